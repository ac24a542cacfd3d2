"""Sample archives for demos, tests and benchmarks, generated on the spot.

* ``engine``: healthy vs faulty machines. Healthy is a harmonic hum (a random shaft rate and its
  harmonics); faulty adds periodic knocks (a decaying high resonance) and bearing noise (band noise
  modulated at a ball-pass rate). Pure numpy, always available.
* ``voice``: male vs female speech from espeak-ng's voices (needs the ``espeak-ng`` program).

Files rotate through wav/flac/ogg/mp3, several sample rates and mono/stereo, as a real archive
would. ``bad=True`` adds one object of every bad-input kind melbatch quarantines.

:func:`field_shifted` puts real recordings through a phone line, a codec, noise, a room, a gain or
a tempo change: the field a model meets after training (bench/field.py, tests/test_transfer.py).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from melbatch import URI, storage

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
    """float32 samples (frames[, channels]) → bytes of the given container, written a second at a time:
    libsndfile's Vorbis encoder crashed the process (SIGSEGV) on one write of 50 s at 44.1 kHz
    (`sample-archive --seconds 50`, issue 44); a second at a time it wrote 300 s."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, 1 if x.ndim == 1 else x.shape[1], format=fmt[0], subtype=fmt[1]) as f:
        for s in range(0, len(x), max(1, sr)):
            f.write(x[s: s + sr])
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


MIXTURE_SOURCES = ("beep", "hiss", "hum")  # what a mixture archive's files hold, several at once
MIXTURE_MANIFEST = "labels.csv"


def mixture_sound(rng: np.random.Generator, seconds: float, sr: int, sources: set[str],
                  spans: dict[str, tuple[float, float]] | None = None) -> np.ndarray:
    """Several sources at once over a faint noise floor: ``hum`` (a 50-120 Hz hum and its harmonics),
    ``beep`` (1-1.5 kHz tone pips, 0.1 s on and 0.2 s off), ``hiss`` (noise in 4.5-7 kHz). A source
    in ``spans`` sounds only from its start to its end (seconds)."""
    t = np.arange(int(seconds * sr)) / sr
    x = 0.01 * rng.standard_normal(len(t))
    for name in sorted(sources):
        if name == "hum":
            f0 = rng.uniform(50, 120)
            part = sum(rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3))
                       for k in range(1, 6))
        elif name == "beep":
            part = np.sin(2 * np.pi * rng.uniform(1000, 1500) * t) * ((t % 0.3) < 0.1)
        else:
            spec = np.fft.rfft(rng.standard_normal(len(t)))
            f = np.fft.rfftfreq(len(t), 1 / sr)
            spec[(f < 4500) | (f > min(7000, 0.45 * sr))] = 0
            part = np.fft.irfft(spec, len(t))
            part /= np.abs(part).max() + 1e-9
        if spans and name in spans:
            a, b = spans[name]
            part = part * ((t >= a) & (t < b))
        x = x + rng.uniform(0.5, 1.0) * part / (np.abs(part).max() + 1e-9)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def make_mixture_archive(dst: URI, files_per_set: int = 4, seconds: float = 4.0, seed: int = 0,
                         spans: int = 0) -> tuple[list[SampleFile], URI]:
    """A multi-label archive: files ``dst/mix_NNNN.wav`` (16 kHz) each holding one of the seven non-empty
    sets of :data:`MIXTURE_SOURCES` (``files_per_set`` of each), and ``dst/labels.csv`` with a row per
    file and label. With ``spans``, that many more files hold a hum throughout and a beep only in their
    first 2 seconds, labelled with a ``start_s,end_s`` row for the beep. Returns the files (label: their
    label string) and the manifest's URI."""
    import csv
    import itertools

    dst = storage.canonical(dst)
    rng = np.random.default_rng(seed)
    sets = [set(c) for k in (1, 2, 3) for c in itertools.combinations(MIXTURE_SOURCES, k)]
    out: list[SampleFile] = []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["uri", "label", "start_s", "end_s"])
    for i in range(files_per_set * len(sets) + spans):
        name = f"mix_{i:04d}.wav"
        if i < files_per_set * len(sets):
            sources = sets[i % len(sets)]
            x = mixture_sound(rng, seconds, 16_000, sources)
            w.writerows([name, s, "", ""] for s in sorted(sources))
        else:
            sources = {"hum", "beep"}
            x = mixture_sound(rng, seconds, 16_000, sources, {"beep": (0.0, 2.0)})
            w.writerows([[name, "hum", "", ""], [name, "beep", "0", "2"]])
        uri = storage.join(dst, name)
        storage.write_bytes(uri, encode(x, 16_000, FORMATS[0]))
        out.append(SampleFile(uri, ";".join(sorted(sources))))
    manifest = storage.join(dst, MIXTURE_MANIFEST)
    storage.write_bytes(manifest, buf.getvalue().encode())
    return out, manifest


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
        "truncated.flac": (flac[: len(flac) // 2], "truncated"),
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


# --------------------------------------------------------------------------------------------- bad corpus

def _wav_bytes(pcm: bytes, rate: int = 16_000, channels: int = 1, bits: int = 16, data_len: int | None = None) -> bytes:
    """A PCM WAV whose header fields are taken as given, however absurd (0 Hz, 65535 channels, 4 GB data)."""
    block = channels * bits // 8
    size = len(pcm) if data_len is None else data_len
    return (b"RIFF" + struct.pack("<I", min(36 + size, 0xFFFFFFFF)) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits) +
            b"data" + struct.pack("<I", size) + pcm)


def _au_bytes(pcm_be: bytes, rate: int, channels: int) -> bytes:
    return b".snd" + struct.pack(">IIIII", 24, len(pcm_be), 3, rate, channels) + pcm_be


def _aiff_zero_rate(pcm_be: bytes) -> bytes:
    comm = struct.pack(">hIh", 1, len(pcm_be) // 2, 16) + bytes(10)  # 80-bit rate of 0
    ssnd = struct.pack(">II", 0, 0) + pcm_be
    body = b"AIFF" + b"COMM" + struct.pack(">I", len(comm)) + comm + b"SSND" + struct.pack(">I", len(ssnd)) + ssnd
    return b"FORM" + struct.pack(">I", len(body)) + body


def _flac_total_samples(flac: bytes, total: int) -> bytes:
    """A FLAC whose STREAMINFO declares ``total`` samples."""
    b = bytearray(flac)
    v = int.from_bytes(b[18:26], "big")
    b[18:26] = ((v & ~((1 << 36) - 1)) | total).to_bytes(8, "big")
    return bytes(b)


# Folder and file names of real archives: spaces, unicode, %, +, #, =, &, brackets, nested prefixes.
ODD_DIRS = ["", "nested/deeper/", "with space/", "ünïcödé/ñ/", "100% done/", "a+b=c & d/", "[take 2] (final)/",
            "#hash/"]


def bad_corpus(seed: int = 0) -> list[tuple[str, bytes, str]]:
    """At least 100 broken objects as ``(relative key, bytes, kind)``, ``kind`` the quarantine kind
    melbatch must give each (every key of :data:`~melbatch.shards.QUARANTINE_KINDS` but ``read_error`` and
    ``unlabelled``, which come from storage and labels, not from bytes). Deterministic for a seed."""
    c = _Corpus(np.random.default_rng(seed))
    sr = 16_000
    t = np.arange(3 * sr) / sr
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    _cut_short(c, tone, sr)
    _not_audio(c)
    _bad_headers(c, tone, sr)
    _bad_samples(c, tone, sr)
    return c.items


class _Corpus:
    """The broken objects made so far, each under one of the odd folders in turn, and the seeded draws."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.items: list[tuple[str, bytes, str]] = []

    def add(self, name: str, data: bytes, kind: str) -> None:
        n = len(self.items)
        self.items.append((f"{ODD_DIRS[n % len(ODD_DIRS)]}{kind}/{n:03d} {name}", data, kind))

    def cut(self, data: bytes, lo: float, hi: float) -> bytes:
        return data[: int(len(data) * self.rng.uniform(lo, hi))]


def _cut_short(c: _Corpus, tone: np.ndarray, sr: int) -> None:
    """Empty files, files cut anywhere (truncated; corrupt where a container cannot tell), sizes that lie."""
    rng = c.rng
    pcm = (tone * 32767).astype("<i2").tobytes()
    wav, flac = encode(tone, sr, FORMATS[0]), encode(tone, sr, FORMATS[1])
    ogg, mp3 = encode(tone, sr, FORMATS[2]), encode(tone, sr, FORMATS[3])
    for ext in ("wav", "flac", "ogg", "mp3", "WAV", "m4a"):
        c.add(f"zero bytes.{ext}", b"", "empty")
    for i in range(12):
        c.add(f"wav cut at random {i}.wav", c.cut(wav, 0.03, 0.9), "truncated")
    for i in range(10):
        c.add(f"flac cut at random {i}.flac", flac[: int(rng.integers(100, int(0.9 * len(flac))))], "truncated")
    for i in range(6):
        c.add(f"mp3 cut at random {i}.mp3", c.cut(mp3, 0.2, 0.8), "truncated")
    c.add("wav header, no data.wav", wav[:44], "truncated")
    c.add("wav declares 4 GB of data.wav", _wav_bytes(pcm, data_len=0xFFFFFFF0), "truncated")
    c.add("flac declares 2^36 samples.flac", _flac_total_samples(flac, (1 << 36) - 1), "truncated")
    for i in range(4):
        c.add(f"ogg cut at random {i}.ogg", c.cut(ogg, 0.2, 0.8), "corrupt")
    for i in range(4):
        c.add(f"wav cut in its header {i}.wav", wav[: int(rng.integers(13, 40))], "corrupt")
    for i in range(2):
        c.add(f"wav cut in its magic {i}.wav", wav[: int(rng.integers(1, 11))], "not_audio")


def _not_audio(c: _Corpus) -> None:
    """Random bytes behind a format's magic (corrupt), and text, pictures, archives and noise named as audio."""
    rng = c.rng
    magic = {"wav": lambda: b"RIFF" + rng.bytes(4) + b"WAVE", "flac": lambda: b"fLaC", "ogg": lambda: b"OggS",
             "mp3": lambda: b"ID3", "aiff": lambda: b"FORM" + rng.bytes(4) + b"AIFF",
             "m4a": lambda: rng.bytes(4) + b"ftyp"}
    for i in range(14):
        ext = list(magic)[i % len(magic)]
        c.add(f"random bytes behind {ext} magic {i}.{ext}", magic[ext]() + rng.bytes(int(rng.integers(200, 6000))),
              "corrupt")
    c.add("mp3 frame sync then random.mp3", b"\xff\xfb" + rng.bytes(5000), "corrupt")
    not_audio = [("notes.wav", b"meeting notes, not audio\n" * 50), ("page.flac", b"<!doctype html><html></html>"),
                 ("data.mp3", b'{"samples": [1, 2, 3]}'), ("image.ogg", b"\x89PNG\r\n\x1a\n" + rng.bytes(800)),
                 ("photo.wav", b"\xff\xd8\xff\xe0" + rng.bytes(800)), ("archive.flac", b"PK\x03\x04" + rng.bytes(300)),
                 ("doc.mp3", b"%PDF-1.7\n" + rng.bytes(500)), ("zeros.wav", bytes(70_000)),
                 ("script.ogg", b"#!/bin/sh\nrm -rf /\n"), ("spreadsheet.m4a", b"a,b,c\n1,2,3\n" * 20)]
    for name, data in not_audio:
        c.add(name, data, "not_audio")
    for i in range(4):  # random bytes that start like nothing we know (a first byte of 0xFF would look like mp3)
        c.add(f"noise bytes {i}.wav", bytes([int(rng.integers(0, 0xFF))]) + rng.bytes(4000), "not_audio")


def _bad_headers(c: _Corpus, tone: np.ndarray, sr: int) -> None:
    """Headers with absurd rates and channel counts (WAV, AU, AIFF)."""
    pcm = (tone * 32767).astype("<i2").tobytes()
    absurd = [("0 Hz", _wav_bytes(pcm, rate=0)), ("4 GHz", _wav_bytes(pcm, rate=4_000_000_000)),
              ("500 Hz", _wav_bytes(pcm, rate=500)), ("1 MHz", _wav_bytes(pcm, rate=1_000_000)),
              ("65535 channels", _wav_bytes(pcm, channels=65535)), ("0 channels", _wav_bytes(pcm, channels=0)),
              ("100 channels", _wav_bytes(pcm[: len(pcm) // 100 * 100], channels=100))]
    for what, data in absurd:
        c.add(f"wav at {what}.wav", data, "bad_header")
    be = (tone * 32767).astype(">i2").tobytes()
    for what, data in (("a billion channels", _au_bytes(be, sr, 10**9)), ("0 Hz", _au_bytes(be, 0, 1)),
                       ("3 GHz", _au_bytes(be, 3_000_000_000, 1)), ("random header", b".snd" + c.rng.bytes(3000))):
        c.add(f"au with {what}.au.wav", data, "bad_header")
    c.add("aiff at 0 Hz.aiff", _aiff_zero_rate(be), "bad_header")


FLOAT_WAV = ("WAV", "FLOAT", "wav")


def _bad_samples(c: _Corpus, tone: np.ndarray, sr: int) -> None:
    """Good headers over bad samples: NaN and infinity, silence, clips too short to keep."""
    for i, (where, value) in enumerate([("start", np.nan), ("middle", np.nan), ("end", np.inf), ("middle", -np.inf)]):
        x = tone.copy()
        at = {"start": 0, "middle": len(x) // 2, "end": len(x) - 10}[where]
        x[at: at + 10] = value
        c.add(f"{value} at the {where} {i}.wav", encode(x, sr, ("WAV", "FLOAT", "wav")), "non_finite")
    c.add("all nan, float64.wav", encode(np.full(2 * sr, np.nan), sr, ("WAV", "DOUBLE", "wav")), "non_finite")
    stereo = np.stack([tone, tone], axis=1)
    stereo[sr, 1] = np.nan
    c.add("nan in the right channel.wav", encode(stereo, sr, ("WAV", "FLOAT", "wav")), "non_finite")
    for value, fmt in ((1e30, FLOAT_WAV), (3e3, FLOAT_WAV), (1e35, ("WAV", "DOUBLE", "wav"))):  # 1e300 reads as inf
        # finite but absurd: a 1e30 sine made every log-mel +inf and a training NaN (issue 44)
        c.add(f"finite {value:g} peak.wav", encode((value / 0.3) * tone.astype(np.float64), sr, fmt), "out_of_range")
    for ext, fmt in (("wav", FORMATS[0]), ("flac", FORMATS[1])):
        c.add(f"digital silence.{ext}", encode(np.zeros(2 * sr, np.float32), sr, fmt), "silent")
    c.add("hiss at -100 dBFS.wav", encode((1e-5 * c.rng.standard_normal(2 * sr)).astype(np.float32), sr,
                                          ("WAV", "FLOAT", "wav")), "silent")
    for secs in (0.01, 0.2, 0.5):
        c.add(f"{secs} s blip.wav", encode(tone[: int(secs * sr)], sr, FORMATS[0]), "too_short")


def write_bad_corpus(dst: URI, label: str = "bad", seed: int = 0) -> list[SampleFile]:
    """Write :func:`bad_corpus` under ``dst/<label>/`` (a label folder, so only the bytes are wrong)."""
    out = []
    for key, data, kind in bad_corpus(seed):
        uri = storage.join(dst, label, key)
        storage.write_bytes(uri, data)
        out.append(SampleFile(storage.canonical(uri), label, kind))
    return out


def write_sparse_files(folder: str, gigabytes: float = 3.0) -> list[SampleFile]:
    """Multi-GB objects that take no disk (sparse files, local folders only): zeros named .wav, a FLAC
    magic before a hole, and a real 3 s recording with a hole after its declared data."""
    size = int(gigabytes * 2**30)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * 16_000) / 16_000)).astype(np.float32)
    spec = [("sparse zeros.wav", b"", "not_audio"), ("sparse after flac magic.flac", b"fLaC", "bad_header"),
            ("recording then a hole.wav", encode(tone, 16_000, FORMATS[0]), None)]
    out = []
    for name, head, kind in spec:
        path = os.path.join(folder, name)
        os.makedirs(folder, exist_ok=True)
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(size)
        out.append(SampleFile(storage.canonical(path), os.path.basename(folder), kind))
    return out


# ------------------------------------------------------------- real recordings as the field changes them

FIELD_SHIFTS = ("phone", "mp3", "noise", "babble", "room", "gain", "tempo")


def _mono(path: str) -> tuple[np.ndarray, int]:
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    return x.mean(1), sr


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12)


def field_shifted(rows: list[tuple[str, str]], kind: str, folder: Path, others: list[str],
                  rng: np.random.Generator, snr_db: tuple[float, float] = (0.0, 10.0)) -> list[tuple[str, str]]:
    """Real recordings (path, label) as another room, line or device gives them, written under ``folder``;
    returns (new path, label) each. Made with other maths and codecs than training's augmentation:

    ``phone`` 300-3400 Hz and 8-bit mu-law; ``mp3`` 8 kbit/s at 8 kHz (ffmpeg); ``noise`` white or pink,
    ``babble`` three of ``others`` (recordings of other speakers) at once, each at an SNR drawn in ``snr_db``
    (0-10 dB); ``room``
    an impulse response of RT60 0.3-0.9 s with early reflections; ``gain`` -30..+6 dB, clipped;
    ``tempo`` +-5..15 % without a change of pitch (ffmpeg's atempo)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path, label in rows:
        dst = folder / f"{Path(path).stem}.{'mp3' if kind == 'mp3' else 'wav'}"
        if kind == "mp3":
            _ffmpeg(path, dst, "-ac", "1", "-ar", "8000", "-c:a", "libmp3lame", "-b:a", "8k")
        elif kind == "tempo":
            _ffmpeg(path, dst, "-filter:a", f"atempo={float(rng.choice([-1, 1]) * rng.uniform(0.05, 0.15) + 1):.3f}")
        else:
            x, sr = _mono(path)
            shifted = _shift(x, sr, kind, others, rng, snr_db)
            sf.write(dst, np.clip(shifted, -1, 1).astype(np.float32), sr, subtype="PCM_16")
        out.append((str(dst), label))
    return out


def _ffmpeg(src: str, dst: Path, *args: str) -> None:
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("the mp3 and tempo shifts need ffmpeg (make system-deps installs it)")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", src, *args, str(dst)], check=True)


def _shift(x: np.ndarray, sr: int, kind: str, others: list[str], rng: np.random.Generator,
           snr_db: tuple[float, float]) -> np.ndarray:
    if kind == "phone":
        f = np.fft.rfftfreq(len(x), 1 / sr)
        x = np.fft.irfft(np.fft.rfft(x) * ((f >= 300) & (f <= 3400)), len(x))
        x = x / max(1e-9, np.abs(x).max()) * 0.7
        code = np.round(np.sign(x) * np.log1p(255 * np.abs(x)) / np.log1p(255) * 127)
        return np.sign(code) * (256 ** (np.abs(code) / 127) - 1) / 255
    if kind in ("noise", "babble"):
        if kind == "noise":  # white or pink, stationary
            tilt = np.maximum(1, np.arange(len(x) // 2 + 1)) ** (0.5 * rng.integers(0, 2))
            n = np.fft.irfft(np.fft.rfft(rng.normal(size=len(x))) / tilt, len(x))
        else:
            n = np.zeros(len(x))
            for j in rng.choice(len(others), 3, replace=False):
                b, _ = _mono(others[j])
                b = np.resize(b, len(x))
                n += b / _rms(b)
        return x + n * _rms(x) / _rms(n) / 10 ** (rng.uniform(*snr_db) / 20)
    if kind == "room":
        rt60 = rng.uniform(0.3, 0.9)
        t = np.arange(int(rt60 * sr)) / sr
        rir = rng.normal(size=len(t)) * np.exp(-6.9 * t / rt60)
        rir[0] = 1.0
        for d in rng.integers(int(0.003 * sr), int(0.03 * sr), 4):  # early reflections
            rir[d] += rng.uniform(0.3, 0.7)
        wet = np.convolve(x, rir)[: len(x)]
        return wet * _rms(x) / _rms(wet)
    if kind == "gain":
        return np.clip(x * 10 ** (rng.uniform(-30, 6) / 20), -1, 1)
    raise ValueError(f"unknown field shift {kind!r}: one of {FIELD_SHIFTS}")
