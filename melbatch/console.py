"""What reaches the terminal: melbatch's own lines and bars; Ray's logs go to Ray's log files.

By default a run prints only melbatch's lines. Ray's and Ray Data's loggers stay on (their files in
the Ray session's ``logs/`` folder keep everything), but without a console handler, and Ray does not
forward its workers' and actors' output to the driver (``log_to_driver``): execution plans,
TrainingReport dumps and per-worker prefixes stay in those files. ``-v/--verbose`` or
``MELBATCH_VERBOSE=1`` (which a submitted job inherits) brings all of it back.

Training runs on Ray Train workers whose output stays in their log files, so the rank-0 worker
sends its progress to the driver through a small queue (:class:`Channel`), and the driver draws one
progress bar per epoch and one table row per epoch (:class:`EpochTable`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

VERBOSE_ENV = "MELBATCH_VERBOSE"
# C0 controls, DEL and C1 controls: in a file or label name they would move the cursor, clear the screen,
# retitle the terminal or split one row into two
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(name: object) -> str:
    r"""A name (a key, a URI, a label) as the console prints it: each control character escaped
    (ESC as ``\x1b``, a newline as ``\n``), everything else as it is."""
    return _CONTROL.sub(lambda m: {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(m[0], f"\\x{ord(m[0]):02x}"),
                        str(name))


RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air")


def verbose() -> bool:
    """Whether Ray's own output is shown (``-v`` or ``MELBATCH_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Turn Ray's output on for this process and the jobs and workers it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def quiet_ray_loggers() -> None:
    """Take the console handlers off Ray's Python loggers (their file handlers stay), unless verbose.

    Errors still reach the terminal: melbatch reports a failed run itself, once, from the exception.
    """
    if verbose():
        return
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)  # the console; Ray Data's session file handler is no StreamHandler
        if name == "ray":
            lg.addHandler(logging.NullHandler())  # no fallback to the root logger's last-resort handler
        lg.propagate = False


# Ray's loggers that speak while ray.init starts or joins a cluster, about Ray's own settings: with
# RAY_AUTH_MODE unset, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled
# to opt out" (melbatch keeps token authentication on; the README says so)
RAY_STARTUP_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


def quiet_ray_startup() -> None:
    """Before ``ray.init``: Ray's warnings about its own start-up settings stay off the console, unless verbose."""
    if not verbose():
        for name in RAY_STARTUP_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


# What Ray's raylet tells every driver that is about Ray's own housekeeping, not the user's run
RAYLET_NOISE = ("PYTHON worker processes have been started",)


def quiet_raylet_messages() -> None:
    """Drop the raylet's housekeeping warnings (they stay in its log file) from the driver's console;
    its other messages (a worker killed for memory, a node lost) still reach the terminal, unless verbose.

    Ray prints them from a driver thread through ``ray._private.worker.print_to_stdstream`` and has
    no setting for it; without that function (another Ray version) nothing changes.
    """
    import ray._private.worker as w  # Ray loads with a job, not with `melbatch --help` (cli imports console)

    original = getattr(w, "print_to_stdstream", None)
    if verbose() or original is None or getattr(original, "melbatch", False):
        return

    def filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any(n in str(line) for line in lines for n in RAYLET_NOISE):
            return None
        return original(data, *args, **kwargs)

    filtered.melbatch = True  # type: ignore[attr-defined]
    w.print_to_stdstream = filtered


# A line of Ray's C++ logging ("[2026-11-28 06:44:22,242 E 6944 6944] core_worker.cc:2465: ...")
NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+\.(cc|h):\d+: ")
_native = {}


def quiet_native_stderr() -> None:
    """Keep the lines Ray's C++ core worker in this process writes straight to file descriptor 2 off
    the terminal (they are in the session's ``python-core-driver-*.log`` as well), unless verbose.

    Called after Ray is up (the processes ``ray.init`` starts keep the real stderr): descriptor 2
    becomes a pipe that a thread copies to the real stderr, less those lines. Anything else passes at
    once, partial lines too (progress bars redraw with ``\\r``); at exit the pipe is drained.
    """
    if verbose() or _native or os.name != "posix":
        return
    read_fd, write_fd = os.pipe()
    real = os.dup(2)
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        held = b""
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            held += chunk
            *lines, held = held.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not NATIVE_LINE.match(line))
            if held and not (held.startswith(b"[") and len(held) < 4096):  # could not be the start of one
                out, held = out + held, b""
            if out:
                os.write(real, out)
        if held:
            os.write(real, held)

    thread = threading.Thread(target=pump, name="melbatch-stderr", daemon=True)
    thread.start()
    _native.update(real=real, thread=thread)
    atexit.register(_restore_native_stderr)


def _restore_native_stderr() -> None:
    """Put the real stderr back on descriptor 2 and let the pump write what it still holds."""
    if not _native:
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(_native["real"], 2)  # closes the pipe's last write end: the pump reads the end and stops
    _native["thread"].join(timeout=2)


def ray_logs_dir() -> str | None:
    """The Ray session's log folder on this node (``None`` before Ray is up or when it is a client)."""
    try:
        import ray._private.worker as w  # as above: only once a job runs

        node = w.global_worker.node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:
        return None


def logs_line() -> str:
    """The one line that says where Ray's own output went."""
    where = ray_logs_dir() or "the Ray session's logs/ folder on each node"
    return f"Ray's logs: {where} (melbatch -v or {VERBOSE_ENV}=1 shows them here)"


class Channel:
    """Progress events from a Ray Train worker to the driver: a queue actor that takes no CPU.

    ``send`` never blocks training for long and never fails it: a lost event only costs a bar update.
    """

    def __init__(self) -> None:
        from ray.util.queue import Queue  # as above: only once a job runs

        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})

    def __reduce__(self):  # the worker gets the queue handle, not a new actor
        return (_channel_of, (self.queue,))

    def send(self, kind: str, **data: Any) -> None:
        with contextlib.suppress(Exception):
            self.queue.put_nowait({"kind": kind, **data})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.queue.shutdown(force=True)


def _channel_of(queue: Any) -> Channel:
    c = Channel.__new__(Channel)
    c.queue = queue
    return c


COLUMNS = (("epoch", 7), ("train_loss", 10), ("val_loss", 9), ("val_acc", 8), ("macro_f1", 8), ("lr", 9),
           ("time", 7), ("step", 7))


def epoch_row(row: dict[str, Any], epochs: int, steps: int) -> str:
    """One line of the epoch table: ``step`` is the training time of one of the epoch's ``steps`` steps."""
    cells = [f"{row['epoch']}/{epochs}", f"{row['train_loss']:.3f}", f"{row['val_loss']:.3f}",
             f"{row['val_accuracy']:.3f}", f"{row['macro_f1']:.3f}", f"{row['lr']:.2e}", f"{row['epoch_s']:.0f}s",
             f"{row.get('train_s', 0.0) / max(1, steps):.2f}s"]
    line = "  ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))
    return line + ("  (backbone frozen)" if row.get("frozen_backbone") else "")


def table_header() -> str:
    return "  ".join(name.rjust(w) for name, w in COLUMNS)


def minutes(seconds: float) -> str:
    """A duration as a person reads it: ``40 s``, ``3 min``, ``1 h 20 min``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    m = round(seconds / 60)
    return f"{m} min" if m < 60 else f"{m // 60} h" + (f" {m % 60} min" if m % 60 else "")


class EpochTable:
    """The driver's side of a training run: reads the channel in a thread, draws a bar per epoch
    (steps, loss, samples/s) and prints each epoch's row once, the worker's warnings once, and once
    the time the run will take from its first steps' pace."""

    def __init__(self, channel: Channel, epochs: int, steps_per_epoch: int, bars: bool = True) -> None:
        self.channel, self.epochs, self.steps, self.bars = channel, epochs, steps_per_epoch, bars
        self.printed: set[int] = set()
        self.warned: set[str] = set()
        self.paced = False
        self._bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="melbatch-progress", daemon=True)

    def __enter__(self) -> EpochTable:
        print(table_header(), flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        self._close_bar()
        self.channel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.channel.queue.get(timeout=0.5)
            except Exception:
                continue
            self.handle(event)

    def _drain(self) -> None:
        while True:
            try:
                self.handle(self.channel.queue.get_nowait())
            except Exception:
                return

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "step" and self.bars:
            bar = self._bar_for(event["epoch"], event["step"])
            if bar is not None:
                bar.set_postfix_str(f"loss {event['loss']:.3f}  {event['samples_per_s']:.0f} samples/s",
                                    refresh=False)
                if event.get("final"):  # the epoch's step count, drawn now (a log gets its 100% line)
                    bar.total = bar.n = event["step"]
                    bar.refresh()
                else:
                    bar.update(max(0, min(event["step"], bar.total) - bar.n))  # redraws at most every mininterval
        elif kind == "epoch":
            row = event["row"]
            self._close_bar()
            if row["epoch"] not in self.printed:  # a resumed attempt reports its epochs again
                self.printed.add(row["epoch"])
                print(epoch_row(row, self.epochs, self.steps), flush=True)
        elif kind == "pace" and not self.paced:
            self.paced = True
            self._close_bar()
            print(f"expected: about {minutes(event['left'] * event['s_per_step'])} more for {event['left']:,} "
                  f"steps at {event['s_per_step']:.2f} s a step (its first steps on this machine; each epoch's "
                  "validation comes on top)", flush=True)
        elif kind == "warning" and event["text"] not in self.warned:
            self.warned.add(event["text"])
            self._close_bar()
            print(f"warning: {event['text']}", flush=True)

    def _bar_for(self, epoch: int, step: int):
        if self._bar is not None and self._bar.desc != f"epoch {epoch}":
            self._close_bar()
        if self._bar is None and epoch not in self.printed:  # starts at the first step seen: rates from there
            self._bar = progress(self.steps, True, f"epoch {epoch}", unit="step", initial=step)
        return self._bar

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.leave = False
            self._bar.close()
            self._bar = None


class Throttle:
    """True at most once every ``seconds`` (a worker's step events)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last = seconds, 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def progress(total: int, enabled: bool, desc: str, unit: str = "file", initial: int = 0):
    """A tqdm bar on stderr: live on a terminal, a line every 15 s in a log (ray job logs, CI, cron)."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, initial=initial,
                mininterval=0.5 if interactive else 15.0, dynamic_ncols=interactive, ascii=not interactive)
