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
from typing import Any

import pyarrow as pa

from melbatch import URI, __version__, classify, storage
from melbatch.config import SCHEMA_VERSION, ScanConfig
from melbatch.ledger import (
    ATTEMPTS,
    LEASE,
    LEDGER,
    LEDGER_SCHEMA,
    RUNS,
    SUMMARY,
    committed_runs,
    read_ledger,
    read_summary,
)
from melbatch.runs import audio_line, content_id, crash_point, label_lines, quarantine_lines
from melbatch.shards import QUARANTINE, read_quarantine, write_table


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

@dataclass
class Diff:
    new: list[storage.ObjectRef] = field(default_factory=list)
    changed: list[storage.ObjectRef] = field(default_factory=list)
    unchanged: list[storage.ObjectRef] = field(default_factory=list)
    rescanned: list[storage.ObjectRef] = field(default_factory=list)  # unchanged, but a new model / a retry
    deleted: list[dict[str, Any]] = field(default_factory=list)  # ledger rows of objects that are gone

    @property
    def todo(self) -> list[storage.ObjectRef]:
        return sorted(self.new + self.changed + self.rescanned, key=lambda r: r.uri)


def diff(listing: list[storage.ObjectRef], ledger: pa.Table, model_id: str, rescan_on_model_change: bool,
         retry_quarantined: bool) -> Diff:
    """Sort the listing against the ledger: only identity (uri, etag, size) decides, never content."""
    known = {r["uri"]: r for r in ledger.to_pylist() if r["status"] != "deleted"}
    d = Diff()
    for ref in listing:
        row = known.pop(ref.uri, None)
        if row is None:
            d.new.append(ref)
        elif (row["etag"], row["size"]) != (ref.etag, ref.size):
            d.changed.append(ref)
        elif (rescan_on_model_change and row["status"] == "classified" and row["model_id"] != model_id) or (
                retry_quarantined and row["status"] == "quarantined"):
            d.rescanned.append(ref)
        else:
            d.unchanged.append(ref)
    d.deleted = sorted(known.values(), key=lambda r: r["uri"])
    return d


def next_ledger(ledger: pa.Table, d: Diff, run_id: str, attempt: URI, out: URI, model_id: str) -> pa.Table:
    """The state after this run: earlier rows, with the objects this run classified, quarantined or
    saw deleted replaced."""
    rows = {r["uri"]: r for r in ledger.to_pylist()}
    quarantined = set(read_quarantine(storage.join(out, attempt)).column("uri").to_pylist()) if d.todo else set()
    for ref in d.todo:
        bad = ref.uri in quarantined
        rows[ref.uri] = {"uri": ref.uri, "etag": ref.etag, "size": ref.size, "run_id": run_id, "attempt": attempt,
                         "status": "quarantined" if bad else "classified", "model_id": model_id}
    for row in d.deleted:
        rows[row["uri"]] = {**row, "status": "deleted", "run_id": run_id}
    return pa.Table.from_pylist([rows[u] for u in sorted(rows)], schema=LEDGER_SCHEMA)


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
        listing = classify.list_archive(cfg.classify)
        d = diff(listing, ledger, meta["model_id"], cfg.rescan_on_model_change, cfg.retry_quarantined)
        summary = Summary(run_id=run_id, archive=storage.canonical(cfg.classify.archive), out=out,
                          model_id=meta["model_id"], config_hash=meta["config_hash"],
                          started_at=_iso(time.time()))
        work = [f"todo\t{r.key()}" for r in d.todo] + [f"deleted\t{r['uri']}" for r in d.deleted]
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
        if d.todo or d.deleted:
            write_table(storage.join(out, attempt, LEDGER),
                        next_ledger(ledger, d, run_id, attempt, out, meta["model_id"]))
            summary.ledger = f"{attempt}/{LEDGER}"
        else:
            summary.ledger = before.get("ledger") if before else None
        summary.attempt = attempt if d.todo else None
        summary.counts = {"listed": len(listing), "new": len(d.new), "changed": len(d.changed),
                          "unchanged": len(d.unchanged), "rescanned": len(d.rescanned), "deleted": len(d.deleted),
                          "classified": result.classified if result else 0,
                          "quarantined": result.quarantined if result else 0,
                          "clips": result.clips if result else 0}
        summary.duration_s = time.perf_counter() - t0
        crash_point("scan:commit")
        lease.check()
        commit(out, summary)
        crash_point("scan:committed")
        _collect_attempts(out, {summary.attempt, *(_attempt_of(out, r) for r in runs)})
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


def _attempt_of(out: URI, run_id: str) -> str | None:
    return read_summary(out, run_id).get("attempt")


def _collect_attempts(out: URI, keep: set[str | None]) -> None:
    """Delete attempt folders no committed run names (crashed or superseded tries)."""
    root = storage.join(out, ATTEMPTS)
    stale = [u for u in storage.list_files(root)
             if f"{ATTEMPTS}/{storage.relative(u, root).split('/')[0]}" not in keep]
    storage.delete(stale)


__all__ = ["Lease", "ScanBusyError", "Summary", "commit", "diff", "run"]
