"""How a Ray Train worker's batches arrive: :class:`HeldShard` (one dataset shard, read through Ray
Data, held in memory after the first epoch when it fits, or read every epoch, each epoch's read
begun while the epoch before is evaluated) and :class:`Waited` (how long the loop waited for them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train


class HeldShard:
    """One of this worker's dataset shards (``train`` or ``val``), read through Ray Data in the first
    epoch and, when ``hold``, kept in this process's memory (as one Arrow table) for the later epochs;
    a small split is read whole by the worker itself before the first epoch (``direct``, see
    :func:`melbatch.train.driver.hold_plan`), and every epoch takes rows of the table.

    Reading a shard each epoch costs little CPU, but on a small machine Ray Data's readers, its
    prefetch thread and the split coordinator take turns with the training thread on the same cores
    (measured: 82-87% of a bare loop on 2 CPUs streaming, see bench/train.py). A small archive's
    clips fit in memory many times over, so after one pass each later epoch only takes rows of the
    held table, in a new random order per epoch. The rows are those the first epoch delivered,
    with their repeats (``min_steps`` passes, ``balance: oversample``); the waveform augmentation
    still differs every epoch. After a restart the first epoch of the new attempt reads it again.
    """

    def __init__(self, name: str, hold: bool) -> None:
        self.name, self.hold = name, hold
        self.table: pa.Table | None = None
        self._started: _Started | None = None

    @property
    def source(self) -> str:
        """Where this epoch's rows come from: ``memory`` (held) or ``shards`` (read through Ray Data)."""
        return "memory" if self.table is not None else "shards"

    def start(self, batch_size: int, seed: int | None = None, **stream: Any) -> None:
        """Begin the next epoch's read now, in the background, when that epoch will read the shard (not
        held): the batches it will ask for, with these arguments. Ray Data's start of an epoch (the
        split coordinator's new execution, the first read) is 0.5-1.9 s before the first batch
        (measured, 2 CPUs, 960-8,000 clips, whatever the block size); this way it overlaps the
        validation pass and the checkpoint instead of the next epoch."""
        if self.table is None and not self.hold:
            self._started = _Started((batch_size, seed, stream), self._read(batch_size, **stream))

    def _read(self, batch_size: int, **stream: Any) -> Iterator[pa.Table]:
        return iter(ray.train.get_dataset_shard(self.name).iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                                                        **stream))

    def batches(self, batch_size: int, seed: int | None = None, **stream: Any) -> Iterator[pa.Table]:
        """Batches of ``batch_size`` rows (the last may be smaller); ``seed`` shuffles (None: in order).
        ``stream`` are Ray Data's ``iter_batches`` arguments for the epochs that read the shard."""
        if self.table is not None:
            n = self.table.num_rows
            order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
            for i in range(0, n, batch_size):
                yield self.table.take(pa.array(order[i: i + batch_size]))
            return
        started, self._started = self._started, None
        if started is not None and started.args == (batch_size, seed, stream):
            read = started.batches()
        else:
            read = self._read(batch_size, **stream)
        kept: list[pa.Table] = []
        for batch in read:
            if self.hold:
                kept.append(batch)
            yield batch
        if self.hold and kept:  # a copy (take) in this process's heap: nothing stays pinned in the object store
            rows = pa.concat_tables(kept)
            self.table = rows.take(pa.array(np.arange(rows.num_rows)))


class _Started:
    """An epoch's read begun early: a thread waits for its first batch (see :meth:`HeldShard.start`)."""

    def __init__(self, args: tuple[Any, ...], read: Iterator[pa.Table]) -> None:
        self.args, self._read, self._first = args, read, None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, daemon=True, name="melbatch-next-epoch")
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first = next(self._read, None)
        except BaseException as e:  # raised again in the training thread, where the epoch asks for it
            self._error = e

    def batches(self) -> Iterator[pa.Table]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not None:
            yield self._first
            yield from self._read


class Waited:
    """An iterator's items, and the seconds its reader spent waiting for them: in all (``total``)
    and for the first (``first``: the epoch's start, Ray Data's plan and first read when streaming)."""

    def __init__(self, items: Iterator[Any]) -> None:
        self._items, self.total, self.first, self._got_one = items, 0.0, 0.0, False

    def __iter__(self) -> Waited:
        return self

    def __next__(self) -> Any:
        t = time.perf_counter()
        try:
            return next(self._items)
        finally:
            dt = time.perf_counter() - t
            self.total += dt
            if not self._got_one:
                self.first, self._got_one = dt, True
