"""Decoding, resampling and clip cutting: formats, rates, channels, bad files, bounded memory."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import tracemalloc

import numpy as np
import pytest
import torch
import torchaudio
from conftest import tone

from melbatch import storage
from melbatch.audio import decode
from melbatch.audio.decode import DecodeError
from melbatch.audio.objects import logmels_of_object
from melbatch.config import FeatureConfig
from melbatch.testing import archives

CFG = FeatureConfig(clip_s=1.0, clip_hop_s=1.0, min_tail_s=0.25)


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


@pytest.mark.parametrize("fmt", archives.FORMATS, ids=[f[2] for f in archives.FORMATS])
@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_every_format_rate_and_channel_count_decodes_to_mono_at_target_rate(fmt, sr, channels):
    x = tone(1000, 2.5, sr)
    if channels == 2:
        x = np.stack([x, x], axis=1)
    info, y = decode.decode_all(io.BytesIO(archives.encode(x, sr, fmt)), 16_000)
    assert info.decoder == "soundfile"
    assert (info.sample_rate_hz, info.channels) == (sr, channels)
    assert y.ndim == 1 and y.dtype == np.float32
    # lossy codecs add a little encoder delay/padding; duration stays within 0.1 s
    assert abs(len(y) / 16_000 - 2.5) < 0.1
    assert abs(dominant_hz(y, 16_000) - 1000) < 10


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg to make an m4a and torchcodec to read it")
def test_m4a_falls_back_to_torchcodec(tmp_path):
    path = tmp_path / "tone.m4a"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=880:duration=3",
                    "-ar", "44100", "-ac", "2", str(path)], check=True)
    with open(path, "rb") as f:
        info, y = decode.decode_all(f, 16_000)
    assert info.decoder == "torchcodec" and info.decoders_tried == ("soundfile", "torchcodec")
    assert abs(len(y) / 16_000 - 3.0) < 0.1
    assert abs(dominant_hz(y, 16_000) - 880) < 10


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000),
                                      (11025, 22050), (16000, 16000)])
def test_streamed_resampling_equals_resampling_the_whole_signal(orig, new, rng):
    x = (0.1 * rng.standard_normal(orig * 23 + 37)).astype(np.float32)
    blocks = (x[i: i + 7777] for i in range(0, len(x), 7777))
    y = np.concatenate(list(decode.resample_stream(blocks, orig, new)))
    ref = torchaudio.functional.resample(torch.from_numpy(x), orig, new).numpy()
    assert len(y) == len(ref)
    assert np.abs(y - ref).max() < 1e-5


def _clips(seconds: float, cfg: FeatureConfig) -> list[decode.Clip]:
    x = np.ones(int(seconds * cfg.sample_rate_hz), np.float32)
    return list(decode.cut_clips(iter(np.array_split(x, 7)), cfg))


def test_clips_pad_the_tail_when_long_enough():
    clips = _clips(3.5, CFG)
    assert [c.start_s for c in clips] == [0.0, 1.0, 2.0, 3.0]
    assert clips[-1].end_s == pytest.approx(3.5)
    assert all(len(c.samples) == CFG.clip_samples for c in clips)
    assert clips[-1].samples[: CFG.sample_rate_hz // 2].all() and not clips[-1].samples[CFG.sample_rate_hz // 2:].any()


def test_clips_drop_tail_and_short_tails():
    assert len(_clips(3.5, FeatureConfig(clip_s=1.0, clip_hop_s=1.0, tail="drop", min_tail_s=0.25))) == 3
    assert len(_clips(3.1, CFG)) == 3  # 0.1 s left is below min_tail_s
    assert len(_clips(0.5, CFG)) == 1 and len(_clips(0.1, CFG)) == 0


def test_overlapping_clips_and_exact_fit():
    cfg = FeatureConfig(clip_s=1.0, clip_hop_s=0.5, min_tail_s=0.25)
    assert [c.start_s for c in _clips(2.0, cfg)] == [0.0, 0.5, 1.0, 1.5]  # 1.5 s: the padded tail
    assert [c.start_s for c in _clips(2.0, CFG)] == [0.0, 1.0]


@pytest.mark.parametrize("bad", archives.write_bad_files("memory://bad-kinds", "x", np.random.default_rng(0)),
                         ids=lambda b: b.uri.rsplit("/", 1)[-1])
def test_every_bad_input_gets_its_specific_kind(bad):
    ref = storage.ObjectRef(bad.uri, "etag", len(storage.read_bytes(bad.uri)))
    with pytest.raises(DecodeError) as e:
        logmels_of_object(ref, FeatureConfig(), silence_dbfs=-70)
    assert e.value.kind == bad.bad_kind, e.value.message
    assert e.value.message


@pytest.mark.parametrize("peak,kept", [(0.5, True), (4.0, True), (900.0, True), (2e3, False), (1e30, False)])
def test_float_audio_beyond_a_sane_peak_is_out_of_range_and_hot_masters_are_kept(peak, kept):
    """Float WAVs over full scale are real (masters with headroom); 1e30 is not, and its log-mel was +inf."""
    x = tone(440, 2.0, 16_000).astype(np.float64) / 0.3 * peak
    data = archives.encode(x, 16_000, archives.FLOAT_WAV)
    ref = storage.ObjectRef(f"memory://peaks/{peak:g}.wav", "etag", len(data))
    storage.write_bytes(ref.uri, data)
    if not kept:
        with pytest.raises(DecodeError) as e:
            logmels_of_object(ref, CFG, silence_dbfs=-70)
        assert e.value.kind == "out_of_range" and "rescale" in e.value.message
        return
    info, staged = logmels_of_object(ref, CFG, silence_dbfs=-70)
    with staged:
        mels = [m for _, m in staged]
    assert len(mels) == 2 and all(np.isfinite(m).all() for m in mels)
    assert info.peak == pytest.approx(peak, rel=1e-3)


def _wav_header(rate: int, channels: int, frames: int = 100) -> bytes:
    data = bytes(frames * channels * 2)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + \
        b"data" + struct.pack("<I", len(data)) + data


@pytest.mark.parametrize("rate,channels,kind", [(1, 1, "bad_header"), (2_000_000, 1, "bad_header"),
                                               (16000, 1000, "bad_header"), (0, 1, "bad_header"),
                                               (16000, 0, "bad_header")])
def test_absurd_headers_are_refused_before_reading(rate, channels, kind):
    with pytest.raises(DecodeError) as e:
        decode.decode_all(io.BytesIO(_wav_header(rate, channels)), 16_000)
    assert e.value.kind == kind
    if kind == "bad_header":  # refused by melbatch's own check, naming the values
        assert f"{rate} Hz and {channels} channels" in e.value.message


def test_sniffing_names_the_container():
    assert decode.sniff_container(archives.encode(tone(440, 0.1, 8000), 8000, archives.FORMATS[1])) == "flac"
    assert decode.sniff_container(b"\x00\x00\x00\x20ftypM4A ") == "mp4"
    assert decode.sniff_container(b"hello") is None


@pytest.mark.slow
def test_a_long_file_decodes_in_bounded_memory(tmp_path):
    """20 minutes of 48 kHz stereo (440 MB as float32) streams through with a few MB held at once."""
    import soundfile as sf

    sr, minutes = 48_000, 20
    path = tmp_path / "long.flac"
    with sf.SoundFile(path, "w", sr, 2, format="FLAC", subtype="PCM_16") as f:
        block = np.stack([tone(300, 60, sr), tone(500, 60, sr)], axis=1)
        for _ in range(minutes):
            f.write(block)
    cfg = FeatureConfig()
    tracemalloc.start()
    with open(path, "rb") as fh:
        _info, clips = decode.decode_clips(fh, cfg)
        n = sum(1 for _ in clips)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == minutes * 60 // 5
    decoded_bytes = minutes * 60 * sr * 2 * 4
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB while decoding {decoded_bytes / 1e6:.0f} MB of audio"


def test_a_span_is_the_slice_of_the_whole_signal_and_decoding_stops_at_its_end(rng):
    """decode_span (what `melbatch show --start-s/--seconds` and restyled stored clips read) equals the
    slice of the whole decoded signal, across block boundaries and past the end; it reads the object
    only up to the span's end, so ten seconds near the start of a long recording do not decode it all."""
    sr = 44_100
    x = (0.3 * rng.standard_normal(95 * sr)).astype(np.float32)  # 95 s: blocks of 10 s, resampled
    data = archives.encode(x, sr, archives.FORMATS[0])
    _, whole = decode.decode_all(io.BytesIO(data), 16_000)
    for start_s, seconds in ((0.0, 10.0), (9.5, 1.0), (31.25, 12.5), (90.0, None), (94.0, 10.0), (120.0, 5.0)):
        _, got = decode.decode_span(io.BytesIO(data), 16_000, start_s, seconds)
        a = int(start_s * 16_000)
        want = whole[a:] if seconds is None else whole[a:a + int(seconds * 16_000)]
        np.testing.assert_array_equal(got, want, err_msg=f"{start_s}+{seconds}")

    class Counted(io.BytesIO):
        read_bytes = 0

        def read(self, n=-1):
            out = super().read(n)
            Counted.read_bytes += len(out)
            return out

        def readinto(self, b):
            n = super().readinto(b)
            Counted.read_bytes += n
            return n

    decode.decode_span(Counted(data), 16_000, 2.0, 3.0)
    assert Counted.read_bytes < len(data) / 3, (Counted.read_bytes, len(data))


def test_a_long_ogg_is_written_without_crashing_the_process():
    """Issue 44, case 5: `sample-archive --seconds 50` died of SIGSEGV inside libsndfile's Vorbis encoder
    (one write of 50 s at 44.1 kHz). In a child process, so a crash fails this test, not the suite."""
    import sys

    code = ("import io, numpy as np, soundfile as sf; from melbatch.testing import archives; "
            "x = (0.3 * np.sin(np.arange(50 * 44100) / 7)).astype(np.float32); "
            "b = archives.encode(x, 44100, ('OGG', 'VORBIS', 'ogg')); "
            "print(round(len(sf.read(io.BytesIO(b))[0]) / 44100, 2))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.returncode
    assert done.stdout.strip() == "50.0"
