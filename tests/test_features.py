"""Log-mel images: librosa parity, shape, a tone lands in the right band, storage dtype."""

from __future__ import annotations

import warnings

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


@pytest.mark.parametrize("cfg", [FeatureConfig(), FeatureConfig(n_fft=1024, win_length=1024, n_mels=64, top_db=None),
                                 FeatureConfig(mel_scale="htk", n_mels=64, f_min_hz=100.0, f_max_hz=6000.0)],
                         ids=["defaults", "1024-64-no-floor", "htk-band"])
def test_logmel_equals_torchaudios_modules(cfg, rng):
    """The fast path (re²+im², sparse filterbank) is torchaudio's MelSpectrogram + AmplitudeToDB."""
    import torch
    import torchaudio

    x = (0.2 * rng.standard_normal(cfg.clip_samples)).astype(np.float32)
    mel = torchaudio.transforms.MelSpectrogram(
        cfg.sample_rate_hz, cfg.n_fft, cfg.win_length, cfg.hop_length, cfg.f_min_hz, cfg.f_max_hz, n_mels=cfg.n_mels,
        norm="slaney" if cfg.mel_scale == "slaney" else None, mel_scale=cfg.mel_scale)
    to_db = torchaudio.transforms.AmplitudeToDB("power", cfg.top_db)
    with torch.inference_mode():
        ref = to_db(mel(torch.from_numpy(x))).numpy()
    assert np.abs(compute_logmel(x, cfg) - ref).max() < 1e-3


@pytest.mark.parametrize("kwargs", [{}, {"mel_scale": "htk", "n_mels": 64, "f_min_hz": 100.0, "f_max_hz": 6000.0},
                                    {"n_fft": 2048, "win_length": 2048, "n_mels": 256}])
def test_valid_configs_have_no_empty_mel_bands(kwargs):
    """The config check and torchaudio agree: an accepted config gets no all-zero filter."""
    cfg = FeatureConfig(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchaudio warns about all-zero filterbanks
        mel = compute_logmel(tone(440, cfg.clip_s, cfg.sample_rate_hz), cfg)
    assert mel.shape == cfg.shape


def test_configs_with_empty_mel_bands_are_refused():
    from melbatch.config import ConfigError

    with pytest.raises(ConfigError, match="empty"):
        FeatureConfig(mel_scale="htk", n_mels=128, f_min_hz=100.0, f_max_hz=6000.0)
