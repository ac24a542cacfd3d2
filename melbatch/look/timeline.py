"""A long recording on one time axis: its spectrogram, each label's probability over time, its events.

Two sources make the same :class:`Timeline`: a model package run on one audio object here
(:func:`of_model`, what ``melbatch show --timeline`` draws; clips cut and scored as classify cuts and
scores them, events by classify's rule) and a classify output (:func:`of_outputs`, what the classify
report draws for its longest and most eventful files, from the stored clip predictions and events).
:func:`draw` renders it: spectrogram on top (downsampled in time to fit), probability curves with
their thresholds in the middle, events as bars per label at the bottom, one shared x axis.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from melbatch import URI, storage
from melbatch.audio.decode import cut_clips
from melbatch.audio.logmel import logmel_tensor
from melbatch.config import FeatureConfig
from melbatch.look.pictures import decode_window, png_bytes, pyplot
from melbatch.model.package import load_package, predict_clips
from melbatch.stages import detections

COLUMNS = 1600  # time columns of the spectrogram, whatever the length of the recording
MAX_CURVES = 10  # labels drawn (those with the highest peaks), so many-class models stay readable
PREDICT_CLIPS = 256  # clips scored at once: a long recording's images never all sit in memory


@dataclass
class Timeline:
    title: str
    start_s: float
    end_s: float
    overview: np.ndarray  # (n_mels, columns) image of the stretch, in cfg's units
    cfg: FeatureConfig  # the features the overview was made with (y axis, units)
    times: np.ndarray  # (clips,) the centre of each clip, seconds in the file
    curves: dict[str, np.ndarray]  # label -> (clips,) probability
    thresholds: dict[str, float]  # label -> detection threshold (inf: not detected)
    events: list[dict] = field(default_factory=list)  # label, start_s, end_s, probability_max


@dataclass
class Picture:
    """Where a timeline went and where its axes sit (pixels, origin top-left), and the time they span."""

    uri: URI | None
    png: bytes
    width: int
    height: int
    boxes: dict[str, tuple[int, int, int, int]]  # spectrogram / probability / events: (left, top, right, bottom)
    start_s: float
    end_s: float


def overview(x: np.ndarray, cfg: FeatureConfig, columns: int = COLUMNS) -> tuple[np.ndarray, FeatureConfig]:
    """The plain log-mel of a whole stretch in at most ``columns`` time columns: each column the mean
    mel power of its frames (so a short knock still shows), in dB floored ``top_db`` under the peak;
    computed a block at a time, so hours of audio need little memory. Also the features it used."""
    plain = dataclasses.replace(cfg.without_steps(), top_db=None)
    per_column = max(1, int(np.ceil(len(x) / cfg.hop_length / columns)))
    block = per_column * cfg.hop_length * 64  # 64 columns a block
    pooled = []
    with torch.inference_mode():
        for a in range(0, len(x), block):
            seg = x[a: a + block]
            frames = max(1, len(seg) // cfg.hop_length)
            if len(seg) < cfg.n_fft:
                seg = np.pad(seg, (0, cfg.n_fft - len(seg)))
            power = 10.0 ** (logmel_tensor(torch.from_numpy(np.ascontiguousarray(seg)), plain).numpy()[:, :frames] / 10)
            n = -(-frames // per_column)
            power = np.pad(power, ((0, 0), (0, n * per_column - frames)), mode="edge")
            pooled.append(power.reshape(power.shape[0], n, per_column).mean(axis=2))
    image = 10 * np.log10(np.maximum(np.concatenate(pooled, axis=1), 1e-10))
    if cfg.top_db is not None:
        image = np.maximum(image, image.max() - cfg.top_db)
    return image.astype(np.float32), plain


def of_model(uri: URI, model: URI, start_s: float = 0.0, seconds: float | None = None,
             detect_specs: tuple[str, ...] = (), hop_s: float | None = None, min_event_s: float = 0.0,
             gap_s: float = 0.0) -> Timeline:
    """Score ``uri`` (or its window) with the package at ``model``, as classify would with these
    detection settings (``--threshold`` values, clip hop, minimum event, gap)."""
    pkg = load_package(model)
    cfg = dataclasses.replace(pkg.features, clip_hop_s=hop_s or pkg.features.clip_hop_s)
    detect = detections.Settings.of(detect_specs, pkg.labels, cfg.clip_hop_s, min_event_s, gap_s,
                                    pkg.meta.get("thresholds"))
    x = decode_window(uri, cfg.sample_rate_hz, start_s, seconds)
    if len(x) < cfg.n_fft:
        raise ValueError(f"{uri}: less than {cfg.n_fft} samples from {start_s} s on; nothing to picture")
    rows: list[tuple[int, float, float]] = []
    probs: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for clip in cut_clips([x], cfg):
        rows.append((clip.index, start_s + clip.start_s, start_s + clip.end_s))
        batch.append(clip)
        if len(batch) == PREDICT_CLIPS:
            probs.append(predict_clips(pkg, batch)[0])
            batch = []
    if batch:
        probs.append(predict_clips(pkg, batch)[0])
    p = np.concatenate(probs) if probs else np.zeros((0, len(pkg.labels)), np.float32)
    index, starts, ends = (np.array(c) for c in zip(*rows, strict=True)) if rows else (np.zeros(0),) * 3
    clips = pa.table({"uri": [uri] * len(rows), "clip_index": index.astype(np.int32), "start_s": starts,
                      "end_s": ends})
    hits = pa.Table.from_struct_array(detections.hits(clips, p, np.asarray(detect.thresholds)))
    found = detections.events(hits, pkg.labels, {}, detect.hop_s, detect.min_event_s, detect.gap_s, "")
    image, coarse = overview(x, cfg)
    end_s = start_s + len(x) / cfg.sample_rate_hz
    return Timeline(f"{uri.rsplit('/', 1)[-1]} · {pkg.meta['model_name']}", start_s, end_s, image, coarse,
                    (starts + ends) / 2, {lab: p[:, i] for i, lab in enumerate(pkg.labels)},
                    dict(zip(pkg.labels, detect.thresholds, strict=True)), found.to_pylist())


def of_outputs(clips: pa.Table, events: pa.Table, manifest: dict, uri: URI) -> Timeline:
    """One file of a classify output: its clips' stored probabilities (the top-k labels each clip
    kept; a label a clip did not keep counts as 0), its stored events, its audio read again."""
    mine = clips.filter(pc.equal(clips.column("uri"), uri))
    mine = mine.take(pc.sort_indices(mine, [("start_s", "ascending")]))
    labels = manifest["labels"]
    p = np.zeros((mine.num_rows, len(labels)), np.float32)
    col = {lab: i for i, lab in enumerate(labels)}
    for r, (tops, probs) in enumerate(zip(mine.column("top_labels").to_pylist(),
                                          mine.column("top_probabilities").to_pylist(), strict=True)):
        for lab, q in zip(tops, probs, strict=True):
            p[r, col[lab]] = q
    cfg = FeatureConfig.from_dict(manifest["feature_config"])
    x = decode_window(uri, cfg.sample_rate_hz)
    image, coarse = overview(x, cfg)
    starts, ends = mine.column("start_s").to_numpy(), mine.column("end_s").to_numpy()
    thresholds = {lab: float("inf") if t == "off" else float(t)
                  for lab, t in (manifest.get("detection") or {}).get("thresholds", {}).items()}
    found = events.filter(pc.equal(events.column("uri"), uri)).to_pylist() if events.num_rows else []
    return Timeline(uri.rsplit("/", 1)[-1], 0.0, len(x) / cfg.sample_rate_hz, image, coarse, (starts + ends) / 2,
                    {lab: p[:, i] for i, lab in enumerate(labels)}, thresholds, found)


def draw(tl: Timeline, out: URI | None = None, dpi: int = 100) -> Picture:
    """The timeline as a PNG (written to ``out`` when given): spectrogram, probabilities, events."""
    plt = pyplot()
    shown = sorted(tl.curves, key=lambda lab: -float(np.max(tl.curves[lab], initial=0.0)))[:MAX_CURVES]
    order = [lab for lab in tl.curves if lab in shown]  # the package's order: colours stay put
    colours = plt.get_cmap("tab10")
    fig, (spec, prob, ev) = plt.subplots(3, 1, figsize=(12, 6.4), sharex=True, constrained_layout=True,
                                         gridspec_kw={"height_ratios": [2.2, 1.5, 0.35 + 0.22 * len(order)]})
    cfg = tl.cfg
    spec.imshow(tl.overview, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                extent=(tl.start_s, tl.end_s, -0.5, cfg.n_mels - 0.5))
    centers = cfg.band_centers_hz()
    ticks = np.unique(np.linspace(0, cfg.n_mels - 1, 5).round().astype(int))
    spec.set_yticks(ticks, [f"{centers[i]:,.0f}" for i in ticks])
    spec.set_ylabel("Hz (mel)")
    spec.set_title(tl.title, fontsize=9)
    for i, lab in enumerate(order):
        colour = colours(i % 10)
        prob.plot(tl.times, tl.curves[lab], lw=1.0, color=colour, label=str(lab)[:24])
        if np.isfinite(tl.thresholds.get(lab, np.inf)):
            prob.axhline(tl.thresholds[lab], color=colour, lw=0.6, ls="--")
        row = len(order) - 1 - i
        spans = [(e["start_s"], e["end_s"] - e["start_s"]) for e in tl.events if e["label"] == lab]
        if spans:
            ev.broken_barh(spans, (row - 0.35, 0.7), facecolors=colour)
    prob.set_ylim(-0.02, 1.02)
    prob.set_ylabel("probability")
    prob.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)  # off the curves
    ev.set_yticks(range(len(order)), [str(lab)[:16] for lab in reversed(order)], fontsize=7)
    ev.set_ylim(-0.6, len(order) - 0.4)
    ev.set_xlim(tl.start_s, tl.end_s)
    ev.set_xlabel("seconds" + (f"  ({len(tl.events)} events)" if tl.events else "  (no events)"))
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    scale = dpi / fig.dpi
    boxes = {}
    for name, ax in (("spectrogram", spec), ("probability", prob), ("events", ev)):
        bb = ax.get_window_extent()
        boxes[name] = tuple(round(v * scale) for v in (bb.x0, height - bb.y1, bb.x1, height - bb.y0))
    data = png_bytes(fig, dpi)
    if out:
        storage.write_bytes(out, data)
    return Picture(storage.canonical(out) if out else None, data, round(width * scale), round(height * scale), boxes,
                   tl.start_s, tl.end_s)
