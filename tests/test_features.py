"""Log-mel images: librosa parity, shape, a tone lands in the right band, storage dtype."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from conftest import tone

from melbatch.audio import Clip
from melbatch.config import FeatureConfig
from melbatch.features import compute_logmel, logmel_clips

PARITY_TOLERANCE_DB = 0.01


@pytest.mark.parametrize("cfg", [
    FeatureConfig(),
    FeatureConfig(sample_rate_hz=22050, n_fft=1024, win_length=1024, hop_length=256, n_mels=64,
                  f_min_hz=50.0, f_max_hz=8000.0, clip_s=3.0, clip_hop_s=3.0),
    FeatureConfig(mel_scale="htk", n_mels=40, top_db=None),
], ids=["defaults", "22k-1024-64", "htk-40"])
def test_logmel_matches_librosa_on_interior_frames(cfg, rng):
    """Same settings, same numbers: within 0.01 dB on every frame not touching the padded edges."""
    sr = cfg.sample_rate_hz
    x = (tone(1000, cfg.clip_s, sr) + 0.05 * rng.standard_normal(cfg.clip_samples)).astype(np.float32)
    ours = compute_logmel(x, cfg)
    power = librosa.feature.melspectrogram(
        y=x, sr=sr, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length, window="hann",
        center=True, pad_mode="reflect", power=2.0, n_mels=cfg.n_mels, fmin=cfg.f_min_hz,
        fmax=cfg.f_max_hz, htk=cfg.mel_scale == "htk", norm="slaney" if cfg.mel_scale == "slaney" else None)
    ref = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=cfg.top_db)
    assert ours.shape == ref.shape == cfg.shape
    edge = cfg.n_fft // cfg.hop_length // 2 + 1
    assert np.abs(ours - ref)[:, edge:-edge].max() < PARITY_TOLERANCE_DB


def test_a_pure_tone_is_one_bright_band_at_its_mel_bin():
    cfg = FeatureConfig()
    mel = compute_logmel(tone(2000, cfg.clip_s, cfg.sample_rate_hz), cfg)
    centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.f_min_hz, fmax=cfg.f_max_hz)[1:-1]
    brightest = int(np.median(mel.argmax(axis=0)))
    assert abs(brightest - int(np.abs(centres - 2000).argmin())) <= 1
    assert mel.max() - np.median(mel) > 40  # one band far above the rest


def test_top_db_floors_the_image():
    cfg = FeatureConfig(top_db=60.0)
    mel = compute_logmel(tone(500, cfg.clip_s, cfg.sample_rate_hz), cfg)
    assert mel.max() - mel.min() == pytest.approx(60.0, abs=1e-3)


def test_stored_dtype_follows_the_config():
    for dtype in ("float16", "float32"):
        cfg = FeatureConfig(dtype=dtype)
        clip = Clip(0, 0.0, cfg.clip_s, tone(440, cfg.clip_s, cfg.sample_rate_hz))
        [(_, mel)] = list(logmel_clips(iter([clip]), cfg))
        assert mel.dtype == np.dtype(dtype) and mel.shape == cfg.shape
