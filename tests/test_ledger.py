"""The results of a scanned archive as files: every format `melbatch results --format` offers."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from melbatch import ledger


def _results() -> pa.Table:
    return pa.Table.from_pylist([
        {"uri": "s3://a/x.wav", "etag": "e1", "size": 10, "status": "classified", "label": "faulty",
         "probability": 0.875, "clips": 3, "reason": None, "run_id": "000002", "model_id": "m-1"},
        {"uri": "s3://a/much/longer/name.flac", "etag": "e2", "size": 0, "status": "quarantined", "label": None,
         "probability": None, "clips": None, "reason": "empty: zero bytes", "run_id": "000001", "model_id": "m-1"},
    ], schema=ledger.RESULTS_SCHEMA)


def test_every_format_holds_every_row_and_the_table_lines_up():
    t = _results()
    assert pq.read_table(io.BytesIO(ledger.export(t, "parquet"))).to_pylist() == t.to_pylist()
    rows = list(csv.DictReader(io.StringIO(ledger.export(t, "csv").decode())))
    assert [r["uri"] for r in rows] == t.column("uri").to_pylist() and rows[0]["label"] == "faulty"
    assert [json.loads(line) for line in ledger.export(t, "json").decode().splitlines()] == t.to_pylist()
    lines = ledger.export(t, "table").decode().splitlines()
    assert lines[0].split() == ["uri", "status", "label", "prob", "run"] and len(lines) == 3
    assert lines[1].index("classified") == lines[2].index("quarantined") == lines[0].index("status")
    assert "0.875" in lines[1] and lines[2].rstrip().endswith("000001")
    assert ledger.export(t.slice(0, 0), "json") == b"" and len(ledger.export(t.slice(0, 0), "table").splitlines()) == 1
    with pytest.raises(ValueError, match="choose one of"):
        ledger.export(t, "xml")


LEDGER_AT = "attempts/000002-new/ledger.parquet"


def _scan_out(root, old_attempt: str) -> str:
    """A scan OUT whose newest committed run names the ledger at :data:`LEDGER_AT` (the caller writes
    it); ``old_attempt`` holds the verdicts of a.wav (classified) and b.wav (quarantined) in its files/
    and quarantine, as an attempt does."""
    old = root / old_attempt
    (old / "files").mkdir(parents=True)
    pq.write_table(pa.table({"uri": ["s3://a/a.wav"], "label": ["faulty"],
                             "probability": pa.array([0.75], pa.float32()), "clips": pa.array([4], pa.int32())}),
                   old / "files" / "b0.parquet")
    pq.write_table(pa.table({"uri": ["s3://a/b.wav"], "kind": ["corrupt"], "message": ["no header"]}),
                   old / "quarantine.parquet")
    (old / "_manifest.json").write_text(json.dumps({"kind": "predictions", "files": ["files/b0.parquet"]}))
    (root / "runs" / "000002").mkdir(parents=True)
    (root / "runs" / "000002" / "summary.json").write_text(json.dumps({"ledger": LEDGER_AT}))
    return str(root)


def test_results_stream_a_big_ledger_a_row_group_at_a_time_and_find_older_verdicts(tmp_path, capsys):
    """`melbatch results` holds one ledger row group at a time, whatever the archive's size; rows of a
    ledger written before it held verdicts get theirs from the attempt that holds them."""
    from melbatch.cli import commands
    from melbatch.look import report

    n = 2 * ledger.LEDGER_ROW_GROUP_ROWS + 1000
    status = ["deleted" if i % 10 == 3 else "quarantined" if i % 10 == 7 else "classified" for i in range(n)]
    rows = {"uri": [f"s3://a/x/{i:07d}.wav" for i in range(n)], "etag": ["e"] * n, "size": list(range(n)),
            "status": status, "run_id": ["000002"] * n, "attempt": ["attempts/000002-new"] * n, "model_id": ["m"] * n,
            "label": [("faulty", "healthy")[i % 2] if s == "classified" else None for i, s in enumerate(status)],
            "probability": [0.5 + (i % 50) / 100 if s == "classified" else None for i, s in enumerate(status)],
            "clips": [i % 9 + 1 if s == "classified" else None for i, s in enumerate(status)],
            "reason": ["silent: no sound" if s == "quarantined" else None for s in status]}
    # two rows carried over from a ledger written before it held verdicts: only their attempt has them
    for uri, st in (("s3://a/a.wav", "classified"), ("s3://a/b.wav", "quarantined")):
        for k, v in {"uri": uri, "etag": "e0", "size": 9, "status": st, "run_id": "000001",
                     "attempt": "attempts/000001-old", "model_id": "m0", "label": None, "probability": None,
                     "clips": None, "reason": None}.items():
            rows[k].append(v)
    out = _scan_out(tmp_path, "attempts/000001-old")
    ledger.write_ledger(f"{out}/{LEDGER_AT}", pa.table(rows, schema=ledger.LEDGER_SCHEMA).sort_by("uri"))
    live = [u for u, s in zip(rows["uri"], rows["status"], strict=True) if s != "deleted"]

    found = ledger.results(out)
    batches = list(found.batches())
    assert found.rows == len(live) == sum(b.num_rows for b in batches)
    assert len(batches) == 3 and max(b.num_rows for b in batches) <= ledger.LEDGER_ROW_GROUP_ROWS
    assert found.uri_width == len("s3://a/x/0000000.wav")
    table = ledger.current(out)
    assert table.column("uri").to_pylist() == sorted(live) and table.schema == ledger.RESULTS_SCHEMA
    by_uri = {r["uri"]: r for r in table.slice(0, 2).to_pylist()}
    assert (by_uri["s3://a/a.wav"]["label"], by_uri["s3://a/a.wav"]["clips"]) == ("faulty", 4)
    assert by_uri["s3://a/b.wav"]["reason"] == "corrupt: no header" and by_uri["s3://a/b.wav"]["label"] is None
    row = table.filter(pa.compute.equal(table.column("uri"), "s3://a/x/0000011.wav")).to_pylist()[0]
    assert (row["label"], row["clips"], row["reason"]) == ("healthy", 3, None)
    # the scan report's "Now" folds the same batches: counts, labels, the least sure, the quarantined
    now = report.live_now(found, least=50)
    every = table.to_pylist()
    classified = [r for r in every if r["status"] == "classified"]
    assert now.objects == len(live) and now.statuses["classified"] == len(classified)
    assert now.labels == Counter(r["label"] for r in classified)
    assert now.least_sure == sorted(classified, key=lambda r: (r["probability"], r["uri"]))[:50]
    assert [r["uri"] for r in now.quarantined] == [r["uri"] for r in every if r["status"] == "quarantined"]
    quarantined = rows["status"].count("quarantined")  # b.wav's among them
    assert ledger.results(out, "quarantined").rows == quarantined

    csv_out = tmp_path / "results.csv"
    assert commands.main(["results", out, "--format", "csv", "-o", str(csv_out)]) == 0
    assert f"{len(live)} objects -> {csv_out}" in capsys.readouterr().err
    with open(csv_out, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["uri"] for r in got] == sorted(live) and got[0]["label"] == "faulty"
    assert commands.main(["results", out, "--status", "quarantined"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + quarantined and lines[0].split() == ["uri", "status", "label", "prob", "run"]
    assert {line.index("quarantined") for line in lines[1:]} == {lines[0].index("status")}
    parquet_out = tmp_path / "results.parquet"
    assert commands.main(["results", out, "--format", "parquet", "-o", str(parquet_out)]) == 0
    assert pq.read_table(parquet_out).equals(table)


def test_results_read_a_ledger_written_before_it_held_verdicts(tmp_path):
    """A ledger without the verdict columns at all (written by an older melbatch) still gives results."""
    old = pa.table({"uri": ["s3://a/a.wav", "s3://a/b.wav", "s3://a/c.wav"], "etag": ["e"] * 3, "size": [1, 2, 3],
                    "status": ["classified", "quarantined", "deleted"], "run_id": ["000001"] * 3,
                    "attempt": ["attempts/000001-old"] * 3, "model_id": ["m0"] * 3})
    out = _scan_out(tmp_path, "attempts/000001-old")
    (tmp_path / LEDGER_AT).parent.mkdir(parents=True)
    pq.write_table(old, tmp_path / LEDGER_AT)  # the old layout, as it was
    got = ledger.current(out).to_pylist()
    assert [(r["uri"][-5:], r["status"], r["label"], r["probability"], r["reason"]) for r in got] == [
        ("a.wav", "classified", "faulty", 0.75, None), ("b.wav", "quarantined", None, None, "corrupt: no header")]
