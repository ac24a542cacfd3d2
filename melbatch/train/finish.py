"""What a train run leaves in OUT once Ray Train is done: the best epoch (highest macro-F1) becomes
the model package (``OUT/model/``), every validation clip is scored with it by the one prediction
path classify takes (``OUT/val_predictions.parquet``: what the report's "most confidently wrong"
and the per-file accuracy come from), the distance rule (:mod:`melbatch.model.novelty`: fitted on the
pooled features of up to :data:`NOVELTY_TRAIN_FILES` training files, its thresholds chosen on the
validation files), then ``OUT/metrics.json`` and ``OUT/split.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from melbatch import URI, storage
from melbatch.config import FeatureConfig, TrainConfig
from melbatch.labels import multilabel
from melbatch.model import novelty
from melbatch.model.package import (
    PACKAGE_DIR,
    PADDED_VIEWS,
    Package,
    aggregate_files,
    create_model,
    fit_temperature,
    load_package,
    padded,
    predict,
    save_novelty,
    save_package,
    tempered,
    update_meta,
    verdicts,
)
from melbatch.model.weights import Source
from melbatch.shards import METRICS, SPLIT, STATE, VAL_PREDICTIONS, embedding_matrix, mel_array
from melbatch.train.data import Split, collect


def finish(cfg: TrainConfig, result: Any, labels: list[str], features: FeatureConfig, norm: dict[str, Any],
            uris: list[URI], val_files: set[str], train_files: set[str], source: Source,
            review: dict[str, Any] | None = None, here: bool = False) -> dict[str, Any]:
    """The best epoch's model package, every validation clip scored with it (``here``: in this process),
    ``metrics.json`` and ``split.csv``; returns the metrics."""
    candidates = list(result.best_checkpoints or []) or [(result.checkpoint, result.metrics)]
    best_ckpt, best = max(candidates, key=lambda cm: (cm[1]["macro_f1"], cm[1]["epoch"]))
    with best_ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)["history"]
    pool = cfg.time_pool or 1
    model = create_model(cfg.model, len(labels), features.shape, source=Source("none"), time_pool=pool)
    model.load_state_dict(state["model"])
    meta = {"model_name": cfg.model, "time_pool": pool, "labels": labels, "feature_config": features.to_dict(),
            "initial_weights": source.to_dict(),
            "config_hash": features.hash(), "normalization": norm, "train_config": asdict(cfg),
            "best_epoch": best["epoch"], "shards": storage.canonical(cfg.shards), "extra_labels": review,
            "padded_views": PADDED_VIEWS}
    multi = {}
    if cfg.multi_label:  # the thresholds chosen on the validation split at the best epoch go with the model
        multi = {"multi_label": True, "thresholds": json.loads(best["thresholds"])}
    save_package(cfg.out, model, {**meta, **multi})
    val = score_validation(cfg, uris, val_files, here, embeddings=not cfg.multi_label)
    calibration = rule = None
    if not cfg.multi_label:
        val, calibration = calibrate(cfg, val, labels)
        seen = score_validation(cfg, uris, _sample(train_files), here, embeddings=True)
        index = {lab: i for i, lab in enumerate(labels)}
        fitted = novelty.fit(embedding_matrix(seen), np.array([index[v] for v in seen.column("label").to_pylist()]),
                             len(labels))
        val = val.append_column("distance", pa.array(fitted.distances(embedding_matrix(val)), pa.float32())) \
            .drop_columns(["embedding"])
        rule = store_novelty(cfg, fitted, val)
    write_val_predictions(cfg, val)
    metrics = {
        "backbone": "imagenet", "val_accuracy": best["val_accuracy"], "macro_f1": best["macro_f1"],
        "best_epoch": best["epoch"],
        "val_file_accuracy": file_accuracy(val, labels, multi.get("thresholds")),
        "labels": labels, **({"val_map": best["val_map"], **multi} if multi else {
            "confusion_matrix": json.loads(best["confusion_matrix"])}),
        "per_class": json.loads(best["per_class"]), "epochs": history,
        "split": {"train_files": len(train_files), "val_files": len(val_files)},
        "initial_weights": source.to_dict(), "extra_labels": review, "calibration": calibration,
        "novelty": rule, "model_package": storage.join(storage.canonical(cfg.out), PACKAGE_DIR),
    }
    storage.write_bytes(storage.join(cfg.out, METRICS), json.dumps(metrics, indent=2).encode())
    write_split(cfg.out, val_files, train_files)
    return metrics


def write_split(out: URI, val_files: set[str], train_files: set[str]) -> None:
    """``OUT/split.csv``: every file and its side (``uri,split``), what ``--split-manifest`` reads back."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["uri", "split"])
    w.writerows([(u, "val") for u in sorted(val_files)] + [(u, "train") for u in sorted(train_files)])
    storage.write_bytes(storage.join(out, SPLIT), buf.getvalue().encode())


NOVELTY_TRAIN_FILES = 400  # the distance rule's Gaussian: 400 files' clips (FSDD: 400 clips, 10 s on 2 CPUs)


def _sample(files: set[str]) -> set[str]:
    """At most :data:`NOVELTY_TRAIN_FILES` of ``files``, the same ones every run."""
    picked = sorted(files, key=lambda u: hashlib.sha1(u.encode()).hexdigest())
    return set(picked[:NOVELTY_TRAIN_FILES])


def store_novelty(cfg: TrainConfig, fitted: novelty.Novelty, val: pa.Table) -> dict[str, Any]:
    """The distance rule's thresholds chosen on the calibrated validation clips (``distance`` per clip),
    stored with the Gaussian in the package; returns the rule (what ``metrics.json`` keeps)."""
    uris = val.column("uri").to_pylist()
    n = len(val.column("probabilities")[0]) if val.num_rows else 0
    sums = aggregate_files(uris, list(np.asarray(val.column("probabilities").to_pylist(), np.float64).reshape(-1, n)))
    files = sorted(sums)
    scores, _ = verdicts(sums, files, n)
    far = novelty.file_means(uris, val.column("distance").to_numpy())
    rule = novelty.choose(scores.max(axis=1) if len(files) else np.zeros(0), np.array([far[u] for u in files]))
    save_novelty(cfg.out, fitted, rule)
    return rule


class _Scorer:
    """Ray Data actor: the saved package's class probabilities (and with ``embeddings`` its pooled
    features) for stored images (:func:`melbatch.model.package.predict`, the path classify takes)."""

    def __init__(self, package: URI, use_gpu: bool, batch_size: int, embeddings: bool = False) -> None:
        pkg = load_package(package)
        self.pkg = Package(pkg.model.to(torch.device("cuda" if use_gpu else "cpu")), pkg.meta)
        self.batch_size, self.embeddings = batch_size, embeddings

    def __call__(self, batch: pa.Table) -> pa.Table:
        probs, emb = predict(self.pkg, mel_array(batch), self.batch_size, self.embeddings, padded_clips=padded(
            batch.column("start_s").to_numpy(), batch.column("end_s").to_numpy(), self.pkg.features.clip_s))
        labels = self.pkg.labels
        index = {lab: i for i, lab in enumerate(labels)}
        # the probability of the (best-scored) true label; multi-label clips with none of the labels and
        # unlabelled clips (what self-training guesses for): NaN
        given = batch.column("label").to_pylist()
        truth = multilabel.targets(given, index) if self.pkg.meta.get("multi_label") \
            else np.eye(len(labels) + 1, dtype=np.float32)[[index.get(v, len(labels)) for v in given], :-1]
        mine = np.where(truth > 0, probs, -1.0).max(axis=1)
        best = probs.argmax(axis=1)
        out = batch.drop_columns(["mel"]).append_column("predicted", pa.array([labels[i] for i in best])) \
            .append_column("probability", pa.array(probs.max(axis=1), pa.float32())) \
            .append_column("label_probability", pa.array(np.where(mine < 0, np.nan, mine), pa.float32())) \
            .append_column("probabilities", pa.array(list(probs), pa.list_(pa.float32(), len(labels))))
        if not self.embeddings:
            return out
        dim = int(self.pkg.model.num_features)
        emb = np.zeros((0, dim), np.float32) if emb is None else emb
        return out.append_column("embedding", pa.FixedSizeListArray.from_arrays(
            pa.array(emb.astype(np.float32).ravel()), dim))


def score_validation(cfg: TrainConfig, uris: list[URI], val_files: set[str], here: bool,
                     embeddings: bool = False, keep: bool = True) -> pa.Table:
    """Every clip of ``val_files`` (``keep``; else of every other file) scored by the saved package (the
    best epoch), sorted by file and clip (for the validation files, what ``OUT/val_predictions.parquet``
    holds), with ``embeddings`` their pooled features too: by a Ray Data actor, or ``here`` (a small
    split, see :func:`melbatch.train.driver.hold_plan`) in this process."""
    columns = ("uri", "clip_index", "start_s", "end_s", "label", "mel")
    rows = Split(tuple(uris), columns, frozenset(val_files), keep=keep)
    if here:
        scorer = _Scorer(storage.join(cfg.out, PACKAGE_DIR), use_gpu=False, batch_size=cfg.batch_size,
                         embeddings=embeddings)
        return _in_order(scorer(rows.table()))
    with warnings.catch_warnings():  # Ray 2.60 names no parameter for max_restarts yet and warns on the console
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = rows.dataset().map_batches(
            _Scorer, fn_constructor_kwargs={"package": storage.join(cfg.out, PACKAGE_DIR), "use_gpu": cfg.use_gpu,
                                            "batch_size": cfg.batch_size, "embeddings": embeddings},
            batch_format="pyarrow", batch_size=4 * cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=1),
            num_gpus=1 if cfg.use_gpu else 0, num_cpus=min(1.0, cfg.cpus_per_worker or 1.0),
            max_restarts=0)  # a short pass (re-run to resume); restartable actors also make Ray warn on the console
    return _in_order(collect(ds))


def _in_order(scored: pa.Table) -> pa.Table:
    return scored.sort_by([("uri", "ascending"), ("clip_index", "ascending")])


def write_val_predictions(cfg: TrainConfig, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(cfg.out, VAL_PREDICTIONS), buf.getvalue())


RELIABILITY_BINS = 10


def calibrate(cfg: TrainConfig, val: pa.Table, labels: list[str]) -> tuple[pa.Table, dict[str, Any]]:
    """Fit the package's temperature on the validation clips (:func:`~melbatch.model.package.fit_temperature`)
    and store it in ``model.json``. Returns the clips with the calibrated probabilities, and the
    calibration: the temperature, the expected calibration error before and after, the reliability
    table per file (confidence bins: files, mean confidence, accuracy) and, for ``classify
    --unknown-below``, the probability that keeps 90, 95 and 99 % of the validation files."""
    index = {lab: i for i, lab in enumerate(labels)}
    truth = np.array([index[v] for v in val.column("label").to_pylist()])
    raw = np.asarray(val.column("probabilities").to_pylist(), np.float32).reshape(len(truth), len(labels))
    temperature = fit_temperature(raw, truth) if len(truth) else 1.0
    probs = tempered(raw, temperature)
    update_meta(cfg.out, temperature=temperature)
    mine = probs[np.arange(len(truth)), truth]
    val = val.drop_columns(["probability", "label_probability", "probabilities"]) \
        .append_column("probability", pa.array(probs.max(axis=1) if len(truth) else [], pa.float32())) \
        .append_column("label_probability", pa.array(mine, pa.float32())) \
        .append_column("probabilities", pa.array(list(probs), pa.list_(pa.float32(), len(labels))))
    uris = val.column("uri").to_pylist()
    sums = aggregate_files(uris, list(probs.astype(np.float64)))
    files = sorted(sums)
    scores, best = verdicts(sums, files, len(labels))
    file_truth = dict(zip(uris, truth.tolist(), strict=True))
    right = np.array([file_truth[u] == b for u, b in zip(files, best, strict=True)])
    confidence = scores.max(axis=1) if len(files) else np.zeros(0)
    table = [{"from": b / RELIABILITY_BINS, "to": (b + 1) / RELIABILITY_BINS, "files": n, "confidence": c,
              "accuracy": a} for b, n, c, a in _reliability(confidence, right)]
    return val, {"temperature": temperature, "clip_ece_before": _ece(raw, truth), "clip_ece_after": _ece(probs, truth),
                 "reliability": table,
                 "unknown_below_keeping": {f"{k}%": float(np.quantile(confidence, 1 - k / 100)) if len(files) else 0.0
                                           for k in (90, 95, 99)}}


def _reliability(confidence: np.ndarray, right: np.ndarray) -> list[tuple[int, int, float, float]]:
    """Per non-empty confidence bin of :data:`RELIABILITY_BINS`: (bin, count, mean confidence, accuracy)."""
    bins = np.minimum((confidence * RELIABILITY_BINS).astype(int), RELIABILITY_BINS - 1)
    return [(b, int((bins == b).sum()), float(confidence[bins == b].mean()), float(right[bins == b].mean()))
            for b in range(RELIABILITY_BINS) if (bins == b).any()]


def _ece(probs: np.ndarray, truth: np.ndarray) -> float:
    """Expected calibration error over :data:`RELIABILITY_BINS` confidence bins (clips)."""
    if not len(truth):
        return 0.0
    rows = _reliability(probs.max(axis=1), probs.argmax(axis=1) == truth)
    return float(sum(abs(c - a) * n / len(truth) for _, n, c, a in rows))


def file_accuracy(val: pa.Table, labels: list[str], thresholds: dict[str, float] | None = None) -> float:
    """Share of validation files whose verdict (:func:`melbatch.model.package.verdicts`, as classify decides) is
    right. Multi-label (``thresholds``): a file's verdict is every label whose mean clip probability
    reaches its threshold, right when it is the file's whole label set (the union of its clips')."""
    uris = val.column("uri").to_pylist()
    sums = aggregate_files(uris, [np.asarray(p, np.float64) for p in val.column("probabilities").to_pylist()])
    files = sorted(sums)
    scores, best = verdicts(sums, files, len(labels))
    if thresholds is None:
        truth = dict(zip(uris, val.column("label").to_pylist(), strict=True))
        return sum(truth[u] == labels[i] for u, i in zip(files, best, strict=True)) / max(1, len(files))
    sets: dict[str, set[str]] = {}
    for u, lab in zip(uris, val.column("label").to_pylist(), strict=True):
        sets.setdefault(u, set()).update(multilabel.split(lab))
    cut = np.array([thresholds[lab] for lab in labels])
    said = [{labels[j] for j in np.flatnonzero(row >= cut)} for row in scores]
    return sum(sets[u] == s for u, s in zip(files, said, strict=True)) / max(1, len(files))
