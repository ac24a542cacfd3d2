"""The kit a lent GPU machine needs to run the GPU benches, built here: ``make lease-kit``.

A lent machine (the ``device`` tool) starts bare from an image that has torch, torchaudio, timm,
pyarrow, pandas and numpy (for Python 3.12) but not Ray, soundfile or what those need, cannot reach a
package registry, and takes at most 64 MiB of working tree with the command. Ray's wheel alone is
79 MB. So this writes ``.lease/``, which the command carries: the wheels of the packages the image
lacks, for the machine's Python and platform, at the versions this venv has, and Ray as an xz
tarball without what no bench uses (its Java jars, RLlib, the dashboard's web client): 29 MB.
``bench/lease.sh`` installs it on the machine and runs the benches in one command.

    python bench/lease.py                        # .lease/ for the lent machines (CPython 3.12, x86-64)
    python bench/lease.py --python 3.11 --out /tmp/kit   # for this machine: to try the kit here first
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# What melbatch and the benches import that the machine's image does not have (its package list is in
# the device tool's KINDS.md), with what those need in turn; the image has the rest (aiohttp, grpcio,
# protobuf, msgpack, click, filelock, requests, pyyaml, attrs, typing-extensions).
MISSING = ("ray", "soundfile", "cffi", "pycparser", "jsonschema", "jsonschema-specifications", "referencing",
           "rpds-py", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "tensorboardX",
           # the featurize bench's baseline rows: a librosa script
           "librosa", "audioread", "soxr", "pooch", "platformdirs", "decorator")
# Ray's parts no bench starts: Java workers, RLlib, the dashboard's web pages (the dashboard is off)
RAY_DROPPED = ("ray/jars", "ray/rllib", "ray/dashboard/client")
LIMIT_MIB = 56  # of the 64 MiB a command may carry: the working tree itself is ~6 MiB
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def download(names: tuple[str, ...], python: str, dst: Path) -> list[Path]:
    """The wheels of ``names`` at this venv's versions, for CPython ``python`` on x86-64 Linux."""
    pins = [f"{n}=={md.version(n)}" for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dst), *pins]
    subprocess.run(cmd, check=True)
    return sorted(dst.glob("*.whl"))


def ray_tarball(wheel: Path, dst: Path) -> Path:
    """Ray's wheel unpacked, less :data:`RAY_DROPPED`, as an xz tarball to unpack into a site folder."""
    out = dst / "ray.tar.xz"
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():  # extractall drops the modes: raylet and gcs_server must stay executable
                path = Path(z.extract(info, tmp))
                if mode := (info.external_attr >> 16) & 0o777:
                    path.chmod(mode)
        for part in RAY_DROPPED:
            shutil.rmtree(Path(tmp) / part, ignore_errors=True)
        with tarfile.open(out, "w:xz", preset=6) as tar:
            for p in sorted(Path(tmp).iterdir()):
                tar.add(p, arcname=p.name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the lent machine's Python (KINDS.md: 3.12)")
    p.add_argument("--out", default=".lease", help="the kit's folder (git ignores .lease/)")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download(MISSING, args.python, Path(tmp))
        ray = next(w for w in wheels if w.name.startswith("ray-"))
        print(f"{ray.name}: {ray.stat().st_size / 2**20:.1f} MiB as a wheel", flush=True)
        ray_tarball(ray, out)
        for w in wheels:
            if w != ray:
                shutil.copy(w, out / w.name)
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    for name, size in sizes.items():
        print(f"  {name:<70}{size / 2**20:>7.1f} MiB")
    total = sum(sizes.values()) / 2**20
    print(f"{out}/: {len(sizes)} files, {total:.1f} MiB (carried with the working tree, 64 MiB in all)")
    if total > LIMIT_MIB:
        sys.exit(f"the kit is {total:.1f} MiB, over {LIMIT_MIB}: drop more of Ray (RAY_DROPPED) or a package")


if __name__ == "__main__":
    main()
