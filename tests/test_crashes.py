"""Killed drivers, workers and nodes: the next run converges to the fault-free output (the oracle of
``small_archive``), with every input exactly once, and nothing an interrupted attempt left behind is
visible to readers or survives the next run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SMALL_FEATURIZE_ARGS, small_classify, small_featurize
from outputs import assert_no_garbage, classify_digest, featurize_digest

from melbatch import ledger as mb_ledger
from melbatch import shards, storage
from melbatch.cli import commands
from melbatch.config import ScanConfig
from melbatch.shards import DatasetError
from melbatch.stages import classify, featurize, scan

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]


def _run_killed_at(point: str, argv: list[str], address: str) -> None:
    """Run ``melbatch ARGV`` as its own driver process on the session's Ray, SIGKILLed at ``point``."""
    env = {**os.environ, "MELBATCH_CRASH_AT": f"kill:{point}"}
    done = subprocess.run([sys.executable, "-m", "melbatch.cli", *argv, "--address", address, "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-3000:])


def _plant_garbage(dst: str, folders: tuple[str, ...]) -> None:
    """What an earlier attempt over other inputs left: data files and a part file no run will name."""
    for folder in folders:
        storage.write_bytes(f"{dst}/{folder}/0123456789abcdef0123-00000.parquet", b"PAR1 not a real shard")
    storage.write_bytes(f"{dst}/_parts/0123456789abcdef0123.json", b"{}")


@pytest.fixture(scope="module")
def address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


@pytest.mark.parametrize("point", ["featurize:listed", "featurize:batch", "featurize:written", "featurize:manifest"])
def test_featurize_driver_killed_at_each_point_converges(small_archive, address, point, chaos_log):
    b, _, oracle = small_archive
    dst = f"{b}/features-killed-{point.split(':')[1]}"
    _plant_garbage(dst, ("shards",))
    _run_killed_at(point, ["featurize", f"{b}/archive", dst, *SMALL_FEATURIZE_ARGS], address)
    if point == "featurize:manifest":  # committed before the kill: readers see exactly the oracle already
        assert featurize_digest(dst) == oracle
    else:  # not committed: readers see nothing at all
        with pytest.raises(DatasetError, match="did not finish"):
            shards.open_dataset(dst)
    again = featurize.run(small_featurize(b, dst.rsplit("/", 1)[1]), progress=False)
    if point in ("featurize:written", "featurize:manifest"):
        assert again.resumed_batches == again.batches  # every batch was done: nothing is redone
    assert featurize_digest(dst) == oracle
    assert_no_garbage(dst, ("shards",))
    chaos_log(f"driver SIGKILLed at {point}", 1, 2, "nothing visible until committed; re-run == oracle, "
              "planted orphans deleted")


@pytest.mark.parametrize("point", ["classify:listed", "classify:batch", "classify:written", "classify:manifest"])
def test_classify_driver_killed_at_each_point_converges(small_archive, small_predictions, engine_model, address,
                                                        point, chaos_log):
    b = small_archive[0]
    name = f"pred-killed-{point.split(':')[1]}"
    cfg = small_classify(b, engine_model, name)
    _plant_garbage(cfg.out, shards.PREDICTION_DIRS)
    _run_killed_at(point, ["classify", cfg.archive, cfg.model, cfg.out, "--files-per-task", "3",
                           "--max-quarantine-rate", "1"], address)
    if point == "classify:manifest":
        assert classify_digest(cfg.out) == small_predictions
    else:
        with pytest.raises(DatasetError, match="did not finish"):
            shards.open_dataset(cfg.out)
    again = classify.run(cfg, progress=False)
    if point == "classify:batch":
        assert again.resumed_batches >= 1  # what the killed driver had finished was kept
    assert classify_digest(cfg.out) == small_predictions
    assert_no_garbage(cfg.out, shards.PREDICTION_DIRS)
    chaos_log(f"driver SIGKILLed at {point}", 1, 2, "nothing visible until committed; re-run == oracle, "
              "planted orphans deleted")


def _scan_verdicts(out: str) -> tuple[list, list]:
    rows = mb_ledger.current(out).to_pylist()
    return (sorted((r["uri"], r["etag"], r["label"], round(r["probability"], 5), r["clips"]) for r in rows
                   if r["status"] == "classified"),
            sorted(r["uri"] for r in rows if r["status"] == "quarantined"))


@pytest.mark.parametrize("point", ["scan:commit", "scan:committed"])
def test_scan_driver_killed_before_and_after_its_commit_converges_once_the_lease_lapses(
        small_archive, small_predictions, engine_model, address, capsys, point, chaos_log):
    """A killed scan cannot release its lease: the next scan is refused (exit 5, saying until when)
    until the lease lapses, then it commits exactly the fault-free verdicts, once."""
    b = small_archive[0]
    c = small_classify(b, engine_model, f"scan-killed-{point.split(':')[1]}")
    argv = ["scan", c.archive, c.model, c.out, "--files-per-task", "3", "--max-quarantine-rate", "1",
            "--lease-s", "6"]
    _run_killed_at(point, argv, address)
    assert mb_ledger.committed_runs(c.out) == (["000001"] if point == "scan:committed" else [])
    _, held = scan.Lease(c.out, 6)._latest()
    assert not held["released"] and held["expires_at"] > time.time()  # renewed every 2 s until the kill
    assert commands.main([*argv, "--no-progress"]) == 5
    assert "holds" in capsys.readouterr().err
    time.sleep(max(0.0, held["expires_at"] + 0.5 - time.time()))
    s = scan.run(ScanConfig(classify=c, lease_s=6), progress=False)
    assert s.run_id == ("000002" if point == "scan:committed" else "000001")
    assert s.counts["new"] == (0 if point == "scan:committed" else 17)
    files = [(u, e, lab, p, n) for u, e, lab, p, n in small_predictions["files"]]
    assert _scan_verdicts(c.out) == (files, sorted(u for u, _ in small_predictions["quarantine"]))
    attempts = {storage.relative(u, f"{c.out}/attempts").split("/")[0] for u in storage.list_files(f"{c.out}/attempts")}
    named = {mb_ledger.read_summary(c.out, r).get("attempt") for r in mb_ledger.committed_runs(c.out)} - {None}
    assert {f"attempts/{a}" for a in attempts} == named  # the killed attempt was collected or committed
    chaos_log(f"scan driver SIGKILLed at {point} (lease 6 s)", 1, 3,
              "next scan refused (exit 5) until the lease lapsed, then the oracle's verdicts, each once")


class WorkerKiller:
    """Kills (SIGKILL) the session's Ray worker processes whose title starts with one of ``titles``,
    each ``delay_s`` after it is first seen at work, ``count`` of them in all, from a background
    thread: a worker lost in the middle of its task, as an OOM kill or a lost machine would do it."""

    def __init__(self, titles: tuple[str, ...], count: int, delay_s: float = 0.5) -> None:
        import threading

        import psutil

        self.titles, self.count, self.delay_s = titles, count, delay_s
        self.raylet = psutil.Process(ray_raylet_pid())
        self.killed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        first_seen: dict[int, float] = {}
        while not self._stop.wait(0.05) and len(self.killed) < self.count:
            for p in self.raylet.children():
                try:
                    title = (p.cmdline() or [""])[0]
                except psutil.Error:
                    continue
                if not title.startswith(self.titles):
                    first_seen.pop(p.pid, None)
                    continue
                if time.time() - first_seen.setdefault(p.pid, time.time()) >= self.delay_s:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                        self.killed.append(title)
                        first_seen.pop(p.pid)
                    break


def ray_raylet_pid() -> int:
    import ray

    return ray._private.worker._global_node.all_processes["raylet"][0].process.pid


def test_featurize_survives_workers_killed_mid_task(small_archive, faults, chaos_log):
    """Two featurize workers are killed in the middle of their batches (slow reads keep them busy):
    Ray runs those batches again, and the output equals the fault-free one, every input once."""
    b, files, oracle = small_archive
    faults.inject({"kind": "delay", "seconds": 0.4, "method": "GET", "target": f"^/{b.removeprefix('s3://')}/archive/"})
    with WorkerKiller(("ray::featurize_batch",), count=2) as killer:
        s = featurize.run(small_featurize(b, "features-workers-killed"), progress=False)
    faults.clear()
    assert len(killer.killed) == 2, killer.killed
    assert s.inputs == s.featurized + s.quarantined == len(files)
    assert featurize_digest(f"{b}/features-workers-killed") == oracle
    assert_no_garbage(f"{b}/features-workers-killed", ("shards",))
    chaos_log("featurize workers SIGKILLed mid-task", len(killer.killed), 1, "Ray re-ran their batches; == oracle")


def test_classify_survives_decode_workers_and_the_model_actor_killed_mid_task(small_archive, small_predictions,
                                                                             engine_model, faults, chaos_log):
    b = small_archive[0]
    faults.inject({"kind": "delay", "seconds": 0.4, "method": "GET", "target": f"^/{b.removeprefix('s3://')}/archive/"})
    with WorkerKiller(("ray::MapBatches(decode_batch)",), count=1) as k1, \
            WorkerKiller(("ray::MapWorker(MapBatches(Predictor))",), count=1, delay_s=2.0) as k2:
        s = classify.run(small_classify(b, engine_model, "pred-workers-killed"), progress=False)
    faults.clear()
    assert len(k1.killed) == len(k2.killed) == 1, (k1.killed, k2.killed)
    assert s.inputs == s.classified + s.quarantined == 17
    assert classify_digest(f"{b}/pred-workers-killed") == small_predictions
    assert_no_garbage(f"{b}/pred-workers-killed", shards.PREDICTION_DIRS)
    chaos_log("classify decode worker and model actor SIGKILLed mid-task", 2, 1,
              "task re-run, actor restarted; == oracle")
