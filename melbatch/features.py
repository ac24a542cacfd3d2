"""Waveform clips → log-mel images, with torchaudio, the same function in every stage.

Clips are transformed one at a time: torchaudio's STFT is fastest on one short signal (a big
batch of clips or one long signal runs several times slower per second of audio on a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
import torchaudio

from melbatch import storage
from melbatch.audio import AudioInfo, Clip, DecodeError, decode_clips
from melbatch.config import FeatureConfig


@lru_cache(maxsize=8)
def _transforms(cfg: FeatureConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate_hz,
        n_fft=cfg.n_fft,
        win_length=cfg.win_length,
        hop_length=cfg.hop_length,
        f_min=cfg.f_min_hz,
        f_max=cfg.f_max_resolved,
        n_mels=cfg.n_mels,
        power=2.0,
        center=True,
        pad_mode="reflect",
        norm="slaney" if cfg.mel_scale == "slaney" else None,
        mel_scale=cfg.mel_scale,
    )
    to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=cfg.top_db)
    return mel.eval(), to_db.eval()


def compute_logmel(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """One clip (1-D float32 at ``cfg.sample_rate_hz``) → (n_mels, frames) log-mel in dB, float32.

    Power mel spectrogram with a Hann window, centred frames, then 10·log10 with a 1e-10 floor and
    values clipped to ``top_db`` below the clip's maximum (librosa's ``power_to_db(ref=1.0)``).
    """
    mel, to_db = _transforms(cfg)
    with torch.inference_mode():
        return to_db(mel(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)))).numpy()


def logmel_clips(clips: Iterator[Clip], cfg: FeatureConfig) -> Iterator[tuple[Clip, np.ndarray]]:
    """Pair each clip with its log-mel image, in the storage dtype of ``cfg``."""
    dtype = np.dtype(cfg.dtype)
    for clip in clips:
        yield clip, compute_logmel(clip.samples, cfg).astype(dtype, copy=False)


def logmels_of_object(ref: storage.ObjectRef, cfg: FeatureConfig,
                      silence_dbfs: float) -> tuple[AudioInfo, list[tuple[Clip, np.ndarray]]]:
    """Read one object and return all its clips with their log-mel images.

    The clips of one file are gathered before they are returned, so a file that turns out to be
    truncated, corrupt or silent at its end contributes nothing; memory is the file's mel images
    (about 90 MB per hour of audio at the defaults), never its decoded signal.
    Raises :class:`DecodeError` with the reason the file cannot be used.
    """
    stream = None
    try:
        with storage.open_input(ref.uri, ref.size) as stream:
            info, clips = decode_clips(stream, cfg)
            out = list(logmel_clips(clips, cfg))
    except DecodeError as e:
        if stream is not None and stream.error is not None:
            raise _read_error(ref, stream.error) from None
        raise
    except (OSError, storage.StorageError) as e:
        raise _read_error(ref, e) from None
    if not out:
        raise DecodeError("too_short", f"{info.decoded_frames / info.sample_rate_hz:.3f} s of audio is less than "
                          f"min_tail_s={cfg.min_tail_s}", info.decoders_tried)
    peak_dbfs = 20 * math.log10(info.peak) if info.peak > 0 else -math.inf
    if peak_dbfs < silence_dbfs:
        raise DecodeError("silent", f"peak level {peak_dbfs:.1f} dBFS is below silence_dbfs={silence_dbfs}",
                          info.decoders_tried)
    return info, out


def _read_error(ref: storage.ObjectRef, e: BaseException) -> DecodeError:
    return DecodeError("read_error", f"reading {ref.uri} failed: {type(e).__name__}: {e}")
