"""The training data: a featurize output → labels, a split by file, Ray Datasets of images.

:func:`open_shards` checks a featurize output is complete and consistent; :func:`file_labels` reads
each file's label from four small columns; :func:`split_by_file` (or a split manifest) holds out whole
files; :func:`datasets` streams the training and validation images (or waveforms) as Ray Datasets;
:func:`dataset_stats` measures the normalisation; :func:`load_noise_bank` reads ``--noise-dir``.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from melbatch import URI, storage
from melbatch.audio import DecodeError, decode_all
from melbatch.config import AUDIO_EXTENSIONS, ConfigError, FeatureConfig
from melbatch.shards import DatasetError, feature_config_of, mel_array, open_dataset, shard_uris


def open_shards(uri: URI) -> tuple[dict[str, Any], FeatureConfig, list[URI]]:
    """The manifest, features and shard URIs of a complete, consistent featurize output."""
    manifest = open_dataset(uri)
    features = FeatureConfig.from_dict(manifest["feature_config"])
    if features.hash() != manifest["config_hash"]:
        raise DatasetError(f"{uri}/_manifest.json is inconsistent: its feature_config hashes to {features.hash()}, "
                           f"not the recorded {manifest['config_hash']}; re-run featurize")
    uris = shard_uris(uri, manifest)
    if not uris:
        raise DatasetError(f"{uri} holds no clips (every input was quarantined?): see its quarantine.parquet")
    for u in uris:
        if not storage.exists(u):
            raise DatasetError(f"{u} is listed in the manifest but missing: re-run featurize into {uri}")
    with storage.open_input(uris[0]) as f:
        have = feature_config_of(pq.ParquetFile(f).schema_arrow)
    if have.hash() != features.hash():
        raise DatasetError(f"{uris[0]} was written with features {have.hash()} but the manifest says "
                           f"{features.hash()}: the output mixes two featurize runs; re-run featurize with --overwrite")
    if not manifest.get("labels"):
        raise DatasetError(f"{uri} is unlabelled (featurized with --labels none): train needs labels")
    return manifest, features, uris


def file_labels(uris: list[URI]) -> tuple[dict[str, str], Counter, np.ndarray]:
    """(uri → label, uri → clip count, seconds of sound in each clip) for every source file.

    Reads four small columns, not the images.
    """
    labels_of: dict[str, str] = {}
    clips_of: Counter = Counter()
    sound: list[np.ndarray] = []
    for u in uris:
        with storage.open_input(u) as f:
            t = pq.read_table(f, columns=["uri", "label", "start_s", "end_s"])
        uris_col = t.column("uri").to_pylist()
        labels_of.update(zip(uris_col, t.column("label").to_pylist(), strict=True))
        clips_of.update(uris_col)
        sound.append(np.asarray(t.column("end_s")) - np.asarray(t.column("start_s")))
    return labels_of, clips_of, np.concatenate(sound) if sound else np.zeros(0)


def padding_warning(sound_s: np.ndarray, features: FeatureConfig) -> str | None:
    """A loud line with the fix when most clips are mostly padding: the recordings are much shorter
    than ``clip_s`` and featurize was told not to fit the clips to them (the same rule decides)."""
    fitted = features.fitted_to(sound_s.tolist())
    if fitted == features:
        return None
    return (f"half the clips hold less than {np.median(sound_s):.2f} s of sound in {features.clip_s:g} s images: "
            f"the model would mostly see padding. Featurize again without --no-fit-clips, or with --clip-s "
            f"{fitted.clip_s:g} --clip-hop-s {fitted.clip_hop_s:g} --min-tail-s {fitted.min_tail_s:g}.")


def split_by_file(labels_of: dict[str, str], val_fraction: float, seed: int) -> set[str]:
    """Validation files: ``val_fraction`` of each label's files (at least one where a label has two)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for uri, label in sorted(labels_of.items()):
        by_label.setdefault(label, []).append(uri)
    val: set[str] = set()
    for label in sorted(by_label):
        files = by_label[label]
        n = min(len(files) - 1, max(1 if len(files) >= 2 else 0, round(val_fraction * len(files))))
        val.update(rng.permutation(files)[:n].tolist())
    return val


def read_split_manifest(uri: URI, files: set[str]) -> set[str]:
    """Validation files from a CSV with ``uri,split`` (split ``train`` or ``val``)."""
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode("utf-8-sig"))))
    if not rows or not {"uri", "split"} <= set(rows[0]):
        raise ConfigError(f"split manifest {uri} needs a header with 'uri' and 'split' columns")
    bad = sorted({r["split"] for r in rows} - {"train", "val"})
    if bad:
        raise ConfigError(f"split manifest {uri}: split must be 'train' or 'val', found {bad}")
    val = {storage.canonical(r["uri"]) for r in rows if r["split"] == "val"}
    missing = sorted(val - files)[:3]
    if missing:
        raise ConfigError(f"split manifest {uri} names files that are not in the shards, e.g. {missing}")
    if not val:
        raise ConfigError(f"split manifest {uri} puts no file in 'val'")
    return val


def _filter_files(batch: pa.Table, files: pa.Array, keep: bool) -> pa.Table:
    mask = pc.is_in(batch.column("uri"), value_set=files)
    return batch.filter(mask if keep else pc.invert(mask))


def keeps_audio(manifest: dict[str, Any]) -> bool:
    """Whether a featurize output stores each clip's waveform next to its image."""
    return bool(manifest.get("audio", {}).get("kept"))


def images(uris: list[URI], columns: list[str]) -> Any:
    fs, _ = storage.arrow_filesystem(uris[0])
    return ray.data.read_parquet([storage.arrow_filesystem(u)[1] for u in uris], filesystem=fs, columns=columns)


def split(ds: Any, val_files: set[str], keep: bool) -> Any:
    files = pa.array(sorted(val_files), pa.string())
    return ds.map_batches(_filter_files, batch_format="pyarrow", fn_kwargs={"files": files, "keep": keep})


def _oversample(batch: pa.Table, repeats: dict[str, float]) -> pa.Table:
    """Repeat each row ``repeats[label]`` times on average (whole part always, fraction at random)."""
    r = np.array([repeats[v] for v in batch.column("label").to_pylist()])
    counts = np.floor(r).astype(int) + (np.random.default_rng().random(len(r)) < r - np.floor(r))
    return batch.take(pa.array(np.repeat(np.arange(len(r)), counts)))


def datasets(uris: list[URI], val_files: set[str], wave: bool,
             repeats: dict[str, float] | None = None) -> dict[str, Any]:
    """{"train", "val"} Ray Datasets over the shards, split by source file.

    Training rows carry the waveform (``audio``) when ``wave``, else the stored image; validation
    rows always the stored image. ``repeats`` oversamples rare labels (``balance: oversample``).
    """
    # blocks in a new random order every epoch, then a local shuffle buffer in each worker
    train = split(images(uris, ["uri", "label", "start_s", "end_s", "audio" if wave else "mel"])
                   .randomize_block_order(), val_files, keep=False)
    if repeats:
        train = train.map_batches(_oversample, batch_format="pyarrow", fn_kwargs={"repeats": repeats})
    return {"train": train, "val": split(images(uris, ["uri", "label", "mel"]), val_files, keep=True)}


def load_noise_bank(uri: URI, sample_rate_hz: int, max_s: float = 600.0, warn: Any = print) -> np.ndarray:
    """The noise recordings under ``uri`` at ``sample_rate_hz``, each scaled to unit RMS, end to end (≤ ``max_s``);
    ``warn`` tells of the files skipped."""
    parts, total = [], 0
    skipped: list[str] = []
    for ref in storage.list_objects(uri, extensions=AUDIO_EXTENSIONS):
        try:
            with storage.open_input(ref.uri, ref.size) as f:
                _, x = decode_all(f, sample_rate_hz)
        except DecodeError as e:
            skipped.append(f"{ref.uri} ({e.kind})")
            continue
        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
        if rms > 0:
            parts.append((x / rms).astype(np.float32))
            total += len(x)
        if total >= max_s * sample_rate_hz:
            break
    if skipped:
        warn(f"noise_dir: skipped {len(skipped)} file(s) that do not decode, e.g. {skipped[:3]}")
    if not parts:
        raise ConfigError(f"noise_dir {uri} holds no decodable, non-silent audio ({', '.join(AUDIO_EXTENSIONS)})")
    return np.concatenate(parts)[: int(max_s * sample_rate_hz)]


def _moments(batch: pa.Table) -> pa.Table:
    x = mel_array(batch).astype(np.float64)
    return pa.table({"n": [x.size], "s": [x.sum()], "ss": [np.square(x).sum()]})


def dataset_stats(train_ds: Any) -> tuple[float, float]:
    """Mean and standard deviation of every mel value in the training split (one streaming pass)."""
    t = train_ds.map_batches(_moments, batch_format="pyarrow").to_arrow_refs()
    parts = pa.concat_tables(ray.get(t))
    n, s, ss = (pc.sum(parts.column(c)).as_py() for c in ("n", "s", "ss"))
    mean = s / n
    return float(mean), float(math.sqrt(max(ss / n - mean * mean, 1e-12)))
