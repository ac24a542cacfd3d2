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

from melbatch import shards
from melbatch.cli import commands
from melbatch.testing import archives

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


def _alive_nodes(address: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address) if n.state == "ALIVE"]


def _wait_for_nodes(address: str, n: int) -> list:
    deadline, nodes, error = time.time() + 90, [], None
    while time.time() < deadline:
        try:
            nodes = _alive_nodes(address)
        except Exception as e:  # the dashboard is still starting
            nodes, error = [], e
        if len(nodes) == n:
            return nodes
        time.sleep(1)
    raise AssertionError(f"the cluster did not come up with {n} nodes: {nodes} (last error: {error})")


def _worker_node_processes() -> list[psutil.Process]:
    """The worker node's raylet (it alone has the worker_node resource) and everything it started."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("/raylet") and any("worker_node,1" in c for c in cmd):
            with contextlib.suppress(psutil.Error):
                procs += [p, *p.children(recursive=True)]
    return procs


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """(dashboard address, {node_id: "head"|"worker"}, start_worker) of a fresh two-node cluster;
    ``start_worker()`` adds the worker node again after a test killed it."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, agent_head, agent_worker, client = _free_ports(5)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0",
           # a lost node is noticed within seconds (default: about 30 s of missed health checks)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=300000000",
              "--disable-usage-stats"]
    head = [RAY, "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--include-dashboard=true", f"--dashboard-agent-listen-port={agent_head}",
            f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", '--resources={"head_node": 1}', *common]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agent_worker}",
              '--resources={"worker_node": 1}', *common]
    address = f"http://127.0.0.1:{dash}"

    def start(cmd: list[str]) -> None:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def start_worker() -> None:
        start(worker)
        _wait_for_nodes(address, 2)

    try:
        start(head)
        start(worker)
        nodes = _wait_for_nodes(address, 2)
        roles = {n.node_id: "head" if "head_node" in (n.resources_total or {}) else "worker" for n in nodes}
        assert sorted(roles.values()) == ["head", "worker"]
        yield address, roles, start_worker
    finally:
        _kill_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, job: str, args: list[str], capsys) -> tuple[int, str]:
    code = commands.main(["submit", job, "--address", address, "--working-dir", str(ROOT), "--", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_featurize_and_classify_jobs_run_on_both_nodes(cluster, engine_model, capsys):
    address, roles, _ = cluster
    b = engine_model
    files = archives.make_archive(f"{b}/cluster-archive", "engine", files_per_class=6, seconds=3.0, seed=41, bad=True)

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
    noise = [n for n in ("Execution plan", "Starting execution", "pid=", "core_worker") if n in out]
    assert not noise and "Ray's logs: " in out, (noise, out)  # the job streams melbatch's lines, not Ray's
    p = shards.read_manifest(f"{b}/cluster-predictions")
    assert p["counts"]["inputs"] == len(files) == p["counts"]["classified"] + p["counts"]["quarantined"]
    assert set(p["nodes"]) == set(roles), (p["nodes"], roles)
    verdicts = shards.read_tables(f"{b}/cluster-predictions", "files").column("uri").to_pylist()
    assert sorted(verdicts) == sorted(f.uri for f in files if f.bad_kind is None)


def test_a_failing_job_returns_its_exit_status_and_a_wrong_config_never_reaches_the_cluster(cluster, capsys):
    from ray.job_submission import JobSubmissionClient

    address, _, _ = cluster
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


def _title(p: psutil.Process) -> str:
    """The process title (what Ray sets, e.g. ``ray::decode_batch``), or "" for a process that ended
    or is a zombie meanwhile."""
    try:
        return (p.cmdline() or [""])[0]
    except psutil.Error:
        return ""


def _submit_and_kill_the_worker_node(address: str, job: str, args: list[str], title: str, capsys) -> tuple[int, str]:
    """Submit a job, kill the whole worker node (raylet, workers, agents) as soon as it runs ``title``
    there, and return the job's exit status and log once it ends."""
    import threading

    result: dict = {}
    t = threading.Thread(target=lambda: result.update(code=commands.main(
        ["submit", job, "--address", address, "--working-dir", str(ROOT), "--", *args])))
    t.start()
    deadline, killed = time.time() + 120, []
    while not killed and time.time() < deadline and t.is_alive():
        if any(_title(p).startswith(title) for p in _worker_node_processes()):
            time.sleep(0.5)  # in the middle of its work
            for p in _worker_node_processes():
                with contextlib.suppress(psutil.Error):
                    p.kill()
                    killed.append(p.pid)
        time.sleep(0.1)
    t.join(300)
    out = capsys.readouterr()
    assert killed, "the worker node never ran " + title
    return result.get("code", -1), out.out + out.err


@pytest.mark.chaos
def test_a_worker_node_lost_in_the_middle_of_featurize_and_classify(cluster, small_archive, small_predictions,
                                                                   engine_model, faults, capsys, chaos_log):
    """The worker node dies (every process of it, SIGKILL) while it runs featurize batches, and again
    while it decodes for classify: the jobs finish on the head and commit the fault-free output."""
    from conftest import SMALL_FEATURIZE_ARGS
    from outputs import assert_no_garbage, classify_digest, featurize_digest

    address, _, start_worker = cluster
    b, _, oracle = small_archive
    # slow reads keep every batch busy for a second or more, so the node dies mid-work
    faults.inject({"kind": "delay", "seconds": 0.4, "method": "GET", "target": f"^/{b.removeprefix('s3://')}/archive/"})
    code, out = _submit_and_kill_the_worker_node(
        address, "featurize", [f"{b}/archive", f"{b}/features-node-lost", *SMALL_FEATURIZE_ARGS, "--no-progress"],
        "ray::featurize_batch", capsys)
    assert code == 0, out
    assert featurize_digest(f"{b}/features-node-lost") == oracle
    assert_no_garbage(f"{b}/features-node-lost", ("shards",))
    assert len(_alive_nodes(address)) == 1

    start_worker()
    code, out = _submit_and_kill_the_worker_node(
        address, "classify", [f"{b}/archive", f"{engine_model}/model", f"{b}/pred-node-lost", "--files-per-task", "3",
                              "--max-quarantine-rate", "1", "--cpus-per-actor", "0.5", "--no-progress"],
        "ray::MapBatches(decode_batch)", capsys)
    faults.clear()
    assert code == 0, out
    assert classify_digest(f"{b}/pred-node-lost") == small_predictions
    assert_no_garbage(f"{b}/pred-node-lost", shards.PREDICTION_DIRS)
    chaos_log("a whole worker node SIGKILLed mid-job (featurize, then classify)", 2, 2,
              "both jobs finished on the head; outputs == oracle")
