"""Where labels come from: a folder under SRC (``class_name/…/file.wav``), a manifest, or nowhere;
and the reviewed clips' labels (``labels.csv`` of ``melbatch review``).

Folder labels follow torchvision's ImageFolder and Keras' ``audio_dataset_from_directory``: the
first folder under SRC names the class, whatever lies below it (``dog/2024-05-01/rec.wav`` is a
``dog``). ``label_depth`` picks another level: 2 is the folder below that, -1 the file's own folder.

A manifest is a CSV with a header (columns ``uri,label``; ``path`` is accepted for ``uri``) or JSON
Lines with the same keys. Its URIs may be absolute (``s3://…``, ``file://…``, ``/abs``) or relative
to SRC.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass

from melbatch import URI, storage
from melbatch.config import ConfigError

NO_LABEL = object()  # marks an object that needs a label and has none
REVIEWED_COLUMNS = ("uri", "clip_index", "start_s", "end_s", "predicted", "probability", "label")
SKIP = "skip"  # a reviewed row with this label (or none) is left out


class Labeler:
    """Maps an object URI to its label (``None`` for unlabelled archives, ``NO_LABEL`` if missing)."""

    def __init__(self, source: str, src: URI, depth: int = 1):
        self.source, self.depth = source, depth
        self.src = storage.canonical(src)
        self.table: dict[URI, str] | None = None
        if source not in ("folder", "none"):
            self.table = load_manifest(source, self.src)

    def __call__(self, uri: URI) -> str | object | None:
        if self.source == "none":
            return None
        if self.table is not None:
            return self.table.get(uri, NO_LABEL)
        rel = storage.relative(uri, self.src) if uri != self.src else posixpath.basename(uri)
        folders = [f for f in rel.split("/")[:-1] if f]  # "a//b" in an object key has no empty folder
        if len(folders) < abs(self.depth):
            return NO_LABEL
        return folders[self.depth - 1] if self.depth > 0 else folders[self.depth]

    def why_missing(self) -> str:
        if self.source == "folder" and self.depth == 1:
            return "the file is not inside a class folder (SRC/<label>/<file>); move it or use --labels MANIFEST"
        if self.source == "folder":
            return (f"the file does not lie {abs(self.depth)} folder(s) deep under SRC (--label-depth "
                    f"{self.depth}); move it, change --label-depth or use --labels MANIFEST")
        return f"the label manifest {self.source} has no row for this object"


def load_manifest(uri: URI, src: URI) -> dict[URI, str]:
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except storage.StorageError:
        raise ConfigError(f"label manifest {uri} does not exist: give a .csv/.jsonl with uri,label columns") from None
    rows = _parse_jsonl(text, uri) if uri.endswith((".jsonl", ".ndjson")) else _parse_csv(text, uri)
    table: dict[URI, str] = {}
    for key, label in rows:
        if not label:
            raise ConfigError(f"label manifest {uri}: empty label for {key!r}")
        absolute = "://" in key or key.startswith("/")
        # a relative key is the object's key under SRC, byte for byte ("./" in front allowed): "../x.wav" is an
        # object whose key holds "..", never a place outside SRC
        table[storage.canonical(key) if absolute else storage.join(src, key.removeprefix("./"))] = str(label)
    if not table:
        raise ConfigError(f"label manifest {uri} has no rows")
    return table


def _parse_csv(text: str, uri: URI) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    key = "uri" if "uri" in cols else "path" if "path" in cols else None
    if key is None or "label" not in cols:
        raise ConfigError(f"label manifest {uri} needs a header with 'uri' (or 'path') and 'label' columns, "
                          f"found {sorted(cols)}")
    return [(r[key], r["label"]) for r in reader]


def _parse_jsonl(text: str, uri: URI) -> list[tuple[str, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append((obj.get("uri") or obj["path"], obj["label"]))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ConfigError(f"label manifest {uri} line {n}: expected {{\"uri\": ..., \"label\": ...}}") from None
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
