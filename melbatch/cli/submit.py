"""Submit a melbatch job to a Ray cluster through Ray's Job Submission API, and follow it.

Top-down: :func:`submit` checks the job's arguments here, before anything reaches the cluster
(a wrong config fails with the same message as the local command), builds the runtime
environment (this checkout as the working directory, the non-secret S3 settings, an optional
runtime-env YAML), submits ``python jobs/<job>.py ARGS`` with the SDK, streams the job's logs
and returns an exit status: the job's own (the driver's exit code) when it ran, 1 when Ray stopped
or failed it otherwise. Credentials never travel with a job: the cluster's nodes have them
(instance profile, workload identity or a Secret), so no key appears in the job's metadata.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from typing import Any

import yaml
from ray.job_submission import JobSubmissionClient

from melbatch.cli.options import parse_job
from melbatch.config import ConfigError
from melbatch.stages.runs import FORWARDED_ENV

JOBS = ("featurize", "train", "classify", "scan")
# never uploaded with the working directory (Ray also honours .gitignore)
EXCLUDES = [".venv", ".git", "demo-output", "bench-output", "**/__pycache__", "*.parquet", "*.png", "*.html"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def check_args(job: str, args: list[str]) -> None:
    """Parse and validate the job's arguments exactly as the CLI would; raise :class:`ConfigError`."""
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}: choose one of {JOBS}")
    try:
        parse_job(job, args)
    except SystemExit as e:  # argparse already printed what is wrong
        raise ConfigError(f"the arguments of `melbatch {job}` are wrong (see above): {shlex.join(args)}") from e


def runtime_env(working_dir: str, extra: str | None = None) -> dict[str, Any]:
    """This checkout as the working directory, the non-secret storage settings, and ``extra`` (a YAML file)."""
    env: dict[str, Any] = {"working_dir": working_dir, "excludes": list(EXCLUDES)}
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if forwarded:
        env["env_vars"] = forwarded
    if extra:
        with open(extra) as f:
            more = yaml.safe_load(f) or {}
        if not isinstance(more, dict):
            raise ConfigError(f"--runtime-env {extra}: give a YAML mapping (pip:, env_vars:, ...)")
        secrets = [k for k in (more.get("env_vars") or {}) if "SECRET" in k.upper() or k.upper().endswith("KEY_ID")
                   or "TOKEN" in k.upper() or "PASSWORD" in k.upper()]
        if secrets:
            raise ConfigError(f"--runtime-env {extra} puts {secrets} in the job's metadata, which anyone with the "
                              "dashboard can read: give the cluster's nodes the credentials (instance profile, "
                              "workload identity or a Kubernetes Secret) instead")
        env_vars = {**env.get("env_vars", {}), **(more.pop("env_vars", None) or {})}
        env.update(more)
        if env_vars:
            env["env_vars"] = env_vars
    return env


def submit(job: str, args: list[str], address: str | None, working_dir: str = ".", extra_env: str | None = None,
           submission_id: str | None = None, wait: bool = True, out: Any = None) -> int:
    """Submit ``melbatch <job> ARGS`` as a Ray job; with ``wait``, stream its logs and return its exit status."""
    out = out or sys.stdout

    check_args(job, args)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster given: pass --address http://HEAD:8265 (or set RAY_ADDRESS)")
    entrypoint = shlex.join(["python", f"jobs/{job}.py", *args])
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as e:
        raise ConfigError(f"cannot reach Ray's job API at {address} ({e}): is the cluster up, and its dashboard port "
                          "8265 reachable (kubectl port-forward svc/melbatch-head-svc 8265:8265, or `ray dashboard "
                          "infra/ray-cluster.yaml`)?") from None
    job_id = _submit_when_ready(client, entrypoint=entrypoint, runtime_env=runtime_env(working_dir, extra_env),
                                submission_id=submission_id, metadata={"melbatch_job": job})
    print(f"submitted {job_id} to {address}: {entrypoint}", file=out, flush=True)
    if not wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}", file=out)
        return 0
    return follow(client, job_id, out)


def _submit_when_ready(client: Any, ready_s: float = 120.0, **job: Any) -> str:
    """``client.submit_job(**job)``, waiting while a just-started cluster has no job agent yet."""
    deadline = time.monotonic() + ready_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "try again later" in str(e) and time.monotonic() < deadline:
                time.sleep(2.0)  # the nodes are up, their dashboard agents not yet
                continue
            raise ConfigError(f"the cluster did not take the job: {e}") from None


def follow(client: Any, job_id: str, out: Any = None, poll_s: float = 1.0) -> int:
    """Stream ``job_id``'s logs until it ends; its exit status (the driver's exit code, else 1)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream broke (a dashboard restart): fall back to polling the status
        print(f"(log stream ended: {type(e).__name__}: {e}; waiting for the job)", file=out)
    while (info := client.get_job_info(job_id)).status not in TERMINAL:
        time.sleep(poll_s)
    status = str(info.status)
    code = info.driver_exit_code
    print(f"job {job_id}: {status}" + (f" (exit code {code})" if code is not None else "") +
          (f": {info.message}" if info.message and status != "SUCCEEDED" else ""), file=out, flush=True)
    if status == "SUCCEEDED":
        return 0
    return code if code not in (None, 0) else 1
