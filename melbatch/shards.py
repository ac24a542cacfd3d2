"""The on-disk contract: explicit Parquet schemas, shard writing, manifests and the quarantine table.

Mel layout: one ``fixed_size_binary(n_mels * n_frames * itemsize)`` value per row, holding the
image as a C-order, little-endian ``float16``/``float32`` array; the field's metadata records
``shape`` and ``dtype``, and :func:`mel_array` turns a column into a ``(rows, n_mels, n_frames)``
array without copying. Why not Arrow's ``fixed_shape_tensor`` (a ``fixed_size_list`` of floats)?
Parquet stores a list element by element, with repetition levels for each of the 64,128 values of
a default image: writing it measured 3x slower and reading 2-4x slower than one fixed-size binary
value per row, and shard writing was the largest cost of the whole featurize task. A fixed size
still means no offsets, no ragged rows and a shape every reader can check.

A dataset is complete only when ``_manifest.json`` exists: it is written last and lists every
shard. Readers go through :func:`open_dataset`, never through a directory listing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from melbatch import URI, storage
from melbatch.config import SCHEMA_VERSION, FeatureConfig

MANIFEST = "_manifest.json"
QUARANTINE = "quarantine.parquet"
SHARD_DIR = "shards"
# a train OUT: melbatch.train.driver writes these next to the model package, the report reads them
METRICS = "metrics.json"
VAL_PREDICTIONS = "val_predictions.parquet"
STATE = "state.pt"  # in each Ray Train checkpoint: model, optimizer, schedule, epoch, history
TRAIN_CONFIG = "train_config.json"  # model, feature hash and normalisation of the run that owns OUT
SPLIT = "split.csv"  # uri,split of every file: which were held out
DIVERGED = "_diverged.json"  # a train whose loss stopped being finite: why (the driver raises it, no model)
BACKBONES_TABLE = "backbones.json"  # train --backbone auto: every candidate's validation scores and the one kept
REVIEW_DIR, REVIEW_PAGE, REVIEW_LABELS = "review", "index.html", "labels.csv"  # melbatch review's OUT/review/
# melbatch discover's OUT/discover/: the page, the grouping (grouping.GROUPS_SCHEMA) and its summary
DISCOVER_DIR, GROUPS_FILE, DISCOVER_SUMMARY = "discover", "groups.parquet", "summary.json"
REVIEWED_CLIPS = "reviewed_clips.parquet"  # in a train OUT: reviewed clips from outside the shards (clip schema)
# train --unlabelled with the ImageNet fine-tune (melbatch.train.selftrain): OUT/self-training/round-<r>/ holds
# round r's train OUT (round 0: the supervised teacher), its guesses of every unlabelled clip (GUESSES_SCHEMA),
# the clips taken with their guessed labels (PSEUDO_DIR: clip schema) and the record that commits them
SELF_TRAINING_DIR, GUESSES, PSEUDO_DIR, PSEUDO_RECORD = "self-training", "guesses.parquet", "pseudo", "_pseudo.json"
GUESSES_SCHEMA = pa.schema([pa.field("uri", pa.string(), nullable=False),
                            pa.field("clip_index", pa.int32(), nullable=False),
                            pa.field("guess", pa.string(), nullable=False),  # the teacher's best label
                            pa.field("probability", pa.float32(), nullable=False),  # its (calibrated) probability
                            pa.field("taken", pa.bool_(), nullable=False)])  # a pseudo-labelled training clip
META_PREFIX = b"melbatch."
DICTIONARY_COLUMNS = ["uri", "etag", "label", "decoder"]
STATISTICS_COLUMNS = ["uri", "label", "clip_index", "start_s"]


class DatasetError(RuntimeError):
    """An output is missing, incomplete or was made with other features."""


AUDIO_DTYPE = "int16"  # 16-bit PCM: half the bytes of float32, 96 dB of range, what the archives hold anyway


def clip_schema(cfg: FeatureConfig, keep_audio: bool = False) -> pa.Schema:
    """One row per clip; the feature config and its hash ride in the schema metadata.

    With ``keep_audio`` each row also carries the clip's waveform (mono, at the feature sample
    rate, zero-padded like the image) as 16-bit PCM in ``audio``: training needs it for
    waveform-level augmentation, and it is what a person listens to when a picture looks wrong.
    """
    mel_bytes = cfg.n_mels * cfg.n_frames * np.dtype(cfg.dtype).itemsize
    audio = [pa.field("audio", pa.binary(cfg.clip_samples * np.dtype(AUDIO_DTYPE).itemsize), nullable=False,
                      metadata={"shape": json.dumps([cfg.clip_samples]), "dtype": AUDIO_DTYPE,
                                "sample_rate_hz": str(cfg.sample_rate_hz), "order": "C, little-endian"})]
    return pa.schema(
        [
            pa.field("uri", pa.string(), nullable=False),
            pa.field("etag", pa.string(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("clip_index", pa.int32(), nullable=False),
            pa.field("start_s", pa.float64(), nullable=False),
            pa.field("end_s", pa.float64(), nullable=False),
            pa.field("decoder", pa.string(), nullable=False),
            pa.field("source_sample_rate_hz", pa.int32(), nullable=False),
            pa.field("source_channels", pa.int16(), nullable=False),
            pa.field("mel", pa.binary(mel_bytes), nullable=False,
                     metadata={"shape": json.dumps(list(cfg.shape)), "dtype": cfg.dtype, "order": "C, little-endian"}),
            *(audio if keep_audio else []),
        ],
        metadata=feature_metadata(cfg),
    )


# the quarantine table's ``kind`` column: why a file became no clips
QUARANTINE_KINDS = {
    "empty": "the object has zero bytes",
    "not_audio": "the bytes are not in any audio format melbatch knows",
    "unsupported_format": "an audio container that no installed decoder reads",
    "corrupt": "an audio container whose contents cannot be decoded",
    "truncated": "decoding stopped well short of the length the header declares",
    "bad_header": "the header declares impossible values (rate, channels)",
    "non_finite": "the samples contain NaN or infinity",
    "out_of_range": "float samples far beyond full scale (over +60 dBFS): a broken or unscaled file",
    "silent": "the whole file is below the silence threshold",
    "too_short": "less audio than min_tail_s, so not one clip",
    "read_error": "the object could not be read from storage",
    "unlabelled": "no label for this object in the label manifest",
}


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("decoders_tried", pa.list_(pa.string())),
    ],
    metadata={META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()},
)


PREDICTION_DIRS = ("clips", "files", "detections")
DETECTION_DIR = "detections"
DETECTION_SCHEMA = pa.schema([  # ``classify`` output, one row per detected event (melbatch.stages.detections)
    pa.field("uri", pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("probability_max", pa.float32(), nullable=False),
    pa.field("probability_mean", pa.float32(), nullable=False),
    pa.field("clips", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
], metadata={META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()})


def clip_prediction_schema(top_k: int, embedding_dim: int = 0) -> pa.Schema:
    """``classify`` output, one row per clip: top-k labels and probabilities (best first)."""
    emb = [pa.field("embedding", pa.list_(pa.float32(), embedding_dim), nullable=False)] if embedding_dim else []
    return pa.schema([
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("probability", pa.float32(), nullable=False),
        pa.field("top_labels", pa.list_(pa.string(), top_k), nullable=False),
        pa.field("top_probabilities", pa.list_(pa.float32(), top_k), nullable=False),
        *emb,
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
    ], metadata={META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()})


def file_prediction_schema(labels: list[str]) -> pa.Schema:
    """``classify`` output, one row per file: the verdict over its clips (mean probability per label)."""
    return pa.schema([
        pa.field("uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("probability", pa.float32(), nullable=False),
        pa.field("clips", pa.int32(), nullable=False),
        pa.field("scores", pa.list_(pa.float32(), len(labels)), nullable=False,
                 metadata={"labels": json.dumps(labels)}),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("decoder", pa.string(), nullable=False),
        pa.field("source_sample_rate_hz", pa.int32(), nullable=False),
        pa.field("source_channels", pa.int16(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("config_hash", pa.string(), nullable=False),
        # the mean over its clips of their distance from the training clips (melbatch.model.novelty);
        # null for a package without the distance rule
        pa.field("distance", pa.float32(), nullable=True),
    ], metadata={META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode()})


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column of classify clip rows as one ``(rows, dim)`` float32 array."""
    if not table.num_rows:
        return np.zeros((0, 0), np.float32)
    col = table.column("embedding").combine_chunks()
    return np.asarray(col.flatten(), np.float32).reshape(table.num_rows, -1)


def write_table(uri: URI, table: pa.Table, row_group_rows: int | None = None) -> None:
    """One small Parquet file, published atomically (in row groups of ``row_group_rows`` when given)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows)
    storage.write_bytes(uri, buf.getvalue())


def read_tables(dst: URI, folder: str, columns: list[str] | None = None) -> pa.Table:
    """Every Parquet file a complete output's manifest lists under ``folder`` (``clips``, ``files`` or
    ``detections``; outputs made before a folder existed list none), as one table (only ``columns``
    when given).

    The files are fetched together (an object store serves them concurrently) and decoded on
    threads (Arrow lets go of the GIL): a scan OUT holds one small file per work batch, thousands of
    them, which one at a time cost a round trip and ~1.5 ms of decoding each."""
    manifest = open_dataset(dst)
    return read_files([storage.join(dst, rel) for rel in manifest.get(folder, [])], columns)


def read_files(uris: list[URI], columns: list[str] | None = None) -> pa.Table:
    """Parquet files of one schema as one table (only ``columns`` when given), in the order given:
    fetched together, decoded on threads."""
    blobs = storage.read_many(uris)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        tables = list(pool.map(lambda u: pq.read_table(pa.BufferReader(blobs.pop(u)), columns=columns), uris))
    return pa.concat_tables(tables) if tables else pa.table({})


def feature_metadata(cfg: FeatureConfig) -> dict[bytes, bytes]:
    return {
        META_PREFIX + b"schema_version": str(SCHEMA_VERSION).encode(),
        META_PREFIX + b"feature_config": cfg.canonical_json().encode(),
        META_PREFIX + b"config_hash": cfg.hash().encode(),
    }


def feature_config_of(schema: pa.Schema) -> FeatureConfig:
    """The feature config a shard was written with, read back from its schema metadata."""
    raw = (schema.metadata or {}).get(META_PREFIX + b"feature_config")
    if raw is None:
        raise DatasetError("this Parquet file carries no melbatch feature config; was it written by melbatch?")
    return FeatureConfig.from_dict(json.loads(raw))


@dataclass
class ClipRow:
    """A clip ready to be written (its file's identity plus where the clip sits in it)."""

    uri: str
    etag: str
    size: int
    label: str | None
    clip_index: int
    start_s: float
    end_s: float
    decoder: str
    source_sample_rate_hz: int
    source_channels: int
    mel: np.ndarray = field(repr=False)
    audio: np.ndarray | None = field(default=None, repr=False)  # int16 PCM, when the output keeps audio


@dataclass
class ShardWriter:
    """Writes clip rows into shards named ``{stem}-{00000}.parquet`` under ``folder``.

    Rows are flushed one row group at a time, so memory holds at most one row group; a new shard
    starts every ``rows_per_shard`` rows. Each shard is published atomically when it closes.
    """

    folder: URI
    stem: str
    cfg: FeatureConfig
    rows_per_shard: int
    rows_per_row_group: int
    keep_audio: bool = False
    written: list[tuple[str, int]] = field(default_factory=list)  # (file name, rows)
    _pending: list[ClipRow] = field(default_factory=list)
    _stack: contextlib.ExitStack | None = None
    _writer: pq.ParquetWriter | None = None
    _rows_in_shard: int = 0

    def add(self, rows: list[ClipRow]) -> None:
        self._pending.extend(rows)
        while len(self._pending) >= self.rows_per_row_group:
            self._flush(self.rows_per_row_group)

    def close(self) -> list[tuple[str, int]]:
        while self._pending:
            self._flush(min(len(self._pending), self.rows_per_row_group))
        self._close_shard()
        return self.written

    def abort(self) -> None:
        if self._stack is not None:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._stack = None

    def _flush(self, n: int) -> None:
        rows, self._pending = self._pending[:n], self._pending[n:]
        if self._writer is None:
            name = f"{self.stem}-{len(self.written):05d}.parquet"
            self._stack = contextlib.ExitStack()
            f = self._stack.enter_context(storage.atomic_open(storage.join(self.folder, name)))
            schema = clip_schema(self.cfg, self.keep_audio)
            # no dictionary and no statistics for the mel values: both cost time and say nothing
            self._writer = pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=DICTIONARY_COLUMNS,
                                            write_statistics=STATISTICS_COLUMNS)
            self.written.append((name, 0))
        self._writer.write_table(rows_to_table(rows, self.cfg, self.keep_audio), row_group_size=n)
        self._rows_in_shard += n
        self.written[-1] = (self.written[-1][0], self._rows_in_shard)
        if self._rows_in_shard >= self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stack.close()
            self._writer, self._stack, self._rows_in_shard = None, None, 0


def rows_to_table(rows: list[ClipRow], cfg: FeatureConfig, keep_audio: bool = False) -> pa.Table:
    schema = clip_schema(cfg, keep_audio)
    arrays = {"mel": (cfg.dtype, [r.mel for r in rows])}
    if keep_audio:
        arrays["audio"] = (AUDIO_DTYPE, [r.audio for r in rows])
    cols: dict[str, Any] = {f.name: plain_array([getattr(r, f.name) for r in rows], f.type)
                            for f in schema if f.name not in arrays}
    for name, (dtype, values) in arrays.items():
        cols[name] = tensor_array(np.stack(values), dtype)
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)


_NUMPY_OF = {pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64, pa.float64(): np.float64}


def plain_array(values: list[Any], type_: pa.DataType) -> pa.Array:
    """Python values (strings, or numbers of ``_NUMPY_OF``'s types; None for null strings) as an Arrow
    array, built from its buffers. ``pa.array`` would do, but its first call in a process imports pandas
    to ask whether the values are a pandas object (~0.3 s, a tenth of a small featurize run's cost)."""
    n = len(values)
    if type_ in _NUMPY_OF:
        return pa.Array.from_buffers(type_, n, [None, pa.py_buffer(np.asarray(values, _NUMPY_OF[type_]))])
    if type_ != pa.string():
        raise TypeError(f"plain_array: {type_} is not one of {[*_NUMPY_OF, pa.string()]}")
    data = [b"" if v is None else v.encode("utf-8") for v in values]
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    valid = np.array([v is not None for v in values], bool)
    nulls = n - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(pa.string(), n, [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))],
                                 null_count=nulls)


def tensor_array(values: np.ndarray, dtype: str) -> pa.FixedSizeBinaryArray:
    """The rows of ``values`` (``(rows, *shape)``) as one fixed-size binary value each: the layout of
    the shards' ``mel`` and ``audio`` columns (C order, little-endian ``dtype``); no copy when
    ``values`` already has that layout."""
    data = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    width = data[0].nbytes if len(data) else int(np.prod(data.shape[1:])) * data.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(data), [None, pa.py_buffer(data)])


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size binary column (``mel`` or ``audio``) as a ``(rows, *shape)`` array, without copying."""
    field_ = table.schema.field(name)
    col = table.column(name)
    return tensor_values(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col,
                         json.loads(field_.metadata[b"shape"]), field_.metadata[b"dtype"].decode())


def tensor_values(arr: pa.FixedSizeBinaryArray, shape: Sequence[int], dtype: str) -> np.ndarray:
    """A fixed-size binary array in the shards' layout (:func:`tensor_array`) as ``(rows, *shape)``,
    without copying."""
    dt = np.dtype(dtype).newbyteorder("<")
    if arr.null_count or len(arr) == 0:
        return np.zeros((len(arr), *shape), dt)
    width = arr.type.byte_width
    flat = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return flat.view(dt).reshape(len(arr), *shape)


def mel_array(table: pa.Table) -> np.ndarray:
    """The ``mel`` column of a shard table (or record batch) as a ``(rows, n_mels, n_frames)`` array."""
    return tensor_column(table, "mel")


def clip_key(uri: str, clip_index: int) -> str:
    """One clip's key, ``uri<TAB>clip_index``: a reviewer's answer, a self-training guess."""
    return f"{uri}\t{clip_index}"


def clip_keys(table: pa.Table) -> list[str]:
    """:func:`clip_key` of every row of a table (or record batch) with ``uri`` and ``clip_index``."""
    return [clip_key(u, i) for u, i in zip(table.column("uri").to_pylist(), table.column("clip_index").to_pylist(),
                                            strict=True)]


def audio_array(table: pa.Table) -> np.ndarray:
    """The ``audio`` column as ``(rows, samples)`` float32 in [-1, 1)."""
    return tensor_column(table, "audio").astype(np.float32) * np.float32(1 / 32768)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] → 16-bit PCM (rounded, clipped)."""
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16)


def write_quarantine(dst: URI, rows: list[dict[str, Any]]) -> None:
    """``DST/quarantine.parquet``: always written, possibly empty."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["uri"]), schema=QUARANTINE_SCHEMA) if rows \
        else pa.Table.from_arrays([pa.nulls(0, f.type) for f in QUARANTINE_SCHEMA], schema=QUARANTINE_SCHEMA)
    # (empty_table() and from_pylist call pa.array, which imports pandas: see plain_array)
    write_table(storage.join(dst, QUARANTINE), table)


def write_manifest(dst: URI, manifest: dict[str, Any]) -> None:
    """Written last: its presence is what makes ``dst`` a complete dataset."""
    storage.write_bytes(storage.join(dst, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(dst: URI) -> dict[str, Any] | None:
    uri = storage.join(dst, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def open_dataset(dst: URI, expect: FeatureConfig | None = None) -> dict[str, Any]:
    """The manifest of a complete dataset, refusing incomplete ones and (given ``expect``) other features."""
    manifest = read_manifest(dst)
    if manifest is None:
        raise DatasetError(f"{dst} has no {MANIFEST}: the run that writes it did not finish (or never ran); "
                           "re-run the same `melbatch featurize`/`classify` command to complete it")
    if expect is not None:
        have = FeatureConfig.from_dict(manifest["feature_config"])
        if have.hash() != expect.hash():
            diff = ", ".join(f"{k}: {a} (dataset) vs {b} (expected)" for k, (a, b) in have.diff(expect).items())
            raise DatasetError(f"{dst} holds features with config hash {have.hash()}, not {expect.hash()}: {diff}")
    return manifest


def shard_uris(dst: URI, manifest: dict[str, Any]) -> list[URI]:
    return [storage.join(dst, rel) for rel in manifest["shards"]]


def iter_clips(dst: URI) -> Iterator[dict[str, Any]]:
    """Rows of a complete dataset as dicts with ``mel`` as an (n_mels, n_frames) array (small data, tests, pictures)."""
    manifest = open_dataset(dst)
    for uri in shard_uris(dst, manifest):
        with storage.arrow_input(uri) as f:
            table = pq.read_table(f)
        arrays = {"mel": mel_array(table)}
        if "audio" in table.column_names:
            arrays["audio"] = audio_array(table)
        for i, row in enumerate(table.drop_columns(list(arrays)).to_pylist()):
            row.update({name: a[i] for name, a in arrays.items()})
            yield row


def read_quarantine(dst: URI) -> pa.Table:
    with storage.arrow_input(storage.join(dst, QUARANTINE)) as f:
        return pq.read_table(f)
