"""classify's three pipeline stages and the rows that travel between them.

A work batch (one row of :func:`work_table`: its id and its objects) becomes chunks:

1. :func:`decode_batch` (CPU task): read → decode → clips → log-mel, the featurize code path, in
   chunks of at most :data:`CHUNK_BYTES` of images (or of 16-bit PCM, when the model makes the images);
2. :class:`Predictor` (actor): the package's clip predictions and, per file, its clips' probability sums
   (and distance sums, :mod:`melbatch.model.novelty`, when the package has the rule);
3. :func:`write_batch` (CPU task): ``clips/<batch>-<seq>.parquet``; the chunk goes on to the driver
   without its clips (:func:`melbatch.stages.classify.finish_batch` finishes the batch there).

The driver (:mod:`melbatch.stages.classify`) plans the batches and sizes the pools; this module is
what runs in the workers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from melbatch import URI, storage
from melbatch.audio.decode import DecodeError
from melbatch.audio.logmel import clip_images
from melbatch.audio.objects import logmels_of_object
from melbatch.config import FeatureConfig
from melbatch.model.package import aggregate_files, load_package, padded, predict, predict_audio
from melbatch.shards import (
    AUDIO_DTYPE,
    QUARANTINE_SCHEMA,
    clip_prediction_schema,
    file_prediction_schema,
    tensor_array,
    tensor_values,
    write_table,
)
from melbatch.stages import detections, workers
from melbatch.stages.runs import quarantine_row, this_node

# Images travel from the decoders to the model in chunks of at most this many bytes (about 10 minutes
# of audio at the default features), so a batch of any length of audio passes in bounded memory.
CHUNK_BYTES = 16 * 2**20


# ------------------------------------------------------------------------------------- between stages

# What travels decode -> model -> write -> driver: one row per chunk of a work batch, its fields typed
# and named. ``batch``/``seq``/``last`` say which chunk it is (the last one of a batch carries the
# batch's file details and quarantine rows); the clips' images ride in the shards' layout
# (:func:`~melbatch.shards.tensor_array`), their predictions in the clip-prediction schema.
REF = pa.struct([pa.field("uri", pa.string(), nullable=False), pa.field("etag", pa.string(), nullable=False),
                 pa.field("size", pa.int64(), nullable=False)])
CLIP = pa.struct([clip_prediction_schema(1).field(n) for n in ("uri", "etag", "clip_index", "start_s", "end_s")])
FILE = pa.struct([file_prediction_schema([]).field(n) for n in (
    "uri", "etag", "size", "decoder", "duration_s", "source_sample_rate_hz", "source_channels")])
QUARANTINED = pa.struct(list(QUARANTINE_SCHEMA))
SUMS = pa.struct([pa.field("uri", pa.string(), nullable=False),  # a file's clips in one chunk
                  pa.field("probability_sum", pa.list_(pa.float64()), nullable=False),
                  pa.field("clips", pa.int32(), nullable=False),
                  pa.field("distance_sum", pa.float64(), nullable=True)])  # None: the package has no distance rule
CHUNK_FIELDS = [pa.field("batch", pa.string()), pa.field("seq", pa.int32()), pa.field("last", pa.bool_()),
                pa.field("node", pa.string()), pa.field("files", pa.list_(FILE)),
                pa.field("quarantine", pa.list_(QUARANTINED))]


def work_table(todo: list[tuple[str, list[storage.ObjectRef]]]) -> pa.Table:
    """The pipeline's input: one row per work batch, its id and its objects."""
    return pa.table({"batch": pa.array([bid for bid, _ in todo], pa.string()),
                     "refs": pa.array([[{"uri": r.uri, "etag": r.etag, "size": r.size} for r in refs]
                                       for _, refs in todo], pa.list_(REF))})


def _items(row: pa.Table, column: str) -> pa.Array:
    """The values of a one-row table's list column."""
    return row.column(column).combine_chunks().flatten()


def _listed(values: pa.Array) -> pa.Array:
    """``values`` as one list value (the column of a one-row table)."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def chunk_images(chunk: pa.Table, cfg: FeatureConfig) -> np.ndarray:
    """A decoded chunk's images, ``(clips, n_mels, n_frames)``, without copying."""
    return tensor_values(_items(chunk, "mel"), cfg.shape, cfg.dtype)


def chunk_audio(chunk: pa.Table, cfg: FeatureConfig) -> np.ndarray:
    """A chunk decoded without images: its clips as 16-bit PCM, ``(clips, clip_samples)``, without copying."""
    return tensor_values(_items(chunk, "audio"), (cfg.clip_samples,), AUDIO_DTYPE)


# --------------------------------------------------------------------------------------------- stages

def decode_batch(batch: pa.Table, features_json: str, silence_dbfs: float, images: bool = True) -> Iterator[pa.Table]:
    """Stage 1 (CPU task): a work batch's objects → their clips' log-mel images, in chunks; without
    ``images``, their clips as 16-bit PCM (the model actor makes the images on its device).

    One output row per chunk of at most :data:`CHUNK_BYTES` of images or audio (``seq`` 0, 1, ...;
    the last has ``last`` set and carries the batch's file details and quarantine rows), so a batch
    of any length of audio passes through in bounded memory. A file's clips join a chunk only once
    the file is known to be good (:class:`~melbatch.audio.objects.StagedClips`).
    """
    workers.prepare_worker(1)  # parallelism comes from Ray tasks
    cfg = FeatureConfig.from_dict(json.loads(features_json))
    shape, dtype = (cfg.shape, cfg.dtype) if images else ((cfg.clip_samples,), AUDIO_DTYPE)
    per_chunk = max(1, int(CHUNK_BYTES // (np.dtype(dtype).itemsize * math.prod(shape))))
    for row in batch.to_pylist():
        files, quarantine, clips, seq = [], [], [], 0
        mels = np.empty((per_chunk, *shape), dtype)  # filled in place: no list of small arrays
        for r in row["refs"]:
            ref = storage.ObjectRef(r["uri"], r["etag"], r["size"])
            try:
                info, staged = logmels_of_object(ref, cfg, silence_dbfs, images=images)
            except DecodeError as e:
                quarantine.append(quarantine_row(ref, e))
                continue
            files.append({"uri": ref.uri, "etag": ref.etag, "size": ref.size, "decoder": info.decoder,
                          "duration_s": info.decoded_frames / info.sample_rate_hz,
                          "source_sample_rate_hz": info.sample_rate_hz, "source_channels": info.channels})
            with staged:
                for clip, mel in staged:
                    mels[len(clips)] = mel if images else clip.samples
                    clips.append({"uri": ref.uri, "etag": ref.etag, "clip_index": clip.index,
                                  "start_s": clip.start_s, "end_s": clip.end_s})
                    if len(clips) == per_chunk:
                        yield _chunk(row["batch"], seq, False, clips, mels, [], [], images)
                        clips, seq = [], seq + 1
                        mels = np.empty_like(mels)
        yield _chunk(row["batch"], seq, True, clips, mels[: len(clips)], files, quarantine, images)


def _chunk(bid: str, seq: int, last: bool, clips: list[dict], values: np.ndarray, files: list[dict],
           quarantine: list[dict], images: bool = True) -> pa.Table:
    column = "mel" if images else "audio"  # images, or the clips' PCM for the model actor to image
    data = tensor_array(values, values.dtype.name)  # the bytes as they are, not copied
    return pa.Table.from_pydict({
        "batch": [bid], "seq": [seq], "last": [last], "node": [this_node()],
        "files": pa.array([files], pa.list_(FILE)), "quarantine": pa.array([quarantine], pa.list_(QUARANTINED)),
        "clips": pa.array([clips], pa.list_(CLIP)), column: _listed(data),
    }, schema=pa.schema([*CHUNK_FIELDS, pa.field("clips", pa.list_(CLIP)), pa.field(column, pa.list_(data.type))]))


class Predictor:
    """Stage 2 (actor): loads the model package once, then turns each chunk's images into its clip
    predictions (``clips``) and, per file, the sum of its clips' probabilities (``sums``)."""

    def __init__(self, model_uri: URI, batch_size: int, top_k: int, embeddings: bool, use_gpu: bool,
                 threads: int, thresholds: tuple[float, ...]) -> None:
        workers.prepare_worker(threads)
        pkg = load_package(model_uri, threads)
        self.pkg = replace(pkg, model=pkg.model.to(torch.device("cuda" if use_gpu else "cpu")).eval())
        self.batch_size, self.k, self.embeddings = batch_size, min(top_k, len(pkg.labels)), embeddings
        self.thresholds = np.asarray(thresholds, np.float64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self._predict(batch.slice(i, 1)) for i in range(batch.num_rows)])

    def _predict(self, chunk: pa.Table) -> pa.Table:
        clips = pa.Table.from_struct_array(_items(chunk, "clips"))
        cfg = self.pkg.features
        if self.pkg.embedder is not None:  # a head on an audio backbone: it hears the clips themselves
            probs, emb = predict_audio(self.pkg, chunk_audio(chunk, cfg))
            return self._rows(chunk, clips, probs, emb, self.embeddings)
        if "audio" in chunk.column_names:  # decoded without images: make them here, on the model's device
            images = clip_images(chunk_audio(chunk, cfg), cfg, next(self.pkg.model.parameters()).device,
                                 self.batch_size)
        else:
            images = chunk_images(chunk, cfg)
        far = self.pkg.novelty is not None
        probs, emb = predict(self.pkg, images, self.batch_size, self.embeddings or far, padded_clips=padded(
            clips.column("start_s").to_numpy(), clips.column("end_s").to_numpy(), cfg.clip_s))
        return self._rows(chunk, clips, probs, emb, self.embeddings)

    def _rows(self, chunk: pa.Table, clips: pa.Table, probs: np.ndarray, emb: np.ndarray | None,
              keep: bool) -> pa.Table:
        """The chunk with its clips' predictions (``keep``: with their embeddings), per-file sums and
        detection hits."""
        uris = clips.column("uri").to_pylist()
        sums = aggregate_files(uris, probs)
        far: dict[str, float] = {}
        if self.pkg.novelty is not None and emb is not None:
            for u, d in zip(uris, self.pkg.novelty.distances(emb), strict=True):
                far[u] = far.get(u, 0.0) + float(d)
        predictions = self._clip_table(clips, probs, emb if keep else None).to_struct_array().combine_chunks()
        rows = [{"uri": u, "probability_sum": a, "clips": n, "distance_sum": far.get(u)} for u, (a, n) in sums.items()]
        return chunk.select([f.name for f in CHUNK_FIELDS]).append_column(
            "clips", _listed(predictions)).append_column("sums", _listed(pa.array(rows, SUMS))).append_column(
            "hits", _listed(detections.hits(clips, probs, self.thresholds)))

    def _clip_table(self, clips: pa.Table, probs: np.ndarray, emb: np.ndarray | None) -> pa.Table:
        labels = np.array(self.pkg.labels, dtype=object)
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
        n = clips.num_rows
        cols: dict[str, Any] = {
            **{name: clips.column(name) for name in CLIP.names},
            "label": labels[top[:, 0]].tolist() if n else [],
            "probability": np.take_along_axis(probs, top[:, :1], 1)[:, 0] if n else [],
            "top_labels": labels[top].tolist(), "top_probabilities": np.take_along_axis(probs, top, 1).tolist(),
            "model_id": [self.pkg.meta["model_id"]] * n, "config_hash": [self.pkg.meta["config_hash"]] * n,
        }
        dim = 0
        if emb is not None:
            dim = emb.shape[1]
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float32).ravel()), dim)
        return pa.Table.from_pydict(cols, schema=clip_prediction_schema(self.k, dim))


def write_batch(batch: pa.Table, out: URI) -> pa.Table:
    """Stage 3 (CPU task): each chunk's clip predictions as ``clips/<batch>-<seq>.parquet``; the chunk
    goes on to the driver with its clip count and file name instead of its clips."""
    written = []
    for i in range(batch.num_rows):
        chunk = batch.slice(i, 1)
        clips = pa.Table.from_struct_array(_items(chunk, "clips"))
        name = None
        if clips.num_rows:
            bid, seq = chunk.column("batch")[0].as_py(), chunk.column("seq")[0].as_py()
            name = f"clips/{bid}-{seq:05d}.parquet"
            write_table(storage.join(out, name), clips.replace_schema_metadata(clip_prediction_schema(1).metadata))
        written.append(chunk.drop_columns(["clips"]).append_column("clips", pa.array([clips.num_rows], pa.int32()))
                       .append_column("clips_file", pa.array([name], pa.string())))
    return pa.concat_tables(written)
