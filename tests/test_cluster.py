"""A real two-node Ray cluster on this machine, jobs submitted through Ray's Job Submission API.

``ray start --head`` and a second ``ray start --address`` (a worker node with its own resources)
run as separate processes on 127.0.0.1, with token auth on, beside the test session's own Ray.
featurize and classify are submitted with ``melbatch submit`` against the local S3 server; their
manifests record which node ran each batch, and both nodes must have worked. The cluster is
stopped by killing exactly its own processes (``ray stop`` would also stop the session's Ray).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST

from melbatch import cli, samples, shards

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_cluster(temp_dir: str, gcs_port: int) -> None:
    """Kill every process of this cluster (found by its temp dir or GCS port), nothing else."""
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmd or f"127.0.0.1:{gcs_port}" in cmd or f"--gcs_server_port={gcs_port}" in cmd:
            with contextlib.suppress(psutil.Error):
                mine += [p, *p.children(recursive=True)]  # agents and workers rename themselves (ray::...)
    for p in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(mine, timeout=20)


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """(dashboard address, {node_id: "head"|"worker"}) of a fresh two-node cluster."""
    from ray.util.state import list_nodes

    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, agent_head, agent_worker, client = _free_ports(5)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=300000000",
              "--disable-usage-stats"]
    head = [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--include-dashboard=true", f"--dashboard-agent-listen-port={agent_head}",
            f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", '--resources={"head_node": 1}', *common]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agent_worker}",
              '--resources={"worker_node": 1}', *common]
    address = f"http://127.0.0.1:{dash}"
    try:
        for cmd in (head, worker):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        deadline, nodes, error = time.time() + 90, [], None
        while time.time() < deadline:
            try:
                nodes = [n for n in list_nodes(address=address) if n.state == "ALIVE"]
            except Exception as e:  # the dashboard is still starting
                nodes, error = [], e
            if len(nodes) == 2:
                break
            time.sleep(1)
        assert len(nodes) == 2, f"the cluster did not come up with 2 nodes: {nodes} (last error: {error})"
        roles = {n.node_id: "head" if "head_node" in (n.resources_total or {}) else "worker" for n in nodes}
        assert sorted(roles.values()) == ["head", "worker"]
        yield address, roles
    finally:
        _kill_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, job: str, args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["submit", job, "--address", address, "--working-dir", str(ROOT), "--", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_featurize_and_classify_jobs_run_on_both_nodes(cluster, engine_model, capsys):
    address, roles = cluster
    b = engine_model
    files = samples.make_archive(f"{b}/cluster-archive", "engine", files_per_class=6, seconds=3.0, seed=41, bad=True)

    code, out = _submit(address, "featurize", [f"{b}/cluster-archive", f"{b}/cluster-features", "--clip-s", "2",
                                               "--clip-hop-s", "2", "--n-mels", "64", "--files-per-task", "2",
                                               "--no-progress"], capsys)
    assert code == 0, out
    assert "SUCCEEDED" in out and "inputs" in out  # the job's own summary came back through the log stream
    m = shards.read_manifest(f"{b}/cluster-features")
    assert m["counts"]["inputs"] == len(files) == m["counts"]["featurized"] + m["counts"]["quarantined"]
    assert m["config_hash"] == FAST.hash()
    assert set(m["nodes"]) == set(roles), (m["nodes"], roles)  # batches ran on the head and on the worker
    assert sum(m["nodes"].values()) == -(-len(files) // 2)  # one entry per batch of 2 files

    code, out = _submit(address, "classify", [f"{b}/cluster-archive", f"{b}/model", f"{b}/cluster-predictions",
                                              "--files-per-task", "2", "--cpus-per-actor", "0.5",
                                              "--max-quarantine-rate", "1", "--no-progress"], capsys)
    assert code == 0, out
    p = shards.read_manifest(f"{b}/cluster-predictions")
    assert p["counts"]["inputs"] == len(files) == p["counts"]["classified"] + p["counts"]["quarantined"]
    assert set(p["nodes"]) == set(roles), (p["nodes"], roles)
    verdicts = shards.read_tables(f"{b}/cluster-predictions", "files").column("uri").to_pylist()
    assert sorted(verdicts) == sorted(f.uri for f in files if f.bad_kind is None)


def test_a_failing_job_returns_its_exit_status_and_a_wrong_config_never_reaches_the_cluster(cluster, capsys):
    from ray.job_submission import JobSubmissionClient

    address, _ = cluster
    before = len(JobSubmissionClient(address).list_jobs())
    code, _ = _submit(address, "featurize", ["s3://no-such-bucket-here/x", "s3://no-such-bucket-here/y",
                                             "--n-mels", "4000"], capsys)
    assert code == 2 and len(JobSubmissionClient(address).list_jobs()) == before  # refused here, not submitted
    # an archive that does not exist: the job starts, fails with exit code 3 (storage), and submit says so
    code, out = _submit(address, "featurize", ["s3://no-such-bucket-here/x", "s3://no-such-bucket-here/y"], capsys)
    assert code == 3 and "FAILED" in out and "storage error" in out, out
    for info in JobSubmissionClient(address).list_jobs():  # no credential travels with a job
        meta = json.dumps([info.runtime_env, info.metadata, info.entrypoint])
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in meta and "AWS_SECRET_ACCESS_KEY" not in meta
