"""Sample archives for demos, tests and benchmarks, generated on the spot.

* ``engine``: healthy vs faulty machines. Healthy is a harmonic hum (a random shaft rate and its
  harmonics); faulty adds periodic knocks (a decaying high resonance) and bearing noise (band noise
  modulated at a ball-pass rate). Pure numpy, always available.
* ``voice``: male vs female speech from espeak-ng's voices (needs the ``espeak-ng`` program).

Files rotate through wav/flac/ogg/mp3, several sample rates and mono/stereo, as a real archive
would. ``bad=True`` adds one object of every bad-input kind melbatch quarantines.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from melbatch import storage

URI = str
KINDS = ("engine", "voice")
# (container, subtype, extension) and the rates/channel counts the generator rotates through
FORMATS = [("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg"),
           ("MP3", "MPEG_LAYER_III", "mp3")]
RATES = [16_000, 44_100, 22_050, 48_000, 8_000]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "please call me back after the meeting",
    "the weather today is cloudy with a chance of rain", "turn left at the second traffic light",
    "my order number is four five six seven", "thank you for waiting, an agent will answer soon",
    "the engine makes a strange noise in the morning", "we will ship the parcel on monday",
]


@dataclass(frozen=True)
class SampleFile:
    uri: URI
    label: str
    bad_kind: str | None = None  # the quarantine kind melbatch should report, for bad files


def encode(x: np.ndarray, sr: int, fmt: tuple[str, str, str]) -> bytes:
    """float32 samples (frames[, channels]) → bytes of the given container."""
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt[0], subtype=fmt[1])
    return buf.getvalue()


def engine_sound(rng: np.random.Generator, seconds: float, sr: int, faulty: bool) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    shaft = rng.uniform(25, 60)  # Hz
    x = np.zeros_like(t)
    for k in range(1, 12):
        if shaft * k < sr / 2:
            x += rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * shaft * k * t + rng.uniform(0, 2 * np.pi))
    x *= 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t)  # slow load wobble
    x += 0.02 * rng.standard_normal(len(t))
    if faulty:
        # fault cues stay well below Nyquist, so they survive low rates and lossy codecs (mp3 at 8 kHz
        # keeps little above 3 kHz): knocks ring at 1.2-3.5 kHz, bearings whine in a 2:1 band above 1.2 kHz
        knock_hz, res_hz = rng.uniform(3, 8), min(rng.uniform(1800, 3500), 0.25 * sr)
        env = np.exp(-((t % (1 / knock_hz)) / 0.006))
        x += 0.8 * env * np.sin(2 * np.pi * res_hz * t)
        noise = rng.standard_normal(len(t))
        spec = np.fft.rfft(noise)
        f = np.fft.rfftfreq(len(noise), 1 / sr)
        lo = min(3000.0, 0.15 * sr)
        spec[(f < lo) | (f > 2 * lo)] = 0
        band = np.fft.irfft(spec, len(noise))
        x += 0.5 * band / (np.abs(band).max() + 1e-9) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(80, 160) * t))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def voice_sound(rng: np.random.Generator, seconds: float, female: bool) -> tuple[np.ndarray, int]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("the voice sample archive needs espeak-ng: apt-get install espeak-ng (or use --kind engine)")
    variant = f"f{rng.integers(1, 5)}" if female else f"m{rng.integers(1, 7)}"
    pitch = int(rng.integers(55, 90) if female else rng.integers(10, 40))
    words = " ".join(rng.choice(SENTENCES, size=3, replace=False))
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run([exe, "-v", f"en+{variant}", "-p", str(pitch), "-s", str(int(rng.integers(140, 190))),
                        "-w", tmp.name, words], check=True, capture_output=True)
        x, sr = sf.read(tmp.name, dtype="float32")
    n = int(seconds * sr)
    x = np.pad(x, (0, max(0, n - len(x))))[:n]
    return (x + 0.003 * rng.standard_normal(len(x)).astype(np.float32)).astype(np.float32), sr


def make_archive(dst: URI, kind: str = "engine", files_per_class: int = 12, seconds: float = 8.0,
                 seed: int = 0, bad: bool = False) -> list[SampleFile]:
    """Write a labelled archive ``dst/<label>/<name>.<ext>``; returns what was written."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
    dst = storage.canonical(dst)  # SampleFile.uri is spelled as melbatch spells object URIs
    rng = np.random.default_rng(seed)
    labels = ("healthy", "faulty") if kind == "engine" else ("male", "female")
    out: list[SampleFile] = []
    for i in range(files_per_class):
        for j, label in enumerate(labels):
            # every label gets every format, rate and channel count equally often: a format or rate
            # that went with one label would be a shortcut a model learns instead of the sound
            fmt = FORMATS[(i + 2 * j) % len(FORMATS)]
            channels = 1 + (i // 2 + j) % 2
            if kind == "engine":
                sr = RATES[(2 * i + j) % len(RATES)]
                x = engine_sound(rng, seconds, sr, faulty=j == 1)
            else:
                x, sr = voice_sound(rng, seconds, female=j == 1)
            if channels == 2:
                x = np.stack([x, 0.8 * x], axis=1)
            uri = storage.join(dst, label, f"{label}_{i:04d}.{fmt[2]}")
            storage.write_bytes(uri, encode(x, sr, fmt))
            out.append(SampleFile(uri, label))
    if bad:
        out += write_bad_files(dst, labels[0], rng)
    return out


def write_bad_files(dst: URI, label: str, rng: np.random.Generator) -> list[SampleFile]:
    """One object of each bad kind, inside a class folder so that only its content is wrong."""
    sr = 16_000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * sr) / sr)).astype(np.float32)
    wav = encode(tone, sr, FORMATS[0])
    flac = encode(tone, sr, FORMATS[1])
    nan = tone.copy()
    nan[100:200] = np.nan
    bad = {
        "empty.wav": (b"", "empty"),
        "noise_bytes.wav": (rng.bytes(4096), "not_audio"),
        "notes.mp3": (b"this is a text file, not audio\n" * 40, "not_audio"),
        "truncated.wav": (wav[: len(wav) // 3], "truncated"),
        "truncated.flac": (flac[: len(flac) // 2], "corrupt"),
        "broken_header.wav": (wav[:12] + rng.bytes(400), "corrupt"),
        "silent.flac": (encode(np.zeros(2 * sr, np.float32), sr, FORMATS[1]), "silent"),
        "too_short.wav": (encode(tone[: sr // 5], sr, FORMATS[0]), "too_short"),
        "nan_samples.wav": (encode(nan, sr, ("WAV", "FLOAT", "wav")), "non_finite"),
    }
    out = []
    for name, (data, kind) in bad.items():
        uri = storage.join(dst, label, f"bad_{name}")
        storage.write_bytes(uri, data)
        out.append(SampleFile(uri, label, kind))
    return out
