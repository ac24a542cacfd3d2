"""The commands that run a job or read what one wrote: featurize, train, classify and scan (their
flags come from :mod:`melbatch.cli.options`), results, detections, export, submit.

Each ``cmd_*`` takes the parsed arguments and returns the exit code; each ``*_args`` declares a
command's own arguments; a command's docstring is its ``--help`` description. The table in
:mod:`melbatch.cli.commands` names them. Each body imports its stage when it runs, so ``--help`` and a
wrong flag answer without loading torch or Ray.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import io
import json
import sys
from typing import Any

from melbatch import ledger
from melbatch.cli.options import JOBS, refuse_to_overwrite
from melbatch.config import ConfigError
from melbatch.console import shown

EXIT_QUARANTINE = 4
EXIT_BUSY = 5


def cmd_featurize(args: argparse.Namespace) -> int:
    from melbatch.stages import featurize

    cfg = JOBS["featurize"].config(args)
    summary = featurize.run(cfg, progress=not args.no_progress)
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from melbatch.model.weights import Source
    from melbatch.train import driver

    cfg = JOBS["train"].config(args)
    m = driver.run(cfg, progress=not args.no_progress)
    what = f"{cfg.model}: best epoch {m['best_epoch']}/{cfg.epochs}" if m.get("backbone", "imagenet") == "imagenet" \
        else f"a head on the {m['backbone']} backbone"
    print(f"\ntrained {what} on {cfg.shards}:  val_accuracy {m['val_accuracy']:.3f}  per file "
          f"{m['val_file_accuracy']:.3f}  macro_f1 {m['macro_f1']:.3f}  "
          f"({m['split']['train_files']} train / {m['split']['val_files']} val files)")
    if m.get("multi_label"):
        print(f"multi-label: macro mAP {m['val_map']:.3f}; val_accuracy is the share of clips with every label right; "
              "each label's threshold was chosen on the validation split (best F1) and is kept in the package")
    for lab, pc in m["per_class"].items():
        extra = f"  f1 {pc['f1']:.3f}  threshold {pc['threshold']:.3f}" if m.get("multi_label") else ""
        print(f"  {shown(lab):<16} precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  "
              f"support {pc['support']}{extra}")
    print(f"started from: {Source.from_dict(m['initial_weights']).describe()}")
    print(f"model package: {m['model_package']}\nmetrics: {cfg.out.rstrip('/')}/metrics.json")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from melbatch.stages import classify

    cfg = JOBS["classify"].config(args)
    summary = classify.run(cfg, progress=not args.no_progress)
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    if summary.quarantine_rate > cfg.max_quarantine_rate:
        print(f"melbatch classify: {summary.quarantined} of {summary.inputs} inputs ({summary.quarantine_rate:.1%}) "
              f"were quarantined, more than --max-quarantine-rate {cfg.max_quarantine_rate:g}: see "
              f"{summary.out.rstrip('/')}/quarantine.parquet", file=sys.stderr)
        return EXIT_QUARANTINE
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from melbatch.stages import scan

    cfg = JOBS["scan"].config(args)
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


def results_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="a scan output")
    p.add_argument("--format", choices=ledger.RESULT_FORMATS, default="table",
                   help="table (default), csv, json (one object per line), parquet (needs --output)")
    p.add_argument("-o", "--output", default=None, help="write to this URI instead of stdout")
    p.add_argument("--status", choices=["classified", "quarantined"], default=None, help="only these objects")



def cmd_results(args: argparse.Namespace) -> int:
    """One row per live object of OUT (a `melbatch scan` output): the newest committed run wins; deleted objects
    are left out, quarantined ones have a reason.
    """
    from melbatch import storage

    if args.format == "parquet" and not args.output:
        raise ConfigError("--format parquet needs -o/--output FILE (binary output does not go to a terminal)")
    refuse_to_overwrite(args.output, "-o", None)
    found = ledger.results(args.out, args.status)
    with storage.atomic_open(args.output) if args.output else contextlib.nullcontext(_Stdout()) as sink:
        ledger.write_rows(found.batches(), ledger.RESULTS_SCHEMA, args.format, sink, found.uri_width)
    if args.output:
        print(f"{found.rows} objects -> {args.output}", file=sys.stderr)
    return 0


class _Stdout(io.RawIOBase):
    """A binary file whose UTF-8 text goes to whatever ``sys.stdout`` is now (a terminal, a pipe, a
    test's buffer), decoded incrementally: a writer may cut a character between two writes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        sys.stdout.write(self._decoder.decode(bytes(data)))
        return len(data)


def _emit(data: bytes, output: str | None, what: str) -> int:
    """A table's bytes to ``output`` (any URI, saying so on stderr), else to stdout."""
    from melbatch import storage

    if output:
        refuse_to_overwrite(output, "-o", None)
        storage.write_bytes(output, data)
        print(f"{what} -> {output}", file=sys.stderr)
    else:
        sys.stdout.write(data.decode())
    return 0


def detections_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="a classify or scan output")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet", "raven"), default="table",
                   help="table (default), csv, json (one event per line), parquet (needs --output), raven (needs "
                        "--output FOLDER)")
    p.add_argument("-o", "--output", default=None, help="write to this URI instead of stdout (a folder for raven)")
    p.add_argument("--label", action="append", default=None, help="only events of this label; repeatable")
    p.add_argument("--min-probability", type=float, default=0.0,
                   help="only events whose peak probability is at least this (default: all)")



def cmd_detections(args: argparse.Namespace) -> int:
    """Every event of OUT (a classify or scan output; for a scan the current ones): runs of clips whose
    probability for a label reached its threshold (classify's --threshold, --min-event-s, --gap-s, recorded in
    the manifest), with uri, etag, label, start_s, end_s, probability_max, probability_mean, clips. --format
    raven writes one Raven Pro selection table per source file with events (tab-separated: Selection, View,
    Channel, Begin Time (s), End Time (s), Low Freq (Hz), High Freq (Hz), Annotation, Score), named after the
    file's path under the archive with .Table.1.selections.txt, as Raven, OpenSoundscape and BirdNET's tools
    read them.
    """
    from melbatch import storage
    from melbatch.stages import detections

    if args.format in ("parquet", "raven") and not args.output:
        raise ConfigError(f"--format {args.format} needs -o/--output "
                          f"{'FOLDER (one selection table per source file)' if args.format == 'raven' else 'FILE'}")
    table, manifest = detections.combined(args.out, args.label or (), args.min_probability)
    if args.format == "raven":
        top_hz = detections.high_freq_hz(manifest["feature_config"])
        tables = detections.raven_tables(table, manifest["archive"], top_hz)
        for rel, data in tables.items():
            storage.write_bytes(storage.join(args.output, rel), data)
        print(f"{table.num_rows} events in {len(tables)} Raven selection table(s) -> {args.output}", file=sys.stderr)
        return 0
    data = detections.render_text(table) if args.format == "table" else ledger.export(table, args.format)
    return _emit(data, args.output, f"{table.num_rows} events")


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a train OUT or its model/ folder (any URI)")
    p.add_argument("dest", metavar="OUT.onnx", help="where the graph goes (any URI)")



def cmd_export(args: argparse.Namespace) -> int:
    """Write MODEL (a train OUT or its model/ folder) as one ONNX graph that any ONNX runtime runs without
    melbatch: input 'audio', float32 [batch, clip samples] of mono audio at the package's sample rate (cut
    your recording into clips of the package's length, as classify does); outputs 'probabilities' [batch,
    labels] and 'logmel' [batch, n_mels, n_frames], the image the model saw. Every feature-engineering step of
    the package's config is inside the graph. Labels, sample rate, clip length and the feature config are in
    the graph's metadata. Before writing, the graph is run with onnxruntime and compared with melbatch's own
    probabilities on check clips (at most 1e-3 apart, or nothing is written).
    """
    from melbatch.model import export
    from melbatch.model.package import ModelError

    refuse_to_overwrite(args.dest, "OUT.onnx", (".onnx",))
    try:
        exported = export.export(args.model, args.dest)
    except ModelError as e:
        raise ConfigError(f"MODEL: {e}") from None
    print(exported.render())
    return 0


def submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", choices=list(JOBS), help="which job")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="the job's arguments, as for `melbatch JOB`")
    _add_submit_options(p)



def cmd_submit(args: argparse.Namespace) -> int:
    """Check JOB's arguments here (a wrong config fails before anything is sent), then submit `python jobs/JOB.py
    ARGS` to the cluster's job API with this checkout as the working directory, stream its logs and exit with
    the job's exit status (1 if Ray stopped or failed it). The non-secret S3 settings (AWS_ENDPOINT_URL,
    AWS_REGION, AWS_PROFILE, retries and deadlines) travel with the job; credentials never do: the cluster's
    nodes must have them (instance profile, workload identity or a Secret). Example: melbatch submit featurize
    --address http://HEAD:8265 -- s3://archive/calls s3://ml/features/calls
    """
    from melbatch.cli import submit

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
