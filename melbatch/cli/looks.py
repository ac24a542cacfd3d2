"""The commands that draw, report, review, search, discover and generate: show, report, review,
similar, discover, sample-archive, demo.

Each ``cmd_*`` takes the parsed arguments and returns the exit code; each ``*_args`` declares a
command's arguments; a command's docstring is its ``--help`` description. The table in
:mod:`melbatch.cli.commands` names them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from typing import Any

from melbatch.cli.options import add_dataclass_flags, given, refuse_to_overwrite
from melbatch.config import (
    ConfigError,
    DetectConfig,
    DiscoverConfig,
    FeatureConfig,
    ReviewConfig,
    SimilarConfig,
    build,
)


def show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uris", metavar="URI", nargs="*", help="audio objects (or, with --shards/--predictions, source "
                   "files)")
    p.add_argument("-o", "--output", default="melbatch-show.png", help="PNG to write (any URI) (default: %(default)s)")
    p.add_argument("--shards", default=None, help="a featurize output: show its stored clips")
    p.add_argument("--predictions", default=None, help="a classify output: show classified clips with their "
                   "predictions")
    p.add_argument("--model", default=None, help="a model package: use its feature config for audio inputs")
    p.add_argument("--compare", action="store_true", help="each clip before and after the feature-engineering steps")
    p.add_argument("--start", type=float, default=0.0, help="audio inputs: seconds to skip (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=None, help="audio inputs: seconds to show, 0 for all (default: "
                   "10, or all of it with --timeline)")
    p.add_argument("--timeline", action="store_true", help="one long recording on one time axis: its spectrogram "
                   "(averaged down to fit), each label's probability over time (--model scores its clips as "
                   "classify does; --clip-hop-s for finer steps) and the events classify would detect "
                   "(--threshold, --min-event-s, --gap-s)")
    p.add_argument("--clips", type=int, default=1, help="--shards/--predictions: clips per source file "
                   "(default: %(default)s)")
    add_dataclass_flags(p, FeatureConfig, "features for audio inputs (over --model's or the defaults)")
    add_dataclass_flags(p, DetectConfig, "detections, with --timeline (as classify's)")



def cmd_show(args: argparse.Namespace) -> int:
    """Draw one PNG sheet: for each input its waveform above its log-mel spectrogram (seconds; Hz on a mel-spaced
    axis; a dB colour bar), side by side, the label or prediction in the title. Inputs are audio objects (any
    URI and format; images made as featurize makes them, with --model's feature config or the defaults,
    changed by the feature flags below), or with --shards the stored clips of a featurize output, or with
    --predictions the classified clips of a classify output (source URIs, or none for a few clips of each
    label; for predictions the least confident ones). --compare draws each clip twice: plain log-mel, then
    with the feature-engineering steps (try --denoise gate --compare). --timeline draws one long recording
    with --model's probabilities over time and its events.
    """
    from melbatch.look import pictures
    from melbatch.model.package import ModelError, read_package_meta

    refuse_to_overwrite(args.output, "-o", (".png",))
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


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a featurize DST, train OUT, classify OUT or scan OUT (any URI)")
    p.add_argument("-o", "--output", default=None, help="HTML file to write (any URI; default: RUN/report.html)")
    p.add_argument("--thumbnails", type=int, default=8, help="spectrogram thumbnails per gallery (default: 8)")
    p.add_argument("--baseline", default=None, metavar="TRAIN_OUT",
                   help="for a train OUT: another train OUT to compare with, epoch by epoch (e.g. the same run "
                        "from random init)")



def cmd_report(args: argparse.Namespace) -> int:
    """Write one self-contained HTML page (images embedded, no server, no network) about RUN: counts, label
    distribution and the quarantine table; for a train OUT the loss and accuracy curves, the confusion matrix
    and the most confidently wrong validation clips with their spectrograms; for a classify OUT the verdicts,
    their confidence and the least confident clips; for a scan OUT the trend over its runs. The kind of output
    is detected.
    """
    from melbatch.look import report

    refuse_to_overwrite(args.output, "-o", (".html", ".htm"))
    if args.thumbnails < 0:
        raise ConfigError(f"--thumbnails {args.thumbnails}: give 0 or more spectrogram thumbnails per gallery")
    try:
        uri, kind = report.write(args.run, args.output, thumbnails=args.thumbnails, baseline=args.baseline)
    except report.ReportError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote the {kind} report of {args.run} to {uri} (self-contained HTML: open it in a browser)")
    return 0


def review_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="a classify or scan output")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_dataclass_flags(p, ReviewConfig, "review")



def cmd_review(args: argparse.Namespace) -> int:
    """From a classify or scan OUT, choose the clips most worth a person's time (--strategy), and write
    OUT/review/index.html (self-contained: each clip's spectrogram, an audio player for the clip, its top
    predictions and where it sits in its file; a box per clip for the true label and a button that saves
    labels.csv) and OUT/review/labels.csv (uri,clip_index,start_s,end_s,predicted,probability,label with the
    label column empty). Train on the answers with `melbatch train SHARDS OUT --extra-labels labels.csv`.
    Reads each chosen clip's audio again from the archive; no Ray.
    """
    from melbatch.look import review

    summary = review.run(build(ReviewConfig, {"out": args.out, **given(args, ReviewConfig)}, "review"))
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    return 0


def discover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", metavar="ARCHIVE", help="an unlabelled audio archive (any URI)")
    p.add_argument("out", metavar="OUT", help="where OUT/discover/ goes (any URI)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_dataclass_flags(p, DiscoverConfig, "discover")


def cmd_discover(args: argparse.Namespace) -> int:
    """Find what an unlabelled ARCHIVE holds: embed every clip (or --sample N files, taken from every folder)
    with an ImageNet backbone as it is, or a trained package (--model), on Ray with classify's decode and
    features; group the clips by k-means on the cluster (k chosen by silhouette between --min-groups and
    --max-groups, or --groups K); and write OUT/discover/index.html (per group, largest first: its size, the
    clips nearest its centre and at its edge with spectrogram and audio, the folders and hours of day they come
    from, a label box for the group and one per clip), groups.parquet (uri, clip_index, start_s, end_s, group,
    distance) and summary.json (k, how it was chosen, sizes). The page's Save labels.csv writes the labelled
    clips for `melbatch featurize ARCHIVE FEATURES --labels labels.csv` (or `train --extra-labels`); then
    `melbatch train FEATURES MODEL`.
    """
    from melbatch.look import discover

    summary = discover.run(build(DiscoverConfig, {"archive": args.archive, "out": args.out,
                                                  **given(args, DiscoverConfig)}, "discover"))
    print(json.dumps(dataclasses.asdict(summary), indent=2) if args.json else summary.render())
    return 0


def similar_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="a classify or scan output with embeddings")
    p.add_argument("query", metavar="QUERY", help="an audio URI, or URI#CLIP_INDEX of a clip in OUT")
    p.add_argument("--json", action="store_true", help="print the matches as JSON")
    add_dataclass_flags(p, SimilarConfig, "search")



def cmd_similar(args: argparse.Namespace) -> int:
    """List the clips of OUT (a classify or scan output made with --keep-embeddings) that sound most like QUERY,
    by the cosine similarity of the model's embeddings. QUERY is an audio object (any URI and format: cut and
    imaged with the model package's features, its clips' embeddings averaged) or a clip of OUT written
    URI#CLIP_INDEX. Streams the clip files (memory stays flat however big the archive); no Ray.
    """
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


def sample_archive_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dst", metavar="DST", help="output URI")
    p.add_argument("--kind", choices=["engine", "voice"], default="engine", help="which task")
    p.add_argument("--files-per-class", type=int, default=12, help="files per label")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each file")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same archive)")
    p.add_argument("--bad", action="store_true", help="also write one broken object of every kind")



def cmd_sample_archive(args: argparse.Namespace) -> int:
    """Write a labelled sample archive DST/<label>/<file> in mixed formats, rates and channel counts. engine:
    healthy vs faulty machine sound (numpy). voice: male vs female speech (needs espeak-ng).
    """
    from melbatch.testing import archives

    files = archives.make_archive(args.dst, args.kind, args.files_per_class, args.seconds, args.seed, args.bad)
    bad = sum(f.bad_kind is not None for f in files)
    print(f"wrote {len(files)} files ({bad} deliberately bad) of the '{args.kind}' task to {args.dst}")
    return 0


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None, help="where to put the archive and outputs (default: a temp folder)")
    p.add_argument("--kind", choices=["engine", "voice"], default="engine", help="which sample task")
    p.add_argument("--files-per-class", type=int, default=16, help="files per label")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (0: featurize only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")



def cmd_demo(args: argparse.Namespace) -> int:
    from melbatch.cli import demo

    demo.run(args.dir or tempfile.mkdtemp(prefix="melbatch-demo-"), args.kind, args.files_per_class, args.epochs,
             progress=not args.no_progress)
    return 0
