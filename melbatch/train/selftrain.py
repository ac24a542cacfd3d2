"""``train --unlabelled USHARDS`` for the ImageNet fine-tune: self-training on the archive the model will meet.

A noisy student (Xie et al. 2020), in rounds, each a step of one job that re-running resumes. The
driver (:func:`melbatch.train.driver.self_train`) trains the supervised teacher into
``OUT/self-training/round-0/``; then, for each round ``r``:

1. :func:`check` (before any cluster work): USHARDS is featurize output of SHARDS' features.
2. :func:`guess`: the round before's package, its BatchNorm statistics re-estimated on a sample of
   USHARDS (:func:`adapted_teacher`, what ``classify --adapt`` does; saved as ``round-<r>/teacher/``),
   scores every clip of USHARDS, streamed through a Ray Data actor as validation is
   (:func:`melbatch.train.finish.score_validation`, the one prediction path classify takes): only each
   clip's key and probabilities come back to the driver.
3. :func:`pick`: per guessed label its surest clips, at most ``--pseudo-keep`` of an equal share of
   the clips (:func:`melbatch.model.heads.pseudo_labels`, the rule the heads use): per-label thresholds
   and class balance, so no label swallows the archive; ``guesses.parquet`` keeps every clip's guess.
4. :func:`copy_taken`: one Ray task per shard of USHARDS copies the taken clips' rows, with their
   guessed labels, into ``round-<r>/pseudo/`` (the clip schema: the student reads them as it reads
   SHARDS); ``round-<r>/_pseudo.json`` commits the round's data. A crash before it makes the same
   guesses again; after it, the student's run resumes from its checkpoints.
5. The student: a fresh fine-tune from the same starting weights on SHARDS' training files and the
   pseudo-labelled clips, under the field augmentation (its noise), validated on the teacher's
   validation files, into ``round-<r>/``.

The last round's package becomes OUT's; ``metrics.json`` keeps every round under ``self_training``.
What it may change: the model's weights. What it may not: the labels and the split you gave (the
validation files are never trained on, even if USHARDS holds them: their clips are filtered out).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from melbatch import URI, storage
from melbatch.config import ConfigError, FeatureConfig, TrainConfig
from melbatch.model import adapt
from melbatch.model.heads import pseudo_labels
from melbatch.model.package import load_package, read_package_meta
from melbatch.shards import (
    GUESSES,
    GUESSES_SCHEMA,
    PSEUDO_DIR,
    PSEUDO_RECORD,
    SELF_TRAINING_DIR,
    clip_keys,
    clip_schema,
    mel_array,
    write_table,
)
from melbatch.train.data import keeps_audio, open_shards
from melbatch.train.finish import score_validation

HERE_MB = 512  # an unlabelled archive of at most this many MB of images is scored in the driver, without Ray Data
TEACHER_DIR = "teacher"  # round-<r>/teacher/: the teacher adapted to the archive, the one that guessed
ADAPT_GUESSES = True


def round_dir(out: URI, r: int) -> URI:
    """Round ``r``'s train OUT (round 0: the supervised teacher)."""
    return storage.join(out, SELF_TRAINING_DIR, f"round-{r}")


def check(cfg: TrainConfig, features: FeatureConfig) -> tuple[dict[str, Any], list[URI]]:
    """USHARDS' manifest and shard URIs, refused before any cluster work when the student could not
    train on its clips beside SHARDS' (other features, no waveforms for --wave-augment, several labels
    a clip, another storage than OUT's)."""
    if cfg.multi_label:
        raise ConfigError("--unlabelled with --multi-label: self-training guesses one label a clip; leave out one "
                          "of them")
    manifest, theirs, uris = open_shards(cfg.unlabelled, labelled=False)
    if theirs.hash() != features.hash():
        mine, other = features.to_dict(), theirs.to_dict()
        diff = ", ".join(f"{k} {other.get(k)!r} (SHARDS: {v!r})" for k, v in mine.items() if other.get(k) != v)
        raise ConfigError(f"--unlabelled {cfg.unlabelled} was featurized with other features than {cfg.shards}: "
                          f"{diff}. Featurize the unlabelled archive again with SHARDS' settings (and "
                          "--no-fit-clips, so its clips are not fitted to its own recordings)")
    if cfg.augment.wave_augment and not keeps_audio(manifest):
        raise ConfigError(f"--wave-augment trains on waveforms, and --unlabelled {cfg.unlabelled} holds images "
                          "only: featurize it again with --keep-audio, or leave out --wave-augment")
    if type(storage.filesystem(cfg.shards)[0]) is not type(storage.filesystem(cfg.out)[0]):
        raise ConfigError(f"the guessed clips are written into OUT {cfg.out} and read with {cfg.shards}'s shards "
                          "by one reader: put OUT on the same storage as SHARDS (both s3:// or both local)")
    return manifest, uris


def is_small(manifest: dict[str, Any], features: FeatureConfig) -> bool:
    """Whether USHARDS' images are few enough (:data:`HERE_MB`) to be scored in this process."""
    image = clip_schema(features).field("mel").type.byte_width
    return manifest.get("counts", {}).get("clips", 0) * image <= HERE_MB * 2**20


def guess(teacher: TrainConfig, uris: list[URI], here: bool) -> pa.Table:
    """Every clip of ``uris`` scored by ``teacher.out``'s package: ``uri, clip_index, probabilities``."""
    scored = score_validation(teacher, uris, set(), here, keep=False)  # no file held back: every clip
    return scored.select(["uri", "clip_index", "probabilities"])


def shard_sample(uris: list[URI], most: int = adapt.ADAPT_CLIPS, spread: int = 16) -> np.ndarray:
    """Up to ``most`` images spread over the shards ``uris``: from up to ``spread`` shards spread over the
    list, row groups spread over each (a few row groups are read, never a whole archive)."""
    chosen = [uris[i] for i in sorted(set(np.linspace(0, len(uris) - 1, min(len(uris), spread)).astype(int)))]
    parts = []
    for u in chosen:
        with storage.arrow_input(u, whole=False) as f:
            pf = pq.ParquetFile(f)
            groups = pf.num_row_groups
            per = max(1, math.ceil(most / (len(chosen) * max(1, pf.metadata.num_rows // max(1, groups)))))
            for g in sorted(set(np.linspace(0, groups - 1, min(groups, per)).astype(int).tolist())):
                parts.append(mel_array(pf.read_row_group(g, columns=["mel"])))
    images = np.concatenate(parts) if parts else np.zeros(0)
    return images[np.linspace(0, len(images) - 1, most).astype(int)] if len(images) > most else images


def adapted_teacher(teacher: TrainConfig, uris: list[URI], round_out: URI) -> TrainConfig | None:
    """The teacher's package with its BatchNorm statistics re-estimated on a sample of the unlabelled
    archive (:func:`melbatch.model.adapt.adapted`, what ``classify --adapt`` does), saved as
    ``round_out/teacher/``: the train config to guess with (``None``: nothing to adapt, or too few clips)."""
    pkg = load_package(teacher.out)
    sample = shard_sample(uris)
    if not adapt.can_adapt(pkg) or pkg.embedder is not None or len(sample) < adapt.FEW_CLIPS:
        return None
    new = adapt.adapted(pkg, sample)
    where = storage.join(round_out, TEACHER_DIR)
    adapt.save(new, where)
    return replace(teacher, out=where)


@dataclass(frozen=True)
class Pseudo:
    """A round's pseudo-labelled clips: their shard files, the count per label, and the record."""

    uris: tuple[URI, ...]
    per_label: dict[str, int]
    record: dict[str, Any]


def pick(scored: pa.Table, labels: list[str], keep: float, before: pa.Table | None) -> tuple[pa.Table, dict[str, Any]]:
    """The round's guesses (:data:`~melbatch.shards.GUESSES_SCHEMA`: every clip, which are taken) and
    its record: clips taken per label, and the share of guesses the same as the round ``before``."""
    n = scored.num_rows
    probs = np.asarray(scored.column("probabilities").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                       np.float32).reshape(n, len(labels))
    take, best = pseudo_labels(probs, keep) if n else (np.zeros(0, bool), np.zeros(0, int))
    guesses = pa.table({"uri": scored.column("uri"), "clip_index": scored.column("clip_index"),
                        "guess": pa.array([labels[i] for i in best], pa.string()),
                        "probability": pa.array(probs.max(axis=1) if n else [], pa.float32()),
                        "taken": pa.array(take)}, schema=GUESSES_SCHEMA)
    agreement = None
    if before is not None:
        was = dict(zip(clip_keys(before), before.column("guess").to_pylist(), strict=True))
        same = [was[k] == g for k, g in zip(clip_keys(guesses), guesses.column("guess").to_pylist(), strict=True)
                if k in was]
        agreement = float(np.mean(same)) if same else None
    per_label = {lab: int(c) for lab, c in zip(labels, np.bincount(best[take], minlength=len(labels)), strict=True)}
    return guesses, {"taken": int(take.sum()), "of": n, "per_label": per_label, "agreement_with_previous": agreement}


@ray.remote(num_cpus=0.5, max_retries=2)
def _copy(shard: URI, taken: dict[str, str], dest: URI) -> int:
    """The taken clips of one shard, with their guessed labels, into ``dest`` (none: no file); their count."""
    with storage.arrow_input(shard) as f:
        rows = pq.read_table(f)
    keys = clip_keys(rows)
    mask = np.array([k in taken for k in keys], bool)
    if not mask.any():
        return 0
    rows = rows.filter(pa.array(mask))
    at = rows.schema.get_field_index("label")
    labels = pa.array([taken[k] for k, m in zip(keys, mask, strict=True) if m], pa.string())
    write_table(dest, rows.set_column(at, rows.schema.field("label"), labels))
    return int(mask.sum())


def copy_taken(uris: list[URI], guesses: pa.Table, round_out: URI) -> list[URI]:
    """The taken clips of ``guesses`` copied from USHARDS' shards ``uris`` into ``round_out/pseudo/``, one
    Ray task per shard (each holds one shard: memory stays bounded whatever the archive's size)."""
    chosen = guesses.filter(guesses.column("taken"))
    taken = ray.put(dict(zip(clip_keys(chosen), chosen.column("guess").to_pylist(), strict=True)))
    dests = [storage.join(round_out, PSEUDO_DIR, f"part-{k:05d}.parquet") for k in range(len(uris))]
    counts = ray.get([_copy.remote(u, taken, d) for u, d in zip(uris, dests, strict=True)])
    return [d for d, c in zip(dests, counts, strict=True) if c]


def make(teacher: TrainConfig, uris: list[URI], manifest: dict[str, Any], labels: list[str], round_out: URI,
         before: pa.Table | None) -> Pseudo:
    """Round data: the teacher's guesses, the clips taken and copied, committed by the record."""
    features = FeatureConfig.from_dict(manifest["feature_config"])
    guesser = (adapted_teacher(teacher, uris, round_out) if ADAPT_GUESSES else None) or teacher
    guesses, record = pick(guess(guesser, uris, is_small(manifest, features)), labels, teacher.pseudo_keep, before)
    write_table(storage.join(round_out, GUESSES), guesses)
    written = copy_taken(uris, guesses, round_out)
    record = {**record, "teacher": teacher.out, "guessed_by": read_package_meta(guesser.out)["model_id"],
              "adapted": guesser is not teacher, "unlabelled": teacher.unlabelled,
              "shards": [storage.relative(u, round_out) for u in written]}
    storage.write_bytes(storage.join(round_out, PSEUDO_RECORD), json.dumps(record, indent=2).encode())
    return load(round_out)  # type: ignore[return-value]


def load(round_out: URI) -> Pseudo | None:
    """A round's committed data (``None``: not committed yet)."""
    at = storage.join(round_out, PSEUDO_RECORD)
    if not storage.exists(at):
        return None
    record = json.loads(storage.read_bytes(at))
    return Pseudo(tuple(storage.join(round_out, rel) for rel in record["shards"]), record["per_label"], record)


def guesses_of(round_out: URI) -> pa.Table | None:
    """A committed round's guesses, for the next round's agreement (``None``: round 0, the teacher)."""
    at = storage.join(round_out, GUESSES)
    if not storage.exists(at):
        return None
    with storage.arrow_input(at) as f:
        return pq.read_table(f)


def describe(r: int, pseudo: Pseudo) -> str:
    """The line ``train`` prints for a round's data."""
    rec = pseudo.record
    agree = "" if rec["agreement_with_previous"] is None else \
        f", {rec['agreement_with_previous']:.3f} of the guesses as the round before"
    per = ", ".join(f"{lab} {n:,}" for lab, n in rec["per_label"].items())
    by = " by the teacher adapted to the archive" if rec.get("adapted") else ""
    return f"round {r}: {rec['taken']:,} of {rec['of']:,} unlabelled clips taken{by} ({per}){agree}"


__all__ = ["Pseudo", "check", "copy_taken", "describe", "guess", "guesses_of", "load", "make", "pick", "round_dir"]
