"""scan: nightly incremental scans of a growing archive, exactly once.

OUT holds::

    runs/<run_id>/summary.json   the commit of run <run_id> (000001, 000002, ...): created only if
                                 absent (S3 If-None-Match: *, a hard link locally); only these count
    attempts/<run_id>-<key>/     one attempt's data: a classify output of the objects the run covers
                                 (files/, clips/, quarantine.parquet, _manifest.json) and ledger.parquet,
                                 the state of every object after the run
    _lease/<n>.json              who is scanning, until when (generation n; the highest counts)

Top-down (:func:`run`):

1. :func:`preflight` checks the package, ARCHIVE and OUT; a :class:`Lease` is taken (a second scan of
   the same OUT is refused while it lasts; a crashed scan's lease expires).
2. The latest committed run's ledger says what is known; one listing of ARCHIVE says what exists.
   :func:`diff` sorts every object into new / changed (etag or size differ) / unchanged / deleted;
   unchanged objects are never read.
3. The new and changed objects are classified into the attempt folder (classify's pipeline: batches
   named by content, resumable). The attempt folder is named after the run id and the exact work, so a
   crashed scan's next try reuses what it finished and an attempt with other work never mixes in.
4. The new ledger is written, then ``runs/<run_id>/summary.json`` is created conditionally: that
   one write is the commit. Uncommitted attempts are deleted afterwards.

Why exactly once holds: data is only ever written into an attempt folder no committed run names yet,
and readers (:func:`melbatch.ledger.current`, ``melbatch results``) start from the newest *committed* summary and
follow only what it names. A scan killed anywhere before the create leaves no summary, so the next
scan sees the same committed state, computes the same run id and work, and redoes only what is
missing; a scan killed after it is done. S3 has no atomic rename, but it needs none: the commit is the
creation of one small object, which S3 makes conditional and atomic; locally the same holds for
``link(2)``. Two writers computing the same run id cannot both create its summary; a create whose
reply is lost is recognised by reading the summary back and comparing its attempt nonce.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from melbatch import URI, __version__, listing, storage
from melbatch.config import SCHEMA_VERSION, ScanConfig
from melbatch.ledger import (
    ATTEMPTS,
    LEASE,
    LEDGER,
    LEDGER_SCHEMA,
    RUNS,
    SUMMARY,
    VERDICT_SCHEMA,
    attempt_verdicts,
    committed_runs,
    read_ledger,
    read_summary,
    write_ledger,
)
from melbatch.shards import QUARANTINE
from melbatch.stages import classify
from melbatch.stages.runs import audio_line, content_id, crash_point, label_lines, listing_lines, quarantine_lines


class ScanBusyError(RuntimeError):
    """Another scan holds OUT (its lease has not expired), or committed this run first."""


# --------------------------------------------------------------------------------------------- lease

@dataclass
class Lease:
    """Who may scan OUT: ``_lease/<generation>.json`` files, the highest generation counts.

    Taking or renewing the lease creates the next generation conditionally, so of two scans that
    race, one wins. A lease ends when released or when ``expires_at`` passes (a crashed scan).
    """

    out: URI
    ttl_s: float
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    generation: int = -1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    lost: bool = False

    def __post_init__(self) -> None:
        self.out = storage.canonical(self.out)

    def _latest(self) -> tuple[int, dict[str, Any] | None]:
        root = storage.join(self.out, LEASE)
        gens = sorted(int(storage.relative(u, root).removesuffix(".json")) for u in storage.list_files(root, ".json"))
        if not gens:
            return -1, None
        return gens[-1], json.loads(storage.read_bytes(storage.join(root, f"{gens[-1]:012d}.json")))

    def _create(self, gen: int, state: dict[str, Any]) -> bool:
        """Create generation ``gen``; a create whose reply was lost is ours if the content is."""
        uri, data = storage.join(self.out, LEASE, f"{gen:012d}.json"), json.dumps(state).encode()
        return storage.create_exclusive(uri, data) or storage.read_bytes(uri) == data

    def acquire(self) -> Lease:
        gen, held = self._latest()
        now = time.time()
        if held and not held.get("released") and held["expires_at"] > now:
            raise ScanBusyError(f"another scan ({held['owner']}, since {_iso(held['acquired_at'])}) holds {self.out} "
                           f"until {_iso(held['expires_at'])}; wait for it, or if it is dead, let its lease expire "
                           f"(or delete {storage.join(self.out, LEASE)}/ to break it)")
        state = {"owner": self.owner, "acquired_at": now, "expires_at": now + self.ttl_s, "released": False}
        if not self._create(gen + 1, state):
            raise ScanBusyError(f"another scan took the lease on {self.out} at the same moment; try again later")
        self.generation = gen + 1
        old = [u for u in storage.list_files(storage.join(self.out, LEASE), ".json")
               if int(storage.relative(u, storage.join(self.out, LEASE)).removesuffix(".json")) < self.generation]
        storage.delete(old)
        self._thread = threading.Thread(target=self._renew_loop, daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            now = time.time()
            ok = self._create(self.generation + 1, {"owner": self.owner, "acquired_at": now,
                                                    "expires_at": now + self.ttl_s, "released": False})
            if not ok:
                self.lost = True
                return
            self.generation += 1

    def check(self) -> None:
        """Raise unless this scan still holds the lease (called before committing)."""
        _, held = self._latest()
        if self.lost or not held or held["owner"] != self.owner or held.get("released"):
            raise ScanBusyError(f"this scan lost its lease on {self.out} (another scan took over after it expired); "
                           "nothing was committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if not self.lost and self.generation >= 0:
            self._create(self.generation + 1, {"owner": self.owner, "acquired_at": time.time(), "expires_at": 0,
                                               "released": True})


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --------------------------------------------------------------------------------------------- state

@dataclass(frozen=True)
class Diff:
    """A listing sorted against the ledger, as tables (an archive of millions of objects stays columns:
    only the objects to read become Python objects, in :attr:`todo`)."""

    new: pa.Table  # listing rows (listing.LISTING_SCHEMA)
    changed: pa.Table
    unchanged: pa.Table
    rescanned: pa.Table  # unchanged, but a new model / a retry
    deleted: pa.Table  # ledger rows of objects that are gone

    @cached_property
    def todo_table(self) -> pa.Table:
        return pa.concat_tables([self.new, self.changed, self.rescanned]).sort_by("uri")

    @cached_property
    def todo(self) -> list[storage.ObjectRef]:
        return listing.refs_of(self.todo_table)


def diff(listing: pa.Table, ledger: pa.Table, model_id: str, rescan_on_model_change: bool,
         retry_quarantined: bool, unread: tuple[URI, ...] = ()) -> Diff:
    """Sort the listing (a :data:`~melbatch.listing.LISTING_SCHEMA` table) against the ledger: only
    identity (uri, etag, size) decides, never content. Column operations throughout: a hash lookup of
    each listed uri among the ledger's live rows, then masks. Objects under ``unread`` (folders the
    listing could not read: a mount gone, permission denied) are not taken for deleted: they keep
    their rows until a scan reads their folder again."""
    live = ledger.filter(pc.not_equal(ledger["status"], "deleted"))
    at = pc.index_in(listing["uri"], value_set=live["uri"].combine_chunks())  # its row in `live`; null: new
    known = pc.is_valid(at)

    def was(column: str) -> pa.ChunkedArray:
        return live[column].take(at)

    changed = pc.fill_null(pc.and_(known, pc.or_(pc.not_equal(was("etag"), listing["etag"]),
                                                 pc.not_equal(was("size"), listing["size"]))), False)
    same = pc.and_(known, pc.invert(changed))
    again = pc.and_(pc.equal(was("status"), "quarantined"), pa.scalar(retry_quarantined))
    if rescan_on_model_change:
        other_model = pc.and_(pc.equal(was("status"), "classified"), pc.not_equal(was("model_id"), model_id))
        again = pc.or_(again, other_model)
    rescanned = pc.and_(same, pc.fill_null(again, False))
    gone = pc.invert(pc.is_in(live["uri"], value_set=listing["uri"].combine_chunks()))
    for prefix in unread:
        gone = pc.and_(gone, pc.invert(pc.starts_with(live["uri"], prefix)))
    return Diff(new=listing.filter(pc.invert(known)), changed=listing.filter(changed),
                unchanged=listing.filter(pc.and_(same, pc.invert(rescanned))), rescanned=listing.filter(rescanned),
                deleted=live.filter(gone).sort_by("uri"))


def next_ledger(ledger: pa.Table, d: Diff, run_id: str, attempt: URI, out: URI, model_id: str) -> pa.Table:
    """The state after this run: earlier rows, with the objects this run classified, quarantined or
    saw deleted replaced (with their verdicts); sorted by uri. Column operations: no Python object
    per row."""
    todo = d.todo_table
    n = todo.num_rows
    verdicts = attempt_verdicts(storage.join(out, attempt)) if n else VERDICT_SCHEMA.empty_table()
    at = pc.index_in(todo["uri"], value_set=verdicts["uri"].combine_chunks())

    def same(value: str) -> pa.Array:
        return pa.repeat(pa.scalar(value, pa.string()), n)

    bad = pc.fill_null(pc.is_valid(verdicts["reason"].take(at)), False)
    read = pa.table({"uri": todo["uri"], "etag": todo["etag"], "size": todo["size"],
                     "status": pc.if_else(bad, "quarantined", "classified"),
                     "run_id": same(run_id), "attempt": same(attempt), "model_id": same(model_id),
                     **{name: verdicts[name].take(at) for name in VERDICT_SCHEMA.names[1:]}})
    gone = d.deleted.set_column(d.deleted.schema.get_field_index("status"), "status",
                                pa.repeat(pa.scalar("deleted"), d.deleted.num_rows))
    gone = gone.set_column(gone.schema.get_field_index("run_id"), "run_id",
                           pa.repeat(pa.scalar(run_id), gone.num_rows))
    replaced = pa.concat_arrays([c for t in (todo, d.deleted) for c in t["uri"].chunks] or [pa.array([], pa.string())])
    kept = ledger.filter(pc.invert(pc.is_in(ledger["uri"], value_set=replaced)))
    parts = [t.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA) for t in (kept, read, gone)]
    return pa.concat_tables(parts).sort_by("uri")


# --------------------------------------------------------------------------------------------- run

@dataclass
class Summary:
    """One scan; written as ``runs/<run_id>/summary.json`` (its creation is the commit)."""

    run_id: str
    archive: URI
    out: URI
    model_id: str
    config_hash: str
    counts: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # label -> events detected in what this scan read
    quarantine_kinds: dict[str, int] = field(default_factory=dict)
    audio_s: float = 0.0
    started_at: str = ""
    duration_s: float = 0.0
    attempt: str | None = None
    ledger: str | None = None
    resumed_batches: int = 0
    listing: dict[str, dict] = field(default_factory=dict)  # what the listing met: listing.ListingNotes.as_dict()
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def quarantine_rate(self) -> float:
        todo = self.counts.get("classified", 0) + self.counts.get("quarantined", 0)
        return self.counts.get("quarantined", 0) / todo if todo else 0.0

    def render(self) -> str:
        c = self.counts
        lines = [
            f"scan {self.archive} -> {self.out}  (run {self.run_id}, model {self.model_id})",
            f"  listed       {c['listed']:>8}  = new {c['new']} + changed {c['changed']} + unchanged {c['unchanged']}"
            f" (+ rescanned {c['rescanned']})",
            f"  deleted      {c['deleted']:>8}",
            *listing_lines(self.listing),
            f"  read         {c['classified'] + c['quarantined']:>8}  = classified {c['classified']} + "
            f"quarantined {c['quarantined']}",
            audio_line(self.audio_s, self.duration_s),
        ]
        if self.resumed_batches:
            lines.append(f"  resumed      {self.resumed_batches:>8}  batches an interrupted scan had finished")
        lines += label_lines(self.labels, "files")
        if self.events:
            lines.append(f"  events       {sum(self.events.values()):>8}  ("
                         f"{', '.join(f'{k} {v}' for k, v in sorted(self.events.items()))}; melbatch detections OUT)")
        if self.attempt:
            lines += quarantine_lines(storage.join(self.out, self.attempt, QUARANTINE), self.quarantine_kinds)
        lines.append(f"  summary      {storage.join(self.out, RUNS, self.run_id, SUMMARY)}")
        return "\n".join(lines)


def preflight(cfg: ScanConfig) -> dict[str, Any]:
    """The model package's meta; ARCHIVE readable, OUT writable (before any lease or cluster work)."""
    return classify.preflight_model(cfg.classify)


def run(cfg: ScanConfig, progress: bool = True) -> Summary:
    """One scan of ``cfg.classify.archive`` into ``cfg.classify.out``; returns the committed summary."""
    t0 = time.perf_counter()
    meta = preflight(cfg)
    out = storage.canonical(cfg.classify.out)
    lease = Lease(out, cfg.lease_s).acquire()
    try:
        runs = committed_runs(out)
        before = read_summary(out, runs[-1]) if runs else None
        ledger = read_ledger(out, before)
        run_id = f"{int(runs[-1]) + 1 if runs else 1:06d}"
        crash_point("scan:listing")
        notes = listing.ListingNotes()
        listed = classify.list_archive(cfg.classify, notes=notes)
        d = diff(listed, ledger, meta["model_id"], cfg.rescan_on_model_change, cfg.retry_quarantined,
                 tuple(notes.unreadable_uris))
        summary = Summary(run_id=run_id, archive=storage.canonical(cfg.classify.archive), out=out,
                          model_id=meta["model_id"], config_hash=meta["config_hash"],
                          started_at=_iso(time.time()), listing=notes.as_dict())
        work = [f"todo\t{r.key()}" for r in d.todo] + [f"deleted\t{u}" for u in d.deleted["uri"].to_pylist()]
        key = content_id(f"scan {run_id} {meta['model_id']}", work)[:16]
        attempt = f"{ATTEMPTS}/{run_id}-{key}"
        result = None
        if d.todo:
            crash_point("scan:inference")
            result = classify.classify_objects(cfg.classify, meta, d.todo, storage.join(out, attempt), progress)
            summary.labels, summary.quarantine_kinds = result.labels, result.quarantine_kinds
            summary.events = result.events
            summary.audio_s, summary.resumed_batches = result.audio_s, result.resumed_batches
        crash_point("scan:written")
        if d.todo or d.deleted.num_rows:
            write_ledger(storage.join(out, attempt, LEDGER), next_ledger(ledger, d, run_id, attempt, out,
                                                                         meta["model_id"]))
            summary.ledger = f"{attempt}/{LEDGER}"
        else:
            summary.ledger = before.get("ledger") if before else None
        summary.attempt = attempt if d.todo else None
        summary.counts = {"listed": len(listed), "new": len(d.new), "changed": len(d.changed),
                          "unchanged": len(d.unchanged), "rescanned": len(d.rescanned), "deleted": len(d.deleted),
                          "classified": result.classified if result else 0,
                          "quarantined": result.quarantined if result else 0,
                          "clips": result.clips if result else 0}
        summary.duration_s = time.perf_counter() - t0
        crash_point("scan:commit")
        lease.check()
        commit(out, summary)
        crash_point("scan:committed")
        _collect_attempts(out, [*runs, run_id])
    finally:
        lease.release()
    return summary


def commit(out: URI, summary: Summary) -> None:
    """Create ``runs/<run_id>/summary.json`` if absent. If it exists, it is ours only when its nonce is
    (a lost reply to our own create); otherwise another scan committed this run first."""
    data = json.dumps({"schema_version": SCHEMA_VERSION, "melbatch_version": __version__, **asdict(summary)},
                      indent=2, sort_keys=True).encode()
    uri = storage.join(out, RUNS, summary.run_id, SUMMARY)
    if storage.create_exclusive(uri, data):
        return
    if json.loads(storage.read_bytes(uri)).get("nonce") != summary.nonce:
        raise ScanBusyError(f"run {summary.run_id} of {out} was committed by another scan while this one ran; this "
                       "scan's work is not committed (the next scan starts from that run)")


def _collect_attempts(out: URI, runs: list[str]) -> None:
    """Delete the attempt folders no committed run names (crashed or superseded tries).

    One delimited listing of ``attempts/`` (not of every file in it), and only the summaries of the
    committed runs an attempt folder claims (``<run_id>-<key>``) are read, in parallel."""
    root = storage.join(out, ATTEMPTS)
    names = storage.list_names(root)
    committed = set(runs)
    claimed = sorted({n.split("-", 1)[0] for n in names} & committed)
    summaries = storage.read_many([storage.join(out, RUNS, r, SUMMARY) for r in claimed])
    keep = {json.loads(data).get("attempt") for data in summaries.values()}
    for name in names:
        if f"{ATTEMPTS}/{name}" not in keep:
            storage.delete_tree(storage.join(root, name))


__all__ = ["Lease", "ScanBusyError", "Summary", "commit", "diff", "run"]
