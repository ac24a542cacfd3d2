"""The terminal holds melbatch's lines: the epoch table prints each row once, Ray's C++ log lines
are kept off stderr while everything else (progress bars' partial lines too) passes."""

from __future__ import annotations

import subprocess
import sys

from melbatch import console

ROW = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.25, "val_accuracy": 0.875, "macro_f1": 0.8, "lr": 1e-3,
       "epoch_s": 12.3, "train_s": 11.5, "frozen_backbone": False}


def test_each_epoch_row_and_warning_is_printed_once(capsys):
    table = console.EpochTable(channel=None, epochs=3, steps_per_epoch=10, bars=False)
    for _ in range(2):  # a resumed attempt reports epoch 1 again
        table.handle({"kind": "epoch", "row": ROW})
        table.handle({"kind": "warning", "text": "the loss is stuck"})
    table.handle({"kind": "epoch", "row": {**ROW, "epoch": 2, "frozen_backbone": True}})
    out = capsys.readouterr().out.splitlines()
    assert out == [console.epoch_row(ROW, 3, 10), "warning: the loss is stuck",
                   console.epoch_row({**ROW, "epoch": 2, "frozen_backbone": True}, 3, 10)]
    assert out[0].split() == ["1/3", "0.500", "0.250", "0.875", "0.800", "1.00e-03", "12s", "1.15s"]  # 11.5 s, 10 steps
    assert out[2].endswith("(backbone frozen)")
    assert console.table_header().split() == ["epoch", "train_loss", "val_loss", "val_acc", "macro_f1", "lr", "time",
                                              "step"]


def test_the_time_a_run_will_take_is_told_once_from_its_first_steps(capsys):
    """Issue 45: the worker's pace after its first steps becomes one line: the minutes left, the steps, the pace."""
    table = console.EpochTable(channel=None, epochs=10, steps_per_epoch=62, bars=False)
    table.handle({"kind": "pace", "s_per_step": 1.5, "left": 617})
    table.handle({"kind": "pace", "s_per_step": 9.0, "left": 600})  # a resumed attempt: not told again
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("expected: about 15 min more for 617 steps at 1.50 s a step"), out
    assert [console.minutes(s) for s in (0.2, 40, 89, 90, 3599, 4800)] == ["1 s", "40 s", "89 s", "2 min", "1 h",
                                                                           "1 h 20 min"]


def test_an_epochs_bar_ends_full_in_a_log_whatever_the_throttle_let_through(capsys):
    """In a log (stderr not a terminal) a bar draws every 15 s; the epoch's final step still draws its 100% line,
    with the steps the epoch really had."""
    table = console.EpochTable(channel=None, epochs=1, steps_per_epoch=32, bars=True)
    table.handle({"kind": "step", "epoch": 1, "step": 1, "loss": 2.0, "samples_per_s": 4.0})
    table.handle({"kind": "step", "epoch": 1, "step": 26, "loss": 1.0, "samples_per_s": 8.0})
    assert "100%" not in capsys.readouterr().err
    table.handle({"kind": "step", "epoch": 1, "step": 30, "loss": 0.5, "samples_per_s": 9.0, "final": True})
    table.handle({"kind": "epoch", "row": ROW})
    err = capsys.readouterr().err
    assert "epoch 1: 100%" in err and "30/30" in err and "loss 0.500" in err, err


NATIVE = """
import os, sys
from melbatch import console
console.quiet_native_stderr()
os.write(2, b"[2026-11-28 06:44:22,242 E 6944 6944] core_worker.cc:2465: Actor with class name: x\\n")
sys.stderr.write("epoch 1:  50%|#####     | 5/10\\r")
sys.stderr.flush()
os.write(2, b"a real error\\n[2026-11-28 06:44:23,001 W 1 2] raylet_client.cc:12: noise\\n")
print("stdout stays", flush=True)
"""


def test_rays_native_log_lines_are_kept_off_stderr_and_the_rest_passes():
    p = subprocess.run([sys.executable, "-c", NATIVE], capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"stdout stays\n"
    assert p.stderr == b"epoch 1:  50%|#####     | 5/10\ra real error\n", p.stderr  # bytes: \r kept as it is
    loud = subprocess.run([sys.executable, "-c", NATIVE], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MELBATCH_VERBOSE": "1"})
    assert "core_worker.cc:2465" in loud.stderr and "raylet_client.cc" in loud.stderr
