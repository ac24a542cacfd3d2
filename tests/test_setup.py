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
