"""Pictures a person can read: waveform over log-mel spectrogram on real axes, several side by side.

A :class:`Panel` is one thing to show — an audio file (any URI, any format melbatch decodes, turned
into an image with the same function featurize uses) or a stored clip of a featurize output (its
stored image, and its waveform: stored with it when featurized with ``--keep-audio``, else read
again from the archive). :func:`render` draws panels as one PNG
sheet: seconds on x, Hz on a mel-spaced y axis, a dB colour bar, the label or prediction in the
title.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from melbatch import URI, storage
from melbatch.audio.decode import DecodeError, decode_span
from melbatch.audio.logmel import logmel_tensor
from melbatch.config import ConfigError, FeatureConfig, build, merge
from melbatch.shards import audio_array, mel_array, open_dataset, read_manifest, read_tables, shard_uris


@dataclass
class Panel:
    """One column of a sheet: a title, a waveform (or ``None``) and a (n_mels, frames) image made
    with ``cfg`` (``None``: the sheet's feature config). A stored clip without its waveform names
    where it was cut from (``source``), to be read again to draw or restyle it."""

    title: str
    mel: np.ndarray
    start_s: float = 0.0
    samples: np.ndarray | None = field(default=None, repr=False)
    cfg: FeatureConfig | None = None
    source: Cut | None = None


@dataclass(frozen=True)
class Cut:
    """Where a stored clip was cut from: ``[start_s, end_s)`` of ``uri``, zero-padded to ``samples``."""

    uri: URI
    start_s: float
    end_s: float
    samples: int


@dataclass
class Rendered:
    """Where a sheet went and where its spectrograms sit in it (pixels, origin top-left): for tests."""

    uri: URI
    width: int
    height: int
    spectrogram_boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) per panel


def sheet(uris: list[URI], flags: dict[str, Any], shards: URI | None = None, predictions: URI | None = None,
          base: dict[str, Any] | None = None, per_file: int = 1, start_s: float = 0.0, seconds: float | None = 10.0,
          compare: bool = False) -> tuple[FeatureConfig, list[Panel]]:
    """What ``melbatch show`` draws: audio files (features: ``base``, e.g. a package's, under the
    feature ``flags`` given), or the stored clips of a featurize output (``shards``) or a classify
    output (``predictions``), optionally restyled with other feature ``flags``; with ``compare``
    each panel before and after the feature-engineering steps."""
    if shards and predictions:
        raise ConfigError("give --shards or --predictions, not both")
    if shards or predictions:
        pick = shard_panels if shards else prediction_panels
        cfg, panels = pick(shards or predictions, uris or None, per_file=per_file)
        panels = with_waveforms(panels, cfg)
        if flags:  # try other features on the stored/classified clips
            if flags.get("sample_rate_hz", cfg.sample_rate_hz) != cfg.sample_rate_hz:
                raise ConfigError(f"these clips are at {cfg.sample_rate_hz} Hz: --sample-rate-hz cannot change")
            cfg = build(FeatureConfig, merge(cfg.to_dict(), flags), "features")
            panels = restyle(panels, cfg)
    else:
        if not uris:
            raise ConfigError("give audio URIs to show, or --shards FEATURES / --predictions OUT")
        cfg = build(FeatureConfig, merge(base or {}, flags), "features")
        panels = [audio_panel(u, cfg, start_s, seconds) for u in uris]
    return cfg, before_after(panels, cfg) if compare else panels


def audio_panel(uri: URI, cfg: FeatureConfig, start_s: float = 0.0, seconds: float | None = 10.0,
                title: str | None = None) -> Panel:
    """An audio object's stretch ``[start_s, start_s + seconds)`` (all of it with ``None``), mono at
    ``cfg.sample_rate_hz``, with its log-mel image made as featurize makes them."""
    x = decode_window(uri, cfg.sample_rate_hz, start_s, seconds)
    if len(x) < cfg.n_fft:
        raise ValueError(f"{uri}: less than {cfg.n_fft} samples from {start_s} s on; nothing to picture")
    return wave_panel(x, cfg, title or uri.rsplit("/", 1)[-1], start_s)


def decode_window(uri: URI, sample_rate_hz: int, start_s: float = 0.0, seconds: float | None = None) -> np.ndarray:
    """An audio object's ``[start_s, start_s + seconds)`` (all of it from ``start_s`` with ``None``),
    mono at the rate; the object is read and decoded only up to the span's end."""
    try:
        with storage.open_input(uri) as f:
            _, x = decode_span(f, sample_rate_hz, start_s, seconds)
    except DecodeError as e:
        raise ValueError(f"cannot picture {uri}: {e}") from None
    except OSError as e:
        raise storage.StorageError(f"cannot read {uri}: {type(e).__name__}: {e}") from None
    return np.ascontiguousarray(x, dtype=np.float32)


def wave_panel(x: np.ndarray, cfg: FeatureConfig, title: str, start_s: float = 0.0) -> Panel:
    """A waveform at ``cfg.sample_rate_hz`` and its image, made by featurize's function."""
    with torch.inference_mode():
        mel = logmel_tensor(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), cfg).numpy()
    return Panel(title, mel, start_s, x, cfg)


def describe_steps(cfg: FeatureConfig) -> str:
    """The feature-engineering steps of ``cfg`` in a few words ("plain log-mel" without any)."""
    words = []
    if cfg.denoise != "none":
        words.append(f"denoise {cfg.denoise} {cfg.denoise_threshold_db:g}/{cfg.denoise_reduction_db:g} dB")
    words += [f"{lo:g}-{hi:g} Hz {gain:+g} dB" for lo, hi, gain in cfg.band_emphasis]
    if cfg.compression == "pcen":
        words.append("PCEN")
    if cfg.clip_norm != "none":
        words.append(f"{cfg.clip_norm} norm")
    return " · ".join(words) or "plain log-mel"


def restyle(panels: list[Panel], cfg: FeatureConfig) -> list[Panel]:
    """The same clips with images made by ``cfg`` from their waveforms (to try features before featurizing)."""
    return [wave_panel(_waveform(p, cfg), cfg, p.title, p.start_s) for p in panels]


def with_waveforms(panels: list[Panel], cfg: FeatureConfig) -> list[Panel]:
    """Stored clips with their waveforms, to draw: those the shards hold, else read again from the
    archive where that still can be done (else left without one)."""
    out = []
    for p in panels:
        if p.samples is None and p.source is not None:
            with contextlib.suppress(ValueError):
                p = replace(p, samples=_waveform(p, cfg))
        out.append(p)
    return out


def _waveform(p: Panel, cfg: FeatureConfig) -> np.ndarray:
    """The panel's clip: stored with it, else read again from where it was cut."""
    if p.samples is not None:
        return p.samples
    cut = p.source
    if cut is None:
        raise ValueError(f"{p.title}: no waveform to make another image from")
    try:
        x = decode_window(cut.uri, cfg.sample_rate_hz, cut.start_s, cut.end_s - cut.start_s)
    except (ValueError, storage.StorageError) as e:
        raise ValueError(f"{p.title}: the shards hold its image only, and reading it again failed ({e}); "
                         "featurize with --keep-audio to store the clips' waveforms") from None
    return np.pad(x, (0, max(0, cut.samples - len(x))))  # a tail clip, padded as featurize pads it


def before_after(panels: list[Panel], cfg: FeatureConfig) -> list[Panel]:
    """Each panel twice: its waveform as plain log-mel (the steps off), then with ``cfg``'s steps."""
    if not cfg.steps:
        raise ValueError("these features have no feature-engineering steps to compare: add one, e.g. "
                         "--denoise gate, --compression pcen, --band-emphasis 2000-8000:+6, --clip-norm band_mean")
    plain, out = cfg.without_steps(), []
    for p in panels:
        x = _waveform(p, cfg)
        before = wave_panel(x, plain, f"before · {p.title}", p.start_s)
        after = wave_panel(x, cfg, f"after ({describe_steps(cfg)}) · {p.title}", p.start_s)
        out += [before, after]
    return out


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib  # heavy, and its backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 100) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def project_2d(x: np.ndarray) -> np.ndarray:
    """PCA to two dimensions: the rows of ``x`` (centred) on its two directions of largest variance.
    Each axis is signed so that its largest coordinate is positive: the same rows draw the same map."""
    c = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(0)
    if len(c) < 2:
        return np.zeros((len(c), 2))
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    xy = c @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy * np.where(xy[np.abs(xy).argmax(0), [0, 1]] < 0, -1.0, 1.0)


def archive_map(xy: np.ndarray, labels: list[str], marked: np.ndarray, what: str) -> bytes:
    """A scatter of clips in 2-D coloured by label, ``marked`` ones ringed in black (the review's picks)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
    names = sorted(set(labels))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    lab = np.asarray(labels, dtype=object)
    size = max(2.0, min(18.0, 6000 / max(1, len(xy))))
    for i, name in enumerate(names):
        sel = lab == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colours(i % colours.N), label=str(name)[:30], alpha=0.7,
                   linewidths=0)
    if marked.any():
        ax.scatter(xy[marked, 0], xy[marked, 1], s=36, facecolors="none", edgecolors="black", linewidths=0.9,
                   label="review picks")
    ax.set_xlabel("first principal component")
    ax.set_ylabel("second principal component")
    ax.set_title(what, fontsize=9)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return png_bytes(fig)


def render(panels: list[Panel], cfg: FeatureConfig, out: URI, dpi: int = 100) -> Rendered:
    """Draw ``panels`` side by side (waveform above, spectrogram below) into the PNG ``out``.

    Panels whose images share units (dB, PCEN, ...) share one colour scale and bar.
    """
    plt = pyplot()
    if not panels:
        raise ValueError("nothing to draw: give at least one panel")
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels) + 0.8, 5.0), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 2.4]}, constrained_layout=True)
    groups: dict[str, list[int]] = {}
    for col, p in enumerate(panels):
        groups.setdefault((p.cfg or cfg).units, []).append(col)
    for units, cols in groups.items():
        vmin = min(float(panels[c].mel.min()) for c in cols)
        vmax = max(float(panels[c].mel.max()) for c in cols)
        image = None
        for col in cols:
            image = _draw(axes[0, col], axes[1, col], panels[col], panels[col].cfg or cfg, vmin, vmax, col == 0)
        fig.colorbar(image, ax=[axes[1, c] for c in cols], label=units, shrink=0.9)
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    boxes = []
    for ax in axes[1, :]:
        bb = ax.get_window_extent()
        boxes.append((int(bb.x0), int(height - bb.y1), int(bb.x1), int(height - bb.y0)))
    storage.write_bytes(out, png_bytes(fig, dpi))
    scale = dpi / fig.dpi
    return Rendered(storage.canonical(out), round(width * scale), round(height * scale),
                    [tuple(round(v * scale) for v in b) for b in boxes])


def _draw(wave_ax, spec_ax, p: Panel, cfg: FeatureConfig, vmin: float, vmax: float, first: bool):
    seconds = (p.mel.shape[1] - 1) * cfg.hop_length / cfg.sample_rate_hz
    if p.samples is not None and len(p.samples):
        t = p.start_s + np.arange(len(p.samples)) / cfg.sample_rate_hz
        step = max(1, len(t) // 4000)  # enough points for the eye, not millions
        wave_ax.plot(t[::step], p.samples[::step], lw=0.5, color="#1f4e79")
        wave_ax.set_ylim(-1.05, 1.05)
    else:
        wave_ax.text(0.5, 0.5, "waveform not stored (featurize --keep-audio)", ha="center", va="center",
                     transform=wave_ax.transAxes)
    wave_ax.set_xlim(p.start_s, p.start_s + seconds)
    wave_ax.set_title(p.title, fontsize=9)
    wave_ax.set_ylabel("amplitude" if first else "")
    image = spec_ax.imshow(p.mel, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                           extent=(p.start_s, p.start_s + seconds, -0.5, cfg.n_mels - 0.5), interpolation="nearest")
    centers = cfg.band_centers_hz()
    ticks = np.unique(np.linspace(0, cfg.n_mels - 1, 6).round().astype(int))
    spec_ax.set_yticks(ticks, [f"{centers[i]:,.0f}" for i in ticks])
    spec_ax.set_xlabel("seconds")
    spec_ax.set_ylabel("Hz (mel scale)" if first else "")
    return image


def shard_panels(features: URI, uris: list[URI] | None = None, per_file: int = 1,
                 limit: int = 6) -> tuple[FeatureConfig, list[Panel]]:
    """Stored clips of a featurize output: the first ``per_file`` clips of each of ``uris`` (source
    files), or, without ``uris``, of the first files of each label (at most ``limit`` panels)."""
    manifest, cfg = _open_features(features)
    wanted = [storage.canonical(u) for u in uris] if uris else None
    files_per_label = max(1, limit // max(1, len(manifest.get("labels") or {"": 0})))
    found: dict[str, list[Panel]] = {}
    per_label: dict[str, int] = {}
    for row, mel, audio in _stored_rows(features, manifest, wanted):
        panels = found.get(row["uri"], [])
        if len(panels) >= per_file:
            continue
        if not panels:
            if not wanted and per_label.get(row["label"], 0) >= files_per_label:
                continue
            per_label[row["label"]] = per_label.get(row["label"], 0) + 1
            found[row["uri"]] = panels
        name = row["uri"].rsplit("/", 1)[-1]
        panels.append(_stored_panel(f"{row['label']} · {name} · clip {row['clip_index']}", row, mel, audio, cfg))
    order = wanted or sorted(found, key=lambda u: (found[u][0].title, u))
    missing = [u for u in (wanted or []) if not found.get(u)]
    if missing:
        raise ValueError(f"not in {features}: {missing[:3]} (give source URIs as the shards record them)")
    return cfg, [p for u in order for p in found.get(u, [])][:limit if not wanted else None]


def stored_clips(features: URI, keys: list[tuple[URI, int]], titles: list[str]) -> tuple[FeatureConfig, list[Panel]]:
    """The stored clips ``(source uri, clip_index)`` of a featurize output, titled ``titles``, in that order."""
    manifest, cfg = _open_features(features)
    at = {k: i for i, k in enumerate(keys)}
    got: dict[int, Panel] = {}
    for row, mel, audio in _stored_rows(features, manifest, sorted({u for u, _ in keys})):
        i = at.get((row["uri"], row["clip_index"]))
        if i is not None:
            got[i] = _stored_panel(titles[i], row, mel, audio, cfg)
    return cfg, [got[i] for i in sorted(got)]


def _open_features(features: URI) -> tuple[dict, FeatureConfig]:
    manifest = open_dataset(features)
    return manifest, FeatureConfig.from_dict(manifest["feature_config"])


def _stored_rows(features: URI, manifest: dict, uris: list[URI] | None):
    """(row, image as float32, waveform or None) of the stored clips, only of ``uris`` if given."""
    for shard in shard_uris(features, manifest):
        with storage.arrow_input(shard) as f:
            table = pq.read_table(f)
        if uris:
            table = table.filter(pc.is_in(table.column("uri"), value_set=pa.array(uris)))
        if not table.num_rows:
            continue
        mels = mel_array(table)
        audio = audio_array(table) if "audio" in table.column_names else None
        for i, row in enumerate(table.select(["uri", "label", "clip_index", "start_s", "end_s"]).to_pylist()):
            yield row, mels[i].astype(np.float32), None if audio is None else audio[i]


def _stored_panel(title: str, row: dict, mel: np.ndarray, audio: np.ndarray | None, cfg: FeatureConfig) -> Panel:
    cut = Cut(row["uri"], row["start_s"], row["end_s"], cfg.clip_samples)
    return Panel(title, mel, row["start_s"], audio, source=None if audio is not None else cut)


def thumbnail(mel: np.ndarray, cfg: FeatureConfig, title: str = "", width_in: float = 2.6) -> bytes:
    """A small PNG of one image on its real axes (seconds, Hz on a mel scale), for reports."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(width_in, width_in * 0.62), constrained_layout=True)
    seconds = (mel.shape[1] - 1) * cfg.hop_length / cfg.sample_rate_hz
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, -0.5, cfg.n_mels - 0.5),
              interpolation="nearest")
    centers = cfg.band_centers_hz()
    ticks = np.unique(np.linspace(0, cfg.n_mels - 1, 3).round().astype(int))
    ax.set_yticks(ticks, [f"{centers[i]:,.0f}" for i in ticks], fontsize=6)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_xlabel("s", fontsize=6, labelpad=1)
    if title:
        ax.set_title(title, fontsize=6)
    return png_bytes(fig)


def prediction_panels(predictions: URI, uris: list[URI] | None = None, per_file: int = 1,
                      limit: int = 6) -> tuple[FeatureConfig, list[Panel]]:
    """Classified clips of a classify output, redrawn from their source audio with the model's
    features, the prediction in the title: the first ``per_file`` clips of each of ``uris``, or,
    without ``uris``, the least confident clips of each predicted label (where mistakes hide)."""
    manifest = read_manifest(predictions)
    if not manifest or manifest.get("kind") != "predictions":
        raise ValueError(f"{predictions} is not a finished classify output (no _manifest.json of kind "
                         "'predictions'): run `melbatch classify` into it first")
    cfg = FeatureConfig.from_dict(manifest["feature_config"])
    rows = sorted(read_tables(predictions, "clips").select(
        ["uri", "clip_index", "start_s", "end_s", "label", "probability"]).to_pylist(),
        key=lambda r: (r["uri"], r["clip_index"]))
    if uris:
        wanted = [storage.canonical(u) for u in uris]
        missing = [u for u in wanted if not any(r["uri"] == u for r in rows)]
        if missing:
            raise ValueError(f"not classified in {predictions}: {missing[:3]} (give URIs as the archive listing "
                             "names them)")
        chosen = [r for u in wanted for r in [r for r in rows if r["uri"] == u][:per_file]]
    else:
        labels = sorted({r["label"] for r in rows})
        per_label = max(1, limit // max(1, len(labels)))
        chosen = []
        for label in labels:
            seen: set[str] = set()
            for r in sorted((r for r in rows if r["label"] == label), key=lambda r: (r["probability"], r["uri"])):
                if r["uri"] not in seen and len(seen) < per_label:
                    seen.add(r["uri"])
                    chosen.append(r)
        chosen = chosen[:limit]
    panels = []
    for r in chosen:
        name = r["uri"].rsplit("/", 1)[-1]
        title = f"predicted {r['label']} {r['probability']:.2f} · {name} · clip {r['clip_index']}"
        panels.append(audio_panel(r["uri"], cfg, r["start_s"], r["end_s"] - r["start_s"], title))
    return cfg, panels
