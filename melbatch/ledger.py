"""The scan output format, and reading it: committed runs, their summaries, the ledger, the results.

A scan OUT holds ``runs/<run_id>/summary.json`` (the commits), ``attempts/<run_id>-<key>/`` (the data
of one attempt: a classify output and ``ledger.parquet``) and ``_lease/``; ``melbatch.scan`` writes
them (and says why they are exactly once). Readers start from the newest committed summary and
follow only what it names. This module is what ``melbatch results`` and the scan report read with:
storage and Parquet only, no Ray, no model.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from melbatch import URI, storage
from melbatch.config import SCHEMA_VERSION, ConfigError
from melbatch.shards import META_PREFIX, open_dataset, read_manifest, read_quarantine, read_tables

RUNS, ATTEMPTS, LEASE = "runs", "attempts", "_lease"
SUMMARY, LEDGER = "summary.json", "ledger.parquet"
STATUSES = ("classified", "quarantined", "deleted")
LEDGER_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # classified | quarantined | deleted
    pa.field("run_id", pa.string(), nullable=False),  # the run that last changed this row
    pa.field("attempt", pa.string()),  # where its verdict or quarantine row lives (relative to OUT)
    pa.field("model_id", pa.string()),
], metadata={META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()})
RESULT_FORMATS = ("table", "csv", "json", "parquet")
RESULTS_SCHEMA = pa.schema([
    pa.field("uri", pa.string()), pa.field("etag", pa.string()), pa.field("size", pa.int64()),
    pa.field("status", pa.string()), pa.field("label", pa.string()), pa.field("probability", pa.float32()),
    pa.field("clips", pa.int32()), pa.field("reason", pa.string()), pa.field("run_id", pa.string()),
    pa.field("model_id", pa.string()),
])


def committed_runs(out: URI) -> list[str]:
    """Run ids with a summary (the commits), oldest first."""
    root = storage.join(storage.canonical(out), RUNS)
    return sorted(storage.relative(u, root).split("/")[0] for u in storage.list_files(root, f"/{SUMMARY}"))


def read_summary(out: URI, run_id: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(out, RUNS, run_id, SUMMARY)))


def read_ledger(out: URI, summary: dict[str, Any] | None) -> pa.Table:
    """The ledger a committed run names (every object's state after it); empty before the first run."""
    if not summary or not summary.get("ledger"):
        return LEDGER_SCHEMA.empty_table()
    with storage.open_input(storage.join(out, summary["ledger"])) as f:
        return pq.read_table(f, schema=LEDGER_SCHEMA)


def latest_ledger(out: URI) -> pa.Table:
    """The ledger of the newest committed run of a scan OUT; a clear error before the first."""
    runs = committed_runs(out)
    if not runs:
        raise storage.StorageError(f"{out} has no committed scan yet (no {RUNS}/<run_id>/{SUMMARY}): run "
                                   "`melbatch scan` first")
    return read_ledger(out, read_summary(out, runs[-1]))


def current(out: URI, status: str | None = None) -> pa.Table:
    """The verdict for every live object (the newest committed run wins): one row per object that is
    not deleted, with ``uri, etag, size, status, label, probability, clips, run_id, model_id`` (label
    and probability empty for quarantined objects, whose ``reason`` says why); only those of ``status``
    when given."""
    out = storage.canonical(out)
    ledger = latest_ledger(out)
    live = ledger.filter(pc.not_equal(ledger.column("status"), "deleted"))
    if status:
        live = live.filter(pc.equal(live.column("status"), status))
    verdicts: dict[str, dict[str, Any]] = {}
    reasons: dict[str, str] = {}
    for attempt in sorted(set(live.column("attempt").drop_null().to_pylist())):
        root = storage.join(out, attempt)
        verdicts.update({r["uri"]: r for r in read_tables(root, "files").to_pylist()})
        reasons.update({q["uri"]: f"{q['kind']}: {q['message']}" for q in read_quarantine(root).to_pylist()})
    rows = []
    for r in live.to_pylist():
        v = verdicts.get(r["uri"]) if r["status"] == "classified" else None
        rows.append({"uri": r["uri"], "etag": r["etag"], "size": r["size"], "status": r["status"],
                     "label": v["label"] if v else None, "probability": v["probability"] if v else None,
                     "clips": v["clips"] if v else None, "reason": reasons.get(r["uri"]) if not v else None,
                     "run_id": r["run_id"], "model_id": r["model_id"]})
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


def live_attempts(out: URI) -> list[tuple[URI, pa.Array]]:
    """Each attempt that holds current verdicts of a scan OUT (newest last), with the live classified
    objects whose verdict it holds: where their clips and file rows are now."""
    out = storage.canonical(out)
    ledger = latest_ledger(out)
    live = ledger.filter(pc.equal(ledger.column("status"), "classified"))
    return [(storage.join(out, attempt), live.filter(pc.equal(live.column("attempt"), attempt)).column("uri")
             .combine_chunks()) for attempt in sorted(set(live.column("attempt").drop_null().to_pylist()))]


def prediction_roots(out: URI) -> list[tuple[URI, pa.Array | None]]:
    """Where the current predictions of OUT live: a classify OUT is one root (all its rows count); a
    scan OUT is each attempt holding current verdicts, newest last, with the live objects whose rows
    count there (:func:`live_attempts`). A clear error for anything else."""
    out = storage.canonical(out)
    manifest = read_manifest(out)
    if manifest and manifest.get("kind") == "predictions":
        open_dataset(out)
        return [(out, None)]
    if committed_runs(out):
        roots = live_attempts(out)
        if not roots:
            raise ConfigError(f"{out}: no object is classified in its newest committed scan")
        return roots
    raise ConfigError(f"{out} is neither a finished classify output (no _manifest.json of kind 'predictions') nor a "
                      "scan output (no runs/*/summary.json): give the OUT of `melbatch classify` or `melbatch scan`")


def predictions(roots: list[tuple[URI, pa.Array | None]], folder: str) -> pa.Table:
    """The ``folder`` rows ("clips", "files" or "detections") of :func:`prediction_roots`, each object's
    from the root that holds its current verdict: what OUT holds now, in the classify output's format
    (an empty table when no root has any)."""
    parts = []
    for root, uris in roots:
        rows = read_tables(root, folder)
        if rows.num_rows:
            parts.append(rows if uris is None else rows.filter(pc.is_in(rows.column("uri"), value_set=uris)))
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})


def export(results: pa.Table, fmt: str) -> bytes:
    """The results table (:func:`current`) as a file's bytes: ``table`` (aligned text for a terminal),
    ``csv``, ``json`` (one object per line) or ``parquet``."""
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(results, buf)
        return buf.getvalue()
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(results, buf)
        return buf.getvalue()
    rows = results.to_pylist()
    if fmt == "json":
        return ("\n".join(json.dumps(r) for r in rows) + ("\n" if rows else "")).encode()
    if fmt != "table":
        raise ValueError(f"format {fmt!r}: choose one of {RESULT_FORMATS}")
    w = max([len("uri"), *(len(r["uri"]) for r in rows)])
    lines = [f"{'uri':<{w}}  {'status':<11}  {'label':<14}  {'prob':>5}  run"]
    for r in rows:
        prob = f"{r['probability']:.3f}" if r["probability"] is not None else ""
        lines.append(f"{r['uri']:<{w}}  {r['status']:<11}  {r['label'] or '':<14}  {prob:>5}  {r['run_id']}")
    return ("\n".join(lines) + "\n").encode()
