"""The training data: a featurize output → labels, a split by file, Ray Datasets of images.

:func:`open_shards` checks a featurize output is complete and consistent; :func:`file_labels` reads
each file's label from four small columns; :func:`split_by_file` (or a split manifest) holds out whole
files; :func:`splits` says what the training and validation rows are (images or waveforms), read as
Ray Datasets or, when small, whole by each worker (:func:`share` deals them out);
:func:`dataset_stats` measures the normalisation; :func:`load_noise_bank` reads ``--noise-dir``;
:func:`reviewed` folds a review's answered ``labels.csv`` (``--extra-labels``) into the training split.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from melbatch import URI, listing, storage
from melbatch.audio.decode import DecodeError, decode_span
from melbatch.audio.objects import logmels_of_object
from melbatch.config import AUDIO_EXTENSIONS, ConfigError, FeatureConfig
from melbatch.labels.sources import ReviewedClip, read_reviewed
from melbatch.shards import (
    REVIEWED_CLIPS,
    ClipRow,
    DatasetError,
    clip_key,
    clip_keys,
    feature_config_of,
    mel_array,
    open_dataset,
    read_files,
    rows_to_table,
    shard_uris,
    write_table,
)

CLIP_START_TOLERANCE_S = 0.01  # a reviewed clip and the clip cut again must start within this


def open_shards(uri: URI, labelled: bool = True) -> tuple[dict[str, Any], FeatureConfig, list[URI]]:
    """The manifest, features and shard URIs of a complete, consistent featurize output (``labelled``:
    one with labels)."""
    manifest = open_dataset(uri)
    if "shards" not in manifest:  # a classify, scan or discover output given where shards belong
        raise ConfigError(f"{uri} is a {manifest.get('kind') or 'non-featurize'} output, not featurize shards: give "
                          "the DST of `melbatch featurize` (which makes shards of labelled recordings)")
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
    with storage.arrow_input(uris[0], whole=False) as f:  # the schema alone
        have = feature_config_of(pq.ParquetFile(f).schema_arrow)
    if have.hash() != features.hash():
        raise DatasetError(f"{uris[0]} was written with features {have.hash()} but the manifest says "
                           f"{features.hash()}: the output mixes two featurize runs; re-run featurize with --overwrite")
    if labelled and not manifest.get("labels"):
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
        with storage.arrow_input(u) as f:
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


def images(uris: list[URI], columns: list[str], files: frozenset[str] = frozenset(), keep: bool = False,
           shuffle: bool = False) -> Any:
    """The shards' ``columns`` as a Ray Dataset, read by Ray Data's first Parquet reader: the rows of
    the source ``files`` (``keep``) or of every other file, the shards in a new order every time the
    dataset runs (``shuffle``: every epoch; featurize's shards each mix labels and folders).

    Ray 2.60's default reader (``use_datasource_v2``) starts a pool of up to 32 footer-reading actors, each
    a new Python process, for every read: on a small cluster that is most of a training run's start
    (measured on 2 CPUs, the demo's 24 clips: 1.4-1.9 s a read warm, 11 worker processes, against
    0.2-0.4 s and 4). melbatch names every shard from its manifest, so there is nothing to discover.
    The files are chosen inside the read (a pyarrow filter) and the shards shuffled before it, where a
    ``map_batches`` filter and ``randomize_block_order`` each cost a pass over the rows (measured, 2
    CPUs, 8,000 clips, batches of 32: 945 clips/s with the map_batches filter, 2,033 with it in the
    read, 2,052 reading alone; the all-to-all order waited 3.3 s for every read before the first batch)."""
    fs, _ = storage.arrow_filesystem(uris[0])
    chosen = pc.field("uri").isin(pa.array(sorted(files), pa.string()))
    ctx = ray.data.DataContext.get_current()
    was, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet([storage.arrow_filesystem(u)[1] for u in uris], filesystem=fs, columns=columns,
                                     filter=chosen if keep else ~chosen if files else None,
                                     shuffle="files" if shuffle else None)
    finally:
        ctx.use_datasource_v2 = was


def _oversample(batch: pa.Table, repeats: dict[str, float], seed: int | None = None) -> pa.Table:
    """Repeat each row ``repeats[label]`` times on average (whole part always, fraction at random)."""
    r = np.array([repeats[v] for v in batch.column("label").to_pylist()])
    counts = np.floor(r).astype(int) + (np.random.default_rng(seed).random(len(r)) < r - np.floor(r))
    return batch.take(pa.array(np.repeat(np.arange(len(r)), counts)))


def _relabel(batch: pa.Table, labels: dict[str, str]) -> pa.Table:
    """Rows whose ``uri<TAB>clip_index`` is in ``labels`` get that label (a reviewer's answer)."""
    new = [labels.get(k, old) for k, old in zip(clip_keys(batch), batch.column("label").to_pylist(), strict=True)]
    at = batch.schema.get_field_index("label")
    return batch.set_column(at, "label", pa.array(new, pa.string()).cast(batch.schema.field("label").type))


@dataclass(frozen=True)
class Split:
    """One side of the split by file: which shard columns to read and what becomes of the rows (the
    source files kept or left out, a reviewer's labels, oversampling). Read by Ray Data as a stream
    (:meth:`dataset`), or whole in one process (:meth:`table`), with the same steps."""

    uris: tuple[URI, ...]
    columns: tuple[str, ...]
    val_files: frozenset[str]
    keep: bool  # the validation files' rows (True) or every other row (False)
    relabel: dict[str, str] | None = None  # "uri<TAB>clip_index" -> a reviewer's label
    repeats: dict[str, float] | None = None  # label -> times each row is taken on average

    def dataset(self) -> Any:
        # training: the shards in a new order every epoch (and the workers shuffle rows)
        ds = images(list(self.uris), list(self.columns), self.val_files, self.keep, shuffle=not self.keep)
        if self.relabel:
            ds = ds.map_batches(_relabel, batch_format="pyarrow", fn_kwargs={"labels": self.relabel})
        if self.repeats:
            ds = ds.map_batches(_oversample, batch_format="pyarrow", fn_kwargs={"repeats": self.repeats})
        return ds

    def table(self, seed: int = 0, shards: pa.Table | None = None) -> pa.Table:
        """Every row, here; ``seed`` draws the oversampling's fractions (the same seed, the same rows).
        ``shards``: the rows of ``uris`` read already (with these columns at least), not read again."""
        read = shards.select(list(self.columns)) if shards is not None else read_files(list(self.uris),
                                                                                       list(self.columns))
        rows = _filter_files(read, pa.array(sorted(self.val_files), pa.string()), self.keep)
        if self.relabel:
            rows = _relabel(rows, self.relabel)
        return _oversample(rows, self.repeats, seed) if self.repeats else rows


def splits(uris: list[URI], val_files: set[str], wave: bool, repeats: dict[str, float] | None = None,
           review: Reviewed | None = None, more: tuple[URI, ...] = ()) -> dict[str, Split]:
    """{"train", "val"}: the two sides of the split by source file.

    Training rows carry the waveform (``audio``) when ``wave``, else the stored image; validation
    rows always the stored image. ``repeats`` oversamples rare labels (``balance: oversample``).
    With ``review``, training clips take the reviewer's labels and the reviewed clips of files
    outside the shards join the training split. ``more``: files of labelled clips (the clip schema)
    that join the training split too, such as self-training's guessed clips (clips of validation
    files among them are left out, as the shards' are).
    """
    relabel = review.relabel if review and review.relabel else None
    extra = ((review.added_uri,) if review and review.added_uri else ()) + tuple(more)
    columns = ("uri", "label", "start_s", "end_s", "audio" if wave else "mel", *(("clip_index",) if relabel else ()))
    held_out = frozenset(val_files)
    return {"train": Split((*uris, *extra), columns, held_out, keep=False, relabel=relabel, repeats=repeats),
            "val": Split(tuple(uris), ("uri", "label", "start_s", "end_s", "mel"), held_out, keep=True)}


def read_sides(sides: dict[str, Split], seed: int) -> dict[str, pa.Table]:
    """Every side's rows (:meth:`Split.table` with ``seed``), the shards read once for all of them: every
    side's files with the columns any side needs. (The training side also reads a review's added clips;
    they are of files outside the shards, so never the validation side's.)"""
    uris = list(dict.fromkeys(u for side in sides.values() for u in side.uris))
    shards = read_files(uris, list(dict.fromkeys(c for side in sides.values() for c in side.columns)))
    return {name: side.table(seed, shards) for name, side in sides.items()}


def share(rows: pa.Table, rank: int, world: int, seed: int, equal: bool) -> pa.Table:
    """Worker ``rank``'s rows of a table every worker read whole: one permutation (from ``seed``, so the
    same in every worker) dealt out in turn. ``equal``: every worker gets as many rows (the first ones
    again where they do not divide), as data-parallel steps need; validation shares need not be."""
    order = np.random.default_rng(seed).permutation(rows.num_rows)
    if equal and world > 1:
        order = np.resize(order, -(-len(order) // world) * world)
    return rows.take(pa.array(order[rank::world]))


def load_noise_bank(uri: URI, sample_rate_hz: int, max_s: float = 600.0, warn: Any = print) -> np.ndarray:
    """The noise recordings under ``uri`` at ``sample_rate_hz``, each scaled to unit RMS, end to end (≤ ``max_s``);
    ``warn`` tells of the files skipped."""
    parts, total = [], 0
    skipped: list[str] = []
    for ref in listing.list_objects(uri, extensions=AUDIO_EXTENSIONS):
        try:
            with storage.open_input(ref.uri, ref.size) as f:  # no further than the bank still needs
                _, x = decode_span(f, sample_rate_hz, 0.0, (max_s * sample_rate_hz - total + 1) / sample_rate_hz)
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


def collect(ds: Any) -> pa.Table:
    """A (small) dataset's rows as one table. Blocks that a filter emptied are left out: Ray Data passes
    such a block on with its input's columns, not the ones the later stages make."""
    return pa.concat_tables([t for t in ray.get(ds.to_arrow_refs()) if t.num_rows])


def dataset_stats(uris: list[URI], val_files: set[str], here: bool) -> tuple[float, float]:
    """Mean and standard deviation of every mel value in the shards' training split: one streaming
    pass of Ray Data, or ``here`` (a small split) reading it whole in this process."""
    rows = Split(tuple(uris), ("uri", "label", "mel"), frozenset(val_files), keep=False)
    parts = _moments(rows.table()) if here else collect(rows.dataset().map_batches(_moments, batch_format="pyarrow"))
    n, s, ss = (pc.sum(parts.column(c)).as_py() for c in ("n", "s", "ss"))
    mean = s / n
    return float(mean), float(math.sqrt(max(ss / n - mean * mean, 1e-12)))


@dataclass
class Reviewed:
    """What a review's answered ``labels.csv`` (``--extra-labels``) changes in a run.

    Answers for clips of training files relabel them (the reviewer wins over the folder); answers for
    clips of files outside the shards are read from the archive, cut as featurize cut, and added to
    training (``OUT/reviewed_clips.parquet``); answers for validation files are not applied, so the
    held-out split stays the archive's own and before/after accuracies compare.
    """

    uri: URI
    answered: int = 0
    skipped: int = 0  # rows left empty or "skip"
    relabel: dict[str, str] = field(default_factory=dict)  # "uri<TAB>clip_index" -> label, training files only
    in_validation: int = 0  # answers for validation files, not applied
    added: Counter = field(default_factory=Counter)  # label -> clips added from files outside the shards
    added_uri: URI | None = None
    unreadable: list[str] = field(default_factory=list)  # files of added clips that could not be read
    moved: list[tuple[str, str]] = field(default_factory=list)  # (folder label, reviewed label) per relabelled clip

    @property
    def corrected(self) -> int:
        """Answers for training clips that differ from the folder's label."""
        return sum(old != new for old, new in self.moved)

    @property
    def confirmed(self) -> int:
        return len(self.moved) - self.corrected

    def labels(self) -> set[str]:
        return set(self.relabel.values()) | set(self.added)

    def record(self) -> dict[str, Any]:
        return {"uri": self.uri, "answered": self.answered, "skipped": self.skipped, "corrected": self.corrected,
                "confirmed": self.confirmed, "in_validation_not_applied": self.in_validation,
                "added": sum(self.added.values()), "added_per_label": dict(sorted(self.added.items())),
                "unreadable_files": self.unreadable}

    def describe(self) -> str:
        return (f"reviewed labels {self.uri}: {self.answered} answered ({self.skipped} skipped): {self.corrected} "
                f"corrected and {self.confirmed} confirmed in training files, {sum(self.added.values())} clip(s) "
                f"added from {len({k for k in self.added})} label(s) outside the shards, {self.in_validation} in "
                "validation files left as they are")


def reviewed(uri: URI, features: FeatureConfig, keep_audio: bool, labels_of: dict[str, str], clips_of: Counter,
             val_files: set[str], out: URI) -> Reviewed:
    """Read the answers of ``uri`` and sort them (see :class:`Reviewed`); the clips to add are read
    from the archive here, before any cluster work, and written to ``out``."""
    answers, skipped = read_reviewed(uri)
    r = Reviewed(uri, answered=len(answers), skipped=skipped)
    outside: dict[str, list[ReviewedClip]] = {}
    for a in answers:
        if a.uri not in labels_of:
            outside.setdefault(a.uri, []).append(a)
        elif a.clip_index >= clips_of[a.uri]:
            raise ConfigError(f"reviewed labels {uri}: {a.uri} has {clips_of[a.uri]} clips in the shards, no clip "
                              f"{a.clip_index}: was it reviewed from another featurize or classify run's clips?")
        elif a.uri in val_files:
            r.in_validation += 1
        else:
            r.relabel[clip_key(a.uri, a.clip_index)] = a.label
            r.moved.append((labels_of[a.uri], a.label))
    rows: list[ClipRow] = []
    for file_uri, wanted in sorted(outside.items()):
        got = _read_clips(file_uri, {a.clip_index: a for a in wanted}, features, keep_audio)
        if got is None:
            r.unreadable.append(file_uri)
            continue
        rows += got
        r.added.update(row.label for row in got)
    if rows:
        r.added_uri = storage.join(out, REVIEWED_CLIPS)
        write_table(r.added_uri, rows_to_table(rows, features, keep_audio))
    return r


def _read_clips(uri: URI, wanted: dict[int, ReviewedClip], features: FeatureConfig,
                keep_audio: bool) -> list[ClipRow] | None:
    """The ``wanted`` clips of one archive file with their reviewed labels (``None``: unreadable now)."""
    try:
        ref = next(listing.list_objects(uri), None)
    except storage.StorageError:
        return None
    if ref is None:
        return None
    try:
        info, staged = logmels_of_object(ref, features, -math.inf, keep_audio)
    except DecodeError:
        return None
    rows = []
    with staged:
        for clip, mel in staged:
            a = wanted.get(clip.index)
            if a is None:
                continue
            if abs(clip.start_s - a.start_s) > CLIP_START_TOLERANCE_S:
                raise ConfigError(f"reviewed clip {a.clip_index} of {uri} starts at {a.start_s} s, but these shards' "
                                  f"features cut it at {clip.start_s} s: review a classify output of a model "
                                  "trained on these shards (same --clip-s and --clip-hop-s)")
            rows.append(ClipRow(ref.uri, ref.etag, ref.size, a.label, clip.index, clip.start_s, clip.end_s,
                                info.decoder, info.sample_rate_hz, info.channels, mel,
                                clip.samples if keep_audio else None))
    missing = sorted(set(wanted) - {row.clip_index for row in rows})
    if missing:
        raise ConfigError(f"reviewed labels name clip(s) {missing[:5]} of {uri}, which has {len(staged)} clips now: "
                          "the file changed since it was reviewed; review it again")
    return rows
