"""The ``melbatch`` command: parse, build config (defaults < YAML < flags), call one ``run()``.

Each command body imports its stage when it runs, so ``melbatch --help`` and a wrong flag answer
without loading torch or Ray. Exit codes: 0 done; 2 wrong usage or config (nothing was started);
3 storage unreachable or unwritable; 1 the run itself failed.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import io
import json
import sys
import tempfile
import traceback
from typing import Any

from melbatch import __version__, ledger
from melbatch.cli.options import JOBS, add_dataclass_flags, flag_names, given
from melbatch.config import ClassifyConfig, ConfigError, FeatureConfig, ReviewConfig, SimilarConfig, build
from melbatch.console import set_verbose

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
    print(f"\ntrained {cfg.model} on {cfg.shards}: best epoch {m['best_epoch']}/{cfg.epochs}  "
          f"val_accuracy {m['val_accuracy']:.3f}  macro_f1 {m['macro_f1']:.3f}  "
          f"({m['split']['train_files']} train / {m['split']['val_files']} val files)")
    if m.get("multi_label"):
        print(f"multi-label: macro mAP {m['val_map']:.3f}; val_accuracy is the share of clips with every label right; "
              "each label's threshold was chosen on the validation split (best F1) and is kept in the package")
    for lab, pc in m["per_class"].items():
        extra = f"  f1 {pc['f1']:.3f}  threshold {pc['threshold']:.3f}" if m.get("multi_label") else ""
        print(f"  {lab:<16} precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  support {pc['support']}{extra}")
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


def cmd_results(args: argparse.Namespace) -> int:
    from melbatch import storage

    if args.format == "parquet" and not args.output:
        raise ConfigError("--format parquet needs -o/--output FILE (binary output does not go to a terminal)")
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
        storage.write_bytes(output, data)
        print(f"{what} -> {output}", file=sys.stderr)
    else:
        sys.stdout.write(data.decode())
    return 0


def cmd_detections(args: argparse.Namespace) -> int:
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


def cmd_export(args: argparse.Namespace) -> int:
    from melbatch.model import export
    from melbatch.model.package import ModelError

    try:
        exported = export.export(args.model, args.dest)
    except ModelError as e:
        raise ConfigError(f"MODEL: {e}") from None
    print(exported.render())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from melbatch.look import pictures
    from melbatch.model.package import ModelError, read_package_meta

    if args.timeline:
        return _show_timeline(args)

    base: dict[str, Any] = {}
    if args.model and args.uris and not (args.shards or args.predictions):
        try:
            base = read_package_meta(args.model)["feature_config"]
        except ModelError as e:
            raise ConfigError(f"--model: {e}") from None
    try:
        cfg, panels = pictures.sheet(args.uris, given(args, FeatureConfig), args.shards, args.predictions, base,
                                     per_file=args.clips, start_s=args.start,
                                     seconds=10.0 if args.seconds is None else args.seconds or None,
                                     compare=args.compare)
    except ConfigError:
        raise
    except ValueError as e:  # what cannot be pictured (no steps to compare, no stored waveform, ...)
        raise ConfigError(str(e)) from None
    out = pictures.render(panels, cfg, args.output)
    print(f"wrote {out.uri} ({out.width}x{out.height}, {len(panels)} panel(s), features {cfg.hash()}: "
          f"{pictures.describe_steps(cfg)})")
    return 0


def _show_timeline(args: argparse.Namespace) -> int:
    from melbatch.look import timeline
    from melbatch.model.package import ModelError

    if not args.model or len(args.uris) != 1 or args.shards or args.predictions:
        raise ConfigError("--timeline draws one audio URI with its --model: melbatch show URI --model MODEL --timeline")
    changed = sorted(set(given(args, FeatureConfig)) - {"clip_hop_s"})
    if changed:
        raise ConfigError(f"--timeline scores with the model's own features; only --clip-hop-s may change, not "
                          f"{', '.join('--' + c.replace('_', '-') for c in changed)}")
    try:
        tl = timeline.of_model(args.uris[0], args.model, args.start, args.seconds or None, tuple(args.threshold or ()),
                               args.clip_hop_s, args.min_event_s or 0.0, args.gap_s or 0.0)
    except ModelError as e:
        raise ConfigError(f"--model: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    pic = timeline.draw(tl, args.output)
    print(f"wrote {pic.uri} ({pic.width}x{pic.height}): {tl.start_s:.1f}-{tl.end_s:.1f} s, {len(tl.times)} clips, "
          f"{len(tl.events)} events ({', '.join(sorted({e['label'] for e in tl.events})) or 'none'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from melbatch.look import report

    try:
        uri, kind = report.write(args.run, args.output, thumbnails=args.thumbnails, baseline=args.baseline)
    except report.ReportError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote the {kind} report of {args.run} to {uri} (self-contained HTML: open it in a browser)")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from melbatch.look import review

    summary = review.run(build(ReviewConfig, {"out": args.out, **given(args, ReviewConfig)}, "review"))
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from melbatch.look import similar

    cfg = build(SimilarConfig, {"out": args.out, "query": args.query, **given(args, SimilarConfig)}, "similar")
    described, matches, sheet = similar.run(cfg)
    if args.json:
        print(json.dumps({"query": described, "matches": [dataclasses.asdict(m) for m in matches]}, indent=2))
    else:
        print(similar.render_table(described, matches))
    if sheet:
        print(f"wrote {sheet.uri} ({sheet.width}x{sheet.height}: the query and {len(matches)} neighbour(s))",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
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


def cmd_sample_archive(args: argparse.Namespace) -> int:
    from melbatch.testing import archives

    files = archives.make_archive(args.dst, args.kind, args.files_per_class, args.seconds, args.seed, args.bad)
    bad = sum(f.bad_kind is not None for f in files)
    print(f"wrote {len(files)} files ({bad} deliberately bad) of the '{args.kind}' task to {args.dst}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from melbatch.cli import demo

    demo.run(args.dir or tempfile.mkdtemp(prefix="melbatch-demo-"), args.kind, args.files_per_class, args.epochs,
             progress=not args.no_progress)
    return 0



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

    commands = {"featurize": cmd_featurize, "train": cmd_train, "classify": cmd_classify, "scan": cmd_scan}
    for name, job in JOBS.items():
        jp = sub.add_parser(name, help=job.help, description=job.description)
        job.add_args(jp)
        jp.set_defaults(func=commands[name])

    r = sub.add_parser("results", help="the current verdict for every object of a scanned archive",
                       description="One row per live object of OUT (a `melbatch scan` output): the newest "
                       "committed run wins; deleted objects are left out, quarantined ones have a reason.")
    r.add_argument("out", metavar="OUT", help="a scan output")
    r.add_argument("--format", choices=ledger.RESULT_FORMATS, default="table",
                   help="table (default), csv, json (one object per line), parquet (needs --output)")
    r.add_argument("-o", "--output", default=None, help="write to this URI instead of stdout")
    r.add_argument("--status", choices=["classified", "quarantined"], default=None, help="only these objects")
    r.set_defaults(func=cmd_results)

    e = sub.add_parser("detections", help="the events detected in long recordings: one table for the archive, or "
                       "Raven selection tables",
                       description="Every event of OUT (a classify or scan output; for a scan the current ones): "
                       "runs of clips whose probability for a label reached its threshold (classify's --threshold, "
                       "--min-event-s, --gap-s, recorded in the manifest), with uri, etag, label, start_s, end_s, "
                       "probability_max, probability_mean, clips. --format raven writes one Raven Pro selection "
                       "table per source file with events (tab-separated: Selection, View, Channel, Begin Time (s), "
                       "End Time (s), Low Freq (Hz), High Freq (Hz), Annotation, Score), named after the file's "
                       "path under the archive with .Table.1.selections.txt, as Raven, OpenSoundscape and "
                       "BirdNET's tools read them.")
    e.add_argument("out", metavar="OUT", help="a classify or scan output")
    e.add_argument("--format", choices=("table", "csv", "json", "parquet", "raven"), default="table",
                   help="table (default), csv, json (one event per line), parquet (needs --output), raven (needs "
                        "--output FOLDER)")
    e.add_argument("-o", "--output", default=None, help="write to this URI instead of stdout (a folder for raven)")
    e.add_argument("--label", action="append", default=None, help="only events of this label; repeatable")
    e.add_argument("--min-probability", type=float, default=0.0,
                   help="only events whose peak probability is at least this (default: all)")
    e.set_defaults(func=cmd_detections)

    x = sub.add_parser("export", help="a model package as one ONNX graph: mono audio in, probabilities out, the "
                       "log-mel inside",
                       description="Write MODEL (a train OUT or its model/ folder) as one ONNX graph that any ONNX "
                       "runtime runs without melbatch: input 'audio', float32 [batch, clip samples] of mono audio at "
                       "the package's sample rate (cut your recording into clips of the package's length, as "
                       "classify does); outputs 'probabilities' [batch, labels] and 'logmel' [batch, n_mels, "
                       "n_frames], the image the model saw. Every feature-engineering step of the package's config "
                       "is inside the graph. Labels, sample rate, clip length and the feature config are in the "
                       "graph's metadata. Before writing, the graph is run with onnxruntime and compared with "
                       "melbatch's own probabilities on check clips (at most 1e-3 apart, or nothing is written).")
    x.add_argument("model", metavar="MODEL", help="a train OUT or its model/ folder (any URI)")
    x.add_argument("dest", metavar="OUT.onnx", help="where the graph goes (any URI)")
    x.set_defaults(func=cmd_export)

    w = sub.add_parser("show", help="waveform + log-mel spectrogram pictures of audio files, stored or classified "
                       "clips (PNG)",
                       description="Draw one PNG sheet: for each input its waveform above its log-mel spectrogram "
                       "(seconds; Hz on a mel-spaced axis; a dB colour bar), side by side, the label or prediction "
                       "in the title. Inputs are audio objects (any URI and format; images made as featurize makes "
                       "them, with --model's feature config or the defaults, changed by the feature flags below), "
                       "or with --shards the stored clips of a featurize output, or with --predictions the "
                       "classified clips of a classify output (source URIs, or none for a few clips of each label; "
                       "for predictions the least confident ones). --compare draws each clip twice: plain log-mel, "
                       "then with the feature-engineering steps (try --denoise gate --compare). --timeline draws one "
                       "long recording with --model's probabilities over time and its events.")
    w.add_argument("uris", metavar="URI", nargs="*", help="audio objects (or, with --shards/--predictions, source "
                   "files)")
    w.add_argument("-o", "--output", default="melbatch-show.png", help="PNG to write (any URI) (default: %(default)s)")
    w.add_argument("--shards", default=None, help="a featurize output: show its stored clips")
    w.add_argument("--predictions", default=None, help="a classify output: show classified clips with their "
                   "predictions")
    w.add_argument("--model", default=None, help="a model package: use its feature config for audio inputs")
    w.add_argument("--compare", action="store_true", help="each clip before and after the feature-engineering steps")
    w.add_argument("--start", type=float, default=0.0, help="audio inputs: seconds to skip (default: %(default)s)")
    w.add_argument("--seconds", type=float, default=None, help="audio inputs: seconds to show, 0 for all (default: "
                   "10, or all of it with --timeline)")
    w.add_argument("--timeline", action="store_true", help="one long recording on one time axis: its spectrogram "
                   "(averaged down to fit), each label's probability over time (--model scores its clips as "
                   "classify does; --clip-hop-s for finer steps) and the events classify would detect "
                   "(--threshold, --min-event-s, --gap-s)")
    w.add_argument("--clips", type=int, default=1, help="--shards/--predictions: clips per source file "
                   "(default: %(default)s)")
    add_dataclass_flags(w, FeatureConfig, "features for audio inputs (over --model's or the defaults)")
    detect = ("threshold", "min_event_s", "gap_s")
    add_dataclass_flags(w, ClassifyConfig, "detections, with --timeline (as classify's)",
                        exclude=[n for n in flag_names(ClassifyConfig) if n not in detect])
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

    v = sub.add_parser("review", help="the clips a person should check: a page to look and listen, labels.csv for "
                       "the answers",
                       description="From a classify or scan OUT, choose the clips most worth a person's time "
                       "(--strategy), and write OUT/review/index.html (self-contained: each clip's spectrogram, "
                       "an audio player for the clip, its top predictions and where it sits in its file; a box "
                       "per clip for the true label and a button that saves labels.csv) and "
                       "OUT/review/labels.csv (uri,clip_index,start_s,end_s,predicted,probability,label with the "
                       "label column empty). Train on the answers with `melbatch train SHARDS OUT --extra-labels "
                       "labels.csv`. Reads each chosen clip's audio again from the archive; no Ray.")
    v.add_argument("out", metavar="OUT", help="a classify or scan output")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_dataclass_flags(v, ReviewConfig, "review")
    v.set_defaults(func=cmd_review)

    q = sub.add_parser("similar", help="search an archive by sound: the clips nearest a query (embeddings)",
                       description="List the clips of OUT (a classify or scan output made with --keep-embeddings) "
                       "that sound most like QUERY, by the cosine similarity of the model's embeddings. QUERY is "
                       "an audio object (any URI and format: cut and imaged with the model package's features, "
                       "its clips' embeddings averaged) or a clip of OUT written URI#CLIP_INDEX. Streams the clip "
                       "files (memory stays flat however big the archive); no Ray.")
    q.add_argument("out", metavar="OUT", help="a classify or scan output with embeddings")
    q.add_argument("query", metavar="QUERY", help="an audio URI, or URI#CLIP_INDEX of a clip in OUT")
    q.add_argument("--json", action="store_true", help="print the matches as JSON")
    add_dataclass_flags(q, SimilarConfig, "search")
    q.set_defaults(func=cmd_similar)

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

