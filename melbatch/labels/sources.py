"""Where labels come from: a folder under SRC (``class_name/…/file.wav``), a manifest, or nowhere;
and the reviewed clips' labels (``labels.csv`` of ``melbatch review``).

Folder labels follow torchvision's ImageFolder and Keras' ``audio_dataset_from_directory``: the
first folder under SRC names the class, whatever lies below it (``dog/2024-05-01/rec.wav`` is a
``dog``). ``label_depth`` picks another level: 2 is the folder below that, -1 the file's own folder.

A manifest is a CSV with a header (columns ``uri,label``; ``path`` is accepted for ``uri``) or JSON
Lines with the same keys. Its URIs may be absolute (``s3://…``, ``file://…``, ``/abs``) or relative
to SRC. Several labels at once (for ``train --multi-label``): a file may have several rows (or, in
JSON Lines, a list of labels), and rows with ``start_s,end_s`` label a time span of the file only:
a clip gets the labels of the spans it overlaps by at least half the shorter of the two, plus the
file's own. Clips store their labels as one string (:mod:`melbatch.labels.multilabel`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import unicodedata
from dataclasses import dataclass

from melbatch import URI, storage
from melbatch.config import ConfigError
from melbatch.labels import multilabel

NO_LABEL = object()  # marks an object that needs a label and has none
REVIEWED_COLUMNS = ("uri", "clip_index", "start_s", "end_s", "predicted", "probability", "label")
SKIP = "skip"  # a reviewed row with this label (or none) is left out
UNMATCHED_SHOWN = 5  # manifest rows that named no object, shown in a run's summary


@dataclass(frozen=True)
class Spans:
    """The labels of a file whose manifest rows name time spans: each clip gets its own label string."""

    always: tuple[str, ...]  # the file's labels without a span
    spans: tuple[tuple[float, float, str], ...]  # (start_s, end_s, label)

    def of(self, start_s: float, end_s: float) -> str:
        """The labels of the clip ``[start_s, end_s)``: the file's own, and those of the spans it overlaps
        by at least half the shorter of the two."""
        names = set(self.always)
        for a, b, label in self.spans:
            if min(end_s, b) - max(start_s, a) >= 0.5 * min(end_s - start_s, b - a):
                names.add(label)
        return multilabel.join(names)


def clip_label(label: str | Spans | None, start_s: float, end_s: float) -> str | None:
    """The label string of one clip of a file labelled ``label``."""
    return label.of(start_s, end_s) if isinstance(label, Spans) else label


class Labeler:
    """Maps an object URI to its label (``None`` for unlabelled archives, ``NO_LABEL`` if missing; a
    :class:`Spans` when the manifest labels time spans of it).

    A manifest row names an object by its key byte for byte, or else by the same name in another
    Unicode normal form (a manifest typed on Linux, NFC, for names a Mac wrote, NFD); the rows that
    named no object are :meth:`unmatched`."""

    def __init__(self, source: str, src: URI, depth: int = 1):
        self.source, self.depth = source, depth
        self.src = storage.canonical(src)
        self.table: dict[URI, str | Spans] | None = None
        self.matched: set[URI] = set()
        if source not in ("folder", "none"):
            self.table = load_manifest(source, self.src)
            self.normal = {unicodedata.normalize("NFC", u): u for u in self.table}

    def __call__(self, uri: URI) -> str | Spans | object | None:
        if self.source == "none":
            return None
        if self.table is not None:
            key = uri if uri in self.table else self.normal.get(unicodedata.normalize("NFC", uri))
            if key is None:
                return NO_LABEL
            self.matched.add(key)
            return self.table[key]
        rel = storage.relative(uri, self.src) if uri != self.src else posixpath.basename(uri)
        folders = [f for f in rel.split("/")[:-1] if f]  # "a//b" in an object key has no empty folder
        if len(folders) < abs(self.depth):
            return NO_LABEL
        return folders[self.depth - 1] if self.depth > 0 else folders[self.depth]

    def unmatched(self, listed: list[URI]) -> tuple[int, list[str]]:
        """How many manifest rows named no object of ``listed`` (a typo, a file deleted since, one the
        filters leave out), and a few of them, each with the listed name it differs from only in case."""
        missing = sorted(set(self.table or ()) - self.matched)
        if not missing:
            return 0, []
        folded = {u.casefold(): u for u in listed}
        shown = []
        for u in missing[:UNMATCHED_SHOWN]:
            other = folded.get(u.casefold())
            shown.append(f"{u} (listed as {other}: the names differ in case)" if other else u)
        return len(missing), shown

    def why_missing(self) -> str:
        if self.source == "folder" and self.depth == 1:
            return "the file is not inside a class folder (SRC/<label>/<file>); move it or use --labels MANIFEST"
        if self.source == "folder":
            return (f"the file does not lie {abs(self.depth)} folder(s) deep under SRC (--label-depth "
                    f"{self.depth}); move it, change --label-depth or use --labels MANIFEST")
        return f"the label manifest {self.source} has no row for this object"


Row = tuple[str, str, float | None, float | None]  # key, label, start_s, end_s (None: the whole file)


def load_manifest(uri: URI, src: URI) -> dict[URI, str | Spans]:
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except storage.StorageError:
        raise ConfigError(f"label manifest {uri} does not exist: give a .csv/.jsonl with uri,label columns") from None
    rows = _parse_jsonl(text, uri) if uri.endswith((".jsonl", ".ndjson")) else _parse_csv(text, uri)
    whole: dict[URI, set[str]] = {}
    spans: dict[URI, list[tuple[float, float, str]]] = {}
    for key, label, start, end in rows:
        if not multilabel.split(label):
            raise ConfigError(f"label manifest {uri}: empty label for {key!r}")
        absolute = "://" in key or key.startswith("/")
        # a relative key is the object's key under SRC, byte for byte ("./" in front allowed): "../x.wav" is an
        # object whose key holds "..", never a place outside SRC
        at = storage.canonical(key) if absolute else storage.join(src, key.removeprefix("./"))
        if start is None:
            whole.setdefault(at, set()).update(multilabel.split(label))
        else:
            spans.setdefault(at, []).extend((start, end, n) for n in multilabel.split(label))
    table: dict[URI, str | Spans] = {u: multilabel.join(names) for u, names in whole.items()}
    for u, found in spans.items():
        table[u] = Spans(tuple(sorted(whole.get(u, ()))), tuple(sorted(found)))
    if not table:
        raise ConfigError(f"label manifest {uri} has no rows")
    return table


def _span(key: str, start: object, end: object, where: str) -> tuple[float | None, float | None]:
    if start in (None, "") and end in (None, ""):
        return None, None
    try:
        a, b = float(start), float(end)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: start_s and end_s of {key!r} must both be numbers (seconds), or both empty for "
                          f"the whole file; found {start!r}, {end!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"{where}: the span {start!r}-{end!r} of {key!r} is not two finite numbers of seconds (a NaN "
                          "or an infinity); give both, or leave both empty for the whole file")
    if not 0 <= a < b:
        raise ConfigError(f"{where}: the span {a:g}-{b:g} s of {key!r} is empty or negative: need 0 <= start_s < end_s")
    return a, b


def _parse_csv(text: str, uri: URI) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    key = "uri" if "uri" in cols else "path" if "path" in cols else None
    if key is None or "label" not in cols:
        raise ConfigError(f"label manifest {uri} needs a header with 'uri' (or 'path') and 'label' columns, "
                          f"found {sorted(cols)}")
    return [(r[key], r["label"], *_span(r[key], r.get("start_s"), r.get("end_s"), f"label manifest {uri} line {n}"))
            for n, r in enumerate(reader, 2)]


def _parse_jsonl(text: str, uri: URI) -> list[Row]:
    out: list[Row] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            key, label = obj.get("uri") or obj["path"], obj["label"]
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ConfigError(f"label manifest {uri} line {n}: expected {{\"uri\": ..., \"label\": ...}}") from None
        label = multilabel.join(map(str, label)) if isinstance(label, list) else str(label) if label is not None else ""
        out.append((key, label, *_span(key, obj.get("start_s"), obj.get("end_s"), f"label manifest {uri} line {n}")))
    return out


@dataclass(frozen=True)
class ReviewedClip:
    """One answered row of a review's ``labels.csv``: this clip of this file is a ``label``."""

    uri: URI
    clip_index: int
    start_s: float
    end_s: float
    label: str


def reviewed_csv(rows: list[dict]) -> bytes:
    """``labels.csv`` of a review: :data:`REVIEWED_COLUMNS`, the ``label`` column empty for the reviewer."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REVIEWED_COLUMNS)
    for r in rows:
        w.writerow([r["uri"], r["clip_index"], f"{r['start_s']:.3f}", f"{r['end_s']:.3f}", r["label"],
                    f"{r['probability']:.4f}", ""])
    return buf.getvalue().encode()


def read_reviewed(uri: URI) -> tuple[list[ReviewedClip], int]:
    """The answered rows of a reviewed ``labels.csv`` (any URI), and how many were left out (empty or
    ``skip``). A clip answered twice keeps its last answer. A wrong header or value is a
    :class:`ConfigError` that names the line."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except storage.StorageError:
        raise ConfigError(f"reviewed labels {uri} do not exist: give the labels.csv `melbatch review` wrote, "
                          "with its label column filled") from None
    reader = csv.DictReader(io.StringIO(text))
    need = {"uri", "clip_index", "start_s", "end_s", "label"}
    if not need <= set(reader.fieldnames or []):
        raise ConfigError(f"reviewed labels {uri} need a header with {', '.join(REVIEWED_COLUMNS)} (found "
                          f"{reader.fieldnames}): give the labels.csv `melbatch review` wrote")
    answered: dict[tuple[str, int], ReviewedClip] = {}
    skipped = 0
    for n, r in enumerate(reader, 2):
        label = (r["label"] or "").strip()
        if not label or label.lower() == SKIP:
            skipped += 1
            continue
        try:
            clip = ReviewedClip(storage.canonical(r["uri"]), int(r["clip_index"]), float(r["start_s"]),
                                float(r["end_s"]), label)
        except (TypeError, ValueError):
            raise ConfigError(f"reviewed labels {uri} line {n}: clip_index, start_s and end_s must be numbers "
                              f"(found {r['clip_index']!r}, {r['start_s']!r}, {r['end_s']!r})") from None
        answered[(clip.uri, clip.clip_index)] = clip
    return list(answered.values()), skipped
