"""The four job commands' arguments, and their configs: defaults < YAML (``--config``) < flags.

Each config field that carries help (:func:`melbatch.config.flag`) becomes a ``--flag`` typed and
defaulted from the dataclass itself, so adding a field with its help adds the flag, the ``--help``
line and the YAML key at once. :data:`JOBS` is what `melbatch featurize|train|classify|scan` accept;
``melbatch.cli`` builds its parser from it and ``melbatch.cli.submit`` checks a job's arguments with
:func:`parse_job` before anything reaches a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from melbatch import storage
from melbatch.config import (
    AUDIO_EXTENSIONS,
    AugmentConfig,
    ClassifyConfig,
    ConfigError,
    DetectConfig,
    FeatureConfig,
    FeaturizeConfig,
    ScanConfig,
    TrainConfig,
    build,
    merge,
    nested,
    parse_yaml,
    sections,
)
from melbatch.console import VERBOSE_ENV


def flag_names(cls: type, exclude: Iterable[str] = ()) -> list[str]:
    """The fields of ``cls`` that have a command-line flag (those with help), in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if "help" in f.metadata and f.name not in set(exclude)]


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, title: str, exclude: Iterable[str] = ()) -> None:
    """One flag per documented field of ``cls``, typed and defaulted from the dataclass itself."""
    group = p.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in flag_names(cls, exclude):
        hint, default = hints[name], fields[name].default
        help_text = fields[name].metadata["help"].replace("%", "%%")  # argparse formats help with %: "10% slower"
        shown = f"{help_text} (default: {','.join(default) or 'none' if isinstance(default, tuple) else default})"
        option = "--" + name.replace("_", "-")
        if hint is bool and default is True:
            group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False,
                               default=None, help=help_text)
        elif hint is bool:
            group.add_argument(option, action="store_true", default=None, help=help_text)
        elif typing.get_origin(hint) is tuple and name == "extensions":
            group.add_argument(option, "--ext", type=lambda s: tuple(s.split(",")), default=None, help=shown)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(option, action="append", default=None, help=shown)
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(option, choices=typing.get_args(hint), default=None, help=shown)
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            group.add_argument(option, type=base, default=None, help=shown)


def given(args: argparse.Namespace, cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The flags of ``cls`` the user gave (``None`` means not given)."""
    return {n: getattr(args, n) for n in flag_names(cls, exclude) if getattr(args, n, None) is not None}


def refuse_to_overwrite(uri: str | None, what: str, suffixes: tuple[str, ...] | None) -> None:
    """A ConfigError when ``uri`` is an existing file that is not of the output's kind (its name does not
    end with one of ``suffixes``): `show x.wav -o recording.wav` replaced a recording with a PNG (issue 44).
    ``suffixes`` None: outputs of any name (a table), refused only over a file named as audio."""
    audio = tuple(f".{e}" for e in AUDIO_EXTENSIONS)
    odd = not uri.lower().endswith(suffixes) if uri and suffixes else bool(uri) and uri.lower().endswith(audio)
    if uri and odd and storage.exists(uri) and storage.isfile(uri):
        kind = f"a {' or '.join(suffixes)} file" if suffixes else "a table"
        raise ConfigError(f"{what} {uri} exists and is not {kind}: melbatch will not write over it (a recording?); "
                          "give another path")


def read_yaml(uri: str | None, only: set[str] | None = None) -> dict[str, Any]:
    """The ``--config`` file (any URI) as its sections; ``None`` gives ``{}``. With ``only``, other
    sections are refused (train and classify read their own section of a shared file)."""
    if not uri:
        return {}
    try:
        text = storage.read_bytes(uri)
    except (storage.StorageError, IsADirectoryError, OSError) as e:
        raise ConfigError(f"--config {uri}: cannot read it ({e}); give the path of a YAML file") from None
    yml = parse_yaml(text, uri)
    bad = {k: v for k, v in yml.items() if v is not None and not isinstance(v, dict)}
    if bad:
        k, v = next(iter(bad.items()))
        raise ConfigError(f"config file {uri}: the '{k}:' section must hold settings (name: value lines), not "
                          f"{type(v).__name__} {v!r}"[:200])
    unknown = sorted(set(yml) - only) if only else []
    if unknown:
        names = " and ".join(f"'{s}:'" for s in sorted(only))
        raise ConfigError(f"config file {uri}: unknown section(s) {unknown}; use {names}")
    return yml


def featurize_config(args: argparse.Namespace) -> FeaturizeConfig:
    yml = read_yaml(args.config, {"features", "featurize"})
    features = build(FeatureConfig, merge(yml.get("features") or {}, given(args, FeatureConfig)), "features")
    values = merge(yml.get("featurize") or {}, {"src": args.src, "dst": args.dst, "address": args.address},
                   given(args, FeaturizeConfig))
    return build(FeaturizeConfig, {**values, "features": features}, "featurize")


def _sections_over_flags(cls: type, yml: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Each section of ``cls`` (train's ``augment:``, classify's ``detect:``): the YAML's, or its
    defaults, with the flags the user gave over it."""
    return {name: dataclasses.replace(yml.get(name) or sub(), **given(args, sub))
            for name, sub in sections(cls).items()}


def train_config(args: argparse.Namespace) -> TrainConfig:
    yml = nested(TrainConfig, read_yaml(args.config).get("train") or {}, "train")
    values = merge(yml, {"shards": args.shards, "out": args.out, "address": args.address}, given(args, TrainConfig))
    return build(TrainConfig, {**values, **_sections_over_flags(TrainConfig, yml, args)}, "train")


def _classify_values(args: argparse.Namespace, yml: dict[str, Any], exclude: Iterable[str] = ()) -> ClassifyConfig:
    section = nested(ClassifyConfig, yml.get("classify") or {}, "classify")
    values = merge(section, {"archive": args.archive, "model": args.model, "out": args.out, "address": args.address},
                   given(args, ClassifyConfig, exclude))
    return build(ClassifyConfig, {**values, **_sections_over_flags(ClassifyConfig, section, args)}, "classify")


def classify_config(args: argparse.Namespace) -> ClassifyConfig:
    return _classify_values(args, read_yaml(args.config))


DETECT_GROUP = "detections (the 'detect:' section of classify's YAML)"
SCAN_EXCLUDES = ("overwrite",)  # a scan's OUT is written by scans only: nothing to overwrite


def scan_config(args: argparse.Namespace) -> ScanConfig:
    yml = read_yaml(args.config, {"classify", "scan"})
    inner = _classify_values(args, yml, SCAN_EXCLUDES)
    return build(ScanConfig, {**merge(yml.get("scan") or {}, given(args, ScanConfig)), "classify": inner}, "scan")


def add_run_flags(p: argparse.ArgumentParser, sections: str) -> None:
    """--config, --address and -v, shared by every command that runs on Ray."""
    p.add_argument("--config", metavar="YAML", help=f"YAML file with {sections}; flags override it")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's own logs, execution plans and "
                   f"worker output (by default they go to Ray's log files; also {VERBOSE_ENV}=1)")


def _featurize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="archive URI (s3://bucket/prefix, folder, file://...)")
    p.add_argument("dst", metavar="DST", help="output URI for shards, quarantine and manifest")
    add_run_flags(p, "'features:' and 'featurize:' sections")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_dataclass_flags(p, FeaturizeConfig, "input and output")
    add_dataclass_flags(p, FeatureConfig, "features (recorded in every shard; changing one changes the config hash)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="SHARDS", help="featurize output URI (with _manifest.json)")
    p.add_argument("out", metavar="OUT", help="output URI for checkpoints, model package and metrics")
    add_run_flags(p, "a 'train:' section")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the epoch table stays)")
    add_dataclass_flags(p, TrainConfig, "training")
    add_dataclass_flags(p, AugmentConfig, "augmentation (the 'augment:' section of train's YAML)")


def _archive_model_out(p: argparse.ArgumentParser, out_help: str, sections: str) -> None:
    """ARCHIVE MODEL OUT and the run flags of the commands that classify (classify, scan)."""
    p.add_argument("archive", metavar="ARCHIVE", help="archive URI (s3://bucket/prefix, folder, file://...)")
    p.add_argument("model", metavar="MODEL", help="model package: the OUT of `melbatch train` (local or s3://)")
    p.add_argument("out", metavar="OUT", help=out_help)
    add_run_flags(p, sections)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _classify_args(p: argparse.ArgumentParser) -> None:
    _archive_model_out(p, "output URI for predictions, quarantine and manifest", "a 'classify:' section")
    add_dataclass_flags(p, ClassifyConfig, "classification")
    add_dataclass_flags(p, DetectConfig, DETECT_GROUP)


def _scan_args(p: argparse.ArgumentParser) -> None:
    _archive_model_out(p, "where the ledger, runs and predictions live (the same every night)",
                       "'classify:' and 'scan:' sections")
    add_dataclass_flags(p, ScanConfig, "scan")
    add_dataclass_flags(p, ClassifyConfig, "classification", SCAN_EXCLUDES)
    add_dataclass_flags(p, DetectConfig, DETECT_GROUP)


@dataclass(frozen=True)
class Job:
    """A job command: its one-line help, its ``--help`` description, its arguments and its config."""

    help: str
    description: str
    add_args: Callable[[argparse.ArgumentParser], None]
    config: Callable[[argparse.Namespace], Any]


JOBS: dict[str, Job] = {
    "featurize": Job(
        "audio archive -> log-mel Parquet shards + quarantine + manifest",
        "Read every audio object under SRC, decode (wav, flac, ogg, mp3; more with torchcodec+FFmpeg), mix to "
        "mono, resample, cut into clips and write log-mel images as Parquet shards under DST, with "
        "DST/quarantine.parquet for files that cannot be used and DST/_manifest.json written last. Re-running "
        "resumes and never duplicates rows.",
        _featurize_args, featurize_config),
    "train": Job(
        "fine-tune a timm model on featurized shards with Ray Train",
        "Fine-tune an ImageNet-pretrained timm model on the log-mel shards in SHARDS (a featurize output) with Ray "
        "Train, holding out whole files for validation. Writes checkpoints under OUT/ray-train/, the best model "
        "package in OUT/model/ and OUT/metrics.json. Re-running the same command resumes from the latest "
        "checkpoint.",
        _train_args, train_config),
    "classify": Job(
        "classify every audio file of an archive with a trained model (Ray Data)",
        "Classify every audio object under ARCHIVE with the model package MODEL (the OUT of `melbatch train`), in "
        "one streaming Ray Data pipeline: decode + log-mel with the package's feature config on CPU tasks, the "
        "model on an actor pool (GPUs with --use-gpu), Parquet out. Writes OUT/clips/*.parquet (per clip: top-k "
        "labels), OUT/files/*.parquet (per file: mean clip probability per label, best wins), "
        "OUT/quarantine.parquet and OUT/_manifest.json last. Re-running resumes and never duplicates rows. Exit "
        "code 4: finished, but more inputs were quarantined than --max-quarantine-rate allows.",
        _classify_args, classify_config),
    "scan": Job(
        "classify only what is new or changed in an archive since the last scan",
        "Nightly incremental scan: list ARCHIVE, compare it with the ledger of the last committed scan in OUT, "
        "classify only new or changed objects (etag/size), record deleted ones, and commit the run with one "
        "conditional create of OUT/runs/<run_id>/summary.json. A scan killed anywhere is redone by the next one "
        "without duplicates. Exit codes: 0 ok, 4 too many quarantined, 5 refused (another scan holds OUT, or "
        "committed first).",
        _scan_args, scan_config),
}


def parse_job(job: str, argv: list[str]) -> Any:
    """``melbatch JOB ARGV`` parsed and turned into its config, exactly as the command would (argparse
    prints what is wrong and exits 2; a wrong value raises :class:`ConfigError`)."""
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}: choose one of {tuple(JOBS)}")
    p = argparse.ArgumentParser(prog=f"melbatch {job}", description=JOBS[job].description)
    JOBS[job].add_args(p)
    return JOBS[job].config(p.parse_args(argv))
