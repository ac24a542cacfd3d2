"""scan: incremental, exactly once through crashes at every phase, leases, conditional commits;
on the local S3 server and on a local folder, with a real local Ray."""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np
import pytest

from melbatch import ledger as mb_ledger
from melbatch import shards, storage
from melbatch.cli import commands
from melbatch.config import ClassifyConfig, ScanConfig
from melbatch.listing import LISTING_SCHEMA
from melbatch.stages import scan
from melbatch.testing import archives

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(archive: str, model: str, out: str, **kw) -> ScanConfig:
    return ScanConfig(classify=ClassifyConfig(archive=archive, model=model, out=out, files_per_task=2,
                                              max_quarantine_rate=1.0), **kw)


def _add(archive: str, n_per_class: int, seed: int) -> list[archives.SampleFile]:
    """More engine recordings under ``archive`` (names carry the seed, so batches never collide)."""
    files = archives.make_archive(f"{archive}-tmp{seed}", "engine", files_per_class=n_per_class, seconds=3.0,
                                 seed=seed)
    moved = []
    for f in files:
        name = f.uri.rsplit("/", 1)[-1].replace("_", f"_s{seed}_", 1)
        dst = storage.join(archive, f.label, name)
        storage.write_bytes(dst, storage.read_bytes(f.uri))
        moved.append(archives.SampleFile(storage.canonical(dst), f.label, f.bad_kind))
    return moved


def _read_by_run(out: str, summary: scan.Summary) -> set[str]:
    """The objects a run actually read: its attempt's classified + quarantined inputs."""
    if summary.attempt is None:
        return set()
    root = storage.join(out, summary.attempt)
    return ({r["uri"] for r in shards.read_tables(root, "files").to_pylist()}
            | set(shards.read_quarantine(root).column("uri").to_pylist()))


def _assert_exactly_once(out: str, live: set[str]) -> None:
    table = mb_ledger.current(out)
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) and set(uris) == live
    assert all(p is not None for p, s in zip(table.column("probability").to_pylist(),
                                             table.column("status").to_pylist(), strict=True) if s == "classified")
    # the newest ledger itself holds each verdict: results read that one file, not the attempts' files/
    held = {r["uri"]: r for r in mb_ledger.latest_ledger(out).to_pylist()}
    for r in table.to_pylist():
        assert (held[r["uri"]]["label"], held[r["uri"]]["reason"]) == (r["label"], r["reason"])
        assert (r["label"] is None) == (r["status"] != "classified") and held[r["uri"]]["clips"] == r["clips"]


@pytest.mark.s3
def test_only_new_objects_are_read_results_hold_the_union_and_a_quiet_night_is_a_noop(engine_model):
    b = engine_model
    archive, out, model = f"{b}/scan-archive", f"{b}/scan-out", f"{b}/model"
    first_files = _add(archive, 2, seed=1)
    s1 = scan.run(_cfg(archive, model, out), progress=False)
    assert s1.run_id == "000001" and s1.counts["new"] == 4 and s1.counts["classified"] == 4
    assert _read_by_run(out, s1) == {f.uri for f in first_files}
    more = _add(archive, 1, seed=2)
    s2 = scan.run(_cfg(archive, model, out), progress=False)
    assert (s2.counts["new"], s2.counts["unchanged"], s2.counts["changed"]) == (2, 4, 0)
    assert _read_by_run(out, s2) == {f.uri for f in more}  # the unchanged four were not read
    _assert_exactly_once(out, {f.uri for f in first_files + more})
    s3 = scan.run(_cfg(archive, model, out), progress=False)
    assert s3.counts["unchanged"] == 6 and s3.counts["new"] == s3.counts["classified"] == 0
    assert s3.attempt is None and s3.ledger == s2.ledger
    summary = json.loads(storage.read_bytes(f"{out}/runs/000003/summary.json"))
    assert {"new", "changed", "deleted", "unchanged", "quarantined"} <= set(summary["counts"])
    # the CLI reader: one csv row per live object with uri,label,probability; verdicts right
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        assert commands.main(["results", out, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert {"uri", "label", "probability"} <= set(rows[0]) and len(rows) == 6
    truth = {f.uri: f.label for f in first_files + more}
    assert sum(r["label"] == truth[r["uri"]] for r in rows) >= 5


def test_changed_objects_are_reclassified_and_deleted_ones_marked(engine_model, tmp_path):
    model = f"{engine_model}/model"
    archive, out = str(tmp_path / "archive"), str(tmp_path / "out")
    files = _add(archive, 2, seed=3)
    scan.run(_cfg(archive, model, out), progress=False)
    changed, gone = files[0], files[1]
    x = archives.engine_sound(np.random.default_rng(99), 4.0, 16000, changed.label == "faulty")
    storage.write_bytes(changed.uri, archives.encode(x, 16000, archives.FORMATS[1]))  # same key, new bytes
    storage.delete([gone.uri])
    s = scan.run(_cfg(archive, model, out), progress=False)
    assert (s.counts["changed"], s.counts["deleted"], s.counts["unchanged"], s.counts["new"]) == (1, 1, 2, 0)
    assert _read_by_run(out, s) == {changed.uri}
    _assert_exactly_once(out, {f.uri for f in files} - {gone.uri})
    ledger = {r["uri"]: r for r in mb_ledger.read_ledger(out, mb_ledger.read_summary(out, s.run_id)).to_pylist()}
    assert ledger[gone.uri]["status"] == "deleted" and ledger[changed.uri]["run_id"] == s.run_id
    assert ledger[changed.uri]["size"] == storage.filesystem(changed.uri)[0].size(storage.filesystem(changed.uri)[1])


PHASES = ["scan:listing", "scan:inference", "classify:batch", "scan:written", "scan:commit", "scan:committed"]


def test_a_crash_at_any_phase_leaves_every_object_exactly_once(engine_model, tmp_path, monkeypatch):
    """For each phase in turn: new objects arrive, a scan crashes there, the next scan completes;
    every object is then in the results exactly once and crashed attempts are collected."""
    model = f"{engine_model}/model"
    archive, out = str(tmp_path / "archive"), storage.canonical(str(tmp_path / "out"))
    live = {f.uri for f in _add(archive, 1, seed=4)}
    scan.run(_cfg(archive, model, out), progress=False)
    for i, phase in enumerate(PHASES):
        live |= {f.uri for f in _add(archive, 2, seed=10 + i)}  # 4 new objects: 2 batches of 2
        before = mb_ledger.committed_runs(out)
        monkeypatch.setenv("MELBATCH_CRASH_AT", phase)
        with pytest.raises(RuntimeError, match=f"injected crash at {phase}"):
            scan.run(_cfg(archive, model, out), progress=False)
        monkeypatch.delenv("MELBATCH_CRASH_AT")
        after_crash = mb_ledger.committed_runs(out)
        assert after_crash == before + ([f"{len(before) + 1:06d}"] if phase == "scan:committed" else []), phase
        again = scan.run(_cfg(archive, model, out), progress=False)
        assert again.run_id == f"{len(after_crash) + 1:06d}", phase
        assert again.counts["new"] == (0 if phase == "scan:committed" else 4), phase
        if phase == "classify:batch":
            assert again.resumed_batches >= 1, phase  # batches written before the crash were not redone
        _assert_exactly_once(out, live)
        attempts = {storage.relative(u, storage.join(out, "attempts")).split("/")[0]
                    for u in storage.list_files(storage.join(out, "attempts"))}
        named = {mb_ledger.read_summary(out, r).get("attempt") for r in mb_ledger.committed_runs(out)} - {None}
        assert {f"attempts/{a}" for a in attempts} == named, phase  # crashed attempts were collected


def test_a_second_scan_is_refused_while_the_lease_lasts_and_a_dead_ones_expires(engine_model, tmp_path):
    model = f"{engine_model}/model"
    archive, out = str(tmp_path / "archive"), str(tmp_path / "out")
    _add(archive, 1, seed=6)
    other = scan.Lease(storage.canonical(out), ttl_s=600).acquire()
    with pytest.raises(scan.ScanBusyError, match="holds"):
        scan.run(_cfg(archive, model, out), progress=False)
    assert commands.main(["scan", archive, model, out, "--no-progress"]) == 5
    other.release()
    dead = scan.Lease(storage.canonical(out), ttl_s=0.5).acquire()
    dead._stop.set()  # a crashed scan: it never renews and never releases
    time.sleep(0.6)
    assert scan.run(_cfg(archive, model, out), progress=False).counts["new"] == 2


def test_commit_is_conditional_and_a_lost_reply_is_recognised(tmp_path, bucket):
    for out in (str(tmp_path / "out"), f"{bucket}/out"):
        mine = scan.Summary(run_id="000007", archive="a", out=out, model_id="m", config_hash="h")
        scan.commit(out, mine)
        scan.commit(out, mine)  # our own create whose reply was lost: same nonce, fine
        theirs = scan.Summary(run_id="000007", archive="a", out=out, model_id="m", config_hash="h")
        with pytest.raises(scan.ScanBusyError, match="committed by another scan"):
            scan.commit(out, theirs)
        assert json.loads(storage.read_bytes(f"{out}/runs/000007/summary.json"))["nonce"] == mine.nonce


def test_storage_create_exclusive_on_s3_and_locally(tmp_path, bucket):
    for uri in (str(tmp_path / "x.json"), f"{bucket}/x.json"):
        assert storage.create_exclusive(uri, b"one") is True
        assert storage.create_exclusive(uri, b"two") is False
        assert storage.read_bytes(uri) == b"one"


def test_diff_sorts_by_identity_and_rescans_only_when_asked():
    import pyarrow as pa

    ledger = pa.Table.from_pylist([
        {"uri": "s3://a/same.wav", "etag": "e1", "size": 10, "status": "classified", "run_id": "000001",
         "attempt": "attempts/x", "model_id": "old"},
        {"uri": "s3://a/edited.wav", "etag": "e2", "size": 10, "status": "classified", "run_id": "000001",
         "attempt": "attempts/x", "model_id": "old"},
        {"uri": "s3://a/broken.wav", "etag": "e3", "size": 5, "status": "quarantined", "run_id": "000001",
         "attempt": "attempts/x", "model_id": "old"},
        {"uri": "s3://a/gone.wav", "etag": "e4", "size": 7, "status": "classified", "run_id": "000001",
         "attempt": "attempts/x", "model_id": "old"},
        {"uri": "s3://a/back.wav", "etag": "e5", "size": 7, "status": "deleted", "run_id": "000001",
         "attempt": "attempts/x", "model_id": "old"},
    ], schema=mb_ledger.LEDGER_SCHEMA)
    listing = pa.Table.from_pylist([
        {"uri": "s3://a/same.wav", "etag": "e1", "size": 10}, {"uri": "s3://a/edited.wav", "etag": "e2b", "size": 10},
        {"uri": "s3://a/broken.wav", "etag": "e3", "size": 5}, {"uri": "s3://a/back.wav", "etag": "e5", "size": 7},
        {"uri": "s3://a/fresh.wav", "etag": "e6", "size": 9}], schema=LISTING_SCHEMA)
    d = scan.diff(listing, ledger, "new-model", rescan_on_model_change=False, retry_quarantined=False)
    names = lambda t: sorted(u.rsplit("/", 1)[-1] for u in t.column("uri").to_pylist())  # noqa: E731
    assert names(d.new) == ["back.wav", "fresh.wav"] and names(d.changed) == ["edited.wav"]
    assert names(d.unchanged) == ["broken.wav", "same.wav"] and d.deleted.column("uri").to_pylist() == ["s3://a/gone.wav"]
    assert [r.uri for r in d.todo] == ["s3://a/back.wav", "s3://a/edited.wav", "s3://a/fresh.wav"]  # in key order
    assert d.todo[1] == storage.ObjectRef("s3://a/edited.wav", "e2b", 10)
    d = scan.diff(listing, ledger, "new-model", rescan_on_model_change=True, retry_quarantined=False)
    assert names(d.rescanned) == ["same.wav"] and names(d.unchanged) == ["broken.wav"]
    d = scan.diff(listing, ledger, "old", rescan_on_model_change=True, retry_quarantined=True)
    assert names(d.rescanned) == ["broken.wav"] and names(d.unchanged) == ["same.wav"]


def test_next_ledger_replaces_what_the_run_read_or_saw_deleted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"etag": "e", "size": 1, "status": "classified", "run_id": "000001", "attempt": "attempts/x", "model_id": "m"}
    ledger = pa.Table.from_pylist([{**row, "uri": f"s3://a/{n}.wav"} for n in ("b", "d", "g", "k")] +
                                  [{**row, "uri": "s3://a/z.wav", "status": "deleted"}], schema=mb_ledger.LEDGER_SCHEMA)
    listing = pa.Table.from_pylist([{"uri": f"s3://a/{n}.wav", "etag": "e2" if n == "d" else "e", "size": 1}
                                    for n in ("a", "b", "c", "d", "k")], schema=LISTING_SCHEMA)
    d = scan.diff(listing, ledger, "m2", rescan_on_model_change=False, retry_quarantined=False)
    y = tmp_path / "attempts" / "y"
    (y / "files").mkdir(parents=True)
    pq.write_table(pa.table({"uri": ["s3://a/c.wav"], "kind": ["corrupt"], "message": ["no header"]}),
                   y / "quarantine.parquet")
    pq.write_table(pa.table({"uri": ["s3://a/a.wav", "s3://a/d.wav"], "label": ["x", "y"],
                             "probability": pa.array([0.75, 0.5], pa.float32()),
                             "clips": pa.array([3, 4], pa.int32())}), y / "files" / "b.parquet")
    (y / "_manifest.json").write_text(json.dumps({"kind": "predictions", "files": ["files/b.parquet"]}))
    after = scan.next_ledger(ledger, d, "000002", "attempts/y", str(tmp_path), "m2").to_pylist()
    verdicts = {r["uri"][-5:]: (r["label"], r["probability"], r["clips"], r["reason"]) for r in after}
    assert verdicts["a.wav"] == ("x", 0.75, 3, None) and verdicts["d.wav"] == ("y", 0.5, 4, None)
    assert verdicts["c.wav"] == (None, None, None, "corrupt: no header")
    assert verdicts["b.wav"] == (None, None, None, None)  # not read by this run: as the ledger had it
    assert [(r["uri"][-5:], r["status"], r["run_id"], r["model_id"], r["etag"]) for r in after] == [
        ("a.wav", "classified", "000002", "m2", "e"),  # new
        ("b.wav", "classified", "000001", "m", "e"),  # unchanged: kept as it was
        ("c.wav", "quarantined", "000002", "m2", "e"),  # new, and quarantined by this run
        ("d.wav", "classified", "000002", "m2", "e2"),  # changed
        ("g.wav", "deleted", "000002", "m", "e"),  # gone since
        ("k.wav", "classified", "000001", "m", "e"),
        ("z.wav", "deleted", "000001", "m", "e")]  # deleted before: stays as it was
    assert all(r["attempt"] == "attempts/y" for r in after if r["run_id"] == "000002" and r["status"] != "deleted")
