"""Waveform augmentations measured on signals whose answer is known (tones, noise, impulses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from melbatch.audio.logmel import compute_logmel, logmel_tensor
from melbatch.config import AugmentConfig, ConfigError, FeatureConfig, TrainConfig
from melbatch.train import augment

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
    aug = augment.WaveAugment.of(cfg.augment, SR)
    assert aug.sample_rate_hz == SR and aug.noise_prob == cfg.augment.noise_prob
    assert aug.speed_max == cfg.augment.speed_max
    x = _tones([440] * 16)
    y = augment.augment_waveforms(x, aug, gen=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.abs().max() <= 1.0 and not torch.equal(x, y)


def test_a_clean_start_is_shorter_than_the_run():
    assert TrainConfig(shards="s", out="o", epochs=4, augment=AugmentConfig(clean_epochs=3)).augment.clean_epochs == 3
    with pytest.raises(ConfigError, match=r"clean_epochs=4: use fewer than epochs=4"):
        TrainConfig(shards="s", out="o", epochs=4, augment=AugmentConfig(clean_epochs=4))


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


# ------------------------------------------------------------------------- the field shifts made on images

IMG = FeatureConfig(clip_s=1.0, clip_hop_s=1.0, n_mels=64)


def _image_aug(**on: float) -> augment.WaveAugment:
    settings = {"gain_db": 0.0, "noise_prob": 0.0, "snr_db_min": 10.0, "snr_db_max": 10.0, "telephone_prob": 0.0,
                "speed_prob": 0.0, "speed_max": 0.1, "reverb_prob": 0.0, **on}
    return augment.WaveAugment(SR, **settings)


def _shift_images(x: torch.Tensor, seed: int = 0, **on: float) -> tuple[torch.Tensor, torch.Tensor]:
    images = logmel_tensor(x, IMG).unsqueeze(1)
    centers = torch.from_numpy(IMG.band_centers_hz()).float()
    out = augment.augment_images(images, _image_aug(**on), centers, IMG.hop_length / SR, IMG.top_db,
                                 torch.Generator().manual_seed(seed))
    return images, out


def _band(hz: float) -> int:
    return int(np.argmin(np.abs(IMG.band_centers_hz() - hz)))


def test_image_shifts_off_change_nothing_and_keep_the_floor():
    x = _tones([440, 1000, 3000])
    images, out = _shift_images(x)
    assert torch.allclose(out, images, atol=1e-3)
    _, out = _shift_images(x, noise_prob=1.0, reverb_prob=1.0, telephone_prob=1.0, speed_prob=1.0, gain_db=6.0)
    peak = out.amax(dim=(1, 2, 3))
    assert out.shape == images.shape and bool(torch.isfinite(out).all())
    assert bool((out.amin(dim=(1, 2, 3)) >= peak - IMG.top_db - 1e-3).all())  # floored as featurize stores
    _, cut = _shift_images(x, telephone_prob=1.0)  # a cut band falls to the floor, not below
    assert torch.allclose(cut.amin(dim=(1, 2, 3)), cut.amax(dim=(1, 2, 3)) - IMG.top_db, atol=1e-3)


def test_image_noise_lands_at_the_drawn_snr_and_band_limits_cut_outside_the_voice_band():
    x = _tones([300, 700, 1500, 3000] * 4)
    images, out = _shift_images(x, seed=1, noise_prob=1.0)
    power = torch.pow(10.0, images / 10).mean(dim=(1, 2, 3))
    added = torch.pow(10.0, out / 10).mean(dim=(1, 2, 3)) - power
    snr = (10 * torch.log10(power / added)).numpy()
    near = np.minimum(np.abs(snr - 10.0), np.abs(snr - 16.0))  # noise at the drawn SNR, babble 6 dB below it
    assert near.max() < 0.3 and (np.abs(snr - 10) < 0.3).any() and (np.abs(snr - 16) < 0.3).any(), snr

    x = _tones([100, 1000, 6500] * 8, amp=0.3).sum(0, keepdim=True).repeat(24, 1) / 3
    images, out = _shift_images(x, seed=2, telephone_prob=1.0)
    loss = (images - out)[:, 0].mean(2)  # dB lost per band, per clip
    assert loss[:, _band(1000)].abs().max() < 1.0  # the voice band passes
    assert (loss[:, _band(6500)] > 30).sum() >= 6 and (loss[:, _band(100)] > 20).sum() >= 6  # cuts drawn per clip
    assert loss[:, _band(6500)].min() < 1.0  # and some clips keep the top (a high cut near Nyquist)


def test_image_speed_moves_pitch_and_time_and_reverb_adds_a_tail_keeping_power():
    x = torch.zeros(16, SR)
    x[:, 4000:8000] = _tones([1000.0] * 16, seconds=0.25)
    images, out = _shift_images(x, seed=3, speed_prob=1.0, speed_max=0.1)
    centers = IMG.band_centers_hz()
    peak_hz = centers[out[:, 0].mean(2).argmax(1).numpy()] / centers[images[:, 0].mean(2).argmax(1).numpy()]
    assert peak_hz.min() >= 0.85 and peak_hz.max() <= 1.15 and peak_hz.std() > 0.02  # pitch moves with speed
    onset = (out[:, 0, _band(1000)] > out[:, 0, _band(1000)].amax(1, keepdim=True) - 10).float().argmax(1)
    assert onset.min() >= 20 and onset.max() <= 30 and len(set(onset.tolist())) > 2  # 25 frames / rate

    images, out = _shift_images(x, seed=4, reverb_prob=1.0)
    power = torch.pow(10.0, images / 10)
    wet = torch.pow(10.0, out / 10)
    assert torch.allclose(wet.mean(dim=(1, 2, 3)), power.mean(dim=(1, 2, 3)), rtol=0.05)  # power kept
    after = slice(55, 65)  # 50-150 ms after the burst ends: only the room is heard
    assert bool((wet[..., after].mean(dim=(1, 2, 3)) > 100 * power[..., after].mean(dim=(1, 2, 3))).all())


def test_image_level_goes_from_thirty_db_down_to_gain_db_up():
    """A recorder's level varies far more than a gain stage: -30 dB .. +gain_db on the whole image (the
    microphone EQ around it averages out over the bands)."""
    x = _tones([300, 1000, 3000] * 43)[:128]
    images, out = _shift_images(x, seed=5, gain_db=6.0)
    level = (out - images)[:, 0].mean(dim=(1, 2)).numpy()
    assert level.min() < -20 and level.max() > 0, level  # drawn across the whole range
    assert level.min() >= augment.LEVEL_DB_MIN - 2 and level.max() <= 6.0 + 2, (level.min(), level.max())
