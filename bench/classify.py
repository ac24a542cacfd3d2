"""Classify throughput and memory, against baselines measured in the same run.

    make bench-classify             # or: python bench/classify.py --files 96 --seconds 30

Throughput (one archive of generated 16 kHz WAV files, melbatch's default features, a model
package with random weights of ``--model``; ``classify`` on a local Ray with ``--cpus`` CPUs: one
for the model actor, the rest decode), each in × realtime:
  melbatch classify    the whole job (listing, decode tasks, model actor, Parquet, manifest), timed
                       after a warm-up run so Ray's workers exist; OUT is overwritten each time
  bare featurize       melbatch's decode + clips + log-mel on bytes in memory, one process
                       (the CPUs classify leaves for decoding)
  bare model loop      the model's forward pass + softmax over the same images in memory,
                       ``batch_size`` clips per call, as many threads as the model actor gets;
                       then again while another process decodes the archive in a loop (the load
                       classify's decode tasks put beside its model actor)
Target (issue #4): classify >= 80% of the slower of the two bare loops.

Memory (``test_resnet``, so decoding is the bottleneck and input piles up if anything does): peak
proportional set size (PSS: shared pages counted once) of the driver and every Ray process, and
peak object store use, sampled every 0.5 s, on an archive and one ``--scale`` times larger.
Target: flat within ±15%.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from melbatch import audio, classify, features, model, samples, storage
from melbatch.config import ClassifyConfig, FeatureConfig


def make_archive(root: Path, n: int, seconds: float, sr: int) -> float:
    """``n`` engine recordings (two labels); returns the seconds of audio written."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = ("healthy", "faulty")[i % 2]
        x = samples.engine_sound(rng, seconds, sr, label == "faulty")
        storage.write_bytes(str(root / label / f"{label}_{i:05d}.wav"), samples.encode(x, sr, samples.FORMATS[0]))
    return n * seconds


def make_package(out: Path, name: str, cfg: FeatureConfig) -> None:
    net = model.create_model(name, 2, cfg.shape, pretrained=False)
    model.save_package(str(out), net, {"model_name": name, "labels": ["faulty", "healthy"],
                                       "feature_config": cfg.to_dict(), "config_hash": cfg.hash(),
                                       "normalization": {"kind": "dataset", "mean": -40.0, "std": 20.0}})


def bare_featurize(root: Path, cfg: FeatureConfig) -> tuple[float, np.ndarray]:
    """(× realtime, all images) of decode + log-mel in this process, on bytes already in memory."""
    blobs = [p.read_bytes() for p in sorted(root.rglob("*.wav"))]
    torch.set_num_threads(1)
    t0, mels, seconds = time.perf_counter(), [], 0.0
    import io

    for b in blobs:
        info, clips = audio.decode_clips(io.BytesIO(b), cfg)
        mels += [m for _, m in features.logmel_clips(clips, cfg)]
        seconds += info.decoded_frames / info.sample_rate_hz
    return seconds / (time.perf_counter() - t0), np.stack(mels)


def bare_model(mels: np.ndarray, name: str, cfg: FeatureConfig, batch_size: int, threads: int) -> float:
    """× realtime of the forward pass alone over images in memory (best of 2 passes)."""
    net = model.create_model(name, 2, cfg.shape, pretrained=False).eval()
    torch.set_num_threads(threads)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(2):
            t0 = time.perf_counter()
            for s in range(0, len(mels), batch_size):
                x = torch.from_numpy(mels[s: s + batch_size].astype(np.float32)).unsqueeze(1)
                torch.softmax(net((x + 40.0) / 20.0), 1)
            best = min(best, time.perf_counter() - t0)
    return len(mels) * cfg.clip_s / best


def busy_decoder(root: Path, cfg: FeatureConfig) -> subprocess.Popen:
    """A process that decodes + computes log-mel over the archive in a loop: the CPU load classify's
    decode tasks put beside its model actor (on small machines the cores share caches and bandwidth)."""
    code = ("import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import classify as b; "
            "from melbatch.config import FeatureConfig\n"
            f"while True: b.bare_featurize(Path({str(root)!r}), FeatureConfig())")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class MemorySampler:
    """Peak PSS of this process and all its descendants (Ray's processes), and of the object store."""

    def __init__(self) -> None:
        import psutil

        self.me, self.peak_pss, self.peak_store = psutil.Process(), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        import ray

        total = ray.cluster_resources().get("object_store_memory", 0)
        while not self._stop.is_set():
            pss = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    pss += p.memory_full_info().pss
            store = total - ray.available_resources().get("object_store_memory", total)
            self.peak_pss, self.peak_store = max(self.peak_pss, pss), max(self.peak_store, store)
            time.sleep(0.5)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_classify(archive: Path, pkg: Path, out: Path, batch_size: int, cpus: int, files_per_task: int = 32,
                 sample_memory: bool = False, inflight_mb: float = 512.0) -> tuple[float, float, MemorySampler | None]:
    """(× realtime, seconds, memory peaks) of one whole ``classify.run``.

    Sampling PSS reads every process's page map and costs a good part of a CPU, so throughput runs
    do not sample.
    """
    cfg = ClassifyConfig(archive=str(archive), model=str(pkg), out=str(out), batch_size=batch_size,
                         cpus_per_actor=max(0.5, cpus - 1.0) if cpus > 1 else 0.5, overwrite=True,
                         max_quarantine_rate=1.0, files_per_task=files_per_task, inflight_mb=inflight_mb)
    mem = MemorySampler() if sample_memory else None
    with mem or contextlib.nullcontext():
        t0 = time.perf_counter()
        s = classify.run(cfg, progress=False)
        elapsed = time.perf_counter() - t0
    return s.audio_s / elapsed, elapsed, mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=96, help="files in the throughput archive")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each file")
    p.add_argument("--model", default="resnet18", help="timm model for the throughput rows")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory-files", type=int, default=40, help="files in the small memory archive")
    p.add_argument("--scale", type=int, default=10, help="the large memory archive has this many times more")
    p.add_argument("--memory-inflight-mb", type=float, default=16.0,
                   help="classify --inflight-mb for the memory runs: below the small archive's images, so both "
                   "runs reach the steady state the budget sets")
    p.add_argument("--memory-files-per-task", type=int, default=4,
                   help="files per work batch in the memory runs (many batches: a steady state to measure)")
    args = p.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="melbatch-bench-classify-"))
    cfg = FeatureConfig()
    audio_s = make_archive(root / "archive", args.files, args.seconds, cfg.sample_rate_hz)
    make_package(root / "pkg", args.model, cfg)
    make_package(root / "pkg-tiny", "test_resnet", cfg)
    threads = max(1, args.cpus - 1)
    feat_rt, mels = bare_featurize(root / "archive", cfg)
    model_rt = bare_model(mels, args.model, cfg, args.batch_size, threads)
    busy = busy_decoder(root / "archive", cfg)
    try:
        time.sleep(3)
        busy_rt = bare_model(mels, args.model, cfg, args.batch_size, threads)
    finally:
        busy.kill()

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    make_archive(root / "warm", 2, 5.0, cfg.sample_rate_hz)
    run_classify(root / "warm", root / "pkg", root / "out-warm", args.batch_size, args.cpus)
    fixed = min(run_classify(root / "warm", root / "pkg", root / f"out-warm{i}", args.batch_size, args.cpus)[1]
                for i in range(2))
    best = max(run_classify(root / "archive", root / "pkg", root / f"out-{i}", args.batch_size, args.cpus)[0]
               for i in range(2))
    slower = min(feat_rt, model_rt)
    print(f"\n{args.files} x {args.seconds:g} s of 16 kHz WAV ({audio_s / 3600:.2f} h), model {args.model}, "
          f"batch {args.batch_size}, {args.cpus} CPU(s)")
    print(f"{'pipeline':<40}{'x realtime':>12}")
    print(f"{'melbatch classify (Ray Data, end to end)':<40}{best:>12,.0f}")
    print(f"{'bare featurize (1 process)':<40}{feat_rt:>12,.0f}")
    print(f"{f'bare model loop ({threads} thread(s))':<40}{model_rt:>12,.0f}")
    print(f"{'bare model loop, decoding beside it':<40}{busy_rt:>12,.0f}")
    print(f"classify / slower bare loop: {best / slower:.0%}  (target >= 80%)")
    print(f"classify / bare model loop with the same decode load beside it: {best / busy_rt:.0%}")
    print(f"fixed cost of a run (2 files of 5 s: model actor start, listing, manifest): {fixed:.1f} s")

    rows = []
    for n in (args.memory_files, args.memory_files * args.scale):
        arch = root / f"mem-{n}"
        secs = make_archive(arch, n, args.seconds, cfg.sample_rate_hz)
        rt, _, mem = run_classify(arch, root / "pkg-tiny", root / f"out-mem-{n}", args.batch_size, args.cpus,
                                  files_per_task=args.memory_files_per_task, sample_memory=True,
                                  inflight_mb=args.memory_inflight_mb)
        rows.append((n, secs, rt, mem.peak_pss, mem.peak_store))
    print(f"\nmemory (test_resnet, --inflight-mb {args.memory_inflight_mb:g}), peaks sampled every 0.5 s")
    print(f"{'files':>7}{'audio h':>9}{'x realtime':>12}{'driver+Ray PSS MB':>19}{'object store MB':>17}")
    for n, secs, rt, pss, store in rows:
        print(f"{n:>7}{secs / 3600:>9.2f}{rt:>12,.0f}{pss / 1e6:>19,.0f}{store / 1e6:>17,.0f}")
    (_, _, _, pss0, st0), (_, _, _, pss1, st1) = rows
    print(f"{args.scale}x the archive: PSS {pss1 / pss0 - 1:+.0%}, object store "
          f"{(st1 - st0) / max(st0, 1):+.0%}  (target: within ±15%)")


if __name__ == "__main__":
    main()
