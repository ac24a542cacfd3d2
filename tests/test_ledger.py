"""The results of a scanned archive as files: every format `melbatch results --format` offers."""

from __future__ import annotations

import csv
import io
import json

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
