"""How a process that makes images uses its CPU: its intra-op threads, and freed memory kept mapped.

A clip's image passes through a few fresh buffers of 0.3-1 MB (the framed signal, the spectrum, its
power, the mel). By default glibc's malloc gives memory of that size back to the kernel when it is
freed (an ``mmap``-ed chunk, or a trimmed heap top), so the next clip faults every page of its
buffers in again: measured 120-540 page faults per 5-s clip in a fresh Python process, costing
10-60% of a log-mel's time on a virtual machine (and as much noise). :func:`prepare_worker` raises
malloc's mmap threshold to 32 MB (the ceiling glibc's own adaptive threshold stops at) and its trim
threshold to 64 MB: the buffers are reused from the heap, at the price of at most 64 MB of freed
memory a worker keeps instead of returning it. Elsewhere than glibc (macOS, musl) it only sets the
threads.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers


def prepare_worker(threads: int) -> None:
    """Set this process up to make images: ``threads`` intra-op threads, freed buffers kept mapped."""
    torch.set_num_threads(threads)
    keep_freed_memory()


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed buffers of up to 32 MB mapped (once per process); whether it took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                    TRIM_THRESHOLD_BYTES))
