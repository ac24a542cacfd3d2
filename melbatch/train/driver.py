"""train: fine-tune an ImageNet-pretrained timm model on featurized shards, with Ray Train.

Top-down, as :func:`run` reads:

1. :func:`preflight` checks everything the cluster would need before any cluster work: OUT writable
   and not another model's run, the model name, the featurize output (:func:`~melbatch.train.data.open_shards`:
   manifest present, every shard there and made with the manifest's features), stored waveforms for
   ``--wave-augment``.
2. :func:`labelled_split`: each file's label; whole recordings held out (clips of one file never sit on
   both sides), stratified by label and seeded, or an explicit ``uri,split`` manifest; a review's answers.
3. :func:`class_plan` balances the labels; :class:`~melbatch.train.loop.Budget` plans the steps (small
   data passes over its clips more than once an epoch); :func:`hold_plan` says how the workers get their
   rows; :func:`size_workers` fits the workers to the cluster (Ray Data keeps a CPU, unless the workers
   read a small split themselves); :func:`normalization` is computed once from the training split.
4. :func:`~melbatch.train.loop.train_loop` runs on every TorchTrainer worker (:func:`_trainer`): each reads
   its own part of the data, shifts the training images as the field would (or the waveforms, with
   ``--wave-augment``; :mod:`melbatch.train.augment`), trains, evaluates its part of the validation split
   (confusion matrices are summed across workers) and reports a checkpoint every epoch. Re-running the
   same command resumes from the latest checkpoint; ``FailureConfig`` restarts workers that die.
5. :func:`~melbatch.train.finish.finish`: the driver writes the best epoch's model package
   (``OUT/model/``), scores every validation clip with it (``OUT/val_predictions.parquet``: what the
   report's "most confidently wrong" and the per-file accuracy come from), fits the temperature and
   writes ``OUT/metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from melbatch import URI, listing, storage
from melbatch.config import AUDIO_EXTENSIONS, ConfigError, FeatureConfig, TrainConfig
from melbatch.console import Channel, EpochTable
from melbatch.labels import multilabel
from melbatch.model import backbones
from melbatch.model.backbones import AUTO, IMAGENET
from melbatch.model.package import PACKAGE_DIR, ModelError, can_pool_time, copy_package, create_model
from melbatch.model.weights import Source, resolve
from melbatch.shards import (
    BACKBONES_TABLE,
    DIVERGED,
    METRICS,
    SPLIT,
    TRAIN_CONFIG,
    VAL_PREDICTIONS,
    DatasetError,
    clip_schema,
)
from melbatch.stages.runs import init_ray
from melbatch.train import heads, selftrain
from melbatch.train.data import (
    Reviewed,
    dataset_stats,
    file_labels,
    keeps_audio,
    open_shards,
    padding_warning,
    read_split_manifest,
    reviewed,
    split_by_file,
    splits,
)
from melbatch.train.finish import finish, write_split
from melbatch.train.loop import Budget, frozen_prefix, train_loop

RUN_NAME = "ray-train"
FEW_STEPS = 50  # fewer optimiser steps than this in a whole run: say so before training
ABORT_S = 60  # Ctrl-C waits this long at most for Ray Train to stop its workers
DIRECT_READ_MB = 512  # at most this much training data (all of it) is read by each worker itself, without Ray Data


def preflight(cfg: TrainConfig) -> tuple[dict[str, Any], FeatureConfig, list[URI], dict[str, Any]]:
    """Everything checkable before the cluster: OUT writable and not another run's, model, shards.

    Returns the manifest, features, shard URIs and the earlier run's ``train_config.json`` ({} if none).
    """
    storage.check_writable(cfg.out)
    if cfg.weights and not storage.exists(cfg.weights):
        raise ConfigError(f"weights file {cfg.weights} does not exist")
    try:  # an unknown model name, or one --freeze-blocks / --time-pool can't apply to, fails here, not on workers
        frozen_prefix(create_model(cfg.model, 2, (64, 64), source=Source("none"), time_pool=cfg.time_pool or 1),
                      cfg.freeze_blocks)
    except ModelError as e:
        raise ConfigError(f"--model: {e}") from None
    previous = storage.join(cfg.out, TRAIN_CONFIG)
    before = json.loads(storage.read_bytes(previous)) if storage.exists(previous) else {}
    if before and before.get("model") != cfg.model:
        raise ConfigError(f"{cfg.out} holds a run of {before.get('model')}, not {cfg.model}: use another OUT "
                          "(re-running into the same OUT resumes that run)")
    manifest, features, uris = open_shards(cfg.shards)
    if before and before.get("config_hash") != features.hash():
        raise ConfigError(f"{cfg.out} holds a run on features {before.get('config_hash')}, and {cfg.shards} has "
                          f"features {features.hash()}: use another OUT")
    if cfg.augment.wave_augment and not keeps_audio(manifest):
        raise ConfigError(f"--wave-augment augments the clips' waveforms, and {cfg.shards} holds their images only: "
                          "featurize again with --keep-audio, or leave out --wave-augment")
    if cfg.augment.wave_augment and cfg.augment.noise_dir and next(
            listing.list_objects(cfg.augment.noise_dir, extensions=AUDIO_EXTENSIONS), None) is None:
        raise ConfigError(f"noise_dir {cfg.augment.noise_dir} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return manifest, features, uris, before


def run(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns the metrics written to ``OUT/metrics.json``. Prints one table row per epoch, and
    with ``progress`` a bar per epoch."""
    cfg = _spelled_out(cfg)
    manifest, features, uris, before = preflight(cfg)
    if cfg.backbone not in (IMAGENET, AUTO):  # a head on an audio backbone: checked before any cluster work
        heads.check(cfg, cfg.backbone)
        data = labelled_split(cfg, manifest, features, uris)
        return heads.run(cfg, cfg.backbone, data.labels, data.labels_of, data.train_files, data.val_files,
                         features, uris, manifest, progress)
    if cfg.backbone == AUTO:
        return auto(cfg, manifest, features, uris, progress)
    if cfg.unlabelled:
        return self_train(cfg, features, progress)
    return fine_tune(cfg, manifest, features, uris, before, progress)


def fine_tune(cfg: TrainConfig, manifest: dict[str, Any], features: FeatureConfig, uris: list[URI],
              before: dict[str, Any], progress: bool = True, pseudo: selftrain.Pseudo | None = None) -> dict[str, Any]:
    """The ImageNet fine-tune on Ray Train (steps 2-5 of the module's docstring), after :func:`preflight`;
    ``pseudo``: a self-training round's guessed clips join the training split."""
    cfg = _time_pool(_shifts_that_fit(cfg, features), features, before)
    source = Source.from_dict(before.get("weights")) or resolve(cfg.model, cfg.pretrained, cfg.weights)
    print(f"model {cfg.model}, starting from {source.describe()}", flush=True)
    data = labelled_split(cfg, manifest, features, uris)
    if pseudo:
        data = replace(data, pseudo=pseudo)
    init_ray(cfg.address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch lines are the progress
    plan = class_plan(cfg, data, manifest["labels"])
    budget = Budget.plan(plan.train_rows, cfg)
    hold = hold_plan(cfg, budget, sum(data.clips_of[u] for u in data.val_files), features, data.wave)
    cfg, line = size_workers(cfg, ray.cluster_resources().get("CPU", 0), ray_data=not hold.direct)
    print(line, flush=True)
    floor = f"at least {cfg.step_floor} steps{' while augmenting' if cfg.min_steps is None and cfg.augments else ''}"
    print(f"budget: {budget.describe(cfg.epochs)}" + (f" ({floor}: --min-steps)" if budget.passes > 1 else ""),
          flush=True)
    for line in small_data_warnings(budget, cfg, data.labels_of, data.val_files):
        print(f"warning: {line}", flush=True)
    repeats = plan.repeats
    if budget.passes > 1:  # one streaming pass over rows repeated, not several passes (each costs a start-up)
        repeats = {lab: budget.passes * (repeats or {}).get(lab, 1.0) for lab in plan.row_keys}
    rows = splits(uris, data.val_files, data.wave, repeats, data.review, data.pseudo.uris if data.pseudo else ())
    print(hold.line, flush=True)
    norm = normalization(cfg, before, uris, data.val_files, here=hold.direct)
    storage.write_bytes(storage.join(cfg.out, TRAIN_CONFIG), json.dumps(
        {"model": cfg.model, "config_hash": features.hash(), "norm": norm, "wave_augment": data.wave,
         "weights": source.to_dict(), "budget": asdict(budget), "hold": hold.to_dict(), "train": asdict(cfg)},
        indent=2).encode())
    channel = Channel()
    trainer = _trainer(cfg, {
        "train": asdict(cfg), "labels": data.labels, "norm": norm, "shape": list(features.shape),
        "features": features.to_dict(), "wave": data.wave, "budget": asdict(budget), "weights": source.to_dict(),
        "class_weights": plan.class_weights, "hold": hold.to_dict(),
        "direct": rows if hold.direct else None,
        "crash_at": os.environ.get("MELBATCH_CRASH_AT"), "channel": channel},
        None if hold.direct else {name: split.dataset() for name, split in rows.items()})
    diverged = storage.join(cfg.out, DIVERGED)
    if storage.exists(diverged):
        storage.delete([diverged])
    with EpochTable(channel, cfg.epochs, budget.steps, bars=progress):
        result = interruptible_fit(trainer)
    if storage.exists(diverged):
        raise DatasetError(f"train stopped: {json.loads(storage.read_bytes(diverged))['why']}")
    return finish(cfg, result, data.labels, features, norm, uris, data.val_files, data.train_files, source,
                  data.review.record() if data.review else None, here=hold.direct)


class _Trainer(TorchTrainer):
    """Ray Train's trainer with melbatch's Ctrl-C (issue 44, case 7). Ray Train puts its own SIGINT
    handler on the main thread while it runs: it aborted the run and ended the process with exit 1 and
    no word. melbatch's handler aborts the run the same way (the controller stops the workers; the
    checkpoints already registered stay in ``OUT/ray-train``) and then raises ``KeyboardInterrupt``: the
    command line says to re-run the same command and exits 130, and the re-run resumes from the latest
    checkpoint as after a crash. A second Ctrl-C while the abort runs interrupts at once.

    (Running ``fit()`` in a thread of its own, so that Ray's handler is never put, and shutting Ray
    down on Ctrl-C raced that thread: the first Ray call it made after the shutdown ended the whole
    process with exit 1 — Ray's core worker: "has already been shutdown ... The process will exit".)"""

    def _register_sigint_handler(self, controller: Any) -> None:  # Ray Train calls it with the run's controller
        def interrupted(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.get(controller.abort.remote(), timeout=ABORT_S)  # the controller exits: RayActorError
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupted)


def interruptible_fit(trainer: TorchTrainer) -> Any:
    """``trainer.fit()``, with Ctrl-C's handler as it was before once it returns (:class:`_Trainer`)."""
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


def self_train(cfg: TrainConfig, features: FeatureConfig, progress: bool = True) -> dict[str, Any]:
    """``--unlabelled`` with the ImageNet fine-tune (:mod:`melbatch.train.selftrain`): the supervised teacher
    into ``OUT/self-training/round-0/``, then each round's guesses and student into ``round-<r>/``; the last
    round's package, validation predictions, split and metrics (every round under ``self_training``) are
    copied to OUT. Each step is kept where it lands: re-running the command resumes at the first step
    not done (a round's finished training is read back, not run again)."""
    umanifest, uuris = selftrain.check(cfg, features)
    rounds = cfg.rounds
    print(f"self-training on {umanifest.get('counts', {}).get('clips', 0):,} unlabelled clips of {cfg.unlabelled}: "
          f"a supervised teacher, then {rounds} round(s) of a student on the labelled and the surest guessed clips "
          f"(per label at most {cfg.pseudo_keep:g} of an equal share), each a whole training run", flush=True)
    log: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    for r in range(rounds + 1):
        one = replace(cfg, unlabelled=None, out=selftrain.round_dir(cfg.out, r),
                      split_manifest=storage.join(selftrain.round_dir(cfg.out, 0), SPLIT) if r else cfg.split_manifest)
        pseudo = None
        if r:
            teacher = replace(cfg, out=selftrain.round_dir(cfg.out, r - 1))
            pseudo = selftrain.load(one.out) or selftrain.make(
                teacher, uuris, umanifest, metrics["labels"], one.out, selftrain.guesses_of(teacher.out))
            print(selftrain.describe(r, pseudo), flush=True)
        done = storage.join(one.out, METRICS)
        print(f"--- round {r}: {'the supervised teacher' if not r else 'the student'} into {one.out}", flush=True)
        if storage.exists(done):
            metrics = json.loads(storage.read_bytes(done))
            print(f"done already: validation {metrics['val_file_accuracy']:.3f} per file", flush=True)
        else:
            metrics = fine_tune(one, *preflight(one), progress, pseudo)
        log.append({"round": r, **({k: v for k, v in pseudo.record.items() if k != "shards"} if pseudo else {}),
                    "val_file_accuracy": metrics["val_file_accuracy"], "val_accuracy": metrics["val_accuracy"],
                    "macro_f1": metrics["macro_f1"], "out": one.out})
    last = log[-1]["out"]
    _keep_run(last, cfg.out, (VAL_PREDICTIONS, SPLIT))
    metrics = {**metrics, "self_training": {"unlabelled": cfg.unlabelled, "rounds": log},
               "model_package": storage.join(cfg.out, PACKAGE_DIR)}
    storage.write_bytes(storage.join(cfg.out, METRICS), json.dumps(metrics, indent=2).encode())
    print("round  taken  agreement  validation per file", flush=True)
    for row in log:
        agree = row.get("agreement_with_previous")
        print(f"{row['round']:>5}  {row.get('taken', 0):>5,}  {'' if agree is None else f'{agree:.3f}':>9}  "
              f"{row['val_file_accuracy']:>19.3f}", flush=True)
    print(f"kept: round {rounds}'s student (its package is {storage.join(cfg.out, PACKAGE_DIR)})", flush=True)
    return metrics


def auto(cfg: TrainConfig, manifest: dict[str, Any], features: FeatureConfig, uris: list[URI],
         progress: bool = True) -> dict[str, Any]:
    """``--backbone auto``: every installed backbone's head and the ImageNet fine-tune, each into
    ``OUT/candidates/<name>/`` on the same split; the best by validation accuracy per file (then macro-F1,
    then the cheaper) is copied to OUT, and ``OUT/backbones.json`` holds the table it printed."""
    names = [b.name for b in backbones.installed()]
    for name in names:
        heads.check(replace(cfg, backbone=name), name)
    data = labelled_split(cfg, manifest, features, uris)
    print(f"backbone auto: {', '.join([*names, IMAGENET])} on the same {len(data.train_files)} training and "
          f"{len(data.val_files)} validation files" + ("" if names else
          " (no audio backbone installed: make extras EXTRAS='birdnet speaker')"), flush=True)
    split = storage.join(cfg.out, "candidates", "split.csv")
    write_split(storage.join(cfg.out, "candidates"), data.val_files, data.train_files)
    rows = []
    for name in [*names, IMAGENET]:
        one = replace(cfg, backbone=name, out=storage.join(cfg.out, "candidates", name), split_manifest=split)
        print(f"--- {name}", flush=True)
        m = run(one, progress)
        rows.append({"backbone": name, "val_file_accuracy": m["val_file_accuracy"], "macro_f1": m["macro_f1"],
                     "val_accuracy": m["val_accuracy"], "out": one.out})
    best = max(rows, key=lambda r: (r["val_file_accuracy"], r["macro_f1"], r["backbone"] != IMAGENET))
    _keep_run(best["out"], cfg.out, (METRICS, VAL_PREDICTIONS, SPLIT))
    table = {"chosen": best["backbone"], "by": "validation accuracy per file, then macro-F1", "candidates": rows}
    storage.write_bytes(storage.join(cfg.out, BACKBONES_TABLE), json.dumps(table, indent=2).encode())
    print("backbone        files   clips  macro-F1", flush=True)
    for r in rows:
        print(f"{r['backbone']:<14} {r['val_file_accuracy']:>6.3f}  {r['val_accuracy']:>6.3f}  {r['macro_f1']:>8.3f}"
              + ("  <- kept" if r is best else ""), flush=True)
    print(f"kept: {best['backbone']} (its package is {storage.join(cfg.out, PACKAGE_DIR)})", flush=True)
    metrics = json.loads(storage.read_bytes(storage.join(cfg.out, METRICS)))
    return {**metrics, "auto": table}


def _keep_run(src: URI, out: URI, files: tuple[str, ...]) -> None:
    """The chosen run (a self-training round, an auto candidate) in ``src`` becomes OUT's: its package
    and ``files`` copied into ``out``."""
    copy_package(src, out)
    for rel in files:
        storage.write_bytes(storage.join(out, rel), storage.read_bytes(storage.join(src, rel)))


def _spelled_out(cfg: TrainConfig) -> TrainConfig:
    """The places in their one spelling (file:///abs for a local path): Ray Train runs the workers in a
    folder of its own, where the shards, OUT and a noise folder given relative to here are not found."""
    aug = cfg.augment
    return replace(cfg, shards=storage.canonical(cfg.shards), out=storage.canonical(cfg.out),
                   unlabelled=cfg.unlabelled and storage.canonical(cfg.unlabelled),
                   augment=replace(aug, noise_dir=aug.noise_dir and storage.canonical(aug.noise_dir)))


def _shifts_that_fit(cfg: TrainConfig, features: FeatureConfig) -> TrainConfig:
    """The field shifts are made on dB images: off, saying so, for PCEN or per-clip normalised ones."""
    aug = cfg.augment
    if aug.field_augment and not aug.wave_augment and (features.compression != "db" or features.clip_norm != "none"):
        print(f"field augmentation: off, it works on dB images and these are {features.units} "
              f"(--compression {features.compression}, --clip-norm {features.clip_norm}); --wave-augment on shards "
              "featurized with --keep-audio makes the same shifts on the waveforms", flush=True)
        return replace(cfg, augment=replace(aug, field_augment=False))
    return cfg


def _time_pool(cfg: TrainConfig, features: FeatureConfig, before: dict[str, Any]) -> TrainConfig:
    """``--time-pool`` decided before training: as the run in OUT began (runs from before 2026-12-07 kept
    every frame), else as given, else its default for these images where the model can take it."""
    if before:
        began = before.get("train", {}).get("time_pool") or 1
        if cfg.time_pool not in (None, began):
            raise ConfigError(f"{cfg.out} holds a run at --time-pool {began}: resume it with that (or leave "
                              "--time-pool out), or use another OUT")
        return replace(cfg, time_pool=began)
    factor = cfg.pool_for(features.n_frames)
    if cfg.time_pool is None and factor > 1 and not can_pool_time(
            create_model(cfg.model, 2, (64, 64), source=Source("none")), cfg.model):
        factor = 1  # a model of fixed image size (a ViT) sees every frame
    if factor > 1:
        print(f"images: {features.n_mels} x {features.n_frames}, seen as {features.n_mels} x "
              f"{math.ceil(features.n_frames / factor)} (--time-pool {factor}: a step costs about 1/{factor}; "
              "--time-pool 1 keeps every frame)", flush=True)
    return replace(cfg, time_pool=factor)


@dataclass(frozen=True)
class LabelledSplit:
    """The run's files: each one's label and clip count, which train and which are held out, and what a
    review's answers change (``--extra-labels``)."""

    labels: list[str]  # the model's labels
    labels_of: dict[str, str]  # source file -> its label (string)
    clips_of: Counter  # source file -> its clips
    train_files: set[str]
    val_files: set[str]
    review: Reviewed | None
    wave: bool  # training rows carry waveforms (and so do reviewed clips); preflight saw them stored
    pseudo: selftrain.Pseudo | None = None  # a self-training round's guessed clips, training beside the shards'


def labelled_split(cfg: TrainConfig, manifest: dict[str, Any], features: FeatureConfig,
                   uris: list[URI]) -> LabelledSplit:
    """Each file's label, the split by file (or the split manifest), the reviewed clips; refuses a split
    that leaves a side empty and a run with fewer than two labels, saying what to do."""
    labels = label_names(manifest["labels"], cfg.multi_label, cfg.shards)
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
    wave = cfg.augment.wave_augment
    review = None
    if cfg.extra_labels:
        review = reviewed(cfg.extra_labels, features, wave, labels_of, clips_of, val_files, cfg.out)
        print(review.describe(), flush=True)
        if review.unreadable:
            print(f"warning: {len(review.unreadable)} reviewed file(s) could not be read, their answers are left out: "
                  f"{review.unreadable[:3]}", flush=True)
        labels = sorted(set(labels) | review.labels())
    if len(labels) < 2:
        raise ConfigError(f"{cfg.shards} holds clips of {len(labels)} label(s) ({', '.join(labels) or 'none'}): a "
                          "classifier needs at least two. Featurize the other classes too (SRC/<label>/<file>, one "
                          "folder per class), read the labels from a manifest with --labels, or add reviewed clips "
                          "of other labels with --extra-labels")
    return LabelledSplit(labels, labels_of, clips_of, train_files, val_files, review, wave)


@dataclass(frozen=True)
class ClassPlan:
    """How the labels are balanced (``--balance``): the loss's class weights, or each label's repeats."""

    train_rows: int  # training clips an epoch passes over (after oversampling)
    class_weights: list[float]
    repeats: dict[str, float] | None  # a training row's label -> its repeats each epoch
    row_keys: list[str]  # what a training row's label column holds (multi-label: label strings such as "a;b")


def class_plan(cfg: TrainConfig, data: LabelledSplit, manifest_labels: dict[str, int]) -> ClassPlan:
    """The training clips per label (a review's moves and additions counted) and what ``--balance`` makes
    of them: class weights (the default), repeats of rare labels, or nothing (multi-label: never)."""
    rows_per_label: Counter = Counter()
    for u in data.train_files:
        rows_per_label[data.labels_of[u]] += data.clips_of[u]
    if data.review:
        for old, new in data.review.moved:
            rows_per_label[old] -= 1
            rows_per_label[new] += 1
        rows_per_label.update(data.review.added)
    if data.pseudo:
        rows_per_label.update(data.pseudo.per_label)
    labels = data.labels
    train_rows = sum(rows_per_label.values())
    class_weights, repeats, row_keys = [1.0] * len(labels), None, labels
    if cfg.multi_label:
        row_keys = sorted(set(manifest_labels) | (data.review.labels() if data.review else set()))
        if cfg.balance != "none":
            print(f"balance {cfg.balance}: not applied with --multi-label (each label's threshold is chosen on the "
                  "validation split instead)", flush=True)
    elif cfg.balance == "weights":
        class_weights = [train_rows / (len(labels) * max(1, rows_per_label[lab])) for lab in labels]
    elif cfg.balance == "oversample":
        most = max(rows_per_label.values())
        repeats = {lab: most / max(1, rows_per_label[lab]) for lab in labels}
        train_rows = most * len([lab for lab in labels if rows_per_label[lab]])
    return ClassPlan(train_rows, class_weights, repeats, row_keys)


def normalization(cfg: TrainConfig, before: dict[str, Any], uris: list[URI], val_files: set[str],
                  here: bool) -> dict[str, Any]:
    """The images' normalisation: a resumed run keeps the statistics its checkpoints were trained with;
    else one mean/std of the training split (``dataset``), or each clip its own (``clip``)."""
    if before.get("norm", {}).get("kind") == cfg.normalize:
        return before["norm"]
    if cfg.normalize == "dataset":
        mean, std = dataset_stats(uris, val_files, here=here)
        return {"kind": "dataset", "mean": mean, "std": std}
    return {"kind": "clip"}


def _trainer(cfg: TrainConfig, loop_config: dict[str, Any], datasets: dict[str, Any] | None) -> TorchTrainer:
    """Ray Train's run of :func:`train_loop` on ``cfg.workers`` workers, checkpointing into OUT."""
    fs, path = storage.arrow_filesystem(cfg.out)
    return _Trainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                         checkpoint_score_attribute="macro_f1",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets=datasets,
    )


def label_names(counts: dict[str, int], multi_label: bool, shards: URI) -> list[str]:
    """The model's labels from the featurize manifest's label counts: each label string, or with
    ``multi_label`` every name the strings hold (``a;b`` is a clip with both)."""
    if multi_label:
        names = multilabel.vocabulary(counts)
        if len(names) < 2:
            raise ConfigError(f"{shards} names {len(names)} label(s) ({names}): --multi-label needs at least two")
        return names
    several = sorted(k for k in counts if multilabel.SEP in k or not k)
    if several:
        raise ConfigError(f"{shards} holds clips with several labels or none ({several[:3]}, from a manifest with "
                          "several rows or time spans per file): train them with --multi-label")
    return sorted(counts)


def size_workers(cfg: TrainConfig, cpus: float, ray_data: bool = True) -> tuple[TrainConfig, str]:
    """``cfg`` with ``cpus_per_worker`` chosen when left out, and the line that says so.

    Ray Data's read tasks need a whole CPU; without one, training waits for data forever. So the
    workers share what is left after one CPU (a quarter of a big cluster) for Ray Data, in steps of
    0.05 CPU; an explicit value that leaves less is an error that says what to change. Without
    ``ray_data`` (a ``direct`` hold plan: the workers read the shards themselves before the first
    epoch) no CPU waits for Ray Data, and the workers share them all: a worker's torch threads are its
    whole CPUs, so on 2 CPUs one worker steps on 2 threads instead of 1 (a bare lite0 step on 16 images
    of 128 x 501, 2026-12-07: 5.7 samples/s on one thread, 10.3 on two).
    """
    if cfg.cpus_per_worker is not None:
        left = cpus - cfg.workers * cfg.cpus_per_worker
        if left < 0:
            raise ConfigError(f"{cfg.workers} worker(s) x {cfg.cpus_per_worker} CPU are more than the cluster's "
                              f"{cpus:g} CPUs: lower --cpus-per-worker or --workers")
        if left < 1 and ray_data:
            raise ConfigError(f"{cfg.workers} worker(s) x {cfg.cpus_per_worker} CPU leave {left:g} of the cluster's "
                              f"{cpus:g} CPUs for Ray Data, which needs at least 1: lower --cpus-per-worker "
                              "(fractions are fine), leave it out to size it from the cluster, or lower --workers")
        return cfg, f"CPUs: {cfg.workers} worker(s) x {cfg.cpus_per_worker:g}, {left:g} of {cpus:g} left" + (
            " for Ray Data" if ray_data else "")
    data = max(1.0, cpus // 4) if ray_data else 0.0
    each = math.floor((cpus - data) / cfg.workers * 20) / 20
    if each < 0.05:
        data_cpu = " and Ray Data's 1 CPU" if ray_data else ""
        raise ConfigError(f"the cluster has {cpus:g} CPU(s): {cfg.workers} worker(s){data_cpu} do not fit; "
                          "lower --workers or join a bigger cluster")
    cfg = replace(cfg, cpus_per_worker=each)
    left = (f"{cpus - cfg.workers * each:g} left for Ray Data" if ray_data else
            "none kept for Ray Data: the workers read the shards themselves")
    return cfg, (f"CPUs: {cfg.workers} worker(s) x {each:g} (chosen from the cluster's {cpus:g}; {left}; "
                 "--cpus-per-worker to choose)")


@dataclass(frozen=True)
class HoldPlan:
    """How the workers get their rows (:func:`hold_plan`): ``mode`` is ``direct``, ``hold``,
    ``stream-train`` or ``stream``; a worker's share in bytes (its training rows with their repeats and
    its validation images) and its validation images alone; ``line``, what ``train`` prints."""

    mode: str
    share_bytes: int
    val_share_bytes: int
    line: str

    @property
    def direct(self) -> bool:
        """Each worker reads the shards itself before the first epoch: no Ray Data pipeline."""
        return self.mode == "direct"

    @property
    def hold_train(self) -> bool:
        """The training rows are kept in the worker after they are read once."""
        return self.mode in ("direct", "hold")

    @property
    def hold_val(self) -> bool:
        """The validation rows are kept in the worker after they are read once."""
        return self.mode != "stream"

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.mode, "train": self.hold_train, "val": self.hold_val, "share_bytes": self.share_bytes,
                "val_share_bytes": self.val_share_bytes}


def hold_plan(cfg: TrainConfig, budget: Budget, val_rows: int, features: FeatureConfig, wave: bool) -> HoldPlan:
    """How the workers get their rows (``--hold-mb``), with the line that says so: a training row is its
    waveform (16-bit) or its image, a validation row its image, each epoch's training rows with their
    repeats.

    ``direct``: all of them fit one worker's budget and are small (``DIRECT_READ_MB``): each worker reads
    the shards itself before the first epoch and keeps its share. No Ray Data pipeline starts, which on
    a small cluster costs more than the reading (measured on 2 CPUs: a 2-epoch run's first epoch took
    16.8 s through Ray Data and 0.3 s from memory). ``hold``: each worker's share fits: Ray Data streams
    it in the first epoch and the worker keeps it. ``stream-train``: the training share does not fit,
    the validation share does: Ray Data streams the training rows every epoch and the validation rows
    once (the same every epoch, so streaming them again buys nothing: measured on 2 CPUs, 8,000 clips,
    a streamed validation pass over 1,600 took 3.9-5.5 s of a 10-11 s epoch). ``stream``: not even the
    validation share fits: Ray Data streams both every epoch."""
    schema = clip_schema(features, keep_audio=True)  # the shards' row widths, from the format's one definition
    image, audio = schema.field("mel").type.byte_width, schema.field("audio").type.byte_width
    row = audio if wave else image
    total = budget.train_rows * budget.passes * row + val_rows * image
    share = math.ceil(total / budget.workers)
    val_share = math.ceil(val_rows * image / budget.workers)
    mb, limit = share / 2**20, cfg.hold_mb * 2**20
    if total <= min(cfg.hold_mb, DIRECT_READ_MB) * 2**20:
        mode, line = "direct", (f"each worker reads the shards itself before the first epoch and holds its share "
                                f"in memory ({mb:,.0f} MB of --hold-mb {cfg.hold_mb}); later epochs read nothing")
    elif share <= limit:
        mode, line = "hold", (f"each worker reads its share of the shards once and holds it in memory ({mb:,.0f} MB "
                              f"of --hold-mb {cfg.hold_mb}); later epochs read nothing")
    elif val_share <= limit:
        mode, line = "stream-train", (f"each worker reads its share of the training clips every epoch ({mb:,.0f} MB "
                                      f"with the validation clips is over --hold-mb {cfg.hold_mb}) and holds its "
                                      f"validation clips after the first ({val_share / 2**20:,.0f} MB)")
    else:
        mode, line = "stream", (f"each worker reads its share of the shards every epoch ({mb:,.0f} MB is over "
                                f"--hold-mb {cfg.hold_mb})")
    return HoldPlan(mode, share, val_share, f"data: {line}")


def small_data_warnings(budget: Budget, cfg: TrainConfig, labels_of: dict[str, str], val_files: set[str]) -> list[str]:
    """What the user should know before a run on little data starts."""
    out = []
    if cfg.epochs * budget.steps < FEW_STEPS:
        out.append(f"the run makes only {cfg.epochs * budget.steps} optimiser steps: too few to fine-tune; "
                   f"raise --epochs or --min-steps (now {cfg.step_floor})")
    per_label = Counter(labels_of[u] for u in val_files)
    if len(val_files) < 10 or min(per_label.get(lab, 0) for lab in set(labels_of.values())) < 2:
        out.append(f"validation holds {len(val_files)} file(s) ({min(per_label.values(), default=0)} for the rarest "
                   f"label): its accuracy moves in steps of {1 / max(1, len(val_files)):.0%} and is a rough guide only")
    return out
