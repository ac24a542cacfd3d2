"""Render the README's picture from real pipeline output: `make figure` (after `make demo`).

    python docs/figure.py demo-output/features docs/engine-logmel.png

One healthy and one faulty engine clip as melbatch stored them (log-mel, dB), on real axes.
"""

from __future__ import annotations

import sys

import librosa
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from melbatch import shards
from melbatch.config import FeatureConfig


def main(features: str, out: str) -> None:
    manifest = shards.open_dataset(features)
    cfg = FeatureConfig.from_dict(manifest["feature_config"])
    picks: dict[str, dict] = {}
    for row in shards.iter_clips(features):
        if row["label"] not in picks and row["clip_index"] == 0:
            picks[row["label"]] = row
    freqs = librosa.mel_frequencies(cfg.n_mels, fmin=cfg.f_min_hz, fmax=cfg.f_max_hz, htk=cfg.mel_scale == "htk")
    ticks = np.linspace(0, cfg.n_mels - 1, 5).astype(int)
    fig, axes = plt.subplots(1, len(picks), figsize=(5.2 * len(picks), 3.4), constrained_layout=True)
    for ax, (label, row) in zip(np.atleast_1d(axes), sorted(picks.items()), strict=True):
        img = ax.imshow(row["mel"].astype(np.float32), origin="lower", aspect="auto", cmap="magma",
                        extent=[row["start_s"], row["start_s"] + cfg.clip_s, 0, cfg.n_mels])
        ax.set_yticks(ticks, [f"{freqs[t] / 1000:.1f}" for t in ticks])
        ax.set(xlabel="seconds", ylabel="kHz (mel scale)", title=f"{label}: {row['uri'].rsplit('/', 1)[-1]}")
    fig.colorbar(img, ax=axes, label="dB")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
