"""Two commands on a fresh machine: `make test` installs the Debian tools the suite needs (as root)
or prints the one line that does (otherwise). Checked with the tools hidden from PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = "espeak-ng ffmpeg chromium fonts-dejavu-core"


def _make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``make ARGS`` with a PATH that has make and a shell but not espeak-ng, ffmpeg or chromium."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("make", "bash", "sh", "id", "env", "echo"):
        if not (bin_dir / tool).exists() and shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir)}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_make_test_depends_on_the_system_tools_check(tmp_path):
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0 and "for t in espeak-ng ffmpeg chromium" in plan.stdout, plan.stdout
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_missing_tools_are_installed_as_root(tmp_path):
    p = _make(tmp_path, "system-deps", "IS_ROOT=yes", "APT_GET=echo apt-get")  # echo: the command it would run
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"installing espeak-ng ffmpeg chromium (Debian packages: {PACKAGES})" in p.stdout
    assert "apt-get update -qq" in p.stdout


def test_missing_tools_without_root_stop_with_the_line_to_run(tmp_path):
    p = _make(tmp_path, "system-deps", "IS_ROOT=")
    assert p.returncode != 0
    assert "missing espeak-ng ffmpeg chromium" in p.stdout
    assert f"  sudo apt-get install -y --no-install-recommends {PACKAGES}" in p.stdout


def test_nothing_is_installed_when_the_tools_are_there(tmp_path):
    p = subprocess.run(["make", "--no-print-directory", "system-deps", "APT_GET=false"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr  # CI installed them (make system-deps)


def test_a_new_venv_stops_before_installing_when_the_disk_is_too_full(tmp_path):
    """A full disk fails at pip's 'No space left on device' half-way through 5 GB of wheels; melbatch
    says so first, with the free space it found and what to do."""
    plan = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert plan.stdout.index("disk-check") < plan.stdout.index("-m venv"), plan.stdout
    full = subprocess.run(["make", "--no-print-directory", "disk-check", f"VENV={tmp_path / 'venv'}",
                           "SETUP_GB=1000000"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert full.returncode != 0
    assert f"GB free in {tmp_path}; a new {tmp_path / 'venv'} needs about 1000000 GB" in full.stdout, full.stdout
    assert "make setup VENV=/path/to/venv" in full.stdout
    room = subprocess.run(["make", "--no-print-directory", "disk-check", f"VENV={tmp_path / 'venv'}", "SETUP_GB=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert room.returncode == 0 and room.stdout == "", room.stdout + room.stderr
