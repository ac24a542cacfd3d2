"""Log-mel images: librosa parity, shape, a tone lands in the right band, storage dtype."""

from __future__ import annotations

import subprocess
import sys
import warnings

import librosa
import numpy as np
import pytest
from conftest import tone

from melbatch.audio.decode import Clip
from melbatch.audio.logmel import compute_logmel, logmel_clips
from melbatch.config import FeatureConfig

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


# --- feature engineering (issue 6): each step measured on signals whose answer is known ---------

def _beeping_tone_in_noise(cfg: FeatureConfig, rng, freq=1000.0, amp=0.05, noise=0.1):
    """A tone that is on in the 1st and 3rd second and off in the 2nd/4th/5th, in white noise
    (broadband SNR about -19 dB), and the frames where it sounds."""
    sr, n = cfg.sample_rate_hz, cfg.clip_samples
    t = np.arange(n) / sr
    on = ((t >= 0.0) & (t < 1.0)) | ((t >= 2.0) & (t < 3.0))
    x = amp * np.sin(2 * np.pi * freq * t) * on + noise * rng.standard_normal(n)
    frame_t = np.arange(cfg.n_frames) * cfg.hop_length / sr
    frames_on = (((frame_t > 0.05) & (frame_t < 0.95)) | ((frame_t > 2.05) & (frame_t < 2.95)))
    return x.astype(np.float32), frames_on


def _snr_db(image_db: np.ndarray, band: int, frames_on: np.ndarray) -> float:
    """Tone power in its band while it sounds over the mean power of everything else (all frames,
    the bands away from the tone): how far the tone stands out of the picture."""
    power = 10.0 ** (image_db.astype(np.float64) / 10.0)
    others = np.delete(power, range(band - 3, band + 4), axis=0)
    return float(10 * np.log10(power[band, frames_on].mean() / others.mean()))


@pytest.mark.parametrize("method", ["subtract", "gate"])
def test_denoising_raises_the_snr_of_a_tone_buried_in_noise(method, rng):
    plain = FeatureConfig(top_db=None)
    x, frames_on = _beeping_tone_in_noise(plain, rng)
    band = int(np.abs(plain.band_centers_hz() - 1000).argmin())
    before = _snr_db(compute_logmel(x, plain), band, frames_on)
    denoised = FeatureConfig(top_db=None, denoise=method)
    after = _snr_db(compute_logmel(x, denoised), band, frames_on)
    assert after - before > 10, (before, after)
    # the tone itself survives: its band, while it sounds, loses little
    img, ref = compute_logmel(x, denoised), compute_logmel(x, plain)
    assert np.median(ref[band, frames_on] - img[band, frames_on]) < 3.0


def test_denoising_ignores_the_digital_silence_of_a_padded_tail(rng):
    """A short file's last clip is zero-padded; the noise floor must still come from the noise."""
    cfg = FeatureConfig(top_db=None, denoise="gate")
    x = (0.1 * rng.standard_normal(cfg.clip_samples)).astype(np.float32)
    x[cfg.clip_samples // 2:] = 0.0
    img = compute_logmel(x, cfg)
    plain = compute_logmel(x, FeatureConfig(top_db=None))
    noisy_half = slice(5, cfg.n_frames // 2 - 5)
    assert np.median(plain[:, noisy_half] - img[:, noisy_half]) > 20  # the noise was gated away


def test_band_emphasis_adds_its_gain_to_the_bands_in_range_and_nothing_else(rng):
    x = (0.1 * rng.standard_normal(FeatureConfig().clip_samples)).astype(np.float32)
    plain = compute_logmel(x, FeatureConfig(top_db=None, dtype="float32"))
    cfg = FeatureConfig(top_db=None, dtype="float32", band_emphasis=("2000-4000:+6", "0-300:-10"))
    diff = compute_logmel(x, cfg) - plain
    centres = cfg.band_centers_hz()
    expected = np.where((centres >= 2000) & (centres < 4000), 6.0, 0.0) + np.where(centres < 300, -10.0, 0.0)
    np.testing.assert_allclose(diff, np.broadcast_to(expected[:, None], diff.shape), atol=1e-3)


def test_band_limits_leave_out_what_lies_outside_them():
    """f_min_hz/f_max_hz: a 6 kHz tone is the brightest band at full band, absent from a 300-3400 Hz image."""
    full, phone = FeatureConfig(top_db=None), FeatureConfig(top_db=None, n_mels=64, f_min_hz=300.0, f_max_hz=3400.0)
    x = tone(6000, 5.0, 16000) + tone(1000, 5.0, 16000, amp=0.01)
    assert abs(full.band_centers_hz()[int(np.median(compute_logmel(x, full).argmax(axis=0)))] - 6000) < 150
    assert abs(phone.band_centers_hz()[int(np.median(compute_logmel(x, phone).argmax(axis=0)))] - 1000) < 60


def test_pcen_equals_librosa_started_in_steady_state(rng):
    """PCEN is librosa.pcen on the mel power scaled by 2**31, with the smoother started at the first
    frame (librosa's own default starts it empty, which makes every clip begin with a bright onset)."""
    import math

    import torch

    from melbatch.audio.logmel import _logmel_parts

    cfg = FeatureConfig(compression="pcen", dtype="float32")
    x, _ = _beeping_tone_in_noise(cfg, rng)
    ours = compute_logmel(x, cfg)
    _, _, fb = _logmel_parts(cfg)
    spec = torch.stft(torch.from_numpy(x), cfg.n_fft, cfg.hop_length, cfg.win_length, torch.hann_window(cfg.win_length),
                      center=True, pad_mode="reflect", return_complex=True)
    e = (fb @ spec.abs().square()).numpy().astype(np.float64) * 2.0**31
    t = cfg.pcen_time_constant_s * cfg.sample_rate_hz / cfg.hop_length
    b = (math.sqrt(1 + 4 * t * t) - 1) / (2 * t * t)
    ref = librosa.pcen(e, sr=cfg.sample_rate_hz, hop_length=cfg.hop_length, gain=cfg.pcen_gain, bias=cfg.pcen_bias,
                       power=cfg.pcen_power, time_constant=cfg.pcen_time_constant_s, eps=cfg.pcen_eps,
                       zi=(1 - b) * e[:, :1])
    assert np.abs(ours - ref).max() < 1e-4 * max(1.0, ref.max())
    assert cfg.top_db is None and cfg.units == "PCEN"


def test_pcen_is_an_automatic_gain_control_and_db_is_not(rng):
    """Documented PCEN behaviour: 20 dB louder input barely moves the image (gain 0.98), while the
    dB image moves by 20 dB."""
    x, _ = _beeping_tone_in_noise(FeatureConfig(), rng)
    db, pcen_cfg = FeatureConfig(top_db=None, dtype="float32"), FeatureConfig(compression="pcen", dtype="float32")
    assert np.median(compute_logmel(10 * x, db) - compute_logmel(x, db)) == pytest.approx(20.0, abs=0.01)
    quiet, loud = compute_logmel(x, pcen_cfg), compute_logmel(10 * x, pcen_cfg)
    assert np.median(np.abs(loud - quiet)) < 0.1 * np.median(np.abs(quiet))


@pytest.mark.parametrize("how", ["peak", "band_mean", "standardize"])
def test_clip_normalisation_does_what_it_says(how, rng):
    x, _ = _beeping_tone_in_noise(FeatureConfig(), rng)
    cfg = FeatureConfig(clip_norm=how, dtype="float32")
    img = compute_logmel(x, cfg)
    if how == "peak":
        assert img.max() == pytest.approx(0.0, abs=1e-4)
        np.testing.assert_allclose(img - compute_logmel(x, FeatureConfig(dtype="float32")),
                                   img[0, 0] - compute_logmel(x, FeatureConfig(dtype="float32"))[0, 0], atol=1e-3)
    elif how == "band_mean":
        np.testing.assert_allclose(img.mean(axis=1), 0.0, atol=1e-3)
    else:
        assert abs(img.mean()) < 1e-4 and img.std() == pytest.approx(1.0, abs=1e-3)
    # louder input, same normalised picture
    np.testing.assert_allclose(compute_logmel(4 * x, cfg), img, atol=1e-3 if how != "standardize" else 1e-4)


def test_steps_apply_the_same_to_a_batch_on_the_training_path(rng):
    """Train recomputes images from augmented waveforms in batches: same steps, same numbers."""
    import torch

    from melbatch.audio.logmel import logmel_tensor

    cfg = FeatureConfig(denoise="subtract", band_emphasis=("1000-3000:+3",), compression="pcen",
                        clip_norm="standardize", dtype="float32")
    xs = np.stack([_beeping_tone_in_noise(cfg, rng)[0] for _ in range(3)])
    with torch.inference_mode():
        batch = logmel_tensor(torch.from_numpy(xs), cfg).numpy()
    for i in range(3):
        np.testing.assert_allclose(batch[i], compute_logmel(xs[i], cfg), atol=1e-3)


_FAULTS_PER_CLIP = """
import resource, sys
import numpy as np, torch
from melbatch.stages import workers
from melbatch.config import FeatureConfig
from melbatch.audio.logmel import logmel_clips
from melbatch.audio.decode import Clip
if sys.argv[1] == "prepared":
    workers.prepare_worker(1)
    print(workers.keep_freed_memory(), end=" ")
cfg = FeatureConfig()
rng = np.random.default_rng(0)
clips = [Clip(i, 5.0 * i, 5.0 * (i + 1), (0.1 * rng.standard_normal(cfg.clip_samples)).astype(np.float32))
         for i in range(60)]
for _ in logmel_clips(iter(clips[:10]), cfg):  # warm: the first calls map what a process keeps for good
    pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in logmel_clips(iter(clips), cfg):
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(clips))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_prepared_worker_reuses_its_image_buffers_instead_of_faulting_them_in_each_clip():
    """Each clip's buffers (0.3-1 MB) are freed and made again; with glibc's defaults that costs
    hundreds of page faults per clip in a fresh process (measured 281-541 in 4 of 6 runs, 6 in the
    others). A worker made ready keeps them mapped: 2-4."""
    for _ in range(2):  # without the settings, a fresh process faults hundreds of times per clip in ~2 of 3 runs
        took, faults = subprocess.run([sys.executable, "-c", _FAULTS_PER_CLIP, "prepared"], capture_output=True,
                                      text=True, check=True).stdout.split()
        assert took == "True"
        assert float(faults) < 20, f"{faults} page faults per clip"
