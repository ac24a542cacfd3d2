"""Featurize throughput, in × realtime per CPU core, against baselines measured in the same run.

    make bench                      # or: python bench/featurize.py --files 480 --seconds 30

Rows (all on the same generated 16 kHz WAV files, with melbatch's default feature settings):
  melbatch featurize   the whole job on a local Ray (listing, tasks, decode, mel, Parquet, manifest),
                       timed after Ray is up and its workers are warm; divided by Ray's CPU count; at
                       the defaults (images only) and, taking turns with it, with --keep-audio (the
                       clips' waveforms stored too), with the shards' size per hour of audio
  librosa script       librosa.load + melspectrogram + power_to_db + np.save per file, one process;
                       then the same with one process per core at once, as the job keeps every core busy
  in-memory decode+mel melbatch's decode + clips + log-mel on bytes already in memory, one thread;
                       then the same with one process per core at once (cores share caches and
                       memory bandwidth, so a busy core gives less than a lone one)
  one task, shards    melbatch's task (featurize_batch) in this process on the same files, its shards
    in memory        (images, zstd) written to memory://: the job's work per core without Ray,
                     listing or the local disk; beside in-memory decode+mel it shows what writing costs
  torchaudio module    torchaudio MelSpectrogram + AmplitudeToDB per clip on decoded audio, one thread
  featurize --use-gpu  (with --use-gpu, on a GPU node) the job with the images made in batches on the
                       GPU, taking turns with the default run: its ratio to it is what the GPU adds
Targets (issue #2): melbatch ≥ 1000× per core (stretch 2000×), ≥ 1.5× librosa, ≥ 70% of in-memory.

Fixed cost (issue #18: ≤ 3 s): ``melbatch featurize`` run as a user runs it (a fresh process) on one
file of 5 s, best of ``--repeat``: by default (small work runs in the process, without Ray) and with
``--runner ray``; beside it, in the same run, a fresh Python importing torch alone and importing
melbatch's featurize, so the time a run spends on imports and on its work shows.
"""

from __future__ import annotations

import argparse
import atexit
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from threadpoolctl import threadpool_limits

from melbatch import storage
from melbatch.audio import decode, logmel
from melbatch.config import FeatureConfig, FeaturizeConfig
from melbatch.stages import featurize


def make_files(root: Path, n: int, seconds: float, sr: int) -> list[Path]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    paths = []
    for i in range(n):
        label = ("a", "b")[i % 2]
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(len(t))
        p = root / label / f"f{i:05d}.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, x.astype(np.float32), sr, subtype="PCM_16")
        paths.append(p)
    return paths


def bench_melbatch(src: Path, dst: Path, cfg: FeatureConfig, cpus: int, repeat: int, use_gpu: bool = False
                   ) -> dict[str, tuple[float, float, int]]:
    """Best of ``repeat`` full runs (overwrite: every batch is recomputed), after a warm-up run, at the
    defaults (images only), with ``--keep-audio`` and (``use_gpu``) with ``--use-gpu``, taking turns:
    run → (seconds of audio, wall seconds, bytes of shards written)."""
    import ray

    variants: dict[str, dict] = {"default": {}, "keep_audio": {"keep_audio": True}}
    if use_gpu:
        variants["use_gpu"] = {"use_gpu": True}
    ray.init(num_cpus=cpus, num_gpus=torch.cuda.device_count() if use_gpu else 0, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    warm = src.parent / "warm"
    make_files(warm, 2 * cpus, 5.0, cfg.sample_rate_hz)  # start and warm the workers (torch import)
    featurize.run(FeaturizeConfig(src=str(warm), dst=str(dst) + "-warm", features=cfg, files_per_task=1,
                                  runner="ray"), progress=False)
    best = {name: (0.0, float("inf"), 0) for name in variants}
    for _ in range(repeat):
        for name, flags in variants.items():
            out = Path(f"{dst}-{name}")
            t0 = time.perf_counter()
            s = featurize.run(FeaturizeConfig(src=str(src), dst=str(out), features=cfg, overwrite=True, runner="ray",
                                              **flags), progress=False)
            wall = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in (out / "shards").iterdir())
            best[name] = min(best[name], (s.audio_s, wall, size), key=lambda r: r[1])
    ray.shutdown()
    return best


def wall_s(argv: list[str], repeat: int) -> float:
    """Best wall time of ``repeat`` runs of a command (each a fresh process), in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_fixed_cost(root: Path, cfg: FeatureConfig, repeat: int) -> None:
    """What a run costs whatever its size: the CLI on one 5-s file, and the imports it pays for."""
    one = root / "one"
    make_files(one, 1, 5.0, cfg.sample_rate_hz)
    # python -m, not the venv's melbatch script: a lent machine runs melbatch from PYTHONPATH (bench/lease.sh)
    cli = [sys.executable, "-m", "melbatch.cli", "featurize", str(one), str(root / "one-out"), "--overwrite"]
    local, on_ray = wall_s(cli, repeat), wall_s([*cli, "--runner", "ray"], repeat)
    imports = wall_s([sys.executable, "-c", "import melbatch.cli, melbatch.stages.featurize"], repeat)
    torch_s = wall_s([sys.executable, "-c", "import torch"], repeat)
    print(f"\nfixed cost of a run (melbatch featurize on 1 file of 5 s, a fresh process, best of {repeat}):")
    print(f"  small work in the process (the default)  {local:5.1f} s   (target <= 3)")
    print(f"  --runner ray (start Ray and a worker)    {on_ray:5.1f} s")
    print(f"  of the first: Python + imports {imports:.1f} s (import torch alone {torch_s:.1f} s), "
          f"listing + decode + mel + Parquet + manifest {max(0.0, local - imports):.1f} s")


def best_of(repeat: int, fn, *args) -> tuple[float, float]:
    return min((fn(*args) for _ in range(repeat)), key=lambda r: r[1])


def bench_librosa(paths: list[Path], cfg: FeatureConfig, out: Path) -> tuple[float, float]:
    import librosa

    out.mkdir(parents=True, exist_ok=True)
    total = 0.0
    t0 = time.perf_counter()
    with threadpool_limits(1):
        for i, p in enumerate(paths):
            y, sr = librosa.load(p, sr=cfg.sample_rate_hz)
            m = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=cfg.n_fft, win_length=cfg.win_length,
                                               hop_length=cfg.hop_length, n_mels=cfg.n_mels, fmin=cfg.f_min_hz,
                                               fmax=cfg.f_max_hz, pad_mode="reflect")
            np.save(out / f"{i}.npy", librosa.power_to_db(m, top_db=cfg.top_db).astype(cfg.dtype))
            total += len(y) / sr
    return total, time.perf_counter() - t0


def bench_in_memory(blobs: list[bytes], cfg: FeatureConfig) -> tuple[float, float]:
    total = 0.0
    t0 = time.perf_counter()
    for b in blobs:
        info, clips = decode.decode_clips(io.BytesIO(b), cfg)
        for _, _mel in logmel.logmel_clips(clips, cfg):
            pass
        total += info.decoded_frames / info.sample_rate_hz
    return total, time.perf_counter() - t0


def bench_one_task(paths: list[Path], cfg: FeatureConfig) -> tuple[float, float]:
    """melbatch's featurize task on ``paths`` in this process, its shards written into memory."""
    fc = FeaturizeConfig(src=str(paths[0].parent), dst="memory://melbatch-bench", features=cfg)  # the defaults
    batch = [(storage.ObjectRef(str(p), "", p.stat().st_size), "a") for p in paths]
    t0 = time.perf_counter()
    r = featurize.featurize_batch("bench", batch, cfg.canonical_json(), fc.dst, fc.rows_per_shard,
                                  fc.rows_per_row_group, fc.silence_dbfs, fc.keep_audio)
    seconds = time.perf_counter() - t0
    storage.delete_tree(fc.dst)
    return r.audio_s, seconds


def _in_memory_worker(blobs: list[bytes]) -> float:
    torch.set_num_threads(1)
    return bench_in_memory(blobs, FeatureConfig())[0]


def _librosa_worker(paths: list[Path]) -> float:
    with tempfile.TemporaryDirectory(prefix="melbatch-bench-librosa-") as out:  # its .npy files: ~90 MB a run
        return bench_librosa(paths, FeatureConfig(), Path(out))[0]


def on_every_core(worker: Callable[[list], float], items: list, procs: int) -> tuple[float, float]:
    """A one-thread baseline on every core at once (one process per core, each a share of ``items``):
    what the cores give when all are busy, as they are in the job. Seconds of audio, wall seconds."""
    import multiprocessing as mp

    parts = [items[i::procs] for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(worker, [p[:1] for p in parts])  # warm each process
        t0 = time.perf_counter()
        total = sum(pool.map(worker, parts))
        return total, time.perf_counter() - t0


def bench_torchaudio(signals: list[np.ndarray], cfg: FeatureConfig) -> tuple[float, float]:
    mel = torchaudio.transforms.MelSpectrogram(cfg.sample_rate_hz, cfg.n_fft, cfg.win_length, cfg.hop_length,
                                               cfg.f_min_hz, cfg.f_max_hz, n_mels=cfg.n_mels, norm="slaney",
                                               mel_scale=cfg.mel_scale)
    to_db = torchaudio.transforms.AmplitudeToDB("power", cfg.top_db)
    n = cfg.clip_samples
    total = 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in signals:
            t = torch.from_numpy(x)
            for i in range(0, len(x) - n + 1, n):
                to_db(mel(t[i: i + n]))
                total += n / cfg.sample_rate_hz
    return total, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=480)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs per row (the machine is noisy)")
    p.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed afterwards)")
    p.add_argument("--use-gpu", action="store_true", help="also run featurize --use-gpu (a GPU node)")
    args = p.parse_args()
    if args.use_gpu and not torch.cuda.is_available():
        p.error("--use-gpu: torch sees no GPU on this machine")
    cfg = FeatureConfig()
    root = Path(args.dir or tempfile.mkdtemp(prefix="melbatch-bench-"))
    if not args.dir:  # also when a row fails: the archive and shards are hundreds of MB
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    torch.set_num_threads(1)
    paths = make_files(root / "archive", args.files, args.seconds, cfg.sample_rate_hz)
    hours = args.files * args.seconds / 3600
    print(f"{args.files} files x {args.seconds:.0f} s = {hours:.2f} h of 16 kHz WAV; {args.cpus} CPU(s); "
          f"features {cfg.hash()} (n_fft {cfg.n_fft}, hop {cfg.hop_length}, {cfg.n_mels} mels, {cfg.clip_s} s clips)")

    sub = paths[: max(8, len(paths) // 4)]  # single-process baselines run on a quarter of the files
    blobs = [q.read_bytes() for q in sub]
    signals = [sf.read(q, dtype="float32")[0] for q in sub]
    rows = []
    # single-process baselines first, while no Ray process is alive to share the cores
    a, t = best_of(args.repeat, bench_librosa, sub, cfg, root / "librosa")
    rows.append(("librosa script (load+mel+save)", a / t, a / t, 1))
    a, t = best_of(args.repeat, on_every_core, _librosa_worker, sub, args.cpus)
    rows.append((f"librosa script, {args.cpus} procs", a / t / args.cpus, a / t, args.cpus))
    a, t = best_of(args.repeat, bench_in_memory, blobs, cfg)
    rows.append(("in-memory decode + log-mel", a / t, a / t, 1))
    a, t = best_of(args.repeat, on_every_core, _in_memory_worker, blobs, args.cpus)
    rows.append((f"in-memory decode + log-mel, {args.cpus} procs", a / t / args.cpus, a / t, args.cpus))
    a, t = best_of(args.repeat, bench_one_task, sub, cfg)
    rows.append(("one task in process, shards in memory", a / t, a / t, 1))
    a, t = best_of(args.repeat, bench_torchaudio, signals, cfg)
    rows.append(("torchaudio MelSpectrogram module", a / t, a / t, 1))
    runs = bench_melbatch(root / "archive", root / "features", cfg, args.cpus, args.repeat, args.use_gpu)
    a, t, _ = runs["default"]
    rows.insert(0, ("melbatch featurize (Ray, end to end)", a / t / args.cpus, a / t, args.cpus))
    a, t, _ = runs["keep_audio"]
    rows.append(("melbatch featurize --keep-audio", a / t / args.cpus, a / t, args.cpus))
    if args.use_gpu:
        a, t, _ = runs["use_gpu"]
        rows.append(("melbatch featurize --use-gpu", a / t / args.cpus, a / t, args.cpus))

    ours, librosa_rt, librosa_par, in_mem, in_mem_par = (r[1] for r in rows[:5])
    print(f"\n{'pipeline':<40}{'x realtime/core':>16}{'x realtime':>12}{'cores':>7}")
    for name, per_core, total, cores in rows:
        print(f"{name:<40}{per_core:>16,.0f}{total:>12,.0f}{cores:>7}")
    print(f"\nmelbatch / librosa script, per core      {ours / librosa_par:6.2f}x   (target >= 1.5; all cores busy)")
    print(f"melbatch / librosa script alone          {ours / librosa_rt:6.2f}x   (its one process on an idle machine)")
    print(f"melbatch / in-memory decode+mel          {ours / in_mem:6.0%}    (target >= 70%; one process alone)")
    print(f"melbatch / in-memory, all cores busy     {ours / in_mem_par:6.0%}    (same parallelism as the job)")
    print(f"melbatch per core                        {ours:6,.0f}x   (target >= 1000, stretch 2000)")
    one_task = next(r[1] for r in rows if r[0].startswith("one task"))
    print(f"one task in process / in-memory          {one_task / in_mem:6.0%}    (the rest: reading files, Arrow, "
          "Parquet + zstd)")
    if args.use_gpu:
        print(f"featurize --use-gpu / the default        {runs['default'][1] / runs['use_gpu'][1]:6.2f}x   "
              "(the images made on the GPU, in batches; the same CPUs)")
    (a, _, images), (_, _, both) = runs["default"], runs["keep_audio"]
    print(f"shards per hour of audio                 {images / a * 3.6e3 / 2**20:6,.0f} MB images only (the default), "
          f"{both / a * 3.6e3 / 2**20:,.0f} MB with --keep-audio")
    bench_fixed_cost(root, cfg, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
