"""The worker side of train: what every Ray Train worker runs, top-down.

:func:`train_loop` sets up (:func:`_setup`: the model from its starting weights, AdamW with the new
head and the pretrained backbone at their own learning rates, warm-up + cosine schedule, restored
from the latest checkpoint when a run resumes), then per epoch: :func:`train_epoch` (augmented,
class-weighted steps over this worker's shard), :func:`evaluate` (its share of the validation
images), :func:`epoch_metrics` (summed over the workers) and :func:`checkpoint` (rank 0 saves,
every worker reports). Rank 0 also sends the driver's console its step, epoch and warning events.
:class:`Budget` is how many clips a step takes and how many steps a run makes, decided by the
driver before training.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from melbatch import URI, storage
from melbatch.audio.logmel import logmel_tensor
from melbatch.config import FeatureConfig, TrainConfig
from melbatch.console import Channel, Throttle
from melbatch.labels import multilabel
from melbatch.model.package import (
    PADDED_VIEWS,
    ModelError,
    Package,
    classifier_names,
    create_model,
    normalize,
    padded,
    predict,
)
from melbatch.model.weights import Source
from melbatch.shards import DIVERGED, STATE, audio_array, mel_array
from melbatch.train import augment
from melbatch.train.data import load_noise_bank, read_sides, share
from melbatch.train.feed import HeldShard, Waited

STUCK_EPOCHS, STUCK_FRACTION = 2, 0.8  # warn when the loss is above 80% of a uniform guess after 2 epochs
PACE_STEPS = 2  # the time a run will take is told from this many steps after its first (warm-up) step
MAX_WARMUP = 0.1  # share of a run's steps the warm-up may take (3 epochs with 1 of warm-up was a third)


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
        """Optimiser steps per epoch. The ``passes`` are one stream of repeated rows, dealt out in equal
        shares and batched through, not separate passes that each end in a short batch."""
        return max(1, math.ceil(self.train_rows * self.passes / (self.batch_size * self.workers)))

    @staticmethod
    def plan(train_rows: int, cfg: TrainConfig) -> Budget:
        world = cfg.workers
        batch = min(cfg.batch_size, max(cfg.min_batch_size, train_rows // (world * 8)))
        per_pass = max(1, math.ceil(train_rows / (batch * world)))
        passes = 1
        if cfg.epochs * per_pass < cfg.step_floor:  # the fewest repeats that make min_steps steps in all
            need = math.ceil(cfg.step_floor / cfg.epochs)  # steps per epoch
            passes = (need - 1) * batch * world // max(1, train_rows) + 1
        return Budget(train_rows, world, batch, per_pass, passes)

    def describe(self, epochs: int) -> str:
        line = (f"{self.train_rows} training clips, batch {self.batch_size} x {self.workers} worker(s): "
                f"{self.steps_per_pass} steps per pass over the data")
        if self.passes > 1:
            return f"{line}; each clip {self.passes}x per epoch to reach {epochs * self.steps} steps in {epochs} epochs"
        return f"{line}; {epochs * self.steps} steps in {epochs} epochs"


def _inputs(batch: pa.Table, label_index: dict[str, int], norm: dict[str, Any], device: Any,
            wave: tuple[FeatureConfig, augment.WaveAugment, Any, Any] | None = None, multi: bool = False,
            images: tuple[FeatureConfig, augment.WaveAugment, Any, Any] | None = None) -> tuple:
    """A batch as normalised (N, 1, n_mels, frames) images and label indices on ``device`` (``multi``:
    (N, labels) multi-hot float targets).

    With ``wave`` = (features, augmentation, noise bank, generator) and an ``audio`` column, the
    waveforms are augmented and turned into images here, on the training device: the images of
    one clip differ every epoch, the work is batched tensor maths that a GPU does in a fraction of
    a step, and no augmented audio travels through the object store. (A Ray Data ``map_batches``
    stage would put this on CPU nodes instead; on GPU clusters that is the slower place.) Without
    them, ``images`` = (features, augmentation, band centres, generator) makes the same shifts on the
    stored images (:func:`~melbatch.train.augment.augment_images`).
    """
    if wave is not None and "audio" in batch.column_names:
        features, aug, bank, gen = wave
        with torch.no_grad():
            w = torch.from_numpy(audio_array(batch)).to(device, non_blocking=True)
            x = logmel_tensor(augment.augment_waveforms(w, aug, bank, gen), features).unsqueeze(1)
    else:
        x = torch.from_numpy(mel_array(batch).astype(np.float32)).unsqueeze(1).to(device, non_blocking=True)
        if images is not None:
            features, aug, centers, gen = images
            with torch.no_grad():
                x = augment.augment_images(x, aug, centers, features.hop_length / features.sample_rate_hz,
                                           features.top_db, gen)
    x = normalize(x, norm)
    if multi:
        y = torch.from_numpy(multilabel.targets(batch.column("label").to_pylist(), label_index))
    else:
        y = torch.tensor([label_index[v] for v in batch.column("label").to_pylist()], dtype=torch.long)
    return x, y.to(device, non_blocking=True)


def sound_frames(batch: pa.Table, features: FeatureConfig) -> Any:
    """(n,) how many leading image columns of each clip hold audio (a short recording's clip is padded)."""
    seconds = np.asarray(batch.column("end_s")) - np.asarray(batch.column("start_s"))
    frames = np.ceil(seconds * features.sample_rate_hz / features.hop_length).astype(np.int64) + 1
    return torch.from_numpy(np.minimum(frames, features.n_frames))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def confusion_metrics(conf: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the matrix, from a confusion matrix."""
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


@dataclass
class _Worker:
    """One Ray Train worker's run: what every step of :func:`train_loop` reads, built by :func:`_setup`."""

    cfg: TrainConfig
    labels: list[str]
    label_index: dict[str, int]
    norm: dict[str, Any]
    shape: tuple[int, int]
    features: FeatureConfig
    budget: Budget
    rank: int
    world: int
    device: Any
    gen: Any  # the augmentation's torch.Generator
    wave: Any  # (features, WaveAugment, noise bank, generator) with --wave-augment, else None
    images: Any  # (features, WaveAugment, band centres, generator) with --field-augment alone, else None
    channel: Channel | None  # rank 0 only: step, epoch and warning events for the driver's console
    model: Any
    head: set[str]  # the new head's parameter names (the rest is the pretrained backbone)
    opt: Any
    sched: Any
    class_w: Any
    autocast: Any
    start_epoch: int
    history: list[dict[str, Any]]
    train_shard: HeldShard
    val_shard: HeldShard
    diverged: str | None = None  # why the loss or the gradients stopped being finite


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: set up (resuming from the latest checkpoint), then per epoch
    train, evaluate, and report the row with a checkpoint."""
    w = _setup(config)
    for epoch in range(w.start_epoch, w.cfg.epochs):
        t0 = time.perf_counter()
        where = {"rows_from": w.train_shard.source, "val_from": w.val_shard.source}  # before the epoch holds them
        train, per_label = train_epoch(w, epoch)
        if w.diverged:  # told the driver through OUT, not raised: Ray Train would restart into the same NaN
            if w.rank == 0:
                storage.write_bytes(storage.join(w.cfg.out, DIVERGED), json.dumps({"why": w.diverged}).encode())
            return
        if epoch + 1 < w.cfg.epochs:  # the next epoch's read begins while this one is evaluated
            w.train_shard.start(**epoch_order(w, epoch + 1))
        t_val = time.perf_counter()
        conf, val_loss = evaluate(w)
        t_end = time.perf_counter()
        row, report = epoch_metrics(w, epoch, conf, val_loss, (*train, t_end - t_val, t_end - t0), per_label)
        row.update(where)  # rank 0's: every worker holds, or none does
        report.update(where)
        checkpoint(w, epoch, row, report)
        _maybe_crash(config.get("crash_at"), epoch + 1, w.rank, w.world, storage.join(w.cfg.out, "_injected_crash"))


def _setup(config: dict[str, Any]) -> _Worker:
    """The model (from the starting weights), AdamW and the warm-up + cosine schedule, restored from
    the latest checkpoint when the run resumes; the noise bank and waveform augmentation if asked."""
    cfg = TrainConfig(**config["train"])
    labels: list[str] = config["labels"]
    shape = tuple(config["shape"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    features = FeatureConfig.from_dict(config["features"])
    channel = config.get("channel") if rank == 0 else None
    wave = None
    if config["wave"]:
        noise_dir = cfg.augment.noise_dir
        bank = load_noise_bank(noise_dir, features.sample_rate_hz,
                               warn=lambda t: channel and channel.send("warning", text=t)) if noise_dir else None
        wave = (features, augment.WaveAugment.of(cfg.augment, features.sample_rate_hz),
                None if bank is None else torch.from_numpy(bank).to(device), gen)
    images = None
    if cfg.augment.field_augment and wave is None:
        images = (features, augment.WaveAugment.of(cfg.augment, features.sample_rate_hz),
                  torch.from_numpy(features.band_centers_hz()).float().to(device), gen)

    source = Source.from_dict(config["weights"])
    model = create_model(cfg.model, len(labels), shape, source=source, time_pool=cfg.time_pool or 1)
    # channels-last convolutions: a bare lite0 step on 16 images of 128 x 501 on 2 CPUs, 2026-12-07: 10.3
    # samples/s as it was, 14.4 channels-last (one-channel images are already in that layout; the package
    # is written contiguous, as before)
    model = model.to(memory_format=torch.channels_last)
    if source.kind != "none":
        freeze_blocks(model, cfg.freeze_blocks)
    head = set(classifier_names(model))
    opt = torch.optim.AdamW(param_groups(model, head, cfg), lr=cfg.lr)
    budget = Budget(**config["budget"])
    total = cfg.epochs * budget.steps
    warmup = int(min(cfg.warmup_epochs * budget.steps, MAX_WARMUP * total))  # short runs: a tenth at most
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total))
    start_epoch, history = 0, []
    latest = ray.train.get_checkpoint()
    if latest:
        with latest.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    w = _Worker(
        cfg=cfg, labels=labels, label_index={lab: i for i, lab in enumerate(labels)}, norm=config["norm"],
        shape=shape, features=features, budget=budget, rank=rank, world=world, device=device, gen=gen, wave=wave,
        images=images,
        channel=channel, model=ray.train.torch.prepare_model(model), head=head, opt=opt, sched=sched,
        class_w=torch.tensor(config["class_weights"], dtype=torch.float32, device=device),
        autocast=torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.use_gpu and cfg.amp),
        start_epoch=start_epoch, history=history,
        train_shard=HeldShard("train", config["hold"]["train"]), val_shard=HeldShard("val", config["hold"]["val"]))
    if config["direct"]:  # a small split: this worker reads it whole and keeps its share (see train.hold_plan)
        rows = read_sides(config["direct"], cfg.seed)
        w.train_shard.table = share(rows["train"], rank, world, cfg.seed, equal=True)
        w.val_shard.table = share(rows["val"], rank, world, cfg.seed, equal=False)
    return w


def epoch_order(w: _Worker, epoch: int) -> dict[str, Any]:
    """The batches an epoch takes of the training shard: their size, and this epoch's order (held or
    read: then also Ray Data's local shuffle)."""
    seed = w.cfg.seed + epoch * 7919 + w.rank
    return {"batch_size": w.budget.batch_size, "seed": seed, "local_shuffle_seed": seed, "drop_last": False,
            "local_shuffle_buffer_size": max(256, 8 * w.budget.batch_size)}


def train_epoch(w: _Worker, epoch: int) -> tuple[tuple[float, ...], Any]:
    """One epoch of optimiser steps over this worker's shard (augmented, class-weighted, soft targets);
    the backbone stays frozen in the first ``freeze_epochs``, the field shifts wait ``clean_epochs``.
    Returns ((loss sum, clips seen, seconds, seconds waiting for data, of which for the first batch),
    clips seen per label)."""
    cfg, t0, seen, loss_sum, step = w.cfg, time.perf_counter(), 0, 0.0, 0
    per_label = torch.zeros(len(w.labels), dtype=torch.float64)
    tick, shift = Throttle(0.5), round(cfg.augment.time_shift_frac * w.shape[1])
    frozen = epoch < cfg.freeze_epochs  # linear probe first: only the head learns
    clean = epoch < cfg.augment.clean_epochs  # the images as they are first; the shifts begin after
    w.model.train()
    batches = Waited(w.train_shard.batches(**epoch_order(w, epoch)))
    for batch in batches:
        x, y = _inputs(batch, w.label_index, w.norm, w.device, None if clean else w.wave, cfg.multi_label,
                       None if clean else w.images)
        if len(y) < 2:
            continue
        sound = sound_frames(batch, w.features)
        x = augment.random_time_shift(x, shift, w.gen, sound)
        a = cfg.augment
        x = augment.spec_augment(x, a.time_masks, a.time_mask_frac, a.freq_masks, a.freq_mask_frac, w.gen, sound)
        if cfg.multi_label:  # each label its own yes/no: smoothing moves targets towards 1/2
            target = y * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
        else:
            target = augment.soft_targets(y, len(w.labels), cfg.label_smoothing)
        x, target = augment.mixup(x, target, cfg.augment.mixup_alpha, w.gen)
        with w.autocast:
            logits = w.model(x)
        if cfg.multi_label:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        else:
            loss = -(target * torch.log_softmax(logits.float(), dim=1) * w.class_w).sum(1).mean()
        w.opt.zero_grad(set_to_none=True)
        loss.backward()
        if (why := _diverged(w, loss, epoch, step)) is not None:
            w.diverged = why  # every worker sees it at this step: DDP summed the NaN into everyone's gradients
            break
        if frozen:
            for n, p in w.model.named_parameters():
                if n.removeprefix("module.") not in w.head:
                    p.grad = None
        w.opt.step()
        w.sched.step()
        seen += len(y)
        per_label += (y.sum(0) if cfg.multi_label else torch.bincount(y, minlength=len(w.labels))).cpu().double()
        loss_sum += float(loss.detach()) * len(y)
        step += 1
        if step == 1:
            t_first = time.perf_counter()
        elif step == PACE_STEPS + 1 and w.channel and epoch == w.start_epoch:  # the steps after the first's warm-up
            done = epoch * w.budget.steps + step
            w.channel.send("pace", s_per_step=(time.perf_counter() - t_first) / PACE_STEPS,
                           left=cfg.epochs * w.budget.steps - done)
        if w.channel and tick():
            w.channel.send("step", epoch=epoch + 1, step=step, loss=loss_sum / seen,
                           samples_per_s=seen * w.world / max(1e-9, time.perf_counter() - t0))
    train_s = time.perf_counter() - t0
    if w.channel and seen:  # the epoch's last step, whatever the throttle let through: the bar ends full
        w.channel.send("step", epoch=epoch + 1, step=step, loss=loss_sum / seen,
                       samples_per_s=seen * w.world / max(1e-9, train_s), final=True)
    return (loss_sum, seen, train_s, batches.total, batches.first), per_label


def evaluate(w: _Worker) -> tuple[Any, Any]:
    """This worker's share of the validation images: (confusion matrix, [loss sum, clips]); with
    ``multi_label`` the matrix is instead (the clips' label probabilities, their multi-hot truth).
    Single-label clips are scored as the package will score them (:func:`~melbatch.model.package.predict`:
    a padded clip on three views, their probabilities averaged), so the best epoch is chosen on the
    numbers classify gives; the loss is the cross-entropy of those probabilities."""
    w.model.eval()
    if not w.cfg.multi_label:
        return _evaluate_as_classify(w)
    scored: list[tuple[np.ndarray, np.ndarray]] = []
    val_loss = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in w.val_shard.batches(w.budget.batch_size):
            x, y = _inputs(batch, w.label_index, w.norm, w.device, multi=True)
            with w.autocast:
                logits = w.model(x).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(w.labels)
            scored.append((torch.sigmoid(logits).cpu().numpy(), y.cpu().numpy()))
            val_loss += torch.tensor([float(loss), len(y)], dtype=torch.float64)
    empty = np.zeros((0, len(w.labels)), np.float32)
    conf = (np.concatenate([p for p, _ in scored]) if scored else empty,
            np.concatenate([t for _, t in scored]) if scored else empty)
    return conf, val_loss


def _evaluate_as_classify(w: _Worker) -> tuple[Any, Any]:
    pkg = Package(w.model, {"normalization": w.norm, "padded_views": PADDED_VIEWS, "labels": w.labels,
                            "feature_config": w.features.to_dict()})
    conf = torch.zeros(len(w.labels), len(w.labels), dtype=torch.float64)
    val_loss = torch.zeros(2, dtype=torch.float64)
    for batch in w.val_shard.batches(w.budget.batch_size):
        y = torch.tensor([w.label_index[v] for v in batch.column("label").to_pylist()])
        probs, _ = predict(pkg, mel_array(batch), max(1, batch.num_rows), padded_clips=padded(
            batch.column("start_s").to_numpy(), batch.column("end_s").to_numpy(), w.features.clip_s))
        p = torch.from_numpy(probs).double()
        loss = -torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).sum()
        conf.index_put_((y, p.argmax(1)), torch.ones(len(y), dtype=torch.float64), accumulate=True)
        val_loss += torch.tensor([float(loss), len(y)], dtype=torch.float64)
    return conf, val_loss


def _diverged(w: _Worker, loss: Any, epoch: int, step: int) -> str | None:
    """Why this step cannot be taken (a non-finite loss or gradient norm), else None. The gradients are
    the same on every worker after DDP's all-reduce, so every worker gives the same answer."""
    grads = [p.grad for p in w.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if bool(torch.isfinite(loss)) and bool(torch.isfinite(norm)):
        return None
    return (f"the training loss became {float(loss):g} (gradient norm {float(norm):g}) at epoch {epoch + 1}, step "
            f"{step + 1}; no model was written. Look for audio far beyond full scale in "
            f"the shards (featurize quarantines them since issue 44), or lower --lr (now {w.cfg.lr:g})")


def epoch_metrics(w: _Worker, epoch: int, conf: Any, val_loss: Any, train: tuple[float, ...],
                  per_label: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The epoch's numbers summed over the workers: its table row, and what Ray Train records.
    ``train`` is :func:`train_epoch`'s (loss sum, clips, seconds, seconds waiting for data, of which for
    the first batch), then the validation pass's seconds and the epoch's; the seconds are averaged over
    the workers."""
    counts = torch.tensor(train, dtype=torch.float64)
    if w.world > 1 and dist.is_initialized():
        for t in (val_loss, counts, per_label, *(() if w.cfg.multi_label else (conf,))):
            dist.all_reduce(t)
        if w.cfg.multi_label:  # average precision needs every clip's score, not sums: gather them
            parts: list[Any] = [None] * w.world
            dist.all_gather_object(parts, conf)
            conf = (np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts]))
    m = multilabel.scores(*conf, w.labels) if w.cfg.multi_label else confusion_metrics(conf.numpy(), w.labels)
    train_s, wait_s, first_s, val_s, epoch_s = (counts[2:] / w.world).tolist()
    row = {"epoch": epoch + 1, "train_loss": float(counts[0] / max(1, counts[1])),
           "val_loss": float(val_loss[0] / max(1, val_loss[1])), "val_accuracy": m["val_accuracy"],
           "macro_f1": m["macro_f1"], "lr": w.sched.get_last_lr()[0], "frozen_backbone": epoch < w.cfg.freeze_epochs,
           "samples_per_s": float(counts[1] / max(1e-9, train_s)), "attempt_start_epoch": w.start_epoch,
           "epoch_s": epoch_s, "train_s": train_s, "data_wait_s": wait_s, "first_batch_s": first_s, "val_s": val_s,
           "train_clips_per_label": dict(zip(w.labels, per_label.long().tolist(), strict=True))}
    if w.cfg.multi_label:
        row["val_map"] = m["val_map"]
    extra = {"thresholds": json.dumps(m["thresholds"])} if w.cfg.multi_label else {
        "confusion_matrix": json.dumps(m["confusion_matrix"])}
    return row, {**row, "per_class": json.dumps(m["per_class"]), **extra,
                 "train_clips_per_label": json.dumps(row["train_clips_per_label"])}  # Ray Train flattens dicts


def checkpoint(w: _Worker, epoch: int, row: dict[str, Any], report: dict[str, Any]) -> None:
    """Rank 0 saves model, optimizer, schedule and history; every worker reports the epoch to Ray Train.
    The driver prints the row (Ray keeps a worker's own output in its log file), and a warning when the
    loss stays near a uniform guess."""
    w.history = [*w.history, row]
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if w.rank == 0:
            inner = w.model.module if hasattr(w.model, "module") else w.model
            torch.save({"model": inner.state_dict(), "optimizer": w.opt.state_dict(),
                        "scheduler": w.sched.state_dict(), "epoch": epoch, "history": w.history},
                       os.path.join(d, STATE))
            ckpt = ray.train.Checkpoint.from_directory(d)
            if w.channel:
                w.channel.send("epoch", row=row)
            stuck = not_fitting(w.history, 2 if w.cfg.multi_label else len(w.labels))  # BCE: a yes/no per label
            if stuck and w.channel:
                w.channel.send("warning", text=stuck)
        ray.train.report(report, checkpoint=ckpt)


def frozen_prefix(model: Any, blocks: int) -> list[Any]:
    """The stem and the first ``blocks`` blocks of a timm EfficientNet-family model (``conv_stem``,
    ``bn1``, ``blocks``): what ``--freeze-blocks`` keeps as ImageNet made it. ``ModelError`` for a
    model without that layout or with fewer blocks."""
    if not blocks:
        return []
    parts = [getattr(model, "conv_stem", None), getattr(model, "bn1", None)]
    stages = getattr(model, "blocks", None)
    if any(p is None for p in parts) or stages is None:
        raise ModelError(f"--freeze-blocks needs a model with a stem and blocks (the EfficientNet family, e.g. "
                         f"tf_efficientnet_lite0); {type(model).__name__} has not: leave --freeze-blocks at 0")
    if blocks > len(stages):
        raise ModelError(f"--freeze-blocks {blocks}: the model has {len(stages)} blocks; use at most {len(stages) - 1}")
    return [*parts, *list(stages)[:blocks]]


def freeze_blocks(model: Any, blocks: int) -> None:
    """No gradients for :func:`frozen_prefix`: autograd then records nothing before the first trained
    block, so its backward pass costs nothing (a bare lite0 step on 16 images of 128 x 501 on 2 CPUs,
    channels-last, 2026-12-07: 14.4 samples/s training every layer, 14.8 with the stem frozen, 24.6 with
    the stem and 2 blocks, 31 with 3). Their BatchNorms still learn the archive's statistics."""
    for part in frozen_prefix(model, blocks):
        for p in part.parameters():
            p.requires_grad_(False)


def param_groups(model: Any, head: set[str], cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: the new head at ``lr``, the pretrained backbone at ``lr * backbone_lr_scale``;
    weight decay on weights only (not on biases and norms)."""
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:  # not --freeze-blocks' layers
            groups.setdefault((n in head, p.ndim > 1), []).append(p)
    return [{"params": ps, "lr": cfg.lr * (1.0 if is_head else cfg.backbone_lr_scale),
             "weight_decay": cfg.weight_decay if decays else 0.0} for (is_head, decays), ps in sorted(groups.items())]


def not_fitting(history: list[dict[str, Any]], classes: int) -> str | None:
    """A warning when the training loss is still near a uniform guess after the first epochs, and so is
    the validation loss where there is one: shifted training images can keep the training loss high
    while the model already tells the held-out files apart (the demo's engines: 0.64 of 0.69 at a
    validation loss of 0.000)."""
    uniform = math.log(max(2, classes))
    if len(history) != STUCK_EPOCHS:
        return None
    last = history[-1]
    if last["train_loss"] < STUCK_FRACTION * uniform or last.get("val_loss", math.inf) < STUCK_FRACTION * uniform:
        return None
    where = "above" if last["train_loss"] > uniform else "near"  # 3.70 is not "near" 0.69: it is worse than a guess
    return (f"the training loss is {last['train_loss']:.2f} after {len(history)} epochs, {where} a uniform "
            f"guess over {classes} labels ({uniform:.2f}): the model is not fitting the data. Try less augmentation "
            "(--mixup-alpha 0, --no-field-augment, no --wave-augment, fewer --time-masks/--freq-masks), more "
            "--min-steps, or check the labels.")


def _maybe_crash(spec: str | None, epoch: int, rank: int, world: int, marker: URI) -> None:
    """Fault injection for tests: ``MELBATCH_CRASH_AT=raise:2`` raises after epoch 2 (its checkpoint
    committed); ``exit:2`` kills the last worker's process there (as when a node is lost). Once per
    OUT: a marker file records it.
    """
    if not spec:
        return
    mode, at = spec.split(":")
    if epoch != int(at) or (mode == "exit" and rank != world - 1) or storage.exists(marker):
        return
    # Ray Train registers a report when its controller next polls the workers (about every 2 s): wait
    # for it, so that the crash comes after this epoch's checkpoint is committed, every time
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=120)
    storage.write_bytes(marker, f"{spec} rank {rank}".encode())
    if mode == "exit":
        os._exit(1)
    raise RuntimeError(f"injected crash after epoch {epoch} (MELBATCH_CRASH_AT={spec})")
