"""Bytes → waveform: decode, mix to mono, resample and cut into clips, as a stream.

The decoded signal is never held whole: a file is read in blocks, resampled block by block (with
enough context on both sides that the result equals resampling the whole signal), and cut into
fixed-length clips as the blocks arrive. Memory per file is a few blocks, whatever its length.

Decoders, in order: soundfile (libsndfile: wav, flac, ogg/vorbis/opus, mp3, aiff…), then torchcodec
(FFmpeg: m4a/aac and the rest) when it is installed. Every failure becomes a :class:`DecodeError`
with a ``kind`` from :data:`~melbatch.shards.QUARANTINE_KINDS`, so callers can quarantine it with its reason.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import soundfile as sf
import torch
import torchaudio

from melbatch.config import FeatureConfig
from melbatch.shards import QUARANTINE_KINDS

BLOCK_S = 10.0  # seconds of source audio decoded per read
MAX_CHANNELS = 64
MIN_RATE_HZ, MAX_RATE_HZ = 1000, 768_000
# A stream is called truncated when it decodes this much less than its header declared.
TRUNCATION_TOLERANCE = 0.01
# Float samples beyond this peak (+60 dBFS) are no recording: 32-bit float masters keep a few dB of
# headroom (rarely past +24 dBFS, 16.0), and past ~1e17 the power spectrum overflows float32 to +inf,
# which poisoned shards, losses and embeddings (issue 44: a finite 1e30 sine became an all-inf log-mel).
MAX_PEAK = 1000.0

class DecodeError(Exception):
    """A file cannot become clips; ``kind`` is a key of :data:`~melbatch.shards.QUARANTINE_KINDS`."""

    def __init__(self, kind: str, message: str, decoders_tried: tuple[str, ...] = ()):
        assert kind in QUARANTINE_KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.decoders_tried = decoders_tried


@dataclass
class AudioInfo:
    """What the decoder found, filled in as the stream is read."""

    decoder: str
    sample_rate_hz: int
    channels: int
    declared_frames: int | None
    container: str
    decoded_frames: int = 0
    peak: float = 0.0
    decoders_tried: tuple[str, ...] = ()


@dataclass(frozen=True)
class Clip:
    """One fixed-length window of mono audio at the feature sample rate (zero-padded at a tail)."""

    index: int
    start_s: float
    end_s: float  # end of the real audio in this clip (before padding)
    samples: np.ndarray = field(repr=False)


# ---------------------------------------------------------------------------------------------
# container sniffing: the first bytes say what a file is, whatever its name

_MAGIC: list[tuple[Callable[[bytes], bool], str]] = [
    (lambda b: b[:4] in (b"RIFF", b"RIFX", b"RF64") and b[8:12] == b"WAVE", "wav"),
    (lambda b: b[:4] == b"fLaC", "flac"),
    (lambda b: b[:4] == b"OggS", "ogg"),
    (lambda b: b[:3] == b"ID3" or (len(b) > 1 and b[0] == 0xFF and (b[1] & 0xE0) == 0xE0), "mp3"),
    (lambda b: b[4:8] == b"ftyp", "mp4"),
    (lambda b: b[:4] == b"FORM" and b[8:12] in (b"AIFF", b"AIFC"), "aiff"),
    (lambda b: b[:4] == b"caff", "caf"),
    (lambda b: b[:4] == b".snd", "au"),
]


def sniff_container(head: bytes) -> str | None:
    for test, name in _MAGIC:
        if test(head):
            return name
    return None


HEAD_BYTES = 4096  # enough for the format fields of WAV (after LIST/bext chunks), AIFF, AU and FLAC


def declared_format(head: bytes) -> tuple[int, int] | None:
    """(sample rate in Hz, channels) as the header of a WAV, AIFF, AU or FLAC file declares them,
    read by melbatch itself (``None`` when the head holds no such header). Used to name a file whose
    header declares impossible values, which the decoders only call unreadable."""
    try:
        if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
            i = _chunk(head, b"fmt ", "<")
            if i is not None:
                channels, rate = struct.unpack("<HI", head[i + 2: i + 8])
                return rate, channels
        elif head[:4] == b".snd":
            rate, channels = struct.unpack(">II", head[16:24])
            return rate, channels
        elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
            i = _chunk(head, b"COMM", ">")
            if i is not None:
                channels = struct.unpack(">h", head[i: i + 2])[0]
                exp, mant = struct.unpack(">HQ", head[i + 8: i + 18])  # 80-bit extended float
                rate = 0 if mant == 0 else round(mant * 2.0 ** ((exp & 0x7FFF) - 16383 - 63))
                return rate, channels
        elif head[:4] == b"fLaC" and head[4] & 0x7F == 0:  # STREAMINFO is the first metadata block
            v = int.from_bytes(head[18:26], "big")
            return (v >> 44) & 0xFFFFF, ((v >> 41) & 7) + 1
    except (struct.error, OverflowError):
        return None
    return None


def _chunk(head: bytes, cid: bytes, endian: str) -> int | None:
    """Where the body of chunk ``cid`` starts in a RIFF (``<``) or IFF (``>``) head, if it is there."""
    i = 12
    while i + 8 <= len(head):
        size = struct.unpack(endian + "I", head[i + 4: i + 8])[0]
        if head[i: i + 4] == cid:
            return i + 8
        i += 8 + size + (size & 1)
    return None


def _impossible(rate: int, channels: int) -> bool:
    return not (MIN_RATE_HZ <= rate <= MAX_RATE_HZ) or not (1 <= channels <= MAX_CHANNELS)


# ---------------------------------------------------------------------------------------------
# decoders: each returns (AudioInfo, iterator of float32 mono blocks at the source rate)

Blocks = Iterator[np.ndarray]


def _check_header(rate: int, channels: int, tried: tuple[str, ...]) -> None:
    if _impossible(rate, channels):
        raise DecodeError("bad_header", f"header declares {rate} Hz and {channels} channels; melbatch reads "
                          f"{MIN_RATE_HZ}-{MAX_RATE_HZ} Hz and 1-{MAX_CHANNELS} channels", tried)


def _declared_frames_soundfile(f: sf.SoundFile) -> int | None:
    # libsndfile quietly shortens a truncated WAV to what is there; its log keeps the declared size.
    m = re.search(r"data : (\d+) \(should be (\d+)\)", f.extra_info or "")
    if m and f.format in ("WAV", "WAVEX", "RF64", "W64"):
        declared_bytes, actual_bytes = int(m.group(1)), int(m.group(2))
        if actual_bytes < declared_bytes:
            if actual_bytes == 0:  # a header and no data at all
                return declared_bytes // (f.channels * _SAMPLE_BYTES.get(f.subtype, 2))
            return f.frames * declared_bytes // actual_bytes
    return f.frames if f.frames > 0 else None


_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4,
                 "DOUBLE": 8}


def _decode_soundfile(stream: IO[bytes], tried: tuple[str, ...]) -> tuple[AudioInfo, Blocks]:
    f = sf.SoundFile(stream)
    _check_header(f.samplerate, f.channels, tried)
    info = AudioInfo("soundfile", f.samplerate, f.channels, _declared_frames_soundfile(f),
                     f.format.lower(), decoders_tried=tried)
    block = max(1, round(BLOCK_S * f.samplerate))

    def blocks() -> Blocks:
        with f:
            while True:
                try:
                    x = f.read(block, dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError) as e:
                    if info.declared_frames and getattr(stream, "at_end", False):
                        # the decoder failed on the last bytes there are, short of what the header declares
                        raise DecodeError("truncated", f"the data ends before the {info.declared_frames} frames the "
                                          f"header declares (soundfile: {_clean(str(e))})", tried) from None
                    raise DecodeError("corrupt", f"soundfile: {_clean(str(e))} after {info.decoded_frames} frames",
                                      tried) from None
                if len(x) == 0:
                    return
                yield x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
                if len(x) < block:
                    return

    return info, blocks()


def _decode_torchcodec(stream: IO[bytes], tried: tuple[str, ...]) -> tuple[AudioInfo, Blocks]:
    from torchcodec.decoders import AudioDecoder  # optional: needs FFmpeg's shared libraries

    stream.seek(0)
    dec = AudioDecoder(stream)
    meta = dec.metadata
    rate, channels = int(meta.sample_rate or 0), int(meta.num_channels or 0)
    _check_header(rate, channels, tried)
    duration = meta.duration_seconds_from_header
    declared = round(duration * rate) if duration else None
    info = AudioInfo("torchcodec", rate, channels, declared, str(meta.codec or "ffmpeg"), decoders_tried=tried)

    def blocks() -> Blocks:
        start, block = 0.0, round(BLOCK_S * rate)
        while True:
            try:
                s = dec.get_samples_played_in_range(start, start + BLOCK_S)
            except (RuntimeError, ValueError) as e:
                if start > 0 and "No audio frames" in str(e):
                    return  # the previous block ended exactly at the end of the stream
                raise DecodeError("corrupt", f"torchcodec: {e}", tried) from None
            x = s.data.numpy().astype(np.float32, copy=False)
            if x.shape[-1]:
                yield x.mean(axis=0) if x.shape[0] > 1 else x[0]
            if x.shape[-1] < block:
                return
            start += BLOCK_S

    return info, blocks()


DECODERS: list[tuple[str, Callable[[IO[bytes], tuple[str, ...]], tuple[AudioInfo, Blocks]]]] = [
    ("soundfile", _decode_soundfile),
    ("torchcodec", _decode_torchcodec),
]


def open_audio(stream: IO[bytes]) -> tuple[AudioInfo, Blocks]:
    """Open a seekable byte stream with the first decoder that understands it.

    Returns the decoder's info and an iterator of mono float32 blocks at the source rate. The
    iterator checks samples as they pass (NaN/Inf, peak, decoded length) and raises
    :class:`DecodeError` for truncation at its end.
    """
    head = stream.read(HEAD_BYTES)
    if not head:
        raise DecodeError("empty", "the object has zero bytes")
    container = sniff_container(head)
    errors: list[str] = []
    tried: list[str] = []
    for name, decode in DECODERS:
        tried.append(name)
        stream.seek(0)
        try:
            info, blocks = decode(stream, tuple(tried))
        except DecodeError as e:
            if e.kind == "bad_header":
                raise
            errors.append(f"{name}: {e.message}")
        except ImportError as e:
            errors.append(f"{name}: not installed ({e.name or e}); "
                          "pip install torchcodec and FFmpeg to read more formats")
        except Exception as e:
            errors.append(f"{name}: {_clean(str(e))}")
        else:
            return info, _checked(info, blocks)
    detail = "; ".join(errors)
    declared = declared_format(head)
    if declared and _impossible(*declared):  # what the decoders could not read, its header explains
        _check_header(*declared, tuple(tried))
    if container is None:
        raise DecodeError("not_audio", f"not a known audio format (first bytes {head[:8]!r}); {detail}", tuple(tried))
    unsupported = container == "mp4" and any("not installed" in e for e in errors)
    kind = "unsupported_format" if unsupported else "corrupt"
    raise DecodeError(kind, f"{container} container that no decoder could read: {detail}", tuple(tried))


def _clean(message: str) -> str:
    """Drop the Python object repr that libsndfile's messages carry ("Error opening <... at 0x..>:")."""
    return re.sub(r"Error opening <[^>]*>: ", "", message).strip()


def _checked(info: AudioInfo, blocks: Blocks) -> Blocks:
    for x in blocks:
        if not np.isfinite(x).all():
            raise DecodeError("non_finite", f"NaN or infinite samples after {info.decoded_frames} frames",
                              info.decoders_tried)
        if len(x):
            peak = float(np.abs(x).max())
            if peak > MAX_PEAK:
                raise DecodeError("out_of_range", f"sample magnitude {peak:.3g} after {info.decoded_frames} frames, "
                                  f"{20 * math.log10(peak):.0f} dBFS (float audio is read up to {MAX_PEAK:g}, "
                                  f"+{20 * math.log10(MAX_PEAK):.0f} dBFS): rescale the file", info.decoders_tried)
            info.peak = max(info.peak, peak)
        info.decoded_frames += len(x)
        yield x
    declared = info.declared_frames
    if declared and info.decoded_frames < declared * (1 - TRUNCATION_TOLERANCE) - 0.1 * info.sample_rate_hz:
        raise DecodeError("truncated", f"decoded {info.decoded_frames} of {declared} declared frames "
                          f"({info.decoded_frames / declared:.0%})", info.decoders_tried)
    if info.decoded_frames == 0:
        raise DecodeError("corrupt", "the container holds no decodable samples", info.decoders_tried)


# ---------------------------------------------------------------------------------------------
# resampling a stream exactly as if it were one signal

LOWPASS_FILTER_WIDTH, ROLLOFF = 6, 0.99  # torchaudio's defaults


def resample_stream(blocks: Blocks, orig_hz: int, new_hz: int) -> Blocks:
    """Resample an iterator of blocks with torchaudio; the output equals resampling the joined signal.

    Each chunk is resampled with ``ctx`` samples of real neighbouring audio on both sides (zeros at
    the true ends, as torchaudio pads), and only its own part of the output is kept. Chunks start on
    multiples of the reduced input period, so the filter phases line up across chunk borders.
    """
    if orig_hz == new_hz:
        yield from blocks
        return
    g = math.gcd(orig_hz, new_hz)
    o, n = orig_hz // g, new_hz // g
    width = math.ceil(LOWPASS_FILTER_WIDTH * o / (min(o, n) * ROLLOFF))
    ctx = o * math.ceil((width + o) / o)
    step = o * max(1, round(BLOCK_S * orig_hz) // o)
    resampler = torchaudio.transforms.Resample(orig_hz, new_hz, lowpass_filter_width=LOWPASS_FILTER_WIDTH,
                                               rolloff=ROLLOFF)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return resampler(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    hist = np.zeros(ctx, np.float32)
    pending = np.zeros(0, np.float32)
    for b in blocks:
        pending = np.concatenate([pending, b.astype(np.float32, copy=False)])
        while len(pending) >= step + ctx:
            y = run(np.concatenate([hist, pending[: step + ctx]]))
            yield y[ctx * n // o: (ctx + step) * n // o]
            hist = np.concatenate([hist, pending[:step]])[-ctx:]
            pending = pending[step:]
    if len(pending):
        y = run(np.concatenate([hist, pending, np.zeros(ctx, np.float32)]))
        yield y[ctx * n // o: ctx * n // o + math.ceil(len(pending) * n / o)]


# ---------------------------------------------------------------------------------------------
# cutting a stream into clips

def cut_clips(blocks: Blocks, cfg: FeatureConfig) -> Iterator[Clip]:
    """Fixed windows of ``clip_s`` every ``clip_hop_s``; the tail follows ``cfg.tail``.

    With ``tail="pad"`` the first window that runs past the end is kept, zero-padded, when it holds
    at least ``min_tail_s`` of audio (later windows would only be shorter copies of it). A file
    shorter than one clip becomes one padded clip under the same rule.
    """
    size, hop, sr = cfg.clip_samples, cfg.clip_hop_samples, cfg.sample_rate_hz
    buf = np.zeros(0, np.float32)
    buf_start = 0  # sample index of buf[0] in the whole signal
    index = 0
    for b in blocks:
        buf = np.concatenate([buf, b])
        while True:
            start = index * hop
            lo = start - buf_start
            if lo + size > len(buf):
                break
            yield Clip(index, start / sr, (start + size) / sr, buf[lo: lo + size].copy())
            index += 1
        drop = min(index * hop - buf_start, len(buf))
        if drop > 0:
            buf, buf_start = buf[drop:], buf_start + drop
    start = index * hop
    remaining = buf_start + len(buf) - start
    if cfg.tail == "pad" and remaining >= cfg.min_tail_samples:
        lo = start - buf_start
        clip = np.zeros(size, np.float32)
        clip[:remaining] = buf[lo: lo + remaining]
        yield Clip(index, start / sr, (start + remaining) / sr, clip)


def decode_clips(stream: IO[bytes], cfg: FeatureConfig) -> tuple[AudioInfo, Iterator[Clip]]:
    """Open, decode, mix to mono, resample to ``cfg.sample_rate_hz`` and cut into clips, lazily."""
    info, blocks = open_audio(stream)
    return info, cut_clips(resample_stream(blocks, info.sample_rate_hz, cfg.sample_rate_hz), cfg)


def decode_all(stream: IO[bytes], sample_rate_hz: int) -> tuple[AudioInfo, np.ndarray]:
    """The whole file as one mono signal at ``sample_rate_hz`` (for pictures and tests, not archives)."""
    return decode_span(stream, sample_rate_hz)


def decode_span(stream: IO[bytes], sample_rate_hz: int, start_s: float = 0.0,
                seconds: float | None = None) -> tuple[AudioInfo, np.ndarray]:
    """``[start_s, start_s + seconds)`` of a file (all of it from ``start_s`` with ``None``), mono at
    ``sample_rate_hz``: decoded block by block up to the span's end and no further, so ten seconds
    of a day-long recording cost ten seconds of memory (and the decoding up to them)."""
    info, blocks = open_audio(stream)
    a = int(start_s * sample_rate_hz)
    b = None if seconds is None else a + int(seconds * sample_rate_hz)
    parts, at = [], 0  # ``at``: the first sample of the next block
    for x in resample_stream(blocks, info.sample_rate_hz, sample_rate_hz):
        lo, hi = max(a - at, 0), len(x) if b is None else min(b - at, len(x))
        if lo < hi:
            parts.append(x[lo:hi])
        at += len(x)
        if b is not None and at >= b:
            break
    return info, np.concatenate(parts) if parts else np.zeros(0, np.float32)
