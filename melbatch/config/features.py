"""The feature contract (:class:`FeatureConfig`: everything that decides an image's pixels) and
featurize's own settings (:class:`FeaturizeConfig`: what to read, how to label it, the shards' layout)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

from melbatch import URI
from melbatch.config.fields import ConfigError, Seconds, build, flag, inside, require

FEATURE_DTYPES = ("float16", "float32")
TAIL_POLICIES = ("pad", "drop")
DENOISE_METHODS = ("none", "subtract", "gate")
COMPRESSIONS = ("db", "pcen")
MIN_FITTED_HOP_SHARE = 0.25  # fitted clips overlap by three quarters at most
CLIP_NORMS = ("none", "peak", "band_mean", "standardize")
LABEL_SOURCES = ("folder", "none")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "opus", "mp3", "m4a", "aac", "aif", "aiff")
# featurize --runner auto runs work this small in the driver's process: one core decodes it in about the
# time starting Ray and its workers takes (a few seconds), so a small nightly increment skips that cost.
LOCAL_WORK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines the pixels of a log-mel image: the feature contract.

    Its canonical JSON and :meth:`hash` travel with every shard, manifest and model package, so a
    later stage can refuse features computed differently. Defaults: 16 kHz, 5 s clips, 32 ms FFT
    (25 ms Hann window) every 10 ms, 128 slaney mel bands, dB with an 80 dB floor, stored as float16.

    Feature-engineering steps, applied to each clip's mel power in this order (all off by default;
    see :mod:`melbatch.audio.logmel` for the maths):

    1. ``denoise``: spectral gating. The noise floor of each mel band is its mean power over the
       quietest ``denoise_quantile`` of the clip's frames, the threshold that floor raised by
       ``denoise_threshold_db``; ``subtract`` removes the threshold (never going below
       ``denoise_reduction_db`` under the original), ``gate`` lowers every value under the
       threshold by ``denoise_reduction_db`` and keeps the rest. Stationary noise
       (hum, hiss, fans, rain) goes; sounds that come and go stay. A sound that never stops is
       stationary too and is removed with the noise.
    2. ``band_emphasis``: ``(f_lo_hz, f_hi_hz, gain_db)`` triples; bands whose centre lies in
       ``[f_lo_hz, f_hi_hz)`` get ``gain_db`` added (negative values de-emphasise).
    3. ``compression``: ``db`` (10·log10, floored ``top_db`` under the clip's maximum) or ``pcen``
       (per-channel energy normalisation, Wang et al. 2017: ``librosa.pcen`` of the mel power
       scaled by 2**31, its smoother started at the first frame; ``top_db`` does not apply).
    4. ``clip_norm``: ``peak`` shifts each clip so its maximum is 0; ``band_mean`` subtracts each
       band's mean over the clip (removes a fixed microphone or channel colouring); ``standardize``
       gives each clip zero mean and unit variance.

    Steps at their "off" values are left out of the canonical JSON, so features made before the
    steps existed keep their hash.
    """

    sample_rate_hz: int = flag(16_000, "resample every file to this rate (Hz)")
    clip_s: Seconds = flag(5.0, "clip length in seconds; each clip becomes one image")
    clip_hop_s: Seconds = flag(5.0, "seconds between clip starts (less than --clip-s for overlapping clips)")
    tail: Literal["pad", "drop"] = flag("pad", "the last, partial clip: 'pad' it with zeros or 'drop' it")
    min_tail_s: Seconds = flag(1.0,
        "a partial tail (or a whole short file) needs at least this much audio to become a clip")
    n_fft: int = flag(512, "FFT size in samples")
    win_length: int = flag(400, "Hann window length in samples (<= n_fft)")
    hop_length: int = flag(160, "samples between spectrogram frames")
    n_mels: int = flag(128, "mel bands (image height)")
    f_min_hz: float = flag(0.0, "lowest mel band edge (Hz)")
    f_max_hz: float | None = flag(None,  # None: up to Nyquist (stored as the number)
        "highest mel band edge (Hz); default: half the sample rate")
    top_db: float | None = flag(80.0, "floor each clip's dB values this far below its maximum")
    mel_scale: Literal["slaney", "htk"] = flag("slaney", "'slaney' (librosa's default) or 'htk'")
    dtype: Literal["float16", "float32"] = flag("float16",
        "storage dtype of the mel images: float16 (half the bytes) or float32")
    denoise: Literal["none", "subtract", "gate"] = flag("none",
        "spectral gating of stationary noise (hum, hiss, fans): 'subtract' the per-band noise floor (from the"
        " clip's quietest frames) or 'gate' what is not above it")
    denoise_quantile: float = flag(0.2, "share of each clip's quietest frames that estimates the noise floor")
    denoise_threshold_db: float = flag(6.0, "how far above the noise floor a value must be to count as signal (dB)")
    denoise_reduction_db: float = flag(30.0, "how much noise is lowered, at most (dB)")
    band_emphasis: tuple[tuple[float, float, float], ...] = flag((),
        "LO-HI:GAIN_DB, e.g. 2000-8000:+6: add GAIN_DB to the mel bands centred in LO..HI Hz (negative to "
        "de-emphasise); repeatable")
    compression: Literal["db", "pcen"] = flag("db",
        "'db' (10 log10, floored by --top-db) or 'pcen' (per-channel energy normalisation: an automatic gain "
        "control that brings out onsets in loud backgrounds)")
    pcen_time_constant_s: float = flag(0.4, "PCEN smoother time constant (s)")
    pcen_gain: float = flag(0.98, "PCEN gain (0-1: how fully the background level is divided out)")
    pcen_bias: float = flag(2.0, "PCEN bias")
    pcen_power: float = flag(0.5, "PCEN root compression exponent")
    pcen_eps: float = flag(1e-6, "PCEN epsilon")
    clip_norm: Literal["none", "peak", "band_mean", "standardize"] = flag("none",
        "per-clip normalisation of each image: 'peak' (maximum at 0), 'band_mean' (each band's mean over the "
        "clip removed: a fixed microphone/channel colouring goes), 'standardize' (zero mean, unit variance), "
        "'none'")

    def __post_init__(self) -> None:
        sr = self.sample_rate_hz
        require(isinstance(sr, int) and 1000 <= sr <= 384_000,
                 f"sample_rate_hz={sr!r}: use an integer rate in Hz between 1000 and 384000 (e.g. 16000)")
        require(self.clip_s > 0, f"clip_s={self.clip_s}: clip length must be > 0 seconds")
        require(self.clip_hop_s > 0, f"clip_hop_s={self.clip_hop_s}: clip hop must be > 0 seconds")
        require(self.tail in TAIL_POLICIES, f"tail={self.tail!r}: choose one of {TAIL_POLICIES}")
        require(0 < self.min_tail_s <= self.clip_s,
                 f"min_tail_s={self.min_tail_s}: must be > 0 and <= clip_s ({self.clip_s})")
        require(self.n_fft >= 16 and self.win_length >= 16 and self.hop_length >= 1,
                 "n_fft and win_length must be >= 16 samples and hop_length >= 1")
        require(self.win_length <= self.n_fft,
                 f"win_length={self.win_length} > n_fft={self.n_fft}: raise n_fft or lower win_length")
        require(self.clip_samples >= self.n_fft,
                 f"clip_s={self.clip_s} is shorter than one FFT window ({self.n_fft} samples at "
                 f"{sr} Hz): use a longer clip or a smaller n_fft")
        nyquist = sr / 2
        # canonical: "up to Nyquist" is stored as the number, so equal features compare and hash equal
        object.__setattr__(self, "f_max_hz", float(self.f_max_hz) if self.f_max_hz is not None else nyquist)
        f_max = self.f_max_hz
        require(0 <= self.f_min_hz < f_max,
                 f"f_min_hz={self.f_min_hz} must be >= 0 and below f_max_hz={f_max}")
        require(f_max <= nyquist,
                 f"f_max_hz={f_max} is above the Nyquist frequency {nyquist} of sample_rate_hz={sr}: "
                 "lower f_max_hz or raise sample_rate_hz")
        require(1 <= self.n_mels <= self.n_fft // 2 + 1,
                 f"n_mels={self.n_mels}: must be between 1 and n_fft//2+1 ({self.n_fft // 2 + 1}); "
                 "more mel bands than FFT bins leaves empty bands — raise n_fft or lower n_mels")
        empty = _empty_mel_bands(self)
        require(not empty, f"n_mels={self.n_mels} with n_fft={self.n_fft} leaves {empty} mel band(s) empty between "
                 f"{self.f_min_hz} and {f_max} Hz (no FFT bin falls inside them): raise n_fft, lower n_mels "
                 "or widen f_min_hz..f_max_hz")
        require(self.top_db is None or self.top_db > 0, f"top_db={self.top_db}: must be > 0 or null")
        require(self.mel_scale in ("slaney", "htk"), f"mel_scale={self.mel_scale!r}: 'slaney' or 'htk'")
        require(self.dtype in FEATURE_DTYPES, f"dtype={self.dtype!r}: choose one of {FEATURE_DTYPES}")
        self._check_steps()

    def _check_steps(self) -> None:
        require(self.denoise in DENOISE_METHODS, f"denoise={self.denoise!r}: choose one of {DENOISE_METHODS}")
        require(0 < self.denoise_quantile <= 1, f"denoise_quantile={self.denoise_quantile}: the share of the "
                 "quietest frames that estimates the noise floor, in (0, 1] (e.g. 0.2)")
        require(self.denoise_threshold_db >= 0 and self.denoise_reduction_db > 0,
                 "denoise_threshold_db must be >= 0 and denoise_reduction_db > 0 (dB)")
        object.__setattr__(self, "band_emphasis", tuple(_band(b) for b in self.band_emphasis))
        for lo, hi, _ in self.band_emphasis:
            require(0 <= lo < hi, f"band_emphasis {lo}-{hi} Hz: give f_lo_hz < f_hi_hz, both >= 0")
        require(self.compression in COMPRESSIONS, f"compression={self.compression!r}: choose one of {COMPRESSIONS}")
        if self.compression == "pcen":
            object.__setattr__(self, "top_db", None)  # a dB floor means nothing for PCEN values
        require(self.pcen_time_constant_s > 0 and self.pcen_eps > 0 and self.pcen_bias > 0,
                 "pcen_time_constant_s, pcen_eps and pcen_bias must be > 0")
        require(0 <= self.pcen_gain <= 1 and 0 < self.pcen_power <= 1,
                 f"pcen_gain={self.pcen_gain} must be in [0, 1] and pcen_power={self.pcen_power} in (0, 1]")
        require(self.clip_norm in CLIP_NORMS, f"clip_norm={self.clip_norm!r}: choose one of {CLIP_NORMS}")

    @property
    def steps(self) -> dict[str, Any]:
        """The feature-engineering settings in effect: ``{}`` for plain log-mel."""
        return {k: v for k, v in self._identity().items() if k in _STEP_DEFAULTS}

    def band_centers_hz(self) -> np.ndarray:
        """The centre frequency of each mel band (Hz), bottom band first."""
        lo, hi = _hz_to_mel(np.array([self.f_min_hz, self.f_max_hz], dtype=float), self.mel_scale)
        return _mel_to_hz(np.linspace(lo, hi, self.n_mels + 2), self.mel_scale)[1:-1]

    def without_steps(self) -> FeatureConfig:
        """The same features with every feature-engineering step off (for before/after pictures)."""
        plain = dataclasses.replace(self, **_STEP_DEFAULTS)
        return dataclasses.replace(plain, top_db=self.top_db if self.compression == "db" else 80.0)

    @property
    def units(self) -> str:
        """What the image values are, for colour bars and reports."""
        base = "dB" if self.compression == "db" else "PCEN"
        return {"none": base, "peak": f"{base} re clip max", "band_mean": f"{base} re band mean",
                "standardize": "standard deviations"}[self.clip_norm]

    @property
    def clip_samples(self) -> int:
        return round(self.clip_s * self.sample_rate_hz)

    @property
    def clip_hop_samples(self) -> int:
        return round(self.clip_hop_s * self.sample_rate_hz)

    @property
    def min_tail_samples(self) -> int:
        return round(self.min_tail_s * self.sample_rate_hz)

    @property
    def n_frames(self) -> int:
        """Frames per clip (centred STFT)."""
        return 1 + self.clip_samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int]:
        """(n_mels, n_frames): the image each clip becomes."""
        return (self.n_mels, self.n_frames)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def canonical_json(self) -> str:
        return json.dumps(self._identity(), sort_keys=True, separators=(",", ":"))

    def _identity(self) -> dict[str, Any]:
        d = self.to_dict()
        off = {"denoise_": self.denoise == "none", "pcen_": self.compression != "pcen"}
        for k, default in _STEP_DEFAULTS.items():  # steps that are off do not change the identity
            param = next((prefix for prefix in off if k.startswith(prefix)), None)
            if off[param] if param else d[k] == default:
                del d[k]
        return d

    def hash(self) -> str:
        """Short, stable identity of these features (first 16 hex digits of SHA-256)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        return build(cls, d, "features")

    def fitted_to(self, seconds: list[float]) -> FeatureConfig:
        """These features with clips as long as the recordings, when most recordings are much shorter.

        When the median recording is under half of ``clip_s`` (keywords, digits, calls), the clip
        becomes the 90th percentile of the durations rounded up to 0.25 s (at least 1 s), the hop
        keeps its ratio to the clip, and ``min_tail_s`` drops to a tenth of the clip so that short
        recordings are kept. Otherwise, or with fewer than 3 durations, the features are unchanged.
        The hop's ratio is kept down to :data:`MIN_FITTED_HOP_SHARE` of the clip and no lower: ``--clip-s
        10000`` with the default 5 s hop on 2-6 s files made a hop of 0.0013 s and 2,677 clips from 26 s
        of audio (issue 44), and ``--clip-s 1e6`` a hop of 0 the user never set.
        """
        if len(seconds) < 3 or float(np.median(seconds)) >= self.clip_s / 2:
            return self
        clip = max(1.0, math.ceil(float(np.percentile(seconds, 90)) * 4) / 4)
        if clip >= self.clip_s:
            return self
        hop = round(min(clip, max(MIN_FITTED_HOP_SHARE, self.clip_hop_s / self.clip_s) * clip), 4)
        return dataclasses.replace(self, clip_s=clip, clip_hop_s=hop,
                                   min_tail_s=min(self.min_tail_s, round(max(0.05, clip / 10), 4)))

    def at_rate(self, sample_rate_hz: int) -> FeatureConfig:
        """These features at another sample rate with the same timing: the window, FFT and hop scale with
        the rate (the FFT to a power of two), so an image keeps its shape and covers the wider band."""
        if sample_rate_hz == self.sample_rate_hz:
            return self
        k = sample_rate_hz / self.sample_rate_hz
        return dataclasses.replace(self, sample_rate_hz=sample_rate_hz, n_fft=2 ** math.ceil(math.log2(self.n_fft * k)),
                                   win_length=round(self.win_length * k), hop_length=round(self.hop_length * k),
                                   f_max_hz=None if self.f_max_hz in (None, self.sample_rate_hz / 2) else self.f_max_hz)

    def diff(self, other: FeatureConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: {name: (self, other)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


_STEP_DEFAULTS = {f.name: f.default for f in fields(FeatureConfig)
                  if f.name.startswith(("denoise", "band_emphasis", "compression", "pcen_", "clip_norm"))}


def _band(b: Any) -> tuple[float, float, float]:
    """``(lo, hi, gain_db)`` from a triple or a ``"LO-HI:GAIN"`` string such as ``"2000-8000:+6"``."""
    try:
        if isinstance(b, str):
            span, gain = b.split(":")
            lo, hi = span.split("-")
            b = (lo, hi, gain)
        lo, hi, gain = (float(v) for v in b)
    except (TypeError, ValueError):
        raise ConfigError(f"band_emphasis entry {b!r}: give f_lo_hz-f_hi_hz:gain_db, e.g. 2000-8000:+6") from None
    return (lo, hi, gain)


def _hz_to_mel(f: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # slaney: linear below 1 kHz, logarithmic above
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + 27.0 * np.log(np.maximum(f, 1e-9) / 1000.0) / np.log(6.4))


def _mel_to_hz(m: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(np.log(6.4) * (m - 15.0) / 27.0))


def _empty_mel_bands(cfg: FeatureConfig) -> int:
    """How many triangular mel filters contain no FFT bin (they would be rows of silence)."""
    lo, hi = _hz_to_mel(np.array([cfg.f_min_hz, cfg.f_max_hz]), cfg.mel_scale)
    edges = _mel_to_hz(np.linspace(lo, hi, cfg.n_mels + 2), cfg.mel_scale)
    bins = np.arange(cfg.n_fft // 2 + 1) * cfg.sample_rate_hz / cfg.n_fft
    inside = (bins[None, :] > edges[:-2, None]) & (bins[None, :] < edges[2:, None])
    return int((~inside.any(axis=1)).sum())


def _extensions(given: tuple[str, ...]) -> tuple[str, ...]:
    exts = tuple(e.lower().lstrip(".") for e in given)
    unknown = sorted(set(exts) - set(AUDIO_EXTENSIONS))
    require(not unknown, f"extensions {unknown} are not audio formats melbatch decodes; "
             f"choose from {AUDIO_EXTENSIONS}")
    return exts


DEFAULT_EXTENSIONS = ("wav", "flac", "ogg", "oga", "opus", "mp3")


@dataclass(frozen=True)
class FeaturizeConfig:
    """What to read, how to label it, and how to lay the shards out."""

    src: URI
    dst: URI
    features: FeatureConfig = field(default_factory=FeatureConfig)
    include: tuple[str, ...] = flag((), "only keys (relative to SRC) matching this glob; repeatable")
    exclude: tuple[str, ...] = flag((), "skip keys matching this glob; repeatable")
    extensions: tuple[str, ...] = flag(DEFAULT_EXTENSIONS,
        f"comma-separated file extensions to read (known: {','.join(AUDIO_EXTENSIONS)})")
    labels: str = flag("folder",
        "'folder' (SRC/<label>/.../<file>: the first folder under SRC is the label, as in torchvision's "
        "ImageFolder), 'none', or the URI of a .csv/.jsonl manifest with uri,label (several rows per file, or "
        "start_s,end_s columns for time spans, give clips several labels: train them with --multi-label)")
    label_depth: int = flag(1,
        "with --labels folder: which folder names the label: 1 the first under SRC (dog/2024-05-01/a.wav is "
        "'dog'), 2 the one below it, -1 the file's own folder")
    files_per_task: int = flag(64, "files per Ray task (many small files are batched)")
    rows_per_shard: int = flag(1024, "clips per Parquet shard")
    rows_per_row_group: int = flag(128, "clips per Parquet row group (the unit a streaming reader fetches)")
    silence_dbfs: float = flag(-70.0,
        "files whose peak stays below this level (dB full scale) are quarantined as silent")
    max_inflight_tasks: int = flag(0, "Ray tasks in flight at once (0: twice the cluster's CPUs)")
    runner: Literal["auto", "local", "ray"] = flag("auto",
        "where batches run: 'ray' (Ray tasks on every CPU of the cluster), 'local' (one after another in this "
        "process, without starting Ray: no start-up cost), 'auto' ('local' when no cluster address is given and "
        f"the work is one batch or under {LOCAL_WORK_BYTES // 2**20} MB of input, else 'ray')")
    keep_audio: bool = flag(False,
        "also store each clip's waveform (16-bit PCM) next to its image, for train --wave-augment (shards "
        "about 2.5x larger, featurize about 1.4x slower); without it show reads clips again from SRC to restyle them")
    fit_clips: bool = flag(True,
        "keep --clip-s even when most recordings are much shorter (by default clips are then fitted to the "
        "recordings: the 90th percentile of a sample's durations, rounded up to 0.25 s, >= 1 s)")
    fit_rate: bool = flag(False,
        "fit the sample rate to where the recordings' sound lies: when 1 % of the energy of a sample of "
        "recordings made at 22.05 kHz or more lies above 7 kHz, as in birdsong, make the features at 32 or 22.05 kHz "
        "with the same frame timing. Off by default: on xc_birds10, 32 kHz with 128 mels scored 0.57 per file "
        "against 0.80 at 16 kHz (make bench-field)")
    use_gpu: bool = flag(False,
        "make the log-mel images on GPUs, in batches (the function classify's --mel-on model uses): the CPU tasks "
        "read, decode, resample and cut, and share their node's GPUs; for GPU nodes, where decoding alone is ~7x "
        "faster per core than decoding and the mel (on CPUs the clip-by-clip mel of the default is faster)")
    overwrite: bool = flag(False, "replace an output made with other features, and redo batches already done")
    address: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.src), "SRC is empty: give an archive URI (s3://bucket/prefix, a folder, file://...)")
        require(bool(self.dst), "DST is empty: give an output URI")
        require(self.src.rstrip("/") != self.dst.rstrip("/"), "SRC and DST are the same place: choose another DST")
        require(not inside(self.dst, self.src), f"DST {self.dst} is inside SRC {self.src}: the archive would hold its "
                "own features (a later run or a scan of SRC lists them too); choose a DST outside SRC")
        object.__setattr__(self, "extensions", _extensions(self.extensions))
        require(self.labels in LABEL_SOURCES or "." in self.labels.rsplit("/", 1)[-1],
                 f"labels={self.labels!r}: use 'folder', 'none', or the URI of a .csv/.jsonl manifest (uri,label)")
        require(self.label_depth != 0, "label_depth=0: 1 is the first folder under SRC, 2 the one below it, "
                 "-1 the file's own folder")
        require(self.files_per_task >= 1, "files_per_task must be >= 1")
        require(self.rows_per_row_group >= 1, "rows_per_row_group must be >= 1")
        require(self.rows_per_shard >= self.rows_per_row_group,
                 f"rows_per_shard={self.rows_per_shard} < rows_per_row_group={self.rows_per_row_group}: "
                 "a shard holds whole row groups")
        require(self.silence_dbfs < 0, f"silence_dbfs={self.silence_dbfs}: must be negative (dB full scale)")
        require(self.max_inflight_tasks >= 0, "max_inflight_tasks must be >= 0 (0 = twice the cluster's CPUs)")
        require(self.runner in ("auto", "local", "ray"), f"runner={self.runner!r}: 'auto', 'local' or 'ray'")
