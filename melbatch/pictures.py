"""Pictures a person can read: waveform over log-mel spectrogram on real axes, several side by side.

A :class:`Panel` is one thing to show — an audio file (any URI, any format melbatch decodes, turned
into an image with the same function featurize uses) or a stored clip of a featurize output (its
stored image, and its waveform where the shards keep audio). :func:`render` draws panels as one PNG
sheet: seconds on x, Hz on a mel-spaced y axis, a dB colour bar, the label or prediction in the
title.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from melbatch import storage
from melbatch.audio import decode_all
from melbatch.config import FeatureConfig, _hz_to_mel, _mel_to_hz

URI = str


@dataclass
class Panel:
    """One column of a sheet: a title, a waveform (or ``None``) and a (n_mels, frames) dB image."""

    title: str
    mel: np.ndarray
    start_s: float = 0.0
    samples: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Rendered:
    """Where a sheet went and where its spectrograms sit in it (pixels, origin top-left): for tests."""

    uri: URI
    width: int
    height: int
    spectrogram_boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) per panel


def band_centers_hz(cfg: FeatureConfig) -> np.ndarray:
    """The centre frequency of each mel band of ``cfg`` (Hz), bottom band first."""
    lo, hi = _hz_to_mel(np.array([cfg.f_min_hz, cfg.f_max_hz], dtype=float), cfg.mel_scale)
    return _mel_to_hz(np.linspace(lo, hi, cfg.n_mels + 2), cfg.mel_scale)[1:-1]


def audio_panel(uri: URI, cfg: FeatureConfig, start_s: float = 0.0, seconds: float | None = 10.0,
                title: str | None = None) -> Panel:
    """An audio object's stretch ``[start_s, start_s + seconds)`` (all of it with ``None``), mono at
    ``cfg.sample_rate_hz``, with its log-mel image made as featurize makes them."""
    import torch

    from melbatch.features import logmel_tensor

    with storage.open_input(uri) as f:
        _, x = decode_all(f, cfg.sample_rate_hz)
    a = int(start_s * cfg.sample_rate_hz)
    b = len(x) if seconds is None else min(len(x), a + int(seconds * cfg.sample_rate_hz))
    x = np.ascontiguousarray(x[a:b], dtype=np.float32)
    if len(x) < cfg.n_fft:
        raise ValueError(f"{uri}: less than {cfg.n_fft} samples from {start_s} s on; nothing to picture")
    with torch.inference_mode():
        mel = logmel_tensor(torch.from_numpy(x), cfg).numpy()
    return Panel(title or uri.rsplit("/", 1)[-1], mel, start_s, x)


def render(panels: list[Panel], cfg: FeatureConfig, out: URI, dpi: int = 100) -> Rendered:
    """Draw ``panels`` side by side (waveform above, spectrogram below) into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("nothing to draw: give at least one panel")
    centers = band_centers_hz(cfg)
    ticks = np.unique(np.linspace(0, cfg.n_mels - 1, 6).round().astype(int))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels) + 0.8, 5.0), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 2.4]}, constrained_layout=True)
    vmin = min(float(p.mel.min()) for p in panels)
    vmax = max(float(p.mel.max()) for p in panels)
    image = None
    for col, p in enumerate(panels):
        wave_ax, spec_ax = axes[0, col], axes[1, col]
        seconds = (p.mel.shape[1] - 1) * cfg.hop_length / cfg.sample_rate_hz
        if p.samples is not None and len(p.samples):
            t = p.start_s + np.arange(len(p.samples)) / cfg.sample_rate_hz
            step = max(1, len(t) // 4000)  # enough points for the eye, not millions
            wave_ax.plot(t[::step], p.samples[::step], lw=0.5, color="#1f4e79")
            wave_ax.set_ylim(-1.05, 1.05)
        else:
            wave_ax.text(0.5, 0.5, "no waveform stored", ha="center", va="center", transform=wave_ax.transAxes)
        wave_ax.set_xlim(p.start_s, p.start_s + seconds)
        wave_ax.set_title(p.title, fontsize=9)
        wave_ax.set_ylabel("amplitude" if col == 0 else "")
        image = spec_ax.imshow(p.mel, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                               extent=(p.start_s, p.start_s + seconds, -0.5, cfg.n_mels - 0.5),
                               interpolation="nearest")
        spec_ax.set_yticks(ticks, [f"{centers[i]:,.0f}" for i in ticks])
        spec_ax.set_xlabel("seconds")
        spec_ax.set_ylabel("Hz (mel scale)" if col == 0 else "")
    fig.colorbar(image, ax=axes[1, :].tolist(), label="dB", shrink=0.9)
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    boxes = []
    for ax in axes[1, :]:
        bb = ax.get_window_extent()
        boxes.append((int(bb.x0), int(height - bb.y1), int(bb.x1), int(height - bb.y0)))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    storage.write_bytes(out, buf.getvalue())
    scale = dpi / fig.dpi
    return Rendered(storage.canonical(out), round(width * scale), round(height * scale),
                    [tuple(round(v * scale) for v in b) for b in boxes])


def shard_panels(features: URI, uris: list[URI] | None = None, per_file: int = 1,
                 limit: int = 6) -> tuple[FeatureConfig, list[Panel]]:
    """Stored clips of a featurize output: the first ``per_file`` clips of each of ``uris`` (source
    files), or, without ``uris``, of the first files of each label (at most ``limit`` panels)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from melbatch.shards import audio_array, mel_array, open_dataset, shard_uris

    manifest = open_dataset(features)
    cfg = FeatureConfig.from_dict(manifest["feature_config"])
    wanted = [storage.canonical(u) for u in uris] if uris else None
    files_per_label = max(1, limit // max(1, len(manifest.get("labels") or {"": 0})))
    found: dict[str, list[Panel]] = {}
    per_label: dict[str, int] = {}
    for shard in shard_uris(features, manifest):
        with storage.open_input(shard) as f:
            table = pq.read_table(f)
        if wanted:
            table = table.filter(pc.is_in(table.column("uri"), value_set=pa.array(wanted)))
        mels = mel_array(table)
        audio = audio_array(table) if "audio" in table.column_names else None
        for i, row in enumerate(table.select(["uri", "label", "clip_index", "start_s"]).to_pylist()):
            panels = found.get(row["uri"], [])
            if len(panels) >= per_file:
                continue
            if not panels:
                if not wanted and per_label.get(row["label"], 0) >= files_per_label:
                    continue
                per_label[row["label"]] = per_label.get(row["label"], 0) + 1
                found[row["uri"]] = panels
            name = row["uri"].rsplit("/", 1)[-1]
            panels.append(Panel(f"{row['label']} · {name} · clip {row['clip_index']}", mels[i].astype(np.float32),
                                row["start_s"], None if audio is None else audio[i]))
    order = wanted or sorted(found, key=lambda u: (found[u][0].title, u))
    missing = [u for u in (wanted or []) if not found.get(u)]
    if missing:
        raise ValueError(f"not in {features}: {missing[:3]} (give source URIs as the shards record them)")
    return cfg, [p for u in order for p in found.get(u, [])][:limit if not wanted else None]
