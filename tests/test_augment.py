"""Waveform augmentations measured on signals whose answer is known (tones, noise, impulses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from melbatch import augment
from melbatch.config import FeatureConfig, TrainConfig
from melbatch.features import compute_logmel, logmel_tensor

SR = 16000


def _tones(freqs: list[float], seconds: float = 1.0, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return torch.stack([amp * torch.sin(2 * math.pi * f * t) for f in freqs])


def _peak_hz(x: torch.Tensor) -> np.ndarray:
    spec = torch.fft.rfft(x * torch.hann_window(x.shape[1]), dim=1).abs()
    return (spec.argmax(1).double() * SR / x.shape[1]).numpy()


def _db(x: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(x.square().mean(1))


def test_probability_zero_changes_nothing():
    x = _tones([440, 1000])
    aug = augment.WaveAugment(SR, gain_db=0, noise_prob=0, snr_db_min=5, snr_db_max=30, telephone_prob=0,
                              speed_prob=0, speed_max=0.1, reverb_prob=0)
    assert torch.equal(augment.augment_waveforms(x, aug, gen=torch.Generator().manual_seed(0)), x)


def test_defaults_come_from_the_train_config():
    cfg = TrainConfig(shards="s", out="o")
    aug = augment.WaveAugment.of(cfg, SR)
    assert aug.sample_rate_hz == SR and aug.noise_prob == cfg.noise_prob and aug.speed_max == cfg.speed_max
    x = _tones([440] * 16)
    y = augment.augment_waveforms(x, aug, gen=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.abs().max() <= 1.0 and not torch.equal(x, y)


def test_gain_stays_in_range_and_clips_at_full_scale():
    x = _tones([440] * 64, amp=0.1)
    y = augment.random_gain(x, 6.0, torch.Generator().manual_seed(1))
    change = (_db(y) - _db(x)).numpy()
    assert change.min() >= -6.01 and change.max() <= 6.01 and change.std() > 1.5
    assert augment.random_gain(x * 9, 6.0).abs().max() <= 1.0


@pytest.mark.parametrize("bank", [False, True])
def test_noise_lands_at_the_drawn_snr(bank):
    x = _tones([300, 700, 1500, 3000])
    g = torch.Generator().manual_seed(2)
    noise_bank = torch.randn(5 * SR, generator=g) * 0.2 if bank else None
    y = augment.add_noise(x, 1.0, 10.0, 10.0, noise_bank, g)
    snr = (_db(x) - _db(y - x)).numpy()
    assert np.allclose(snr, 10.0, atol=0.01)
    y = augment.add_noise(x, 1.0, 5.0, 30.0, noise_bank, g)
    snr = (_db(x) - _db(y - x)).numpy()
    assert snr.min() >= 4.99 and snr.max() <= 30.01
    assert torch.equal(augment.add_noise(x, 0.0, 5, 30, noise_bank, g), x)


def test_generated_noise_has_three_colours():
    n = augment.coloured_noise(60, SR, torch.Generator().manual_seed(3))
    assert torch.allclose(n.square().mean(1), torch.ones(60), atol=1e-3)
    spec = torch.fft.rfft(n, dim=1).abs().square()
    tilt = (spec[:, 50:500].mean(1) / spec[:, 4000:7000].mean(1)).log10().numpy()  # low vs high band power
    kinds = np.digitize(tilt, [0.5, 2.5])  # white ≈ 0, pink ≈ 1.3, brown ≈ 2.7 decades
    assert set(kinds) == {0, 1, 2}


def test_telephone_keeps_the_voice_band_only():
    x = _tones([100, 1000, 6000], amp=0.3)
    y = augment.telephone(x, 1.0, SR)
    loss = (_db(x) - _db(y)).numpy()
    assert loss[0] > 25 and loss[2] > 25  # 100 Hz and 6 kHz are gone
    assert abs(loss[1]) < 0.5  # 1 kHz passes, with µ-law's coarse steps
    assert not torch.equal(y[1], x[1])


def test_speed_moves_pitch_by_the_drawn_factor_and_keeps_length():
    x = _tones([1000.0] * 32)
    y = augment.speed(x, 1.0, 0.1, torch.Generator().manual_seed(4))
    assert y.shape == x.shape
    ratio = _peak_hz(y[:, : SR // 2]) / 1000.0
    assert ratio.min() >= 0.89 and ratio.max() <= 1.11 and ratio.std() > 0.02


def test_reverb_adds_a_decaying_tail_and_keeps_power():
    x = torch.zeros(4, SR)
    x[:, 100:400] = _tones([800] * 4, seconds=300 / SR)
    y = augment.reverb(x, 1.0, SR, torch.Generator().manual_seed(5), rt60_range_s=(0.5, 0.5))
    assert torch.allclose(_db(y), _db(x), atol=0.01)
    late = y[:, 2400:4000].square().mean(1)  # 0.1-0.2 s after the burst: room sound only
    later = y[:, 5600:7200].square().mean(1)  # 0.3-0.4 s after: 0.2 s later, about 24 dB quieter at RT60 0.5 s
    drop = (10 * torch.log10(late / later)).numpy()
    assert (late > 0).all() and np.all((drop > 15) & (drop < 35))


def test_batched_images_equal_the_stored_pipeline():
    cfg = FeatureConfig(clip_s=1.0, clip_hop_s=1.0, n_mels=64)
    x = _tones([200, 900, 3100]) * torch.tensor([[1.0], [0.01], [1e-4]])
    batch = logmel_tensor(x, cfg).numpy()
    one = np.stack([compute_logmel(r, cfg) for r in x.numpy()])
    assert np.abs(batch - one).max() < 1e-3
