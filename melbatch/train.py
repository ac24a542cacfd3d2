"""train: fine-tune an ImageNet-pretrained timm model on featurized shards, with Ray Train.

Top-down:

1. :func:`open_shards` checks the featurize output (manifest present, every shard there and made
   with the manifest's features) before any cluster work.
2. :func:`split_by_file` holds out whole recordings (clips of one file never sit on both sides),
   stratified by label and seeded; or an explicit ``uri,split`` manifest decides.
3. Ray Data streams the shards; normalisation statistics are computed once from the train split.
   Training batches carry each clip's waveform (featurize keeps it by default): the worker
   augments the waveforms and recomputes their images on its own device with the very function
   featurize used (see :func:`_inputs` for why there); validation uses the stored images.
4. :func:`train_loop` runs on every TorchTrainer worker: each worker reads its own part of the data,
   trains, evaluates its part of the validation split (confusion matrices are summed across
   workers) and reports a checkpoint every epoch. Re-running the same command resumes from the latest
   checkpoint; ``FailureConfig`` restarts workers that die.
5. The driver writes the best epoch's model package (``OUT/model/``), scores every validation
   clip with it (``OUT/val_predictions.parquet``: what the report's "most confidently wrong" and
   the per-file accuracy come from) and writes ``OUT/metrics.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from melbatch import URI, augment, storage
from melbatch.audio import DecodeError, decode_all
from melbatch.config import AUDIO_EXTENSIONS, ConfigError, FeatureConfig, TrainConfig
from melbatch.console import Channel, EpochTable, Throttle
from melbatch.model import (
    PACKAGE_DIR,
    Package,
    aggregate_files,
    classifier_names,
    create_model,
    load_package,
    normalize,
    predict,
    save_package,
    verdicts,
)
from melbatch.shards import (
    METRICS,
    SPLIT,
    TRAIN_CONFIG,
    VAL_PREDICTIONS,
    DatasetError,
    audio_array,
    feature_config_of,
    mel_array,
    open_dataset,
    shard_uris,
)
from melbatch.weights import Source, resolve

RUN_NAME = "ray-train"
STATE = "state.pt"
STUCK_EPOCHS, STUCK_FRACTION = 2, 0.8  # warn when the loss is above 80% of a uniform guess after 2 epochs
MAX_WARMUP = 0.1  # share of a run's steps the warm-up may take (3 epochs with 1 of warm-up was a third)
FEW_STEPS = 50  # fewer optimiser steps than this in a whole run: say so before training


@dataclass(frozen=True)
class Budget:
    """How many clips a step takes and how many steps the run makes (decided before training)."""

    train_rows: int
    workers: int
    batch_size: int  # per worker: cfg.batch_size, lowered so an epoch has a few steps, never below min_batch_size
    steps_per_pass: int  # one pass over the training clips
    passes: int  # each training clip this many times per epoch: > 1 when epochs alone make fewer than min_steps

    @property
    def steps(self) -> int:
        return self.steps_per_pass * self.passes

    @staticmethod
    def plan(train_rows: int, cfg: TrainConfig) -> Budget:
        world = cfg.workers
        batch = min(cfg.batch_size, max(cfg.min_batch_size, train_rows // (world * 8)))
        per_pass = max(1, math.ceil(train_rows / (batch * world)))
        passes = max(1, math.ceil(cfg.min_steps / (cfg.epochs * per_pass)))
        return Budget(train_rows, world, batch, per_pass, passes)

    def describe(self, epochs: int) -> str:
        line = (f"{self.train_rows} training clips, batch {self.batch_size} x {self.workers} worker(s): "
                f"{self.steps_per_pass} steps per pass over the data")
        if self.passes > 1:
            return f"{line}; each clip {self.passes}x per epoch to reach {epochs * self.steps} steps in {epochs} epochs"
        return f"{line}; {epochs * self.steps} steps in {epochs} epochs"


# --------------------------------------------------------------------------------------------- data

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


def _images(uris: list[URI], columns: list[str]) -> Any:
    import ray

    fs, _ = storage.arrow_filesystem(uris[0])
    return ray.data.read_parquet([storage.arrow_filesystem(u)[1] for u in uris], filesystem=fs, columns=columns)


def _split(ds: Any, val_files: set[str], keep: bool) -> Any:
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
    train = _split(_images(uris, ["uri", "label", "start_s", "end_s", "audio" if wave else "mel"])
                   .randomize_block_order(), val_files, keep=False)
    if repeats:
        train = train.map_batches(_oversample, batch_format="pyarrow", fn_kwargs={"repeats": repeats})
    return {"train": train, "val": _split(_images(uris, ["uri", "label", "mel"]), val_files, keep=True)}


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
    import ray

    parts = pa.concat_tables(ray.get(t))
    n, s, ss = (pc.sum(parts.column(c)).as_py() for c in ("n", "s", "ss"))
    mean = s / n
    return float(mean), float(math.sqrt(max(ss / n - mean * mean, 1e-12)))


# --------------------------------------------------------------------------------------------- worker

def _inputs(batch: pa.Table, label_index: dict[str, int], norm: dict[str, Any], device: Any,
            wave: tuple[FeatureConfig, augment.WaveAugment, Any, Any] | None = None) -> tuple:
    """A batch as normalised (N, 1, n_mels, frames) images and label indices on ``device``.

    With ``wave`` = (features, augmentation, noise bank, generator) and an ``audio`` column, the
    waveforms are augmented and turned into images here, on the training device: the images of
    one clip differ every epoch, the work is batched tensor maths that a GPU does in a fraction of
    a step, and no augmented audio travels through the object store. (A Ray Data ``map_batches``
    stage would put this on CPU nodes instead; on GPU clusters that is the slower place.)
    """
    import torch

    from melbatch.features import logmel_tensor

    if wave is not None and "audio" in batch.column_names:
        features, aug, bank, gen = wave
        with torch.no_grad():
            w = torch.from_numpy(audio_array(batch)).to(device, non_blocking=True)
            x = logmel_tensor(augment.augment_waveforms(w, aug, bank, gen), features).unsqueeze(1)
    else:
        x = torch.from_numpy(mel_array(batch).astype(np.float32)).unsqueeze(1).to(device, non_blocking=True)
    x = normalize(x, norm)
    y = torch.tensor([label_index[v] for v in batch.column("label").to_pylist()], dtype=torch.long)
    return x, y.to(device, non_blocking=True)


def sound_frames(batch: pa.Table, features: FeatureConfig) -> Any:
    """(n,) how many leading image columns of each clip hold audio (a short recording's clip is padded)."""
    import torch

    seconds = np.asarray(batch.column("end_s")) - np.asarray(batch.column("start_s"))
    frames = np.ceil(seconds * features.sample_rate_hz / features.hop_length).astype(np.int64) + 1
    return torch.from_numpy(np.minimum(frames, features.n_frames))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _metrics(conf: np.ndarray, labels: list[str]) -> dict[str, Any]:
    tp = np.diag(conf).astype(float)
    precision = np.divide(tp, conf.sum(0), out=np.zeros_like(tp), where=conf.sum(0) > 0)
    recall = np.divide(tp, conf.sum(1), out=np.zeros_like(tp), where=conf.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {
        "val_accuracy": float(tp.sum() / max(1, conf.sum())),
        "macro_f1": float(f1.mean()),
        "per_class": {lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                      for lab, p, r, f, n in zip(labels, precision, recall, f1, conf.sum(1), strict=True)},
        "confusion_matrix": conf.astype(int).tolist(),
    }


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    cfg = TrainConfig(**config["train"])
    labels: list[str] = config["labels"]
    label_index = {lab: i for i, lab in enumerate(labels)}
    norm, shape = config["norm"], tuple(config["shape"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    features = FeatureConfig.from_dict(config["features"])
    channel, tick = config.get("channel") if rank == 0 else None, Throttle(0.5)
    wave = None
    if config["wave"]:
        bank = load_noise_bank(cfg.noise_dir, features.sample_rate_hz,
                               warn=lambda t: channel and channel.send("warning", text=t)) if cfg.noise_dir else None
        wave = (features, augment.WaveAugment.of(cfg, features.sample_rate_hz),
                None if bank is None else torch.from_numpy(bank).to(device), gen)

    model = create_model(cfg.model, len(labels), shape, source=Source.from_dict(config["weights"]))
    head = set(classifier_names(model))
    opt = torch.optim.AdamW(param_groups(model, head, cfg), lr=cfg.lr)
    budget = Budget(**config["budget"])
    steps_per_epoch = budget.steps_per_pass * budget.passes
    total = cfg.epochs * steps_per_epoch
    warmup = int(min(cfg.warmup_epochs * steps_per_epoch, MAX_WARMUP * total))  # short runs: a tenth at most
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total))
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    model = ray.train.torch.prepare_model(model)
    class_w = torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
    shift = round(cfg.time_shift_frac * shape[1])
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.use_gpu and cfg.amp)

    for epoch in range(start_epoch, cfg.epochs):
        t0, seen, loss_sum, step = time.perf_counter(), 0, 0.0, 0
        model.train()
        frozen = epoch < cfg.freeze_epochs  # linear probe first: only the head learns
        shuffle = max(256, 8 * budget.batch_size)
        for batch in ray.train.get_dataset_shard("train").iter_batches(
                batch_size=budget.batch_size, batch_format="pyarrow", local_shuffle_buffer_size=shuffle,
                local_shuffle_seed=cfg.seed + epoch * 7919 + rank, drop_last=False):
            x, y = _inputs(batch, label_index, norm, device, wave)
            if len(y) < 2:
                continue
            sound = sound_frames(batch, features)
            x = augment.random_time_shift(x, shift, gen, sound)
            x = augment.spec_augment(x, cfg.time_masks, cfg.time_mask_frac, cfg.freq_masks, cfg.freq_mask_frac, gen,
                                     sound)
            target = augment.soft_targets(y, len(labels), cfg.label_smoothing)
            x, target = augment.mixup(x, target, cfg.mixup_alpha, gen)
            with autocast:
                logits = model(x)
            logp = torch.log_softmax(logits.float(), dim=1)
            loss = -(target * logp * class_w).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if frozen:
                for n, p in model.named_parameters():
                    if n.removeprefix("module.") not in head:
                        p.grad = None
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            step += 1
            if channel and tick():
                channel.send("step", epoch=epoch + 1, step=step, loss=loss_sum / seen,
                             samples_per_s=seen * world / max(1e-9, time.perf_counter() - t0))
        train_s = time.perf_counter() - t0
        if channel and seen:  # the epoch's last step, whatever the throttle let through: the bar ends full
            channel.send("step", epoch=epoch + 1, step=step, loss=loss_sum / seen,
                         samples_per_s=seen * world / max(1e-9, train_s), final=True)

        model.eval()
        conf = torch.zeros(len(labels), len(labels), dtype=torch.float64)
        val_loss = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=budget.batch_size,
                                                                        batch_format="pyarrow"):
                x, y = _inputs(batch, label_index, norm, device)
                with autocast:
                    logits = model(x).float()
                val_loss += torch.tensor([float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")),
                                          len(y)], dtype=torch.float64)
                pred = logits.argmax(1).cpu()
                conf.index_put_((y.cpu(), pred), torch.ones(len(y), dtype=torch.float64), accumulate=True)
        counts = torch.tensor([loss_sum, seen, train_s], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            for t in (conf, val_loss, counts):
                dist.all_reduce(t)
        m = _metrics(conf.numpy(), labels)
        row = {"epoch": epoch + 1, "train_loss": float(counts[0] / max(1, counts[1])),
               "val_loss": float(val_loss[0] / max(1, val_loss[1])), "val_accuracy": m["val_accuracy"],
               "macro_f1": m["macro_f1"], "lr": sched.get_last_lr()[0], "frozen_backbone": frozen,
               "samples_per_s": float(counts[1] / max(1e-9, counts[2] / world)), "attempt_start_epoch": start_epoch,
               "epoch_s": time.perf_counter() - t0}
        history = [*history, row]
        report = {**row, "per_class": json.dumps(m["per_class"]), "confusion_matrix": json.dumps(m["confusion_matrix"])}
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                state = {"model": inner.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "epoch": epoch, "history": history}
                torch.save(state, os.path.join(d, STATE))
                ckpt = ray.train.Checkpoint.from_directory(d)
                if channel:  # the driver prints the row (Ray keeps a worker's own output in its log file)
                    channel.send("epoch", row=row)
                stuck = not_fitting(history, len(labels))
                if stuck and channel:
                    channel.send("warning", text=stuck)
            ray.train.report(report, checkpoint=ckpt)
        _maybe_crash(config.get("crash_at"), epoch + 1, rank, world, storage.join(cfg.out, "_injected_crash"))


def param_groups(model: Any, head: set[str], cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: the new head at ``lr``, the pretrained backbone at ``lr * backbone_lr_scale``;
    weight decay on weights only (not on biases and norms)."""
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        groups.setdefault((n in head, p.ndim > 1), []).append(p)
    return [{"params": ps, "lr": cfg.lr * (1.0 if is_head else cfg.backbone_lr_scale),
             "weight_decay": cfg.weight_decay if decays else 0.0} for (is_head, decays), ps in sorted(groups.items())]


def not_fitting(history: list[dict[str, Any]], classes: int) -> str | None:
    """A warning when the training loss is still near a uniform guess after the first epochs."""
    uniform = math.log(max(2, classes))
    if len(history) != STUCK_EPOCHS or history[-1]["train_loss"] < STUCK_FRACTION * uniform:
        return None
    return (f"the training loss is {history[-1]['train_loss']:.2f} after {len(history)} epochs, near a uniform "
            f"guess over {classes} labels ({uniform:.2f}): the model is not fitting the data. Try less augmentation "
            "(--mixup-alpha 0, no --wave-augment, fewer --time-masks/--freq-masks), more --min-steps, or check the "
            "labels.")


def _maybe_crash(spec: str | None, epoch: int, rank: int, world: int, marker: URI) -> None:
    """Fault injection for tests: ``MELBATCH_CRASH_AT=raise:2`` raises after epoch 2; ``exit:2`` kills
    the last worker's process there (as when a node is lost). Once per OUT: a marker file records it.
    """
    if not spec:
        return
    mode, at = spec.split(":")
    if epoch != int(at) or (mode == "exit" and rank != world - 1) or storage.exists(marker):
        return
    storage.write_bytes(marker, f"{spec} rank {rank}".encode())
    if mode == "exit":
        os._exit(1)
    raise RuntimeError(f"injected crash after epoch {epoch} (MELBATCH_CRASH_AT={spec})")


# --------------------------------------------------------------------------------------------- driver

def preflight(cfg: TrainConfig) -> tuple[dict[str, Any], FeatureConfig, list[URI], dict[str, Any]]:
    """Everything checkable before the cluster: OUT writable and not another run's, model, shards.

    Returns the manifest, features, shard URIs and the earlier run's ``train_config.json`` ({} if none).
    """
    storage.check_writable(cfg.out)
    if cfg.weights and not storage.exists(cfg.weights):
        raise ConfigError(f"weights file {cfg.weights} does not exist")
    create_model(cfg.model, 2, (64, 64), source=Source("none"))  # an unknown model name fails here, not on workers
    previous = storage.join(cfg.out, TRAIN_CONFIG)
    before = json.loads(storage.read_bytes(previous)) if storage.exists(previous) else {}
    if before and before.get("model") != cfg.model:
        raise ConfigError(f"{cfg.out} holds a run of {before.get('model')}, not {cfg.model}: use another OUT "
                          "(re-running into the same OUT resumes that run)")
    manifest, features, uris = open_shards(cfg.shards)
    if before and before.get("config_hash") != features.hash():
        raise ConfigError(f"{cfg.out} holds a run on features {before.get('config_hash')}, and {cfg.shards} has "
                          f"features {features.hash()}: use another OUT")
    if cfg.wave_augment and not keeps_audio(manifest):
        if cfg.noise_dir:
            raise ConfigError(f"noise_dir needs the clips' audio, and {cfg.shards} was featurized with "
                              "--no-keep-audio: featurize again without it")
        print(f"warning: {cfg.shards} holds images only (featurized with --no-keep-audio), so waveform "
              "augmentation is off; featurize again to use it, or leave out --wave-augment", flush=True)
    if cfg.wave_augment and cfg.noise_dir and next(
            storage.list_objects(cfg.noise_dir, extensions=AUDIO_EXTENSIONS), None) is None:
        raise ConfigError(f"noise_dir {cfg.noise_dir} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return manifest, features, uris, before


def run(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns the metrics written to ``OUT/metrics.json``. Prints one table row per epoch, and
    with ``progress`` a bar per epoch."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from melbatch.runs import init_ray

    manifest, features, uris, before = preflight(cfg)
    source = Source.from_dict(before.get("weights")) or resolve(cfg.model, cfg.pretrained, cfg.weights)
    print(f"model {cfg.model}, starting from {source.describe()}", flush=True)
    labels = sorted(manifest["labels"])
    labels_of, clips_of, sound_s = file_labels(uris)
    padding = padding_warning(sound_s, features)
    if padding:
        print(f"warning: {padding}", flush=True)
    files = set(labels_of)
    val_files = (read_split_manifest(cfg.split_manifest, files) if cfg.split_manifest
                 else split_by_file(labels_of, cfg.val_fraction, cfg.seed))
    train_files = files - val_files
    if not train_files or not val_files:
        raise ConfigError(f"the split leaves {len(train_files)} training and {len(val_files)} validation files: "
                          "featurize more files or change --val-fraction")
    init_ray(cfg.address)
    cfg, line = size_workers(cfg, ray.cluster_resources().get("CPU", 0))
    print(line, flush=True)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch lines are the progress
    rows_per_label: Counter = Counter()
    for u in train_files:
        rows_per_label[labels_of[u]] += clips_of[u]
    train_rows = sum(rows_per_label.values())
    class_weights, repeats = [1.0] * len(labels), None
    if cfg.balance == "weights":
        class_weights = [train_rows / (len(labels) * max(1, rows_per_label[lab])) for lab in labels]
    elif cfg.balance == "oversample":
        most = max(rows_per_label.values())
        repeats = {lab: most / max(1, rows_per_label[lab]) for lab in labels}
        train_rows = most * len([lab for lab in labels if rows_per_label[lab]])
    budget = Budget.plan(train_rows, cfg)
    print(f"budget: {budget.describe(cfg.epochs)}", flush=True)
    for line in small_data_warnings(budget, cfg, labels_of, val_files):
        print(f"warning: {line}", flush=True)
    wave = cfg.wave_augment and keeps_audio(manifest)
    if budget.passes > 1:  # one streaming pass over rows repeated, not several passes (each costs a start-up)
        repeats = {lab: budget.passes * (repeats or {}).get(lab, 1.0) for lab in labels}
    ds = datasets(uris, val_files, wave, repeats)
    if before.get("norm", {}).get("kind") == cfg.normalize:
        norm = before["norm"]  # a resumed run keeps the statistics its checkpoints were trained with
    elif cfg.normalize == "dataset":
        mean, std = dataset_stats(_split(_images(uris, ["uri", "label", "mel"]), val_files, keep=False))
        norm = {"kind": "dataset", "mean": mean, "std": std}
    else:
        norm = {"kind": "clip"}
    storage.write_bytes(storage.join(cfg.out, TRAIN_CONFIG), json.dumps(
        {"model": cfg.model, "config_hash": features.hash(), "norm": norm, "wave_augment": wave,
         "weights": source.to_dict(), "budget": asdict(budget),
         "train": asdict(cfg)}, indent=2).encode())

    fs, path = storage.arrow_filesystem(cfg.out)
    channel = Channel()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": asdict(cfg), "labels": labels, "norm": norm, "shape": list(features.shape),
                           "features": features.to_dict(), "wave": wave,
                           "budget": asdict(budget), "weights": source.to_dict(), "class_weights": class_weights,
                           "crash_at": os.environ.get("MELBATCH_CRASH_AT"), "channel": channel},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute="macro_f1",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets=ds,
    )
    with EpochTable(channel, cfg.epochs, budget.steps, bars=progress):
        result = trainer.fit()
    return _finish(cfg, result, labels, features, norm, uris, val_files, train_files, source)


def size_workers(cfg: TrainConfig, cpus: float) -> tuple[TrainConfig, str]:
    """``cfg`` with ``cpus_per_worker`` chosen when left out, and the line that says so.

    Ray Data's read tasks need a whole CPU; without one, training waits for data forever. So the
    workers share what is left after one CPU (a quarter of a big cluster) for Ray Data, in steps of
    0.05 CPU; an explicit value that leaves less is an error that says what to change.
    """
    if cfg.cpus_per_worker is not None:
        left = cpus - cfg.workers * cfg.cpus_per_worker
        if left < 1:
            raise ConfigError(f"{cfg.workers} worker(s) x {cfg.cpus_per_worker} CPU leave {left:g} of the cluster's "
                              f"{cpus:g} CPUs for Ray Data, which needs at least 1: lower --cpus-per-worker "
                              "(fractions are fine), leave it out to size it from the cluster, or lower --workers")
        return cfg, f"CPUs: {cfg.workers} worker(s) x {cfg.cpus_per_worker:g}, {left:g} of {cpus:g} left for Ray Data"
    data = max(1.0, cpus // 4)
    each = math.floor((cpus - data) / cfg.workers * 20) / 20
    if each < 0.05:
        raise ConfigError(f"the cluster has {cpus:g} CPU(s): {cfg.workers} worker(s) and Ray Data's 1 CPU do not fit; "
                          "lower --workers or join a bigger cluster")
    cfg = replace(cfg, cpus_per_worker=each)
    return cfg, (f"CPUs: {cfg.workers} worker(s) x {each:g} (chosen from the cluster's {cpus:g}; "
                 f"{cpus - cfg.workers * each:g} left for Ray Data; --cpus-per-worker to choose)")


def small_data_warnings(budget: Budget, cfg: TrainConfig, labels_of: dict[str, str], val_files: set[str]) -> list[str]:
    """What the user should know before a run on little data starts."""
    out = []
    if cfg.epochs * budget.steps < FEW_STEPS:
        out.append(f"the run makes only {cfg.epochs * budget.steps} optimiser steps: too few to fine-tune; "
                   f"raise --epochs or --min-steps (now {cfg.min_steps})")
    per_label = Counter(labels_of[u] for u in val_files)
    if len(val_files) < 10 or min(per_label.get(lab, 0) for lab in set(labels_of.values())) < 2:
        out.append(f"validation holds {len(val_files)} file(s) ({min(per_label.values(), default=0)} for the rarest "
                   f"label): its accuracy moves in steps of {1 / max(1, len(val_files)):.0%} and is a rough guide only")
    return out


def _finish(cfg: TrainConfig, result: Any, labels: list[str], features: FeatureConfig, norm: dict[str, Any],
            uris: list[URI], val_files: set[str], train_files: set[str], source: Source) -> dict[str, Any]:
    """Write the best epoch's model package and metrics.json."""
    import torch

    candidates = list(result.best_checkpoints or []) or [(result.checkpoint, result.metrics)]
    best_ckpt, best = max(candidates, key=lambda cm: (cm[1]["macro_f1"], cm[1]["epoch"]))
    with best_ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
    with result.checkpoint.as_directory() as d:
        history = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)["history"]
    model = create_model(cfg.model, len(labels), features.shape, source=Source("none"))
    model.load_state_dict(state["model"])
    meta = {"model_name": cfg.model, "labels": labels, "feature_config": features.to_dict(),
            "initial_weights": source.to_dict(),
            "config_hash": features.hash(), "normalization": norm, "train_config": asdict(cfg),
            "best_epoch": best["epoch"], "shards": storage.canonical(cfg.shards)}
    save_package(cfg.out, model, meta)
    val = score_validation(cfg, uris, val_files)
    metrics = {
        "val_accuracy": best["val_accuracy"], "macro_f1": best["macro_f1"], "best_epoch": best["epoch"],
        "val_file_accuracy": file_accuracy(val, labels),
        "labels": labels, "confusion_matrix": json.loads(best["confusion_matrix"]),
        "per_class": json.loads(best["per_class"]), "epochs": history,
        "split": {"train_files": len(train_files), "val_files": len(val_files)},
        "initial_weights": source.to_dict(),
        "model_package": storage.join(storage.canonical(cfg.out), PACKAGE_DIR),
    }
    storage.write_bytes(storage.join(cfg.out, METRICS), json.dumps(metrics, indent=2).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["uri", "split"])
    w.writerows([(u, "val") for u in sorted(val_files)] + [(u, "train") for u in sorted(train_files)])
    storage.write_bytes(storage.join(cfg.out, SPLIT), buf.getvalue().encode())
    return metrics


class _Scorer:
    """Ray Data actor: the saved package's class probabilities for stored validation images
    (:func:`melbatch.model.predict`, the path classify takes)."""

    def __init__(self, package: URI, use_gpu: bool, batch_size: int) -> None:
        import torch

        pkg = load_package(package)
        self.pkg = Package(pkg.model.to(torch.device("cuda" if use_gpu else "cpu")), pkg.meta)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        probs, _ = predict(self.pkg, mel_array(batch), self.batch_size)
        labels = self.pkg.labels
        truth = [labels.index(v) for v in batch.column("label").to_pylist()]
        best = probs.argmax(axis=1)
        return batch.drop_columns(["mel"]).append_column("predicted", pa.array([labels[i] for i in best])) \
            .append_column("probability", pa.array(probs.max(axis=1), pa.float32())) \
            .append_column("label_probability", pa.array(probs[np.arange(len(truth)), truth], pa.float32())) \
            .append_column("probabilities", pa.array(list(probs), pa.list_(pa.float32(), len(labels))))


def score_validation(cfg: TrainConfig, uris: list[URI], val_files: set[str]) -> pa.Table:
    """Every validation clip scored by the saved package (the best epoch) → ``OUT/val_predictions.parquet``."""
    import ray

    columns = ["uri", "clip_index", "start_s", "end_s", "label", "mel"]
    with warnings.catch_warnings():  # Ray 2.60 names no parameter for max_restarts yet and warns on the console
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = _split(_images(uris, columns), val_files, keep=True).map_batches(
            _Scorer, fn_constructor_kwargs={"package": storage.join(cfg.out, PACKAGE_DIR), "use_gpu": cfg.use_gpu,
                                            "batch_size": cfg.batch_size},
            batch_format="pyarrow", batch_size=4 * cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=1),
            num_gpus=1 if cfg.use_gpu else 0, num_cpus=min(1.0, cfg.cpus_per_worker),
            max_restarts=0)  # a short pass (re-run to resume); restartable actors also make Ray warn on the console
    table = pa.concat_tables([ray.get(ref) for ref in ds.to_arrow_refs()]).sort_by([("uri", "ascending"),
                                                                                   ("clip_index", "ascending")])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(cfg.out, VAL_PREDICTIONS), buf.getvalue())
    return table


def file_accuracy(val: pa.Table, labels: list[str]) -> float:
    """Share of validation files whose verdict (:func:`melbatch.model.verdicts`, as classify decides) is right."""
    uris = val.column("uri").to_pylist()
    truth = dict(zip(uris, val.column("label").to_pylist(), strict=True))
    sums = aggregate_files(uris, [np.asarray(p, np.float64) for p in val.column("probabilities").to_pylist()])
    files = sorted(sums)
    _, best = verdicts(sums, files, len(labels))
    return sum(truth[u] == labels[i] for u, i in zip(files, best, strict=True)) / max(1, len(files))
