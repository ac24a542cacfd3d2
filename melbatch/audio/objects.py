"""One audio object → its clips' log-mel images, staged until the file is known to be good.

Featurize and classify read every object through :func:`logmels_of_object`: open it (storage),
decode and cut it into clips (audio), make each image (features), and keep the pairs in a
:class:`StagedClips` — in memory up to :data:`SPILL_BYTES`, beyond that on local disk — because a
file may still turn out too short, silent or broken at its end, and then none of its clips may be
written. Transient storage errors are retried; the rest become a :class:`DecodeError` with a kind.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from melbatch import storage
from melbatch.audio.decode import AudioInfo, Clip, DecodeError, decode_clips
from melbatch.audio.logmel import logmel_clips
from melbatch.config import FeatureConfig
from melbatch.shards import to_pcm16

_NO_SAMPLES = np.zeros(0, np.float32)
_NO_IMAGE = np.zeros(0, np.float16)  # a clip staged without its image (the model makes it)


# One file's clips wait, until the file is known to be good, in memory up to this many bytes and
# beyond it on local disk: a 24-hour recording (about 5 GB of images and audio at the defaults)
# costs a worker this much memory, and that much temporary disk, not 5 GB of memory.
SPILL_BYTES = 32 * 2**20
BLOCK_CLIPS = 64  # clips copied into one array, kept or pickled to disk together


class StagedClips:
    """One file's ``(clip, image)`` pairs in order, held in memory up to ``spill_bytes`` and the rest
    in a local temporary file; iterate to get them back (block by block), ``close`` to drop them.

    Images and audio are copied into preallocated blocks of :data:`BLOCK_CLIPS` clips as they come:
    thousands of small arrays kept alive between short-lived ones would fragment the heap (measured:
    4x their size in resident memory), blocks do not.
    """

    def __init__(self, spill_bytes: int = SPILL_BYTES) -> None:
        self.spill_bytes = spill_bytes
        self._blocks: list[tuple[list, np.ndarray, np.ndarray | None]] = []  # (index, start, end) rows, images, audio
        self._filling: tuple[list, np.ndarray, np.ndarray | None] | None = None
        self._held = 0
        self._file = None
        self._n = 0

    def add(self, clip: Clip, mel: np.ndarray) -> None:
        if self._filling is None:
            audio = np.empty((BLOCK_CLIPS, *clip.samples.shape), clip.samples.dtype) if clip.samples.size else None
            self._filling = ([], np.empty((BLOCK_CLIPS, *mel.shape), mel.dtype), audio)
        rows, mels, audio = self._filling
        mels[len(rows)] = mel
        if audio is not None:
            audio[len(rows)] = clip.samples
        rows.append((clip.index, clip.start_s, clip.end_s))
        self._n += 1
        if len(rows) == BLOCK_CLIPS:
            self._seal()

    def _seal(self) -> None:
        rows, mels, audio = self._filling
        k = len(rows)
        block = (rows, mels[:k].copy() if k < BLOCK_CLIPS else mels,
                 None if audio is None else audio[:k].copy() if k < BLOCK_CLIPS else audio)
        self._filling = None
        size = block[1].nbytes + (0 if block[2] is None else block[2].nbytes)
        if self._file is None and self._held + size <= self.spill_bytes:
            self._blocks.append(block)
            self._held += size
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="melbatch-clips-")  # noqa: SIM115 (closed by close())
        pickle.dump(block, self._file, protocol=pickle.HIGHEST_PROTOCOL)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[tuple[Clip, np.ndarray]]:
        if self._filling is not None:
            self._seal()
        for block in self._blocks:
            yield from _unblock(block)
        if self._file is None:
            return
        self._file.seek(0)
        while True:
            try:
                block = pickle.load(self._file)
            except EOFError:
                return
            yield from _unblock(block)

    def close(self) -> None:
        self._blocks, self._filling = [], None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StagedClips:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unblock(block: tuple[list, np.ndarray, np.ndarray | None]) -> Iterator[tuple[Clip, np.ndarray]]:
    rows, mels, audio = block
    for j, (index, start_s, end_s) in enumerate(rows):
        yield Clip(index, start_s, end_s, _NO_SAMPLES if audio is None else audio[j]), mels[j]


def logmels_of_object(ref: storage.ObjectRef, cfg: FeatureConfig, silence_dbfs: float,
                      keep_audio: bool = False, images: bool = True) -> tuple[AudioInfo, StagedClips]:
    """Read one object and return all its clips with their log-mel images, staged.

    The clips of one file are gathered before they are returned, so a file that turns out to be
    truncated, corrupt or silent at its end contributes nothing. They wait in a
    :class:`StagedClips`: in memory up to :data:`SPILL_BYTES`, the rest on local disk, so a file of
    any length costs bounded memory (its images take about 90 MB per hour of audio at the
    defaults, and with ``keep_audio`` its clips as 16-bit PCM in ``Clip.samples`` 115 MB more;
    otherwise ``Clip.samples`` is dropped). Close what is returned (``with staged: ...``).
    Raises :class:`DecodeError` with the reason the file cannot be used. A read the store keeps
    failing is made again (:func:`~melbatch.storage.retrying`), then raises
    :class:`~melbatch.storage.TransientStorageError`: the object may be fine, so it is never
    quarantined for that; the caller's task fails instead. Without ``images`` the clips are only
    cut, and kept as 16-bit PCM for whoever makes their images (classify's model actor, on its GPU).
    """
    return storage.retrying(lambda: _logmels_once(ref, cfg, silence_dbfs, keep_audio or not images, images))


def _logmels_once(ref: storage.ObjectRef, cfg: FeatureConfig, silence_dbfs: float,
                  keep_audio: bool, images: bool) -> tuple[AudioInfo, StagedClips]:
    stream = None
    out = StagedClips()
    try:
        with storage.open_input(ref.uri, ref.size) as stream:
            info, clips = decode_clips(stream, cfg)
            pairs = logmel_clips(clips, cfg) if images else ((c, _NO_IMAGE) for c in clips)
            for c, mel in pairs:
                if images and not np.isfinite(mel).all():  # the last guard: no shard or embedding holds inf/NaN
                    raise DecodeError("non_finite", f"the log-mel image of clip {c.index} is not finite",
                                      info.decoders_tried)
                out.add(replace(c, samples=to_pcm16(c.samples) if keep_audio else _NO_SAMPLES), mel)
        if not len(out):
            raise DecodeError("too_short", f"{info.decoded_frames / info.sample_rate_hz:.3f} s of audio is less "
                              f"than min_tail_s={cfg.min_tail_s}", info.decoders_tried)
        peak_dbfs = 20 * math.log10(info.peak) if info.peak > 0 else -math.inf
        if peak_dbfs < silence_dbfs:
            raise DecodeError("silent", f"peak level {peak_dbfs:.1f} dBFS is below silence_dbfs={silence_dbfs}",
                              info.decoders_tried)
    except BaseException as e:
        out.close()
        if isinstance(e, DecodeError) and stream is not None and stream.error is not None:
            raise _read_error(ref, stream.error) from None  # the decoder only saw a short read
        if isinstance(e, OSError | storage.StorageError):
            raise _read_error(ref, e) from None
        raise
    return info, out


def _read_error(ref: storage.ObjectRef, e: BaseException) -> BaseException:
    """A failed read as a quarantine reason (gone, access denied, changed) or, if the store itself
    kept failing, as the storage error to raise."""
    if isinstance(e, storage.TransientStorageError):
        return e
    return DecodeError("read_error", f"reading {ref.uri} failed: {type(e).__name__}: {e}")
