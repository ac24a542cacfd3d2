"""Detections: when each sound happens in a long recording, from the probabilities of its clips.

Every clip stands for the stretch of time at its centre one clip hop long (the whole clip when clips
do not overlap; the first clip of a file also covers the file's start), so overlapping clips give
finer times, not longer events. For each file and label, the stretches of the clips whose
probability for the label is at least its threshold are merged into events when they touch or
overlap, or are at most ``gap_s`` apart (gap bridging); events shorter than ``min_event_s`` are
dropped. An event has the largest and the mean probability of its clips, and their count.

The tables: ``detections/<batch>.parquet`` of a classify output (:data:`~melbatch.shards.DETECTION_SCHEMA`),
exported as one combined table (CSV, JSON lines, Parquet) or as Raven Pro selection tables, one
tab-separated ``.txt`` per source file (:func:`raven_tables`), the exchange format of bioacoustics.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from melbatch import URI, ledger, storage
from melbatch.config import DEFAULT_THRESHOLD, ConfigError, parse_threshold
from melbatch.shards import DETECTION_DIR, DETECTION_SCHEMA, read_manifest

RULE = ("each clip stands for the clip-hop-long stretch at its centre; stretches of clips at or above the label's "
        "threshold merge into an event when they touch or are at most gap_s apart; events shorter than "
        "min_event_s are dropped")
TOLERANCE_S = 1e-6  # clip times are sums of floats: stretches that touch must merge
# Raven Pro's selection table columns (tab-separated), the ones Raven and the bioacoustics tools read
RAVEN_COLUMNS = ["Selection", "View", "Channel", "Begin Time (s)", "End Time (s)", "Low Freq (Hz)",
                 "High Freq (Hz)", "Annotation", "Score"]
RAVEN_SUFFIX = ".Table.1.selections.txt"
HIT = pa.struct([pa.field("uri", pa.string(), nullable=False), pa.field("clip_index", pa.int32(), nullable=False),
                 pa.field("start_s", pa.float64(), nullable=False), pa.field("end_s", pa.float64(), nullable=False),
                 pa.field("label", pa.int16(), nullable=False), pa.field("probability", pa.float32(), nullable=False)])


@dataclass(frozen=True)
class Settings:
    """How a classify run turns clip probabilities into events (recorded in its manifest)."""

    thresholds: tuple[float, ...]  # one per label, in the package's label order; inf: never
    hop_s: float  # seconds between clip starts at inference
    min_event_s: float = 0.0
    gap_s: float = 0.0

    @classmethod
    def of(cls, specs: Sequence[str], labels: Sequence[str], hop_s: float, min_event_s: float = 0.0,
           gap_s: float = 0.0, defaults: dict[str, float] | None = None) -> Settings:
        return cls(tuple(float(t) for t in thresholds(specs, labels, defaults)), hop_s, min_event_s, gap_s)

    def describe(self, labels: Sequence[str]) -> dict[str, Any]:
        """The manifest's ``detection`` entry."""
        return {"thresholds": {lab: ("off" if np.isinf(t) else t) for lab, t in zip(labels, self.thresholds,
                                                                                     strict=True)},
                "clip_hop_s": self.hop_s, "min_event_s": self.min_event_s, "gap_s": self.gap_s, "rule": RULE}


def thresholds(specs: Sequence[str], labels: Sequence[str], defaults: dict[str, float] | None = None) -> np.ndarray:
    """One threshold per label from ``--threshold`` values: ``P`` sets every label's, ``LABEL=P`` one
    label's, ``LABEL=off`` never detects LABEL (``inf``). Later values win; an unknown label is a
    :class:`ConfigError` naming the known ones. Unset: ``defaults`` (a multi-label package's thresholds,
    chosen on its validation split), else :data:`~melbatch.config.DEFAULT_THRESHOLD`."""
    out = np.array([(defaults or {}).get(lab, DEFAULT_THRESHOLD) for lab in labels], np.float64)
    index = {lab: i for i, lab in enumerate(labels)}
    for spec in specs:
        label, value = parse_threshold(spec)
        if label is None:
            out[:] = value
        elif label in index:
            out[index[label]] = value
        else:
            raise ConfigError(f"--threshold {spec}: the model has no label {label!r}; its labels: {list(labels)}")
    return out


def hits(clips: pa.Table, probs: np.ndarray, thr: np.ndarray) -> pa.Array:
    """The (clip, label) pairs of a chunk whose probability reaches the label's threshold (:data:`HIT`)."""
    rows, cols = np.nonzero(probs >= thr[None, :])
    take = pa.array(rows, pa.int64())
    return pa.StructArray.from_arrays(
        [clips.column("uri").take(take).combine_chunks() if len(rows) else pa.array([], pa.string()),
         *(clips.column(n).take(take).combine_chunks().cast(HIT.field(n).type) if len(rows)
           else pa.array([], HIT.field(n).type) for n in ("clip_index", "start_s", "end_s")),
         pa.array(cols, pa.int16()), pa.array(probs[rows, cols], pa.float32())], fields=list(HIT))


def stretches(start_s: np.ndarray, end_s: np.ndarray, clip_index: np.ndarray,
              hop_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The time each clip stands for: the ``hop_s``-long stretch at its centre, within the clip (the
    first clip of a file from its start)."""
    centre = (start_s + end_s) / 2
    lo = np.maximum(start_s, centre - hop_s / 2)
    lo = np.where(clip_index == 0, start_s, lo)
    return lo, np.minimum(end_s, centre + hop_s / 2)


def events(hit_rows: pa.Table, labels: Sequence[str], etags: dict[str, str], hop_s: float, min_event_s: float,
           gap_s: float, model_id: str) -> pa.Table:
    """The events of a batch's hits (:data:`HIT` rows), one row per event (:data:`DETECTION_SCHEMA`),
    ordered by file, label and start."""
    if not hit_rows.num_rows:
        return DETECTION_SCHEMA.empty_table()
    order = pc.sort_indices(hit_rows, [("uri", "ascending"), ("label", "ascending"), ("start_s", "ascending")])
    t = hit_rows.take(order)
    uri = t.column("uri").to_numpy(zero_copy_only=False)
    lab = t.column("label").to_numpy()
    lo, hi = stretches(t.column("start_s").to_numpy(), t.column("end_s").to_numpy(),
                       t.column("clip_index").to_numpy(), hop_s)
    p = t.column("probability").to_numpy().astype(np.float64)
    n = len(p)
    same = np.zeros(n, bool)  # row i continues row i-1's event
    if n > 1:
        same[1:] = (uri[1:] == uri[:-1]) & (lab[1:] == lab[:-1])
    # the furthest end so far within each (file, label) group: a new event starts past it plus the gap
    group = np.cumsum(~same) - 1
    reach = _group_cummax(hi, group)
    new = ~same
    new[1:] |= lo[1:] > reach[:-1] + gap_s + TOLERANCE_S
    event = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    count = np.bincount(event)
    start = np.minimum.reduceat(lo, first)
    end = np.maximum.reduceat(hi, first)
    keep = end - start >= min_event_s - TOLERANCE_S
    names = np.asarray(labels, dtype=object)
    return pa.Table.from_pydict({
        "uri": uri[first][keep].tolist(), "etag": [etags.get(u, "") for u in uri[first][keep]],
        "label": names[lab[first][keep]].tolist(), "start_s": start[keep], "end_s": end[keep],
        "probability_max": np.maximum.reduceat(p, first)[keep].astype(np.float32),
        "probability_mean": (np.add.reduceat(p, first) / count)[keep].astype(np.float32),
        "clips": count[keep].astype(np.int32), "model_id": [model_id] * int(keep.sum()),
    }, schema=DETECTION_SCHEMA)


def _group_cummax(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """The running maximum of ``x`` restarted at each new ``group`` (groups are contiguous)."""
    offset = np.zeros(len(x))
    if len(x):  # lift each group above all earlier ones, so one running max serves them all
        span = float(np.max(x) - np.min(x)) + 1.0
        offset = group * span
    return np.maximum.accumulate(x + offset) - offset


def raven_tables(table: pa.Table, archive: URI, high_freq_hz: float) -> dict[str, bytes]:
    """Raven Pro selection tables: for each source file with events, its relative path under
    ``archive`` (extension replaced by :data:`RAVEN_SUFFIX`) and the table's bytes, events in time
    order, numbered from 1; the frequency band is the model's (0 to ``high_freq_hz``)."""
    root = storage.canonical(archive)
    rows = sorted(table.to_pylist(), key=lambda r: (r["uri"], r["start_s"], r["label"]))
    files: dict[str, list[dict]] = {}
    for r in rows:
        files.setdefault(r["uri"], []).append(r)
    out = {}
    for uri, mine in files.items():
        rel = storage.relative(uri, root) if uri.startswith(root.rstrip("/") + "/") else uri.rsplit("/", 1)[-1]
        stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
        buf = io.StringIO()
        buf.write("\t".join(RAVEN_COLUMNS) + "\n")
        for i, r in enumerate(mine, 1):
            label = str(r["label"]).replace("\t", " ").replace("\n", " ")
            buf.write(f"{i}\tSpectrogram 1\t1\t{r['start_s']:.4f}\t{r['end_s']:.4f}\t0.0\t{high_freq_hz:.1f}\t"
                      f"{label}\t{r['probability_max']:.4f}\n")
        out[stem + RAVEN_SUFFIX] = buf.getvalue().encode()
    return out


def read_raven(data: bytes) -> list[dict[str, str]]:
    """A Raven selection table's rows as dicts keyed by its header (what a field tool reads back)."""
    lines = data.decode().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line]


def high_freq_hz(features: dict) -> float:
    """The top of the model's mel band (``f_max_hz``; half the sample rate when unset)."""
    return float(features.get("f_max_hz") or features["sample_rate_hz"] / 2)


def combined(out: URI, labels: Sequence[str] = (), min_probability: float = 0.0) -> tuple[pa.Table, dict[str, Any]]:
    """Every current event of a classify or scan OUT as one table (ordered by file and start), only of
    ``labels`` when given and at least ``min_probability`` at their peak; and the newest manifest (its
    archive and features)."""
    roots = ledger.prediction_roots(out)
    table = ledger.predictions(roots, DETECTION_DIR)
    table = table.cast(DETECTION_SCHEMA) if table.num_rows else DETECTION_SCHEMA.empty_table()
    if labels:
        table = table.filter(pc.is_in(table.column("label"), value_set=pa.array(list(labels), pa.string())))
    if min_probability:
        table = table.filter(pc.greater_equal(table.column("probability_max"), min_probability))
    order = pc.sort_indices(table, [("uri", "ascending"), ("start_s", "ascending"), ("label", "ascending")])
    return table.take(order), read_manifest(roots[-1][0]) or {}


def render_text(table: pa.Table) -> bytes:
    """The events as aligned text for a terminal: file, label, start and end (h:mm:ss.s), peak and mean."""
    rows = table.to_pylist()
    w = max([len("uri"), *(len(r["uri"]) for r in rows)])
    lab = max([len("label"), *(len(r["label"]) for r in rows)])
    lines = [f"{'uri':<{w}}  {'label':<{lab}}  {'start':>10}  {'end':>10}  {'max':>5}  {'mean':>5}  clips"]
    lines += [f"{r['uri']:<{w}}  {r['label']:<{lab}}  {clock(r['start_s']):>10}  {clock(r['end_s']):>10}  "
              f"{r['probability_max']:.3f}  {r['probability_mean']:.3f}  {r['clips']:>5}" for r in rows]
    return ("\n".join(lines) + "\n").encode()


def clock(seconds: float) -> str:
    """``h:mm:ss.s``: where in a long recording."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h)}:{int(m):02d}:{s:04.1f}"
