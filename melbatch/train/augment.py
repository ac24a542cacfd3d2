"""Augmentation for training, pure torch and vectorised over the batch so it runs on the training device.

Waveform level, on (N, samples) batches at the feature sample rate — what field recordings vary
in: :func:`speed` (tempo and pitch together, as Kaldi's speed perturbation), :func:`reverb`
(a synthetic room), :func:`telephone` (300-3400 Hz band and 8-bit µ-law), :func:`add_noise`
(generated white/pink/brown noise or the user's noise recordings at a random SNR) and
:func:`random_gain`; :func:`augment_waveforms` applies them in that order, each to a random
subset of the batch. Spectrogram level, on (N, 1, n_mels, frames): random time crop, SpecAugment
(time and frequency masks, filled with zero, i.e. the normalised mean) and mixup (soft targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WaveAugment:
    """Probabilities and ranges of the waveform augmentations (0 switches one off).

    The defaults live in :class:`melbatch.config.TrainConfig`, where users set them.
    """

    sample_rate_hz: int
    gain_db: float
    noise_prob: float
    snr_db_min: float
    snr_db_max: float
    telephone_prob: float
    speed_prob: float
    speed_max: float
    reverb_prob: float

    @classmethod
    def of(cls, settings: object, sample_rate_hz: int) -> WaveAugment:
        """The waveform settings of an :class:`~melbatch.config.AugmentConfig` (same field names)."""
        names = [f for f in cls.__dataclass_fields__ if f != "sample_rate_hz"]
        return cls(sample_rate_hz, **{n: getattr(settings, n) for n in names})


# The image path's bounds beyond the shared knobs, chosen on make bench-field (FSDD digits, README):
# a recorder's level varies far more than a gain stage: -30 dB below to +gain_db above (the gain column
# rose from 0.68 to 0.73-0.78 in four runs); a low-rate codec cuts lower than a phone line, so the band's
# high cut is drawn from 2 kHz (MP3 at 8 kbit/s keeps ~3 kHz).
LEVEL_DB_MIN = -30.0
BAND_TOP_MIN_HZ = 2000.0


def _chosen(n: int, prob: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(n,) boolean: each example drawn with probability ``prob``."""
    return (torch.rand(n, generator=gen) < prob).to(device)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(device)


def random_gain(x: torch.Tensor, max_db: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Scale each clip by a gain drawn uniformly in ±``max_db`` dB; loud results clip at full scale."""
    if max_db <= 0:
        return x
    db = _uniform(len(x), -max_db, max_db, gen, x.device)
    return (x * torch.pow(10.0, db / 20)[:, None]).clamp_(-1.0, 1.0)


def coloured_noise(n: int, samples: int, gen: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, samples) noise with unit power, each row white, pink (1/f) or brown (1/f²) at random."""
    white = torch.randn(n, samples, generator=gen)
    spec = torch.fft.rfft(white, dim=1)
    f = torch.arange(spec.shape[1], dtype=torch.float32).clamp_min(1.0)
    beta = torch.randint(0, 3, (n, 1), generator=gen).float()  # 0 white, 1 pink, 2 brown (power ∝ 1/f^beta)
    noise = torch.fft.irfft(spec * f[None, :].pow(-beta / 2), n=samples, dim=1)
    noise = noise / noise.square().mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    return noise.to(device)


def add_noise(x: torch.Tensor, prob: float, snr_db_min: float, snr_db_max: float,
              bank: torch.Tensor | None = None, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mix noise into a random subset at an SNR drawn in [min, max] dB (relative to each clip's power).

    ``bank`` is a 1-D tensor of noise recordings (the user's noise folder, concatenated); each chosen
    clip gets a random stretch of it. Without one, noise is generated (:func:`coloured_noise`).
    """
    n, samples = x.shape
    pick = _chosen(n, prob, gen, x.device)
    if prob <= 0 or not bool(pick.any()):
        return x
    if bank is not None and len(bank) > samples:
        start = torch.randint(0, len(bank) - samples, (n,), generator=gen)
        idx = start[:, None] + torch.arange(samples)[None, :]
        noise = bank.to(x.device)[idx.to(x.device)]
    elif bank is not None:
        noise = bank.to(x.device).repeat(math.ceil(samples / max(1, len(bank))))[:samples].expand(n, samples)
    else:
        noise = coloured_noise(n, samples, gen, x.device)
    snr = _uniform(n, snr_db_min, snr_db_max, gen, x.device)
    signal_power = x.square().mean(1).clamp_min(1e-10)
    noise_power = noise.square().mean(1).clamp_min(1e-12)
    scale = torch.sqrt(signal_power / (noise_power * torch.pow(10.0, snr / 10))) * pick
    return x + noise * scale[:, None]


def telephone(x: torch.Tensor, prob: float, sample_rate_hz: int, gen: torch.Generator | None = None,
              low_hz: float = 300.0, high_hz: float = 3400.0) -> torch.Tensor:
    """A phone line for a random subset: only the 300-3400 Hz band survives, then 8-bit µ-law."""
    n, samples = x.shape
    pick = _chosen(n, prob, gen, x.device)
    if prob <= 0 or not bool(pick.any()):
        return x
    spec = torch.fft.rfft(x, dim=1)
    freqs = torch.fft.rfftfreq(samples, 1 / sample_rate_hz).to(x.device)
    band = torch.fft.irfft(spec * ((freqs >= low_hz) & (freqs <= high_hz)), n=samples, dim=1)
    mu = 255.0
    code = torch.round(torch.sign(band) * torch.log1p(mu * band.abs().clamp(max=1.0)) / math.log1p(mu) * 127.5)
    phone = torch.sign(code) * ((1 + mu) ** (code.abs() / 127.5) - 1) / mu
    return torch.where(pick[:, None], phone, x)


def speed(x: torch.Tensor, prob: float, max_change: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Play a random subset faster or slower by up to ±``max_change`` (pitch moves with tempo).

    Linear interpolation at each clip's own rate; the clip keeps its length (a sped-up clip ends in
    silence, a slowed-down one loses its end).
    """
    n, samples = x.shape
    pick = _chosen(n, prob, gen, x.device)
    if prob <= 0 or max_change <= 0 or not bool(pick.any()):
        return x
    rate = torch.where(pick, _uniform(n, 1 - max_change, 1 + max_change, gen, x.device), 1.0)
    pos = torch.arange(samples, device=x.device, dtype=x.dtype)[None, :] * rate[:, None]
    lo = pos.floor().long()
    frac = pos - lo
    padded = torch.nn.functional.pad(x, (0, 2))
    lo = lo.clamp(max=samples)
    out = torch.gather(padded, 1, lo) * (1 - frac) + torch.gather(padded, 1, lo + 1) * frac
    return out * (pos < samples - 1)


def room_impulse(n: int, sample_rate_hz: int, rt60_s: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """(n, length) synthetic room responses: a direct path, then noise decaying by 60 dB in ``rt60_s``."""
    length = max(2, int(float(rt60_s.max()) * sample_rate_hz))
    t = torch.arange(length, dtype=torch.float32)[None, :] / sample_rate_hz
    tail = torch.randn(n, length, generator=gen) * torch.exp(-6.9078 * t / rt60_s.cpu()[:, None]) * 0.3
    tail[:, 0] = 1.0
    return tail


def reverb(x: torch.Tensor, prob: float, sample_rate_hz: int, gen: torch.Generator | None = None,
           rt60_range_s: tuple[float, float] = (0.15, 0.8)) -> torch.Tensor:
    """Put a random subset in a synthetic room (RT60 drawn in ``rt60_range_s``), keeping each clip's power."""
    n, samples = x.shape
    pick = _chosen(n, prob, gen, x.device)
    if prob <= 0 or not bool(pick.any()):
        return x
    rir = room_impulse(n, sample_rate_hz, _uniform(n, *rt60_range_s, gen, "cpu"), gen).to(x.device)
    size = samples + rir.shape[1]
    wet = torch.fft.irfft(torch.fft.rfft(x, n=size, dim=1) * torch.fft.rfft(rir, n=size, dim=1), n=size, dim=1)
    wet = wet[:, :samples]
    wet = wet * (x.square().mean(1, keepdim=True) / wet.square().mean(1, keepdim=True).clamp_min(1e-12)).sqrt()
    return torch.where(pick[:, None], wet, x)


def augment_waveforms(x: torch.Tensor, aug: WaveAugment, bank: torch.Tensor | None = None,
                      gen: torch.Generator | None = None) -> torch.Tensor:
    """All waveform augmentations in the order a recording meets them: source, room, line, noise, level."""
    x = speed(x, aug.speed_prob, aug.speed_max, gen)
    x = reverb(x, aug.reverb_prob, aug.sample_rate_hz, gen)
    x = telephone(x, aug.telephone_prob, aug.sample_rate_hz, gen)
    x = add_noise(x, aug.noise_prob, aug.snr_db_min, aug.snr_db_max, bank, gen)
    return random_gain(x, aug.gain_db, gen).clamp_(-1.0, 1.0)


# ------------------------------------------------------------------- the same shifts, made on images

def _lerp_along(x: torch.Tensor, pos: torch.Tensor, dim: int, fill: torch.Tensor) -> torch.Tensor:
    """``x`` (N, 1, F, T) read at fractional positions ``pos`` (N, size) along ``dim`` (2: bands, 3: frames),
    linearly interpolated; positions outside the image read ``fill`` (N, 1, 1, 1)."""
    size = x.shape[dim]
    lo = pos.floor().long()
    frac = (pos - lo).to(x.dtype)
    inside = (pos >= 0) & (pos <= size - 1)
    lo, hi = lo.clamp(0, size - 1), (lo + 1).clamp(0, size - 1)
    shape = [x.shape[0], 1, 1, 1]
    shape[dim] = pos.shape[1]
    other = list(x.shape)
    other[dim] = pos.shape[1]

    def take(i: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, dim, i.view(shape).expand(other))

    out = take(lo) * (1 - frac).view(shape) + take(hi) * frac.view(shape)
    return torch.where(inside.view(shape), out, fill)


def augment_images(x: torch.Tensor, aug: WaveAugment, centers_hz: torch.Tensor, hop_s: float, top_db: float | None,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """The field shifts of :func:`augment_waveforms`, made on log-mel images in dB (N, 1, n_mels, frames)
    so that they need no stored waveforms (``featurize`` keeps images only by default). Each works on
    mel-band power, where the maths of the shift is simple; none is exact, each is close:

    - speed: frames read at the new rate (tempo) and bands at frequency / rate (pitch moves with it);
    - reverb: each band's power plus its own echo, decaying by 60 dB in RT60 (0.15-0.8 s), at a
      direct-to-reverberant ratio of 0-10 dB, power kept;
    - phone line / low bit rate: the bands below a low cut (up to 300 Hz) and above a high cut
      (:data:`BAND_TOP_MIN_HZ` to the top) fall 50 dB, with a one-band slope;
    - noise: white, pink or brown noise power at an SNR in [``snr_db_min``, ``snr_db_max``], or two
      other clips of the batch (babble, a crowd, a second source) 6 dB further down;
    - microphone: a smooth random EQ of up to ±``gain_db`` across the bands, then a recording level
      from :data:`LEVEL_DB_MIN` to +``gain_db``.

    The result is floored ``top_db`` below its peak again, as featurize stores it.
    """
    dev = x.device
    centers = centers_hz.to(dev, torch.float32)
    x = _speed_on_images(x, aug, centers, gen)
    power = torch.pow(10.0, x / 10)
    power = _reverb_on_power(power, aug.reverb_prob, hop_s, gen)
    power = _phone_line_on_power(power, aug.telephone_prob, centers, gen)
    power = _noise_on_power(power, aug, centers, gen)
    x = _microphone_on_images(10 * torch.log10(power.clamp_min(1e-10)), aug.gain_db, gen)
    if top_db is not None:
        x = torch.maximum(x, x.amax(dim=(1, 2, 3), keepdim=True) - top_db)
    return x


def _speed_on_images(x: torch.Tensor, aug: WaveAugment, centers: torch.Tensor,
                     gen: torch.Generator | None) -> torch.Tensor:
    """Speed: frames read at the new rate (tempo), bands at frequency / rate (pitch moves with it)."""
    n, _, f, t = x.shape
    dev = x.device
    floor = x.amin(dim=(1, 2, 3), keepdim=True)
    frames = torch.arange(t, device=dev, dtype=torch.float32)[None, :]
    pick = _chosen(n, aug.speed_prob, gen, dev)
    if aug.speed_max > 0 and bool(pick.any()):
        rate = torch.where(pick, _uniform(n, 1 - aug.speed_max, 1 + aug.speed_max, gen, dev), 1.0)
        x = _lerp_along(x, frames * rate[:, None], 3, floor)
        source_hz = centers[None, :] / rate[:, None]  # a band now shows what was at frequency / rate
        idx = torch.searchsorted(centers.contiguous(), source_hz.contiguous()).clamp(1, f - 1)
        lo_hz, hi_hz = centers[idx - 1], centers[idx]
        pos = (idx - 1).float() + (source_hz - lo_hz) / (hi_hz - lo_hz)
        x = _lerp_along(x, torch.where(source_hz < centers[0], -1.0, pos), 2, floor)
    return x


def _reverb_on_power(power: torch.Tensor, prob: float, hop_s: float, gen: torch.Generator | None) -> torch.Tensor:
    """Reverb: each band's power plus its own echo, decaying by 60 dB in RT60, power kept."""
    n, t, dev = power.shape[0], power.shape[3], power.device
    pick = _chosen(n, prob, gen, dev)
    if not bool(pick.any()):
        return power
    rt60 = _uniform(n, 0.15, 0.8, gen, dev)
    decay = torch.pow(10.0, -6 * hop_s / rt60)  # power per frame
    drr = torch.pow(10.0, -_uniform(n, 0.0, 10.0, gen, dev) / 10)
    k = torch.arange(1, t + 1, device=dev, dtype=torch.float32)[None, :]
    tail = torch.pow(decay[:, None], k) * (drr * (1 - decay) / decay)[:, None]  # sums to drr
    size = 2 * t
    echo = torch.fft.irfft(torch.fft.rfft(power, n=size, dim=3) * torch.fft.rfft(
        torch.nn.functional.pad(tail, (1, 0))[:, None, None, :t], n=size, dim=3), n=size, dim=3)[..., :t]
    wet = power + echo.clamp_min(0)
    wet = wet * power.mean(dim=(2, 3), keepdim=True) / wet.mean(dim=(2, 3), keepdim=True).clamp_min(1e-20)
    return torch.where(pick[:, None, None, None], wet, power)


def _phone_line_on_power(power: torch.Tensor, prob: float, centers: torch.Tensor,
                         gen: torch.Generator | None) -> torch.Tensor:
    """Phone line / low bit rate: the bands outside a random pass band fall 50 dB, with a one-band slope."""
    n, dev = power.shape[0], power.device
    pick = _chosen(n, prob, gen, dev)
    if not bool(pick.any()):
        return power
    low = _uniform(n, 0.0, 300.0, gen, dev)
    high = torch.exp(_uniform(n, math.log(BAND_TOP_MIN_HZ), math.log(float(centers[-1]) * 1.1), gen, dev))
    width = (centers[1:] - centers[:-1]).mean()
    outside = torch.sigmoid((low[:, None] - centers[None, :]) / width) + \
        torch.sigmoid((centers[None, :] - high[:, None]) / width)
    cut = torch.pow(10.0, -5.0 * outside.clamp(max=1.0))  # -50 dB outside the band
    return torch.where(pick[:, None, None, None], power * cut[:, None, :, None], power)


def _noise_on_power(power: torch.Tensor, aug: WaveAugment, centers: torch.Tensor,
                    gen: torch.Generator | None) -> torch.Tensor:
    """Noise: white, pink or brown at a drawn SNR, or two other clips of the batch 6 dB further down."""
    n, _, f, t = power.shape
    dev = power.device
    pick = _chosen(n, aug.noise_prob, gen, dev)
    if not bool(pick.any()):
        return power
    beta = torch.randint(0, 3, (n, 1), generator=gen).float().to(dev)  # white, pink, brown
    profile = torch.pow(centers.clamp_min(50.0)[None, :] / 1000.0, -beta)
    cells = -torch.log(torch.rand(n, 1, f, t, generator=gen).clamp_min(1e-6)).to(dev)  # a periodogram's spread
    noise = profile[:, None, :, None] * (0.5 + 0.5 * cells)
    snr_db = _uniform(n, aug.snr_db_min, aug.snr_db_max, gen, dev)
    if n > 1:  # half of the noisy clips get two other clips of the batch, moved in time, instead (babble),
        # 6 dB further down: a single voice as loud as the clip's own would make its label a coin toss
        shift = int(torch.randint(0, t, (1,), generator=gen))
        other = torch.roll(power.roll(1, dims=0) + power.roll(2, dims=0), shift, dims=3)
        babble = _chosen(n, 0.5, gen, dev)
        noise = torch.where(babble[:, None, None, None], other, noise)
        snr_db = snr_db + 6.0 * babble
    snr = torch.pow(10.0, snr_db / 10)
    level = power.mean(dim=(1, 2, 3)) / (noise.mean(dim=(1, 2, 3)).clamp_min(1e-20) * snr)
    return power + noise * (level * pick)[:, None, None, None]


def _microphone_on_images(x: torch.Tensor, gain_db: float, gen: torch.Generator | None) -> torch.Tensor:
    """Microphone: a smooth random EQ of up to ±gain_db across the bands, then a recording level."""
    if gain_db <= 0:
        return x
    n, _, f, _ = x.shape
    band = torch.linspace(0, math.pi, f, device=x.device)[None, :]
    curve = sum(_uniform(n, -1, 1, gen, x.device)[:, None] * torch.cos(k * band) for k in (1, 2, 3)) / 3
    level = _uniform(n, min(LEVEL_DB_MIN, -gain_db), gain_db, gen, x.device).view(n, 1, 1, 1)
    return x + (gain_db * curve)[:, None, :, None] + level


def random_time_shift(x: torch.Tensor, max_frames: int, gen: torch.Generator | None = None,
                      sound: torch.Tensor | None = None) -> torch.Tensor:
    """Move every image along time by its own random offset, keeping its width; vacated columns are
    silence (the image's floor).

    A clip full of sound moves by up to ``max_frames`` either way (its edge frames drop out). A
    clip whose ``sound`` (n,: leading columns that hold audio) is shorter than the image moves only
    right and only within its padding, so a short word can land anywhere in its clip but is never
    cut. The image keeps its width, unlike a crop: training and validation images then hold the same
    share of padding, which a globally pooled CNN is sensitive to.
    """
    n, _, _, t = x.shape
    if max_frames <= 0:
        return x
    full = torch.full((n,), t, dtype=torch.long)
    sound = full if sound is None else sound.cpu().long().clamp(1, t)
    lo = torch.where(sound >= t, -max_frames, 0)
    hi = torch.where(sound >= t, max_frames, (t - sound).clamp(max=max_frames))
    shift = lo + (torch.rand(n, generator=gen) * (hi - lo + 1)).long().clamp(max=(hi - lo))
    src = torch.arange(t)[None, :] - shift[:, None]  # column j shows column j - shift of the original
    inside = ((src >= 0) & (src < t)).to(x.device)
    idx = src.clamp(0, t - 1).to(x.device)
    moved = torch.gather(x, 3, idx[:, None, None, :].expand(n, x.shape[1], x.shape[2], t))
    return torch.where(inside[:, None, None, :], moved, x.amin(dim=(1, 2, 3), keepdim=True))


def _masks(n: int, size: int, count: int, max_width: torch.Tensor, gen: torch.Generator | None,
           device: torch.device, span: torch.Tensor | None = None) -> torch.Tensor:
    """(n, size) boolean: ``count`` random bands per row, each of width 0..max_width[row], inside
    the row's first ``span[row]`` cells (all ``size`` when None)."""
    out = torch.zeros(n, size, dtype=torch.bool, device=device)
    if count <= 0 or int(max_width.max()) <= 0:
        return out
    span = torch.full((n,), size) if span is None else span.cpu().long().clamp(1, size)
    pos = torch.arange(size, device=device)[None, :]
    for _ in range(count):
        width = (torch.rand(n, generator=gen) * (max_width + 1)).long()[:, None]
        start = (torch.rand(n, 1, generator=gen) * (span[:, None] - width + 1).clamp(min=1)).long()
        width, start = width.to(device), start.to(device)
        out |= (pos >= start) & (pos < start + width)
    return out


def spec_augment(x: torch.Tensor, time_masks: int, time_frac: float, freq_masks: int, freq_frac: float,
                 gen: torch.Generator | None = None, sound: torch.Tensor | None = None) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) without time warping; masked cells become silence: each image's
    lowest value (its floor), not the dataset mean, which in a short recording's padding or an
    empty band would paint a loud stripe the model then learns from.

    Time masks are sized to, and placed on, each image's ``sound`` columns when given (a mask 10%
    as wide as a clip would hide most of a short word), else to the whole image.
    """
    n, _, f, t = x.shape
    span = None if sound is None else sound.cpu().long().clamp(1, t)
    t_width = (time_frac * (torch.full((n,), t) if span is None else span)).long()
    tm = _masks(n, t, time_masks, t_width, gen, x.device, span)
    fm = _masks(n, f, freq_masks, torch.full((n,), int(freq_frac * f)), gen, x.device)
    hide = tm[:, None, None, :] | fm[:, None, :, None]
    floor = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.where(hide, floor, x)


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float,
          gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each example with a random partner: x' = λx + (1-λ)x[perm], same for soft targets."""
    if alpha <= 0 or len(x) < 2:
        return x, targets
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    lam = max(lam, 1 - lam)  # keep the original dominant, so the label stays meaningful
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot with label smoothing: (1-ε) on the class, ε/K spread over all."""
    t = torch.full((len(y), num_classes), smoothing / num_classes, device=y.device)
    return t.scatter_(1, y[:, None], 1 - smoothing + smoothing / num_classes)
