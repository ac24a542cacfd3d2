"""Peak memory of this process from a starting point on (Linux): ``start()`` resets the kernel's
high-water mark (``/proc/self/clear_refs``), ``grown_mb()`` is the peak resident size since then
minus the resident size at ``start``. Unlike ``ru_maxrss``, a peak reached while importing (torch
maps hundreds of MB) cannot hide what the work itself took."""

from __future__ import annotations

_BASE_KB = 0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def start() -> None:
    global _BASE_KB
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _BASE_KB = _status_kb("VmRSS")


def grown_mb() -> float:
    return (_status_kb("VmHWM") - _BASE_KB) / 1024
