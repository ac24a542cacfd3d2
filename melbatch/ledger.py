"""The scan output format, and reading it: committed runs, their summaries, the ledger, the results.

A scan OUT holds ``runs/<run_id>/summary.json`` (the commits), ``attempts/<run_id>-<key>/`` (the data
of one attempt: a classify output and ``ledger.parquet``) and ``_lease/``; ``melbatch.stages.scan`` writes
them (and says why they are exactly once). Readers start from the newest committed summary and
follow only what it names. This module is what ``melbatch results`` and the scan report read with:
storage and Parquet only, no Ray, no model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from melbatch import URI, storage
from melbatch.config import SCHEMA_VERSION, ConfigError
from melbatch.console import shown
from melbatch.shards import META_PREFIX, open_dataset, read_manifest, read_quarantine, read_tables, write_table

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
    # the verdict, kept here so that `melbatch results` reads one file, not every attempt's files/*.parquet
    # (one per work batch): label, probability, clips of a classified object, reason ("kind: message") of a
    # quarantined one. Ledgers written before these columns read them as nulls (see `current`).
    pa.field("label", pa.string()),
    pa.field("probability", pa.float32()),
    pa.field("clips", pa.int32()),
    pa.field("reason", pa.string()),
], metadata={META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()})
VERDICT_SCHEMA = pa.schema([pa.field("uri", pa.string()), *(LEDGER_SCHEMA.field(n) for n in
                                                            ("label", "probability", "clips", "reason"))])
# a ledger is written and read in row groups of this many objects: `melbatch results` streams it one
# row group at a time, so its memory does not grow with the archive
LEDGER_ROW_GROUP_ROWS = 65_536
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
    with storage.arrow_input(storage.join(out, summary["ledger"])) as f:
        return pq.read_table(f, schema=LEDGER_SCHEMA)


def write_ledger(uri: URI, ledger: pa.Table) -> None:
    """A ledger as one Parquet file in row groups of :data:`LEDGER_ROW_GROUP_ROWS`, published atomically."""
    write_table(uri, ledger.cast(LEDGER_SCHEMA), row_group_rows=LEDGER_ROW_GROUP_ROWS)


def _newest_summary(out: URI) -> dict[str, Any]:
    """The summary of the newest committed run of a scan OUT; a clear error before the first."""
    runs = committed_runs(out)
    if not runs:
        raise storage.StorageError(f"{out} has no committed scan yet (no {RUNS}/<run_id>/{SUMMARY}): run "
                                   "`melbatch scan` first")
    return read_summary(out, runs[-1])


def latest_ledger(out: URI) -> pa.Table:
    """The ledger of the newest committed run of a scan OUT; a clear error before the first."""
    return read_ledger(out, _newest_summary(out))


def _latest_ledger_uri(out: URI) -> URI | None:
    """Where the newest committed run's ledger is (``None``: no run has changed anything yet)."""
    summary = _newest_summary(out)
    return storage.join(out, summary["ledger"]) if summary.get("ledger") else None


def _ledger_batches(uri: URI | None, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The ledger at ``uri`` a row group at a time, as :data:`LEDGER_SCHEMA` (only ``columns`` when
    given; columns a ledger written before them lacks read as nulls)."""
    if uri is None:
        return
    names = columns or LEDGER_SCHEMA.names
    with storage.arrow_input(uri, whole=False) as f:  # a row group at a time: the memory results promises
        pf = pq.ParquetFile(f)
        have = [n for n in names if n in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=have, batch_size=LEDGER_ROW_GROUP_ROWS, use_threads=False):
            yield pa.table([batch.column(n) if n in have else pa.nulls(batch.num_rows, LEDGER_SCHEMA.field(n).type)
                            for n in names], schema=pa.schema([LEDGER_SCHEMA.field(n) for n in names]))


def _live(ledger: pa.Table, status: str | None) -> pa.Table:
    """The rows of objects that are not deleted (and are of ``status`` when given)."""
    if status:
        return ledger.filter(pc.equal(ledger.column("status"), status))
    return ledger.filter(pc.not_equal(ledger.column("status"), "deleted"))


def _without_verdict(live: pa.Table) -> pa.ChunkedArray:
    """Rows whose verdict the ledger lacks (written before it held verdicts): to look up in their attempt."""
    classified = pc.equal(live.column("status"), "classified")
    return pc.if_else(classified, pc.is_null(live.column("clips")), pc.is_null(live.column("reason")))


@dataclass(frozen=True)
class Results:
    """The verdict of every live object of a scan OUT (:func:`results`): ``rows`` objects, streamed a
    ledger row group at a time by :meth:`batches` as :data:`RESULTS_SCHEMA` tables."""

    ledger_uri: URI | None
    status: str | None
    rows: int
    uri_width: int  # the longest uri, for aligned text
    older: pa.Table | None = field(repr=False)  # verdicts only attempts hold (ledgers written before)

    def batches(self) -> Iterator[pa.Table]:
        for part in _ledger_batches(self.ledger_uri):
            live = _live(part, self.status)
            if live.num_rows:
                yield _verdicts(live, self.older)


def results(out: URI, status: str | None = None) -> Results:
    """The verdict for every live object (the newest committed run wins): one row per object that is
    not deleted, with ``uri, etag, size, status, label, probability, clips, run_id, model_id`` (label
    and probability empty for quarantined objects, whose ``reason`` says why); only those of ``status``
    when given.

    The newest ledger holds the verdicts: one file, read as columns a row group at a time. A first
    pass over four of its columns counts the rows and finds rows of a ledger written before it held
    verdicts; only those are looked up in the attempts that hold them."""
    out = storage.canonical(out)
    uri = _latest_ledger_uri(out)
    rows, width, older = 0, 0, set()
    for part in _ledger_batches(uri, ["uri", "status", "attempt", "clips", "reason"]):
        live = _live(part, status)
        if not live.num_rows:
            continue
        rows += live.num_rows
        width = max(width, pc.max(pc.utf8_length(live.column("uri"))).as_py())
        older.update(live.filter(_without_verdict(live)).column("attempt").drop_null().unique().to_pylist())
    held = [_keyed(attempt_verdicts(storage.join(out, a)), a) for a in sorted(older)]
    return Results(uri, status, rows, width, pa.concat_tables(held) if held else None)


def current(out: URI, status: str | None = None) -> pa.Table:
    """:func:`results` as one table (for reports and checks; `melbatch results` streams them)."""
    return pa.concat_tables([RESULTS_SCHEMA.empty_table(), *results(out, status).batches()])


def _verdicts(live: pa.Table, older: pa.Table | None) -> pa.Table:
    """Ledger rows of live objects as :data:`RESULTS_SCHEMA`: the verdict from the ledger, else from ``older``."""
    classified = pc.equal(live.column("status"), "classified")
    v = _looked_up(older, live)

    def verdict(name: str) -> pa.ChunkedArray:
        return pc.coalesce(live.column(name), v[name])

    def where(mask: Any, name: str) -> pa.ChunkedArray:
        return pc.if_else(mask, verdict(name), pa.scalar(None, VERDICT_SCHEMA.field(name).type))

    return pa.table({
        "uri": live.column("uri"), "etag": live.column("etag"), "size": live.column("size"),
        "status": live.column("status"), **{n: where(classified, n) for n in ("label", "probability", "clips")},
        "reason": where(pc.invert(classified), "reason"),
        "run_id": live.column("run_id"), "model_id": live.column("model_id"),
    }, schema=RESULTS_SCHEMA)


def attempt_verdicts(root: URI) -> pa.Table:
    """The verdicts of the objects an attempt (a classify output) read (:data:`VERDICT_SCHEMA`): label,
    probability and clips from its ``files/`` rows, the reason ("kind: message") from its quarantine."""
    files = read_tables(root, "files", ["uri", "label", "probability", "clips"])
    quarantine = read_quarantine(root)
    parts = [VERDICT_SCHEMA.empty_table()]
    if files.num_rows:
        parts.append(files.append_column("reason", pa.nulls(files.num_rows, pa.string())).cast(VERDICT_SCHEMA))
    if quarantine.num_rows:
        n = quarantine.num_rows
        parts.append(pa.table({"uri": quarantine.column("uri"), "label": pa.nulls(n, pa.string()),
                               "probability": pa.nulls(n, pa.float32()), "clips": pa.nulls(n, pa.int32()),
                               "reason": pc.binary_join_element_wise(quarantine.column("kind"),
                                                                     quarantine.column("message"), ": ")},
                              schema=VERDICT_SCHEMA))
    return pa.concat_tables(parts)


def _key(table: pa.Table) -> pa.ChunkedArray:
    """Each row's uri and the attempt holding its verdict, as one string."""
    return pc.binary_join_element_wise(table.column("uri"), pc.fill_null(table.column("attempt"), ""), "\n")


def _keyed(verdicts: pa.Table, attempt: str) -> pa.Table:
    return verdicts.append_column("attempt", pa.repeat(pa.scalar(attempt), verdicts.num_rows))


def _looked_up(held: pa.Table | None, live: pa.Table) -> dict[str, pa.ChunkedArray]:
    """The verdict columns of ``held``'s rows (:func:`_keyed` verdicts) for each row of ``live`` (same
    uri and attempt; null where none). Without them (every verdict is in the ledger) no key is built."""
    if held is None:
        return {n: pa.chunked_array([pa.nulls(live.num_rows, VERDICT_SCHEMA.field(n).type)])
                for n in VERDICT_SCHEMA.names[1:]}
    at = pc.index_in(_key(live), value_set=_key(held).combine_chunks())
    return {n: held.column(n).take(at) for n in VERDICT_SCHEMA.names[1:]}


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


def export(table: pa.Table, fmt: str) -> bytes:
    """A table (:func:`current`, or any other) as a file's bytes in ``fmt`` (:func:`write_rows`)."""
    buf = io.BytesIO()
    width = 0
    if fmt == "table" and table.num_rows:
        width = pc.max(pc.utf8_length(table.column("uri"))).as_py()
    write_rows([table], table.schema, fmt, buf, width)
    return buf.getvalue()


def write_rows(batches: Iterable[pa.Table], schema: pa.Schema, fmt: str, sink: IO[bytes], uri_width: int = 0) -> int:
    """Write tables of ``schema`` to ``sink`` one after another, as one file: ``table`` (aligned text
    for a terminal; the uri column ``uri_width`` wide), ``csv``, ``json`` (one object per line) or
    ``parquet``. Only one table is in memory at a time; returns the rows written."""
    if fmt not in RESULT_FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {RESULT_FORMATS}")
    rows = 0
    if fmt in ("parquet", "csv"):
        with pq.ParquetWriter(sink, schema) if fmt == "parquet" else pacsv.CSVWriter(sink, schema) as writer:
            for t in batches:
                writer.write_table(t.cast(schema))
                rows += t.num_rows
        return rows
    w = max(len("uri"), uri_width)
    if fmt == "table":
        sink.write(f"{'uri':<{w}}  {'status':<11}  {'label':<14}  {'prob':>5}  run\n".encode())
    for t in batches:
        lines = []
        for r in t.to_pylist():
            if fmt == "json":
                lines.append(json.dumps(r))
                continue
            prob = f"{r['probability']:.3f}" if r["probability"] is not None else ""
            lines.append(f"{shown(r['uri']):<{w}}  {r['status']:<11}  {shown(r['label'] or ''):<14}  {prob:>5}  "
                         f"{r['run_id']}")
        if lines:
            sink.write(("\n".join(lines) + "\n").encode())
        rows += t.num_rows
    return rows
