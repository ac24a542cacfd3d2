"""What every batch job shares: joining Ray, content-named batches, part files, garbage.

A job splits its inputs into batches named after their content (:func:`content_id`); a Ray task
writes a batch's outputs under names derived from that id and then its part file
``_parts/<id>.json`` (:func:`write_part`), which marks the batch done. A retried task rewrites the
same names, a re-run skips batches whose part file exists (:func:`read_parts`), and after the
manifest is written, :func:`collect_garbage` deletes what an earlier attempt left that the
manifest does not name.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from melbatch import URI, __version__, console, listing, storage
from melbatch.audio.decode import DecodeError
from melbatch.config import SCHEMA_VERSION
from melbatch.console import shown
from melbatch.shards import QUARANTINE_KINDS, write_manifest, write_quarantine

PARTS_DIR = "_parts"
# Non-secret settings a Ray worker needs to reach the same object store as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 *storage.S3_DEFAULTS,  # and the retry and deadline settings: workers keep the driver's bounds
                 console.VERBOSE_ENV)  # and -v: a submitted job shows Ray's output too


CRASH_ENV = "MELBATCH_CRASH_AT"


def crash_point(name: str) -> None:
    """Fault injection for tests: ``MELBATCH_CRASH_AT=<name>`` raises here; ``kill:<name>`` kills the
    process outright (SIGKILL: no cleanup, no ``finally``), as a lost node or an OOM kill would."""
    spec = os.environ.get(CRASH_ENV, "")
    if spec == f"kill:{name}":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec == name:
        raise RuntimeError(f"injected crash at {name} ({CRASH_ENV}={spec})")


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, or start a local Ray; once per process.

    Ray is imported here, not with the module (~2 s): a run that needs no cluster never pays for it."""
    import ray
    import ray.data  # Ray Data sets up its loggers when imported: quiet_ray_loggers finds them

    if ray.is_initialized():
        return
    console.quiet_ray_startup()
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a submitted Ray job: its runtime env applies already
        env = {}
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=console.verbose(),
             logging_level="INFO" if console.verbose() else "WARNING", configure_logging=True)
    console.quiet_ray_loggers()
    console.quiet_raylet_messages()
    console.quiet_native_stderr()
    print(console.logs_line(), flush=True)


def storage_failure(e: BaseException) -> storage.StorageError | None:
    """The storage error behind a failed Ray task or Ray Data pipeline, if that is what failed it.

    Ray wraps a task's exception (``RayTaskError``, Ray Data's ``UserCodeException``) with the
    remote traceback; the cause alone is what a user needs to read.
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, storage.StorageError) and type(e).__module__ == storage.__name__:
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def stopped_by_storage(stage: str, e: BaseException, dst: URI, batch_ids: set[str]) -> BaseException:
    """What to raise when a run's tasks fail: a storage failure says so, with what is kept; anything
    else is raised as it came.

    What is kept is counted from the part files, which a re-run resumes from, once the run's in-flight
    work has settled: a batch that finished after the failure is kept too. Where the store cannot be
    listed either, the message says so rather than give a number."""
    cause = storage_failure(e)
    if cause is None:
        return e
    try:
        done = f"{len(_part_ids(dst) & batch_ids)} of {len(batch_ids)} batches are done and kept"
    except storage.StorageError:
        done = f"how many of {len(batch_ids)} batches are done and kept could not be listed"
    return type(cause)(f"{stage} stopped: {cause} ({done})")


def this_node() -> str:
    """The id of the Ray node running this code ("local" outside Ray): outputs record where work ran."""
    ray = sys.modules.get("ray")  # not imported: certainly not inside Ray
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"


@dataclass(kw_only=True)
class RunSummary:
    """What one batch run did (featurize and classify; scan keeps classify's in its own record):
    every input ends done (``DONE`` names the field: featurized, classified) or quarantined, once.
    Batch results add up with :meth:`add`, :meth:`close` checks the count, :meth:`render` is the
    console summary."""

    DONE: ClassVar[str]  # the subclass's field of inputs that made output
    LABEL_UNIT: ClassVar[str]  # what the label lines count (clips, files)
    inputs: int = 0
    quarantined: int = 0
    clips: int = 0
    audio_s: float = 0.0
    elapsed_s: float = 0.0
    batches: int = 0
    resumed_batches: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    quarantine_kinds: dict[str, int] = field(default_factory=dict)
    decoders: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> batches it did
    skipped: dict[str, int] = field(default_factory=dict)  # extension -> objects the filters left out
    listing: dict[str, dict] = field(default_factory=dict)  # what the listing met: listing.ListingNotes.as_dict()

    def add(self, result: BatchResult) -> None:
        """A batch's result: its done count, clips, audio and per-key counts."""
        setattr(self, self.DONE, getattr(self, self.DONE) + result.done)
        self.clips += result.clips
        self.audio_s += result.audio_s
        for mine, theirs in ((self.labels, result.labels), (self.decoders, result.decoders),
                             (self.nodes, result.nodes)):
            mine.update(Counter(mine) + Counter(theirs))

    def close(self, quarantine: list[dict[str, Any]], started: float) -> None:
        """The run's quarantine rows are in: count them, check every input is accounted for once."""
        self.quarantined = len(quarantine)
        self.quarantine_kinds = dict(Counter(q["kind"] for q in quarantine))
        assert self.inputs == getattr(self, self.DONE) + self.quarantined, asdict(self)
        self.elapsed_s = time.perf_counter() - started

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.inputs if self.inputs else 0.0

    def render(self) -> str:
        lines = [
            *self._head(),
            f"  inputs       {self.inputs:>8}  = {self.DONE} {getattr(self, self.DONE)} + "
            f"quarantined {self.quarantined}",
            *skipped_lines(self.skipped),
            *listing_lines(self.listing),
            self._clips_line(),
            audio_line(self.audio_s, self.elapsed_s, self._rated_audio_s()),
        ]
        if self.resumed_batches:
            lines.append(f"  resumed      {self.resumed_batches:>8}  of {self.batches} batches were already done")
        lines += label_lines(self.labels, self.LABEL_UNIT)
        return "\n".join(lines + quarantine_lines(self._quarantine_uri(), self.quarantine_kinds))

    def _head(self) -> list[str]:
        raise NotImplementedError

    def _clips_line(self) -> str:
        return f"  clips        {self.clips:>8}"

    def _rated_audio_s(self) -> float | None:
        """The audio the x-realtime rate counts (None: all of it)."""
        return None

    def _quarantine_uri(self) -> URI:
        raise NotImplementedError


def chunked(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i: i + n]


def content_id(salt: str, lines: Iterable[str]) -> str:
    """A 20-hex name for a batch: the same salt (config) and lines (inputs) give the same name."""
    h = hashlib.sha256(salt.encode())
    for line in lines:
        h.update(f"{line}\n".encode())
    return h.hexdigest()[:20]


def quarantine_row(ref: storage.ObjectRef, e: DecodeError) -> dict[str, Any]:
    return {"uri": ref.uri, "etag": ref.etag, "size": ref.size, "kind": e.kind, "message": e.message,
            "decoders_tried": list(e.decoders_tried)}


@dataclass(frozen=True)
class BatchResult:
    """What one batch did: what its task returns, what its part file ``_parts/<id>.json`` stores, what
    :meth:`RunSummary.add` reads. ``done`` counts its inputs that made output (featurized,
    classified); every other input is a row of ``quarantine``."""

    batch: str
    done: int
    clips: int
    audio_s: float
    quarantine: list[dict[str, Any]]
    labels: dict[str, int]  # clips (featurize) or files (classify) per label
    decoders: dict[str, int]
    nodes: dict[str, int]  # Ray node id -> batches (1, or several tasks' chunks)
    task_s: float = 0.0  # featurize: wall time inside the task
    shards: tuple[tuple[str, int], ...] = ()  # featurize: (shard file name, rows)
    events: dict[str, int] = field(default_factory=dict)  # classify: detected events per label
    outputs: dict[str, list[str]] = field(default_factory=dict)  # classify: files written, by folder

    def as_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BatchResult:
        """A part file, also one written before results were typed (its done count under the stage's
        own word, ``featurized`` or ``classified``)."""
        d = json.loads(data)
        if "done" not in d:
            d["done"] = d.pop("featurized", None) if "featurized" in d else d.pop("classified")
        d["shards"] = tuple((name, rows) for name, rows in d.get("shards", ()))
        return cls(**{f: d[f] for f in cls.__dataclass_fields__ if f in d})


def write_part(dst: URI, result: BatchResult) -> None:
    """Mark the batch done; call after its data files are written."""
    storage.write_bytes(storage.join(dst, PARTS_DIR, f"{result.batch}.json"), result.as_json())


def read_parts(dst: URI, batch_ids: set[str]) -> dict[str, BatchResult]:
    """Results of this run's batches that an earlier attempt finished: one listing, one concurrent read."""
    root = storage.join(dst, PARTS_DIR)
    wanted = [storage.join(root, f"{bid}.json") for bid in sorted(_part_ids(dst) & batch_ids)]
    return {(r := BatchResult.from_json(data)).batch: r for data in storage.read_many(wanted).values()}


def _part_ids(dst: URI) -> set[str]:
    """The batch ids with a part file under ``dst``: one listing."""
    root = storage.join(dst, PARTS_DIR)
    return {storage.relative(u, root).removesuffix(".json") for u in storage.list_files(root, ".json")}


def commit(dst: URI, stage: str, quarantine: list[dict[str, Any]], manifest: dict[str, Any],
           folders: Iterable[str], keep: set[str], batch_ids: set[str]) -> None:
    """The end of a featurize or classify run, in the one order that keeps it exactly once: every
    batch is written; then the quarantine table; then the manifest, the commit (readers see the
    output from now on); then the garbage of earlier attempts (:func:`collect_garbage`)."""
    crash_point(f"{stage}:written")
    write_quarantine(dst, quarantine)
    write_manifest(dst, manifest)
    crash_point(f"{stage}:manifest")
    collect_garbage(dst, folders, keep, batch_ids)


def manifest_header(kind: str) -> dict[str, Any]:
    """What every manifest starts with: its schema version, kind, the melbatch that wrote it, and when."""
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "melbatch_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def collect_garbage(dst: URI, folders: Iterable[str], keep: set[str], batch_ids: set[str]) -> None:
    """Delete files under ``dst/<folder>`` that ``keep`` (paths relative to ``dst``) does not name, and
    part files of batches not in ``batch_ids`` (earlier attempts, other inputs)."""
    stale: list[URI] = []
    for folder in folders:
        root = storage.join(dst, folder)
        stale += [u for u in storage.list_files(root) if f"{folder}/{storage.relative(u, root)}" not in keep]
    parts_root = storage.join(dst, PARTS_DIR)
    stale += [u for u in storage.list_files(parts_root)
              if storage.relative(u, parts_root).removesuffix(".json") not in batch_ids]
    try:
        storage.delete(stale)
    except storage.StorageError as e:  # the output is committed already; what is left is invisible to readers
        print(f"warning: could not delete {len(stale)} file(s) that earlier attempts left in {dst} ({e}); "
              "readers never see them, and the next run that commits there deletes them", file=sys.stderr)


def audio_line(audio_s: float, elapsed_s: float, done_s: float | None = None) -> str:
    """``audio  H h  in S s (N x realtime)`` for a run summary; the rate counts ``done_s`` seconds of
    audio (the work this run did, without batches resumed from an earlier one) when given."""
    rt = (audio_s if done_s is None else done_s) / elapsed_s if elapsed_s else 0.0
    return f"  audio        {audio_s / 3600:>8.2f} h  in {elapsed_s:.1f} s ({rt:,.0f}x realtime)"


def skipped_lines(skipped: dict[str, int]) -> list[str]:
    """A summary line for the objects the listing filters left out (none: no line)."""
    if not skipped:
        return []
    kinds = ", ".join(f"{ext} {n}" for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return [f"  skipped      {sum(skipped.values()):>8}  objects the filters leave out (--extensions, --include, "
            f"--exclude): {kinds}"]


def listing_lines(notes: dict[str, dict]) -> list[str]:
    """Warning lines for what a listing met besides the objects it lists (links, loops, unreadable
    folders: :class:`~melbatch.listing.ListingNotes`), one per kind with a few examples; none: no line."""
    return [f"  warning      {v['count']:>8}  {listing.ListingNotes.KINDS[kind]}: "
            f"{', '.join(shown(e) for e in v['examples'])}"
            f"{', ...' if v['count'] > len(v['examples']) else ''}" for kind, v in sorted(notes.items())]


def label_lines(labels: dict[str, int], unit: str) -> list[str]:
    """One summary line per label, most frequent first."""
    return [f"  label {shown(label):<14} {n:>6} {unit}" for label, n in sorted(labels.items(), key=lambda kv: (-kv[1],
                                                                                                          kv[0]))]


def quarantine_lines(table_uri: URI, kinds: dict[str, int]) -> list[str]:
    """Summary lines for a quarantine table: where it is, then each kind with its count and meaning."""
    lines = [f"  quarantine   {table_uri}"] if kinds else []
    for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {kind:<18} {n:>6}  {QUARANTINE_KINDS[kind]}")
    return lines
