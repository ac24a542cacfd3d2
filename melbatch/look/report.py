"""Run reports: one static, self-contained HTML page per featurize, train, classify or scan output.

Top-down: :func:`write` finds out what kind of output RUN is (:func:`kind_of`), gathers its facts
into :class:`~melbatch.look.html.Section` s (counts, label distribution, quarantine table; for
training the curves, confusion matrix and the most confidently wrong validation clips; for scans the
trend over runs) and renders them with :func:`~melbatch.look.html.page` (the page pieces live in
:mod:`melbatch.look.html`). Charts and spectrogram thumbnails are PNGs embedded as ``data:`` URIs
and the style sheet is inline, so the file opens from disk, mails and archives without a server or a
network. Every string that comes from data (object keys, labels, error messages) is HTML-escaped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from melbatch import URI, ledger, storage
from melbatch.config import REVIEW_COUNT, FeatureConfig
from melbatch.labels import multilabel
from melbatch.look import pictures, timeline
from melbatch.look.candidates import rank, select
from melbatch.look.html import (
    Section,
    bar_chart,
    confusion,
    curves_chart,
    facts,
    figure,
    gallery,
    histogram,
    hours,
    image,
    note,
    page,
    png,
    table,
    trend_chart,
)
from melbatch.model.weights import Source
from melbatch.shards import (
    BACKBONES_TABLE,
    METRICS,
    VAL_PREDICTIONS,
    embedding_matrix,
    read_manifest,
    read_quarantine,
    read_tables,
)

REPORT = "report.html"
MAX_ROWS = 200  # table rows shown; the rest are counted, and the Parquet file is named
MAP_POINTS = 20_000  # clips drawn on the archive map at most (taken evenly; the review's picks always)
TIMELINES = 3  # files a classify report draws on a timeline
TIMELINE_MIN_CLIPS = 6  # shorter files are not worth one
KINDS = ("featurize", "train", "classify", "scan")


class ReportError(ValueError):
    """RUN is not an output melbatch can report on; the message says what it expects."""


# ---------------------------------------------------------------------------------------- top level

def kind_of(run: URI) -> str:
    """'featurize', 'classify', 'train' or 'scan', from the files RUN holds."""
    manifest = read_manifest(run)
    if manifest and manifest.get("kind") == "features":
        return "featurize"
    if manifest and manifest.get("kind") == "predictions":
        return "classify"
    if storage.exists(storage.join(run, METRICS)):
        return "train"
    if ledger.committed_runs(run):
        return "scan"
    raise ReportError(f"{run} is not a finished featurize, train, classify or scan output (no _manifest.json, "
                      "metrics.json or runs/<run_id>/summary.json): give the DST/OUT of one of those commands")


def write(run: URI, out: URI | None = None, thumbnails: int = 8, baseline: URI | None = None) -> tuple[URI, str]:
    """Write the report of ``run`` to ``out`` (default ``RUN/report.html``); returns (uri, kind).

    ``baseline``: another train OUT to compare a train run with, epoch by epoch (e.g. random init).
    """
    run = storage.canonical(run)
    kind = kind_of(run)
    if baseline and (kind != "train" or kind_of(storage.canonical(baseline)) != "train"):
        raise ReportError(f"--baseline compares two train OUTs; {run} is a {kind} output" if kind != "train"
                          else f"--baseline {baseline} is not a train OUT (no metrics.json)")
    builders: dict[str, Callable[[URI, int], tuple[str, list[Section]]]] = {
        "featurize": featurize_sections, "train": train_sections, "classify": classify_sections,
        "scan": scan_sections}
    title, sections = builders[kind](run, thumbnails)
    if baseline:
        sections.insert(1, comparison_section(run, storage.canonical(baseline)))
    out = out or storage.join(run, REPORT)
    storage.write_bytes(out, page(f"melbatch {kind}: {title}", run, sections).encode())
    return storage.canonical(out), kind


# ------------------------------------------------------------------------------------- the sections

def featurize_sections(run: URI, thumbnails: int) -> tuple[str, list[Section]]:
    m = read_manifest(run) or {}
    c = m["counts"]
    cfg = FeatureConfig.from_dict(m["feature_config"])
    overview = Section("Overview").add(facts([
        ("source", m["src"]), ("inputs", c["inputs"]), ("featurized files", c["featurized"]),
        ("quarantined files", c["quarantined"]), ("clips", c["clips"]), ("audio", hours(c["audio_seconds"])),
        ("inputs = featurized + quarantined", "yes" if c["inputs"] == c["featurized"] + c["quarantined"] else "NO"),
        ("waveforms kept", "yes" if m.get("audio", {}).get("kept") else "no"), ("made", m.get("created_at", "")),
        ("decoders", ", ".join(f"{k}: {v}" for k, v in sorted((m.get("decoders") or {}).items())))]))
    labels = Section("Labels").add(bar_chart(m.get("labels") or {}, "clips per label"))
    labels.add(table(["label", "clips"], sorted((m.get("labels") or {}).items())))
    sheet = Section("Stored clips, one file per label")
    try:
        _, panels = pictures.shard_panels(run, limit=thumbnails)
        sheet.add(gallery((p.title, pictures.thumbnail(p.mel, cfg)) for p in panels))
    except Exception as e:  # a picture that cannot be made must not cost the whole report
        sheet.add(note(f"no thumbnails: {type(e).__name__}: {e}"))
    return run, [overview, labels, sheet, features_section(cfg, m["config_hash"]),
                 quarantine_section(read_quarantine(run).to_pylist(), run)]


def train_sections(run: URI, thumbnails: int) -> tuple[str, list[Section]]:
    from melbatch.model.package import read_package_meta  # timm, which only train reports need

    m = json.loads(storage.read_bytes(storage.join(run, METRICS)))
    meta = read_package_meta(run)
    cfg = FeatureConfig.from_dict(meta["feature_config"])
    labels = m["labels"]
    overview = Section("Overview").add(facts([
        ("model", meta["model_name"]), ("model id", meta["model_id"]), ("shards", meta.get("shards", "")),
        ("started from", _started_from(meta)),
        *([("backbone", f"{meta['backbone']['name']}: {meta['backbone']['version']}; {meta['backbone']['licence']}"),
           ("head", f"logistic regression on {m['head']['train_clips']:,} training clips' embeddings "
                    f"({m['head']['dim']} dims): embedded in {m['head']['embed_s']:g} s, fitted in "
                    f"{m['head']['fit_s']:g} s")] if meta.get("backbone") and m.get("head") else
          [("best epoch", f"{m['best_epoch']} of {len(m['epochs'])}")]),
        ("validation accuracy (clips)", f"{m['val_accuracy']:.3f}"),
        ("validation accuracy (files)", f"{m['val_file_accuracy']:.3f}" if "val_file_accuracy" in m else "n/a"),
        ("macro F1", f"{m['macro_f1']:.3f}"),
        *([("multi-label: macro mAP", f"{m['val_map']:.3f} (accuracy: clips with every label right)")]
          if m.get("multi_label") else []),
        ("files", f"{m['split']['train_files']} train / {m['split']['val_files']} validation (whole files)"),
        ("reviewed labels", _reviewed(m.get("extra_labels"))), ("package", m["model_package"])]))
    curves = Section("Training curves").add(curves_chart(m["epochs"]))
    curves.add(table(["epoch", "train loss", "val loss", "val accuracy", "macro F1", "lr", "samples/s"],
                     [(e["epoch"], f"{e['train_loss']:.4f}", f"{e['val_loss']:.4f}", f"{e['val_accuracy']:.3f}",
                       f"{e['macro_f1']:.3f}", f"{e['lr']:.2e}", f"{e['samples_per_s']:.0f}") for e in m["epochs"]]))
    sections = [overview, *([curves] if m["epochs"] else []), *_auto_section(run), *_self_training_section(m),
                per_class_section(m, labels), wrong_clips_section(run, meta, cfg, thumbnails)]
    if m.get("calibration"):
        sections.append(calibration_section(m["calibration"], m.get("novelty")))
    return run, [*sections, features_section(cfg, meta["config_hash"])]


def per_class_section(m: dict[str, Any], labels: list[str]) -> Section:
    """Precision, recall and F1 per label at the best epoch (and the confusion matrix, or each label's
    AP and threshold when it is its own yes/no)."""
    quality = Section("Per class (validation clips, best epoch)")
    if m.get("multi_label"):  # no confusion matrix: each label is its own yes/no, at its own threshold
        pc = m["per_class"]
        quality.add(table(["label", "AP", "threshold", "precision", "recall", "F1", "clips"],
                          [(lab, "n/a" if pc[lab]["ap"] is None else f"{pc[lab]['ap']:.3f}",
                            *(f"{pc[lab][k]:.3f}" for k in ("threshold", "precision", "recall", "f1")),
                            pc[lab]["support"]) for lab in labels]))
    else:
        quality.add(confusion(m["confusion_matrix"], labels))
        quality.add(table(["label", "precision", "recall", "F1", "clips"],
                          [(lab, *(f"{m['per_class'][lab][k]:.3f}" for k in ("precision", "recall", "f1")),
                            m["per_class"][lab].get("support", "")) for lab in labels]))
    return quality


def wrong_clips_section(run: URI, meta: dict[str, Any], cfg: FeatureConfig, thumbnails: int) -> Section:
    """The validation clips the model got wrong, the most confident first, with thumbnails."""
    wrong = Section("Most confidently wrong validation clips")
    val_uri = storage.join(run, VAL_PREDICTIONS)
    if not storage.exists(val_uri):
        wrong.add(note(f"no {VAL_PREDICTIONS} in this run (trained by an older melbatch)"))
    else:
        with storage.arrow_input(val_uri) as f:
            val = pq.read_table(f).to_pylist()
        # wrong: the top label is not (one of) the clip's label(s)
        bad = sorted((r for r in val if r["predicted"] not in multilabel.split(r["label"])),
                     key=lambda r: -r["probability"])
        wrong.add(note(f"{len(bad)} of {len(val)} validation clips are wrong; the most confident mistakes first "
                       "(stored images, as the model saw them before normalisation)"))
        shown = bad[:thumbnails]
        titles = [f"true {r['label']} · predicted {r['predicted']} {r['probability']:.2f}" for r in shown]
        try:
            _, panels = pictures.stored_clips(meta["shards"], [(r["uri"], r["clip_index"]) for r in shown], titles)
            wrong.add(gallery((p.title, pictures.thumbnail(p.mel, cfg)) for p in panels))
        except Exception as e:
            wrong.add(note(f"no thumbnails: {type(e).__name__}: {e}"))
        wrong.add(table(["file", "clip", "start s", "true", "predicted", "probability", "p(true)"],
                        [(r["uri"], r["clip_index"], f"{r['start_s']:.1f}", r["label"], r["predicted"],
                          f"{r['probability']:.3f}", f"{r['label_probability']:.3f}")
                         for r in bad], limit=MAX_ROWS))
    return wrong


def calibration_section(c: dict[str, Any], rule: dict[str, Any] | None = None) -> Section:
    """How far the package's probabilities can be trusted: the reliability diagram of the validation
    files, the temperature fitted on them, the ``--unknown-below`` values that keep most files, and the
    stored rule ``--unknown auto`` applies (:mod:`melbatch.model.novelty`)."""
    keep = ", ".join(f"{p:.2f} keeps {k}" for k, p in c["unknown_below_keeping"].items())
    section = Section("Calibration (validation files)").add(note(
        f"Probabilities are calibrated by temperature scaling: T = {c['temperature']:.2f} fitted on the validation "
        f"clips (expected calibration error {c['clip_ece_before']:.3f} before, {c['clip_ece_after']:.3f} after). "
        f"classify --unknown-below P labels a file 'unknown' when its best probability is below P: {keep} of "
        "these files."))
    if rule:
        section.add(note(
            f"classify --unknown auto labels a file 'unknown' when its best probability is below "
            f"{rule['probability_below']:.3f} or its clips lie on average farther than {rule['distance_above']:.2f} "
            f"(Mahalanobis) from every label's training clips: it keeps {rule['kept']:.0%} of these "
            f"{rule['files']} files. The distance alone, at {rule['distance_alone_above']:.2f}, keeps "
            f"{rule['keep']:.0%}."))
    rows = c["reliability"]
    if rows:
        fig, ax = figure(4.0, 3.2)
        ax.plot([0, 1], [0, 1], "--", color="#999999", label="perfectly calibrated")
        ax.bar([(r["from"] + r["to"]) / 2 for r in rows], [r["accuracy"] for r in rows], width=0.09,
               color="#1f4e79", label="accuracy of the files in the bin")
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="#c0504d",
                label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (best label's probability)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        section.add(png(fig, "reliability diagram"))
        section.add(table(["confidence", "files", "mean confidence", "accuracy"],
                          [(f"{r['from']:.1f}-{r['to']:.1f}", r["files"], f"{r['confidence']:.3f}",
                            f"{r['accuracy']:.3f}") for r in rows]))
    return section


def _reviewed(r: dict[str, Any] | None) -> str:
    if not r:
        return "none"
    return (f"{r['uri']}: {r['answered']} answered, {r['corrected']} corrected and {r['confirmed']} confirmed in "
            f"training files, {r['added']} clip(s) added from outside the shards "
            f"({', '.join(f'{k} {v}' for k, v in r['added_per_label'].items()) or 'none'}), "
            f"{r['in_validation_not_applied']} in validation files not applied, {r['skipped']} skipped")


def _auto_section(run: URI) -> list[Section]:
    """``train --backbone auto``'s table (``OUT/backbones.json``): every candidate and the one kept."""
    uri = storage.join(run, BACKBONES_TABLE)
    if not storage.exists(uri):
        return []
    t = json.loads(storage.read_bytes(uri))
    rows = [(r["backbone"] + (" (kept)" if r["backbone"] == t["chosen"] else ""), f"{r['val_file_accuracy']:.3f}",
             f"{r['val_accuracy']:.3f}", f"{r['macro_f1']:.3f}", r["out"]) for r in t["candidates"]]
    return [Section("Backbones tried (--backbone auto)").add(
        note(f"Every candidate trained on the same split; kept: {t['chosen']}, by {t['by']}.")).add(
        table(["backbone", "validation files", "validation clips", "macro F1", "its OUT"], rows))]


def _self_training_section(m: dict[str, Any]) -> list[Section]:
    """``train --unlabelled``'s rounds (``metrics.json``'s ``self_training``): per round the guessed clips
    taken per label, the share of guesses the same as the round before, and the validation scores (a
    head's rounds carry the file accuracy alone; the fine-tune's round 0 is the supervised teacher)."""
    st = m.get("self_training")
    if not st:
        return []
    labels = m["labels"]
    rows = []
    for r in st["rounds"]:
        per = r.get("per_label")
        per = dict(zip(labels, per, strict=True)) if isinstance(per, list) else per or {}
        agree = r.get("agreement_with_previous")
        rows.append((r["round"], "the supervised teacher" if "taken" not in r else
                     f"{r['taken']:,} of {r['of']:,} ({', '.join(f'{k} {v:,}' for k, v in per.items())})",
                     "" if agree is None else f"{agree:.3f}", f"{r['val_file_accuracy']:.3f}",
                     f"{r['val_accuracy']:.3f}" if "val_accuracy" in r else "",
                     f"{r['macro_f1']:.3f}" if "macro_f1" in r else ""))
    return [Section("Self-training (--unlabelled)").add(
        note(f"The unlabelled archive: {st['unlabelled']}. Each round takes the model's surest guesses per label "
             "as labels; the validation files are the labelled ones, never guessed.")).add(
        table(["round", "guessed clips taken", "same guess as the round before", "validation files",
               "validation clips", "macro F1"], rows))]


def _started_from(meta: dict[str, Any]) -> str:
    return (Source.from_dict(meta["initial_weights"]).describe() if meta.get("initial_weights")
            else "not recorded (trained by an older melbatch)")


def comparison_section(run: URI, baseline: URI) -> Section:
    """This train run next to another, epoch by epoch: the gain of one start over the other."""
    from melbatch.model.package import read_package_meta  # timm, which only train reports need

    a, b = (json.loads(storage.read_bytes(storage.join(r, METRICS))) for r in (run, baseline))
    names = (f"this run ({_started_from(read_package_meta(run))})",
             f"{baseline} ({_started_from(read_package_meta(baseline))})")
    sec = Section("Compared with another start")
    sec.add(facts([("this run", names[0]), ("baseline", names[1]),
                   ("best validation accuracy", f"{a['val_accuracy']:.3f} vs {b['val_accuracy']:.3f} "
                                                f"({a['val_accuracy'] - b['val_accuracy']:+.3f})")]))
    fig, ax = figure(8.0, 2.8)
    for m, label in ((a, "this run"), (b, "baseline")):
        ax.plot([e["epoch"] for e in m["epochs"]], [e["val_accuracy"] for e in m["epochs"]], "o-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    sec.add(png(fig, "validation accuracy per epoch, this run and the baseline"))
    rows = [(e["epoch"], f"{e['val_accuracy']:.3f}", f"{f['val_accuracy']:.3f}", f"{e['train_loss']:.4f}",
             f"{f['train_loss']:.4f}") for e, f in zip(a["epochs"], b["epochs"], strict=False)]
    return sec.add(table(["epoch", "val accuracy", "baseline val accuracy", "train loss", "baseline train loss"],
                         rows))


def classify_sections(run: URI, thumbnails: int) -> tuple[str, list[Section]]:
    m = read_manifest(run) or {}
    c = m["counts"]
    files = read_tables(run, "files").to_pylist()
    overview = Section("Overview").add(facts([
        ("archive", m["archive"]), ("model", f"{m['model_name']} ({m['model_id']})"), ("inputs", c["inputs"]),
        ("classified files", c["classified"]), ("quarantined files", c["quarantined"]), ("clips", c["clips"]),
        ("audio", hours(c["audio_seconds"])),
        ("inputs = classified + quarantined", "yes" if c["inputs"] == c["classified"] + c["quarantined"] else "NO"),
        ("verdict per file", m.get("aggregation", "")), ("made", m.get("created_at", ""))]))
    verdicts = Section("Verdicts").add(bar_chart(m.get("label_counts") or {}, "files per predicted label"))
    verdicts.add(histogram([f["probability"] for f in files], "verdict probability", "files"))
    unsure = sorted(files, key=lambda f: f["probability"])
    verdicts.add(table(["least confident files", "label", "probability", "clips", "seconds"],
                       [(f["uri"], f["label"], f"{f['probability']:.3f}", f["clips"], f"{f['duration_s']:.1f}")
                        for f in unsure], limit=min(MAX_ROWS, 50)))
    sheet = Section("Least confident clips of each predicted label (redrawn from the archive)")
    try:
        cfg, panels = pictures.prediction_panels(run, limit=thumbnails)
        sheet.add(gallery((p.title, pictures.thumbnail(p.mel, cfg)) for p in panels))
    except Exception as e:
        sheet.add(note(f"no thumbnails (is the archive still readable?): {type(e).__name__}: {e}"))
    cfg = FeatureConfig.from_dict(m["feature_config"])
    clips = read_tables(run, "clips")
    return run, [overview, verdicts, sheet, timeline_section(run, m, files, clips),
                 map_section(run, clips, {f["uri"]: f["label"] for f in files}),
                 features_section(cfg, m["config_hash"]), quarantine_section(read_quarantine(run).to_pylist(), run)]


def timeline_section(run: URI, m: dict[str, Any], files: list[dict[str, Any]], clips: pa.Table) -> Section:
    """The :data:`TIMELINES` most eventful files (then the longest) of at least :data:`TIMELINE_MIN_CLIPS`
    clips, each on one time axis: spectrogram, probabilities, events (redrawn from the archive)."""
    s = Section("Timelines of the most eventful and longest files")
    events = read_tables(run, "detections")
    per_file = Counter(events.column("uri").to_pylist()) if events.num_rows else Counter()
    long_enough = [f for f in files if f["clips"] >= TIMELINE_MIN_CLIPS]
    chosen = sorted(long_enough, key=lambda f: (-per_file[f["uri"]], -f["duration_s"], f["uri"]))[:TIMELINES]
    if not chosen:
        return s.add(note(f"no file has {TIMELINE_MIN_CLIPS} clips or more: timelines are for long recordings"))
    for f in chosen:
        try:
            tl = timeline.of_outputs(clips, events, m, f["uri"])
            s.add(image(timeline.draw(tl).png, f"timeline of {f['uri']}"))
        except Exception as e:
            s.add(note(f"{f['uri']}: no timeline (is the archive still readable?): {type(e).__name__}: {e}"))
    return s.add(note(f"{sum(per_file.values())} events in {len(per_file)} file(s) in all: `melbatch detections {run}` "
                      "lists them (--format raven for Raven selection tables). Curves: each clip's stored top-k "
                      "probabilities; dashed: the thresholds."))


def map_section(run: URI, clips: pa.Table, verdicts: dict[str, str]) -> Section:
    """The archive map: the clip embeddings on their two principal components (PCA, on at most
    :data:`MAP_POINTS` clips taken evenly), coloured by predicted label, with the clips ``melbatch
    review`` would pick first (uncertainty) ringed."""
    s = Section("Archive map (clip embeddings, PCA)")
    if "embedding" not in clips.column_names:
        return s.add(note("no embeddings in this output: classify with --keep-embeddings to draw the archive map "
                          "(and to search it with `melbatch similar`)"))
    order, _ = rank(clips, verdicts, "uncertainty")
    picks = select(clips.column("label").to_pylist(), order, REVIEW_COUNT, 0)
    step = max(1, -(-clips.num_rows // MAP_POINTS))
    rows = sorted(set(range(0, clips.num_rows, step)) | set(picks))
    shown = clips.take(rows)
    xy = pictures.project_2d(embedding_matrix(shown))
    marked = np.isin(np.asarray(rows), picks)
    s.add(image(pictures.archive_map(xy, shown.column("label").to_pylist(), marked,
                                     f"{len(rows):,} of {clips.num_rows:,} clips"), "archive map"))
    return s.add(note(f"Each point is a clip, placed by the two directions in which the model's embeddings of "
                      f"the clips vary most (PCA{f', every {step}th clip' if step > 1 else ''}), coloured by its "
                      f"predicted label. Ringed: the {len(picks)} least confident clips, what `melbatch review "
                      f"{run}` shows first. Clips of one label far from their colour's cloud are worth a look."))


@dataclass
class LiveNow:
    """What a scan OUT holds now, folded from its streamed results (:func:`live_now`)."""

    objects: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)  # classified objects per label
    least_sure: list[dict[str, Any]] = field(default_factory=list)  # classified, least probable first
    quarantined: list[dict[str, Any]] = field(default_factory=list)


def live_now(found: ledger.Results, least: int) -> LiveNow:
    """Counts, the ``least`` least confident classified objects and the quarantined ones, a ledger row
    group at a time: no Python object per classified object of the archive."""
    now = LiveNow()
    unsure = ledger.RESULTS_SCHEMA.empty_table()
    for part in found.batches():
        now.objects += part.num_rows
        now.statuses.update(_counts(part.column("status")))
        ok = part.filter(pc.equal(part.column("status"), "classified"))
        now.labels.update(_counts(ok.column("label")))
        unsure = pa.concat_tables([unsure, ok]).sort_by([("probability", "ascending"), ("uri", "ascending")])
        unsure = unsure.slice(0, least)
        now.quarantined += part.filter(pc.equal(part.column("status"), "quarantined")).to_pylist()
    now.least_sure = unsure.to_pylist()
    return now


def _counts(values: pa.ChunkedArray) -> dict[str, int]:
    return {v["values"]: v["counts"] for v in pc.value_counts(values).to_pylist()}


def scan_sections(run: URI, thumbnails: int) -> tuple[str, list[Section]]:
    runs = [ledger.read_summary(run, r) for r in ledger.committed_runs(run)]
    keys = ["listed", "new", "changed", "unchanged", "deleted", "classified", "quarantined"]
    trend = Section(f"Trend over {len(runs)} committed scan(s)").add(trend_chart(
        [r["run_id"] for r in runs], {k: [r["counts"].get(k, 0) for r in runs] for k in keys[1:]}))
    trend.add(table(["run", "started", "seconds", *keys, "model"],
                    [(r["run_id"], r.get("started_at", ""), f"{r.get('duration_s', 0):.0f}",
                      *(r["counts"].get(k, 0) for k in keys), r.get("model_id", "")) for r in reversed(runs)],
                    limit=MAX_ROWS))
    now = live_now(ledger.results(run), least=min(MAX_ROWS, 50))
    last = runs[-1]
    overview = Section("Now").add(facts([
        ("archive", last.get("archive", "")), ("live objects", now.objects),
        ("classified", now.statuses["classified"]), ("quarantined", now.statuses["quarantined"]),
        ("last scan", f"{last['run_id']} ({last.get('started_at', '')})"), ("model", last.get("model_id", ""))]))
    overview.add(bar_chart(dict(now.labels), "live objects per label"))
    overview.add(table(["least confident objects", "label", "probability", "run"],
                       [(r["uri"], r["label"], f"{r['probability']:.3f}", r["run_id"]) for r in now.least_sure]))
    if now.statuses["classified"] > len(now.least_sure):
        overview.add(note(f"{now.statuses['classified'] - len(now.least_sure)} more rows not shown; all of them: "
                          f"`melbatch results {run}`"))
    quarantined = [{"uri": r["uri"], "kind": (r["reason"] or "").split(":", 1)[0],
                    "message": (r["reason"] or "").split(":", 1)[-1].strip()} for r in now.quarantined]
    return run, [overview, trend, quarantine_section(quarantined, run)]


def features_section(cfg: FeatureConfig, config_hash: str) -> Section:
    rows = [(k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in json.loads(
        cfg.canonical_json()).items()]
    return Section(f"Features ({config_hash}: {pictures.describe_steps(cfg)})").add(table(["setting", "value"], rows))


def quarantine_section(rows: list[dict[str, Any]], run: URI) -> Section:
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    s = Section(f"Quarantine ({len(rows)} file(s))")
    if not rows:
        return s.add(note("nothing quarantined"))
    s.add(table(["kind", "files"], sorted(kinds.items(), key=lambda kv: -kv[1])))
    return s.add(table(["file", "kind", "reason"], [(r["uri"], r["kind"], r["message"]) for r in rows],
                       limit=MAX_ROWS, more=f"the rest in {storage.join(run, 'quarantine.parquet')}"))
