"""train --backbone NAME: a head on a frozen audio backbone's embeddings, instead of fine-tuning an
ImageNet network (:mod:`melbatch.model.backbones` says which backbones there are and what each knows).

Top-down, as :func:`run` reads (the driver has already checked SHARDS and split the files):

1. :func:`embeddings`: every file of SHARDS embedded once per clip by the backbone, on Ray, as a classify
   run of an untrained one-label package over the source recordings (classify's decode at the backbone's
   rate, streaming, resume and quarantine; clips of the backbone's own window). It is cached beside the
   shards (``SHARDS/_embeddings/<backbone>-<features>/``; in OUT when SHARDS cannot be written), so a
   second train on the same shards, or ``auto``, embeds nothing again.
2. :func:`~melbatch.model.heads.fit_head` fits the head on the training files' clips, in this process:
   seconds, not the minutes to hours a fine-tune takes.
3. The package (``OUT/model/``: the head, the backbone's name, version and licence), the validation clips
   scored by it, the temperature, the distance rule (:mod:`melbatch.model.novelty`, on the embeddings),
   ``metrics.json``, ``val_predictions.parquet`` and ``split.csv``, as :func:`~melbatch.train.finish.finish`
   writes them for a fine-tune, so report, review and classify read either alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from melbatch import URI, storage
from melbatch.config import ClassifyConfig, ConfigError, FeatureConfig, TrainConfig
from melbatch.model import backbones, novelty
from melbatch.model.heads import Head, fit_head, probabilities_of, self_train
from melbatch.model.package import (
    PACKAGE_DIR,
    aggregate_files,
    probabilities,
    read_package_meta,
    save_package,
    verdicts,
    weights_id,
)
from melbatch.model.weights import Source
from melbatch.shards import METRICS, DatasetError, read_manifest
from melbatch.stages import classify
from melbatch.train.data import open_shards
from melbatch.train.finish import calibrate, file_accuracy, store_novelty, write_split, write_val_predictions
from melbatch.train.loop import confusion_metrics

EMBEDDINGS_DIR = "_embeddings"


def check(cfg: TrainConfig, name: str) -> backbones.Backbone:
    """The backbone, before any cluster work: known, installed, and asked for what a head can do."""
    try:
        b = backbones.get(name)
    except ValueError as e:
        raise ConfigError(f"--backbone: {e}") from None
    if why := b.missing():
        raise ConfigError(f"--backbone {name}: {why}")
    if cfg.multi_label or cfg.extra_labels:
        raise ConfigError(f"--backbone {name} fits one label per clip from the shards' labels: --multi-label and "
                          "--extra-labels train with --backbone imagenet")
    return b


def features_for(b: backbones.Backbone, features: FeatureConfig) -> FeatureConfig:
    """The clips the backbone hears: its own window (BirdNET 3 s, the speaker encoder 1.6 s) end to end at
    its rate, the shards' tail rule (the image fields are the defaults scaled to that rate: the backbone
    makes its own input from the audio). Measured on xc_birds10 (6 s files, 70/30): BirdNET's head 0.90
    per file on the shards' 5 s clips, 0.97 on its 3 s windows."""
    k = -(-b.sample_rate_hz // 16_000)
    return FeatureConfig(sample_rate_hz=b.sample_rate_hz, clip_s=b.window_s, clip_hop_s=b.window_s,
                         tail=features.tail, min_tail_s=min(features.min_tail_s, b.window_s),
                         n_fft=512 * k, win_length=400 * k, hop_length=160 * k, n_mels=64)


def _meta(b: backbones.Backbone, features: FeatureConfig, labels: list[str]) -> dict[str, Any]:
    return {"model_name": f"{b.name}-head", "labels": labels, "feature_config": features.to_dict(),
            "config_hash": features.hash(), "normalization": {"kind": "none"}, "padded_views": 1,
            "backbone": {"name": b.name, "version": b.version, "dim": b.dim,
                         "sample_rate_hz": b.sample_rate_hz, "window_s": b.window_s, "licence": b.licence}}


def embedding_package(b: backbones.Backbone, features: FeatureConfig, out: URI) -> URI:
    """An untrained one-label package on the backbone: what classify runs to embed an archive (train's
    embeddings, discover's groups). Its head is zeros, so the same package (and id) every time."""
    head = Head(b.dim, 1)
    torch.nn.init.zeros_(head.linear.weight)
    torch.nn.init.zeros_(head.linear.bias)  # all of it: a random bias made a new id, and no run resumed the cache
    return save_package(out, head, {**_meta(b, features, ["unlabelled"]),
                                     "purpose": f"the {b.name} backbone's embeddings, untrained"})


def embed_archive(b: backbones.Backbone, features: FeatureConfig, refs: list[storage.ObjectRef], archive: URI,
                  dest: URI, address: str | None, progress: bool = True) -> tuple[list[URI], classify.Summary]:
    """Embed ``refs`` into ``dest`` (a classify OUT with embeddings, resumed when it exists): the clip files."""
    package = embedding_package(b, features, storage.join(dest, "package"))
    out = storage.join(dest, "clips")
    ccfg = ClassifyConfig(archive=archive, model=package, out=out, keep_embeddings=True, top_k=1,
                          address=address, max_quarantine_rate=1.0)
    meta = {**read_package_meta(package), "root": storage.canonical(package)}
    done = classify.classify_objects(ccfg, meta, refs, out, progress)
    return [storage.join(out, rel) for rel in (read_manifest(out) or {}).get("clips", [])], done


def embeddings(cfg: TrainConfig, b: backbones.Backbone, features: FeatureConfig, shard_uris: list[URI],
               manifest: dict[str, Any], progress: bool = True, shards: URI | None = None) -> pa.Table:
    """Every clip of the files of ``shards`` (default: SHARDS) as the backbone embeds it: ``uri,
    clip_index, start_s, end_s, embedding`` (cached; see the module's docstring)."""
    shards = storage.canonical(shards or cfg.shards)  # classify's outputs compare canonical URIs
    bf = features_for(b, features)
    refs = _refs(shard_uris)
    try:
        storage.check_writable(shards)
        root = shards
    except (ConfigError, storage.StorageError, OSError):
        root = storage.join(cfg.out, "unlabelled") if shards != cfg.shards else cfg.out
    dest = storage.join(root, EMBEDDINGS_DIR, f"{b.name}-{bf.hash()[:12]}")
    print(f"embedding {len(refs):,} files with the {b.name} backbone ({bf.sample_rate_hz} Hz, clips of "
          f"{bf.clip_s:g} s, its window) into {dest}", flush=True)
    files, done = embed_archive(b, bf, refs, manifest.get("src") or shards, dest, cfg.address, progress)
    if done.quarantined:
        print(f"warning: {done.quarantined} of {len(refs)} source file(s) could not be read again for the {b.name} "
              f"backbone (see {dest}/clips/quarantine.parquet); they are left out", flush=True)
    tables = [_read(u, ["uri", "clip_index", "start_s", "end_s", "embedding"]) for u in files]
    if not tables:
        raise DatasetError(f"the {b.name} backbone embedded no clip of {shards}'s {len(refs)} source files: are "
                           f"they still where featurize read them ({manifest.get('src')})? See {dest}/clips")
    return pa.concat_tables(tables)


def _matrix(table: pa.Table, dim: int) -> np.ndarray:
    return np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      np.float32).reshape(table.num_rows, dim)


def _file_accuracy(head: Head, emb: np.ndarray, rows: np.ndarray, uris: list[str], y: np.ndarray) -> float:
    """The share of the files of ``rows`` whose clips' mean probability names their label."""
    probs = probabilities_of(head, emb[rows])
    picked = [u for u, r in zip(uris, rows, strict=True) if r]
    truth = dict(zip(picked, y[rows].tolist(), strict=True))
    sums = aggregate_files(picked, list(probs.astype(np.float64)))
    files = sorted(sums)
    _, best = verdicts(sums, files, probs.shape[1])
    return float(np.mean([truth[u] == b for u, b in zip(files, best, strict=True)])) if files else 0.0


def _self_trained(cfg: TrainConfig, b: backbones.Backbone, x: np.ndarray, y: np.ndarray, labels: int,
                  progress: bool, score: Any) -> tuple[Head, list[dict[str, Any]]]:
    """The head self-trained on ``--unlabelled``'s clips (embedded and cached as SHARDS' are)."""
    manifest, features, uris = open_shards(cfg.unlabelled, labelled=False)
    u = _matrix(embeddings(cfg, b, features, uris, manifest, progress, shards=cfg.unlabelled), b.dim)
    print(f"self-training on {len(u):,} unlabelled clips of {cfg.unlabelled}: {cfg.rounds} round(s), "
          f"at most {cfg.pseudo_keep:g} of an equal share per label each", flush=True)
    head, rounds = self_train(x, y, u, labels, cfg.rounds, cfg.pseudo_keep, score)
    for r in rounds:
        agree = "" if r["agreement_with_previous"] is None else \
            f", {r['agreement_with_previous']:.3f} of the guesses as the round before"
        print(f"  round {r['round']}: {r['taken']:,} of {r['of']:,} clips taken (per label {r['per_label']}){agree}; "
              f"validation {r['val_file_accuracy']:.3f} per file", flush=True)
    return head, rounds


def _read(uri: URI, columns: list[str]) -> pa.Table:
    with storage.arrow_input(uri) as f:
        return pq.read_table(f, columns=columns)


def _refs(shard_uris: list[URI]) -> list[storage.ObjectRef]:
    """The source objects the shards were made from (uri, etag, size), once each, in key order."""
    seen: dict[str, storage.ObjectRef] = {}
    for u in shard_uris:
        t = _read(u, ["uri", "etag", "size"])
        for uri, etag, size in zip(*(t.column(c).to_pylist() for c in ("uri", "etag", "size")), strict=True):
            seen.setdefault(uri, storage.ObjectRef(uri, etag, size))
    return [seen[k] for k in sorted(seen)]


def run(cfg: TrainConfig, name: str, labels: list[str], labels_of: dict[str, str], train_files: set[str],
        val_files: set[str], features: FeatureConfig, shard_uris: list[URI], manifest: dict[str, Any],
        progress: bool = True) -> dict[str, Any]:
    """Embed, fit the head, write the package and its metrics; returns the metrics."""
    t0 = time.perf_counter()
    b = check(cfg, name)
    backbones.announce(b)
    table = embeddings(cfg, b, features, shard_uris, manifest, progress)
    t_embed = time.perf_counter() - t0
    uris = table.column("uri").to_pylist()
    emb = _matrix(table, b.dim)
    keep = np.array([u in labels_of for u in uris])
    index = {lab: i for i, lab in enumerate(labels)}
    y = np.array([index.get(labels_of.get(u, ""), -1) for u in uris])
    is_train = np.array([u in train_files for u in uris]) & keep & (y >= 0)
    is_val = np.array([u in val_files for u in uris]) & keep & (y >= 0)
    if len(set(y[is_train].tolist())) < 2 or not is_val.any():
        raise DatasetError(f"the {b.name} backbone's clips leave {int(is_train.sum())} training clips of "
                           f"{len(set(y[is_train].tolist()))} label(s) and {int(is_val.sum())} validation clips: "
                           "nothing to fit")
    if cfg.unlabelled:
        head, rounds = _self_trained(cfg, b, emb[is_train], y[is_train], len(labels), progress,
                                     lambda h: {"val_file_accuracy": _file_accuracy(h, emb, is_val, uris, y)})
    else:
        head, rounds = fit_head(emb[is_train], y[is_train], len(labels)), []
    bf = features_for(b, features)
    source = Source("backbone", f"{b.name} ({b.version}; {b.licence})")
    meta = {**_meta(b, bf, labels), "train_config": asdict(cfg), "shards": storage.canonical(cfg.shards),
            "best_epoch": 0, "extra_labels": None, "initial_weights": source.to_dict()}
    save_package(cfg.out, head, meta)
    fitted = novelty.fit(emb[is_train], y[is_train], len(labels))
    with torch.inference_mode():
        raw = probabilities(head(torch.from_numpy(emb[is_val])), {}).numpy()
    val_rows = table.filter(pa.array(is_val))
    truth = y[is_val]
    best = raw.argmax(1)
    val = pa.table({
        "uri": val_rows.column("uri"), "clip_index": val_rows.column("clip_index"),
        "start_s": val_rows.column("start_s"), "end_s": val_rows.column("end_s"),
        "label": pa.array([labels[i] for i in truth]), "predicted": pa.array([labels[i] for i in best]),
        "probability": pa.array(raw.max(1), pa.float32()),
        "label_probability": pa.array(raw[np.arange(len(truth)), truth], pa.float32()),
        "probabilities": pa.array(list(raw), pa.list_(pa.float32(), len(labels))),
        "distance": pa.array(fitted.distances(emb[is_val]), pa.float32())})
    val = val.sort_by([("uri", "ascending"), ("clip_index", "ascending")])
    val, calibration = calibrate(cfg, val, labels)
    rule = store_novelty(cfg, fitted, val)
    write_val_predictions(cfg, val)
    write_split(cfg.out, val_files, train_files)
    conf = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(conf, (truth, best), 1)
    m = confusion_metrics(conf, labels)
    seconds = time.perf_counter() - t0
    metrics = {
        "backbone": name, "val_accuracy": m["val_accuracy"], "macro_f1": m["macro_f1"], "best_epoch": 0,
        "val_file_accuracy": file_accuracy(val, labels), "labels": labels, "confusion_matrix": m["confusion_matrix"],
        "per_class": m["per_class"], "epochs": [],
        "split": {"train_files": len(train_files), "val_files": len(val_files)},
        "head": {"train_clips": int(is_train.sum()), "val_clips": int(is_val.sum()), "dim": b.dim,
                 "embed_s": round(t_embed, 1), "fit_s": round(seconds - t_embed, 1),
                 "weights_id": weights_id(head.state_dict())},
        "initial_weights": source.to_dict(),
        "extra_labels": None, "calibration": calibration, "novelty": rule, "seconds": round(seconds, 1),
        **({"self_training": {"unlabelled": storage.canonical(cfg.unlabelled), "rounds": rounds}} if rounds else {}),
        "model_package": storage.join(storage.canonical(cfg.out), PACKAGE_DIR),
    }
    storage.write_bytes(storage.join(cfg.out, METRICS), json.dumps(metrics, indent=2).encode())
    print(f"{b.name} head: {metrics['head']['train_clips']:,} training clips of {len(train_files)} files, "
          f"validation accuracy {metrics['val_accuracy']:.3f} per clip, {metrics['val_file_accuracy']:.3f} per "
          f"file ({len(val_files)} files); embedded in {t_embed:.0f} s, fitted in {seconds - t_embed:.1f} s",
          flush=True)
    return metrics
