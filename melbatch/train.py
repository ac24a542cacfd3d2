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
import pyarrow.parquet as pq

from melbatch import URI, augment, storage
from melbatch.config import AUDIO_EXTENSIONS, ConfigError, FeatureConfig, TrainConfig
from melbatch.console import Channel, EpochTable, Throttle
from melbatch.features import logmel_tensor
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
from melbatch.runs import init_ray
from melbatch.shards import (
    METRICS,
    SPLIT,
    TRAIN_CONFIG,
    VAL_PREDICTIONS,
    audio_array,
    mel_array,
)
from melbatch.trainset import (
    dataset_stats,
    datasets,
    file_labels,
    images,
    keeps_audio,
    load_noise_bank,
    open_shards,
    padding_warning,
    read_split_manifest,
    split,
    split_by_file,
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
    channel: Channel | None  # rank 0 only: step, epoch and warning events for the driver's console
    model: Any
    head: set[str]  # the new head's parameter names (the rest is the pretrained backbone)
    opt: Any
    sched: Any
    class_w: Any
    autocast: Any
    start_epoch: int
    history: list[dict[str, Any]]


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: set up (resuming from the latest checkpoint), then per epoch
    train, evaluate, and report the row with a checkpoint."""
    w = _setup(config)
    for epoch in range(w.start_epoch, w.cfg.epochs):
        t0 = time.perf_counter()
        loss_sum, seen, train_s = train_epoch(w, epoch)
        conf, val_loss = evaluate(w)
        row, report = epoch_metrics(w, epoch, conf, val_loss, (loss_sum, seen, train_s), time.perf_counter() - t0)
        checkpoint(w, epoch, row, report)
        _maybe_crash(config.get("crash_at"), epoch + 1, w.rank, w.world, storage.join(w.cfg.out, "_injected_crash"))


def _setup(config: dict[str, Any]) -> _Worker:
    """The model (from the starting weights), AdamW and the warm-up + cosine schedule, restored from
    the latest checkpoint when the run resumes; the noise bank and waveform augmentation if asked."""
    import ray.train
    import ray.train.torch
    import torch

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
        bank = load_noise_bank(cfg.noise_dir, features.sample_rate_hz,
                               warn=lambda t: channel and channel.send("warning", text=t)) if cfg.noise_dir else None
        wave = (features, augment.WaveAugment.of(cfg, features.sample_rate_hz),
                None if bank is None else torch.from_numpy(bank).to(device), gen)

    model = create_model(cfg.model, len(labels), shape, source=Source.from_dict(config["weights"]))
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
    return _Worker(
        cfg=cfg, labels=labels, label_index={lab: i for i, lab in enumerate(labels)}, norm=config["norm"],
        shape=shape, features=features, budget=budget, rank=rank, world=world, device=device, gen=gen, wave=wave,
        channel=channel, model=ray.train.torch.prepare_model(model), head=head, opt=opt, sched=sched,
        class_w=torch.tensor(config["class_weights"], dtype=torch.float32, device=device),
        autocast=torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.use_gpu and cfg.amp),
        start_epoch=start_epoch, history=history)


def train_epoch(w: _Worker, epoch: int) -> tuple[float, int, float]:
    """One epoch of optimiser steps over this worker's shard (augmented, class-weighted, soft targets);
    the backbone stays frozen in the first ``freeze_epochs``. Returns (loss sum, clips seen, seconds)."""
    import ray.train
    import torch

    cfg, t0, seen, loss_sum, step = w.cfg, time.perf_counter(), 0, 0.0, 0
    tick, shift = Throttle(0.5), round(cfg.time_shift_frac * w.shape[1])
    frozen = epoch < cfg.freeze_epochs  # linear probe first: only the head learns
    w.model.train()
    for batch in ray.train.get_dataset_shard("train").iter_batches(
            batch_size=w.budget.batch_size, batch_format="pyarrow", local_shuffle_buffer_size=max(
                256, 8 * w.budget.batch_size), local_shuffle_seed=cfg.seed + epoch * 7919 + w.rank, drop_last=False):
        x, y = _inputs(batch, w.label_index, w.norm, w.device, w.wave)
        if len(y) < 2:
            continue
        sound = sound_frames(batch, w.features)
        x = augment.random_time_shift(x, shift, w.gen, sound)
        x = augment.spec_augment(x, cfg.time_masks, cfg.time_mask_frac, cfg.freq_masks, cfg.freq_mask_frac, w.gen,
                                 sound)
        target = augment.soft_targets(y, len(w.labels), cfg.label_smoothing)
        x, target = augment.mixup(x, target, cfg.mixup_alpha, w.gen)
        with w.autocast:
            logits = w.model(x)
        loss = -(target * torch.log_softmax(logits.float(), dim=1) * w.class_w).sum(1).mean()
        w.opt.zero_grad(set_to_none=True)
        loss.backward()
        if frozen:
            for n, p in w.model.named_parameters():
                if n.removeprefix("module.") not in w.head:
                    p.grad = None
        w.opt.step()
        w.sched.step()
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        step += 1
        if w.channel and tick():
            w.channel.send("step", epoch=epoch + 1, step=step, loss=loss_sum / seen,
                           samples_per_s=seen * w.world / max(1e-9, time.perf_counter() - t0))
    train_s = time.perf_counter() - t0
    if w.channel and seen:  # the epoch's last step, whatever the throttle let through: the bar ends full
        w.channel.send("step", epoch=epoch + 1, step=step, loss=loss_sum / seen,
                       samples_per_s=seen * w.world / max(1e-9, train_s), final=True)
    return loss_sum, seen, train_s


def evaluate(w: _Worker) -> tuple[Any, Any]:
    """This worker's share of the validation images: (confusion matrix, [loss sum, clips])."""
    import ray.train
    import torch

    w.model.eval()
    conf = torch.zeros(len(w.labels), len(w.labels), dtype=torch.float64)
    val_loss = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=w.budget.batch_size,
                                                                    batch_format="pyarrow"):
            x, y = _inputs(batch, w.label_index, w.norm, w.device)
            with w.autocast:
                logits = w.model(x).float()
            val_loss += torch.tensor([float(torch.nn.functional.cross_entropy(logits, y, reduction="sum")),
                                      len(y)], dtype=torch.float64)
            conf.index_put_((y.cpu(), logits.argmax(1).cpu()), torch.ones(len(y), dtype=torch.float64),
                            accumulate=True)
    return conf, val_loss


def epoch_metrics(w: _Worker, epoch: int, conf: Any, val_loss: Any, train: tuple[float, int, float],
              epoch_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The epoch's numbers summed over the workers: its table row, and what Ray Train records."""
    import torch
    import torch.distributed as dist

    counts = torch.tensor(train, dtype=torch.float64)
    if w.world > 1 and dist.is_initialized():
        for t in (conf, val_loss, counts):
            dist.all_reduce(t)
    m = _metrics(conf.numpy(), w.labels)
    row = {"epoch": epoch + 1, "train_loss": float(counts[0] / max(1, counts[1])),
           "val_loss": float(val_loss[0] / max(1, val_loss[1])), "val_accuracy": m["val_accuracy"],
           "macro_f1": m["macro_f1"], "lr": w.sched.get_last_lr()[0], "frozen_backbone": epoch < w.cfg.freeze_epochs,
           "samples_per_s": float(counts[1] / max(1e-9, counts[2] / w.world)), "attempt_start_epoch": w.start_epoch,
           "epoch_s": epoch_s}
    return row, {**row, "per_class": json.dumps(m["per_class"]), "confusion_matrix": json.dumps(m["confusion_matrix"])}


def checkpoint(w: _Worker, epoch: int, row: dict[str, Any], report: dict[str, Any]) -> None:
    """Rank 0 saves model, optimizer, schedule and history; every worker reports the epoch to Ray Train.
    The driver prints the row (Ray keeps a worker's own output in its log file), and a warning when the
    loss stays near a uniform guess."""
    import ray.train
    import torch

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
            stuck = not_fitting(w.history, len(w.labels))
            if stuck and w.channel:
                w.channel.send("warning", text=stuck)
        ray.train.report(report, checkpoint=ckpt)


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
        mean, std = dataset_stats(split(images(uris, ["uri", "label", "mel"]), val_files, keep=False))
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
        ds = split(images(uris, columns), val_files, keep=True).map_batches(
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
