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

The pipeline's ceiling (issue 32), with an **instant model** (``melbatch_band_means``: each band's
mean over time and a linear head, ~100,000 images/s on one thread, so nothing waits for the model),
over an archive of its own (``--instant-files`` x ``--seconds`` at ``--rate`` in ``--format``; 8 h by
default, so a run's fixed cost is small): classify end to end with the model actor on a quarter of a
CPU, beside bare decode + cut + log-mel (and decode + cut alone) run in ``--cpus`` processes at once
over the same files (bytes in memory, started together). Their ratio is the share of the CPUs that
reaches the model. Target: >= 70%. ``--only instant`` runs this part alone.

Memory (``test_resnet``, so decoding is the bottleneck and input piles up if anything does): peak
proportional set size (PSS: shared pages counted once) of the driver and every Ray process, and
peak object store use, sampled every 0.5 s, on an archive and one ``--scale`` times larger.
Target: flat within ±15%.

With ``--use-gpu`` the model actor and the bare model loop run on the GPU (bfloat16 autocast), and
the GPU's utilisation is sampled during the classify runs (needs ``pynvml``, from nvidia-ml-py).
Then the bare featurize row is per core, and classify is also compared with it times the CPUs
left for decoding: on a GPU the CPUs are what limits. ``--memory-files 0`` skips the memory part.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from melbatch import storage
from melbatch.audio import decode, logmel
from melbatch.config import ClassifyConfig, FeatureConfig
from melbatch.model import package
from melbatch.shards import read_tables, to_pcm16
from melbatch.stages import classify
from melbatch.testing import archives


def make_archive(root: Path, n: int, seconds: float, sr: int, unique: int = 0, fmt: str = "wav") -> float:
    """``n`` engine recordings (two labels) at ``sr`` Hz in ``fmt`` (wav or flac), the first ``unique``
    of them copied round when ``unique`` > 0 (a big archive written in seconds); returns the seconds
    of audio written."""
    form = next(f for f in archives.FORMATS if f[2] == fmt)
    rng, made = np.random.default_rng(0), []
    for i in range(n):
        label = ("healthy", "faulty")[i % 2]
        if unique <= 0 or i < unique:
            made.append(archives.encode(archives.engine_sound(rng, seconds, sr, label == "faulty"), sr, form))
        storage.write_bytes(str(root / label / f"{label}_{i:05d}.{fmt}"), made[-1] if unique <= 0 else made[i % unique])
    return n * seconds


# What one GPU's model does, to size its CPU feeders: classify's predict on an H200 at melbatch's default
# images (128 x 501, batch 256, bfloat16), measured with bench/gpu.py (README, Performance at GPU scale)
GPU_IMAGES_PER_S = {"resnet18": 12_693, "tf_efficientnet_lite0": 7_493}
GPU_SOURCE = "measured on an H200 by bench/gpu.py"


def make_package(out: Path, name: str, cfg: FeatureConfig) -> None:
    net = package.create_model(name, 2, cfg.shape, pretrained=False)
    package.save_package(str(out), net, {"model_name": name, "labels": ["faulty", "healthy"],
                                       "feature_config": cfg.to_dict(), "config_hash": cfg.hash(),
                                       "normalization": {"kind": "dataset", "mean": -40.0, "std": 20.0}})


def bare_featurize(root: Path, cfg: FeatureConfig, limit: int | None = None,
                   images: bool = True) -> tuple[float, np.ndarray]:
    """(× realtime, all images) of decode + log-mel in this process, on bytes already in memory
    (of the first ``limit`` files when given); without ``images`` decode and cut only (what the CPU
    stage does with ``--mel-on model``), returning the clips as 16-bit PCM."""
    blobs = [p.read_bytes() for p in sorted(f for f in root.rglob("*") if f.is_file())[:limit]]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seconds, out = decode_blobs(blobs, cfg, images)
    return seconds / (time.perf_counter() - t0), np.stack(out)


def decode_blobs(blobs: list[bytes], cfg: FeatureConfig, images: bool = True) -> tuple[float, list[np.ndarray]]:
    """(seconds of audio, each clip's image, or its 16-bit PCM without ``images``) of encoded files in
    memory: the bare loops' work."""
    import io

    out, seconds = [], 0.0
    for b in blobs:
        info, clips = decode.decode_clips(io.BytesIO(b), cfg)
        out += [m for _, m in logmel.logmel_clips(clips, cfg)] if images else [to_pcm16(c.samples) for c in clips]
        seconds += info.decoded_frames / info.sample_rate_hz
    return seconds, out


def bare_model(mels: np.ndarray, name: str, cfg: FeatureConfig, batch_size: int, threads: int,
               device: str = "cpu") -> float:
    """× realtime of the forward pass alone over images in memory (best of 2 passes; on a GPU the
    images are copied in per batch, under bfloat16 autocast, as classify's actor does)."""
    net = package.create_model(name, 2, cfg.shape, pretrained=False).to(device).eval()
    torch.set_num_threads(threads)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    best = float("inf")
    with torch.inference_mode(), autocast:
        for _ in range(3 if device == "cuda" else 2):  # a GPU's first pass also tunes its kernels
            t0 = time.perf_counter()
            for s in range(0, len(mels), batch_size):
                x = torch.from_numpy(mels[s: s + batch_size].astype(np.float32)).unsqueeze(1).to(device)
                torch.softmax(net((x + 40.0) / 20.0).float(), 1).cpu()
            best = min(best, time.perf_counter() - t0)
    return len(mels) * cfg.clip_s / best


INSTANT = "melbatch_band_means"  # the instant model (melbatch.model.baseline)


def _bare_share(root: str, cfg_json: str, images: bool, i: int, procs: int, barrier) -> tuple[float, float, float]:
    """One of :func:`bare_parallel`'s processes: (audio seconds, start, end) over its share of the files."""
    cfg = FeatureConfig.from_dict(json.loads(cfg_json))
    blobs = [p.read_bytes() for p in sorted(f for f in Path(root).rglob("*") if f.is_file())[i::procs]]
    torch.set_num_threads(1)
    barrier.wait()
    t0 = time.time()
    seconds, _ = decode_blobs(blobs, cfg, images)
    return seconds, t0, time.time()


def bare_parallel(root: Path, cfg: FeatureConfig, procs: int, images: bool = True, repeat: int = 2) -> float:
    """× realtime of ``procs`` processes decoding (+ log-mel with ``images``) their shares of the files
    at once, bytes in memory, started together: what the same cores do with nothing around them (best
    of ``repeat``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    best = 0.0
    for _ in range(repeat):
        with ctx.Manager() as manager, ctx.Pool(procs) as pool:
            barrier = manager.Barrier(procs)
            parts = pool.starmap(_bare_share, [(str(root), cfg.canonical_json(), images, i, procs, barrier)
                                               for i in range(procs)])
        best = max(best, sum(p[0] for p in parts) / (max(p[2] for p in parts) - min(p[1] for p in parts)))
    return best


def instant_rows(root: Path, cfg: FeatureConfig, args: argparse.Namespace, repeat: int = 2) -> None:
    """The pipeline's ceiling: classify with the instant model against bare decode on the same cores,
    over an archive of its own (``--instant-files``: hours of audio, so a run's fixed cost is small)."""
    cpus, batch_size, arch = args.cpus, args.batch_size, root / "archive-instant"
    audio_s = make_archive(arch, args.instant_files, args.seconds, args.rate, min(48, args.instant_files), args.format)
    make_package(root / "pkg-instant", INSTANT, cfg)
    feed = {"decode + cut + log-mel": bare_parallel(arch, cfg, cpus),
            "decode + cut": bare_parallel(arch, cfg, cpus, images=False)}
    if not (root / "warm").exists():
        make_archive(root / "warm", 2, 5.0, cfg.sample_rate_hz)
    fixed = min(run_classify(root / "warm", root / "pkg-instant", root / f"out-instant-warm-{i}", batch_size, cpus,
                             actor_cpus=0.25)[1] for i in range(repeat + 1))  # the first also starts Ray's workers
    took = {}
    for name, task_cpus in (("after", classify.decode_task_cpus), ("before", lambda share: 1.0)):
        default = classify.decode_task_cpus
        classify.decode_task_cpus = task_cpus
        try:
            for i in range(repeat):
                s = run_classify(arch, root / "pkg-instant", root / f"out-instant-{name}-{i}", batch_size,
                                 cpus, actor_cpus=0.25)[1]
                took[name] = min(took.get(name, float("inf")), s)
        finally:
            classify.decode_task_cpus = default
    print(f"\nthe pipeline's ceiling: instant model ({INSTANT}, actor 0.25 CPU), {cpus} CPU(s), best of {repeat}; "
          f"{args.instant_files} x {args.seconds:g} s of {args.rate / 1000:g} kHz {args.format.upper()} "
          f"({audio_s / 3600:.1f} h)")
    print(f"{'pipeline':<58}{'x realtime':>12}{'of bare':>9}")
    mel = feed["decode + cut + log-mel"]
    for name, what in (("after", "melbatch classify, decode tasks share the CPUs left"),
                       ("before", "melbatch classify, decode tasks a whole CPU each")):
        rt = audio_s / took[name]
        print(f"{what:<58}{rt:>12,.0f}{rt / mel:>9.0%}")
    steady = audio_s / max(1e-9, took["after"] - fixed)
    print(f"{'melbatch classify less its fixed cost':<58}{steady:>12,.0f}{steady / mel:>9.0%}")
    for what, rt in feed.items():
        print(f"{f'bare {what}, {cpus} processes at once':<58}{rt:>12,.0f}{rt / mel:>9.0%}")
    print(f"classify / bare decode + cut + log-mel on the same cores: {audio_s / took['after'] / mel:.0%} end to end, "
          f"{steady / mel:.0%} less the fixed cost of a run ({fixed:.1f} s)  (target >= 70%; before: "
          f"{audio_s / took['before'] / mel:.0%} end to end)")


def busy_decoder(root: Path, cfg: FeatureConfig) -> subprocess.Popen:
    """A process that decodes + computes log-mel over the archive in a loop: the CPU load classify's
    decode tasks put beside its model actor (on small machines the cores share caches and bandwidth)."""
    code = ("import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import classify as b; "
            "from melbatch.config import FeatureConfig\n"
            f"while True: b.bare_featurize(Path({str(root)!r}), FeatureConfig(), 96)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Sampler:
    """A background thread that calls :meth:`sample` every ``every_s`` seconds inside ``with``."""

    every_s = 0.5

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.every_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class GpuSampler(Sampler):
    """Mean GPU utilisation (%, as nvidia-smi reports it) sampled every 0.2 s; ``None`` without pynvml."""

    every_s = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[int] = []

    def sample(self) -> None:
        with contextlib.suppress(Exception):  # no pynvml / no NVML: no samples
            self.samples.append(torch.cuda.utilization())

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


class MemorySampler(Sampler):
    """Peak PSS of this process and all its descendants (Ray's processes), and of the object store."""

    def __init__(self) -> None:
        import psutil
        import ray

        super().__init__()
        self.me, self.peak_pss, self.peak_store = psutil.Process(), 0, 0
        self.total = ray.cluster_resources().get("object_store_memory", 0)

    def sample(self) -> None:
        import psutil
        import ray

        pss = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                pss += p.memory_full_info().pss
        store = self.total - ray.available_resources().get("object_store_memory", self.total)
        self.peak_pss, self.peak_store = max(self.peak_pss, pss), max(self.peak_store, store)


def run_classify(archive: Path, pkg: Path, out: Path, batch_size: int, cpus: int, files_per_task: int = 32,
                 sample_memory: bool = False, inflight_mb: float = 512.0, use_gpu: bool = False,
                 keep_embeddings: bool = False, mel_on: str = "auto",
                 actor_cpus: float | None = None) -> tuple[float, float, MemorySampler | None]:
    """(× realtime, seconds, memory peaks) of one whole ``classify.run``.

    Sampling PSS reads every process's page map and costs a good part of a CPU, so throughput runs
    do not sample.
    """
    cfg = ClassifyConfig(archive=str(archive), model=str(pkg), out=str(out), batch_size=batch_size,
                         cpus_per_actor=actor_cpus or (1.0 if use_gpu else max(0.5, cpus - 1.0) if cpus > 1 else 0.5),
                         overwrite=True, max_quarantine_rate=1.0, files_per_task=files_per_task,
                         inflight_mb=inflight_mb, use_gpu=use_gpu, keep_embeddings=keep_embeddings, mel_on=mel_on)
    mem = MemorySampler() if sample_memory else None
    with mem or contextlib.nullcontext():
        t0 = time.perf_counter()
        s = classify.run(cfg, progress=False)
        elapsed = time.perf_counter() - t0
    return s.audio_s / elapsed, elapsed, mem


def many_batches(root: Path, files: int, cpus: int, batch_size: int, repeat: int = 2) -> None:
    """classify of ``files`` 1-s recordings, one per work batch, with up to 16 batches in an input block
    (the default) and with one (as before): what Ray Data's cost per block is in a run of many batches."""
    cfg = FeatureConfig()
    arch = root / f"many-{files}"
    secs = make_archive(arch, files, 1.0, cfg.sample_rate_hz)
    default = classify.BATCHES_PER_BLOCK
    took = {}
    for i in range(repeat):
        for per_block in (1, default):
            classify.BATCHES_PER_BLOCK = per_block
            try:
                s = run_classify(arch, root / "pkg-tiny", root / f"out-many-{per_block}-{i}", batch_size, cpus,
                                 files_per_task=1)[1]
            finally:
                classify.BATCHES_PER_BLOCK = default
            took[per_block] = min(took.get(per_block, float("inf")), s)
    print(f"\n{files} files of 1 s, one per work batch ({files} batches), test_resnet, {cpus} CPU(s), "
          f"best of {repeat}:")
    print(f"{'input blocks':<44}{'seconds':>9}{'files/s':>9}")
    for per_block, s in took.items():
        name = (f"up to {per_block} batches a block (the default)" if per_block == default
                else "one batch a block (before)")
        print(f"{name:<44}{s:>9.1f}{files / s:>9.1f}")
    print(f"blocks of up to {default} / one a block: {took[1] / took[default]:.2f}x the speed "
          f"({secs / took[default]:,.0f} vs {secs / took[1]:,.0f} x realtime)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=96, help="files in the throughput archive")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each file")
    p.add_argument("--unique", type=int, default=0,
                   help="write only this many different recordings and copy them round (0: all different)")
    p.add_argument("--bare-files", type=int, default=96, help="files the bare loops run over (the first ones)")
    p.add_argument("--model", default="resnet18", help="timm model for the throughput rows")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true", help="the model actor and the bare model loop on the GPU")
    p.add_argument("--memory-files", type=int, default=40, help="files in the small memory archive (0: skip)")
    p.add_argument("--scale", type=int, default=10, help="the large memory archive has this many times more")
    p.add_argument("--memory-inflight-mb", type=float, default=16.0,
                   help="classify --inflight-mb for the memory runs: below the small archive's images, so both "
                   "runs reach the steady state the budget sets")
    p.add_argument("--many-files", type=int, default=480,
                   help="1-s files, one per work batch, for the input-block rows (0: skip)")
    p.add_argument("--memory-files-per-task", type=int, default=4,
                   help="files per work batch in the memory runs (many batches: a steady state to measure)")
    p.add_argument("--instant-files", type=int, default=960,
                   help="files in the instant model's archive (48 different ones copied round)")
    p.add_argument("--rate", type=int, default=16_000, help="sample rate of the instant model's archive (Hz)")
    p.add_argument("--format", choices=["wav", "flac"], default="wav", help="format of the instant model's archive")
    p.add_argument("--only", choices=["instant"], default=None,
                   help="run one part alone: 'instant', the pipeline's ceiling with the instant model")
    args = p.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="melbatch-bench-classify-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # archives and outputs: GBs at --instant-files 3840
    cfg = FeatureConfig()
    audio_s = make_archive(root / "archive", args.files, args.seconds, cfg.sample_rate_hz, args.unique)
    make_package(root / "pkg", args.model, cfg)
    make_package(root / "pkg-tiny", "test_resnet", cfg)
    if args.only == "instant":
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        make_archive(root / "warm", 2, 5.0, cfg.sample_rate_hz)
        run_classify(root / "warm", root / "pkg-tiny", root / "out-warm", args.batch_size, args.cpus)
        instant_rows(root, cfg, args)
        return
    threads, device = max(1, args.cpus - 1), "cuda" if args.use_gpu else "cpu"
    feat_rt, mels = bare_featurize(root / "archive", cfg, args.bare_files)
    decode_rt, _ = bare_featurize(root / "archive", cfg, args.bare_files, images=False)
    model_rt = bare_model(mels, args.model, cfg, args.batch_size, threads, device)
    busy = busy_decoder(root / "archive", cfg)
    try:
        time.sleep(3)
        busy_rt = bare_model(mels, args.model, cfg, args.batch_size, threads, device)
    finally:
        busy.kill()

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    run = functools.partial(run_classify, batch_size=args.batch_size, cpus=args.cpus, use_gpu=args.use_gpu)
    make_archive(root / "warm", 2, 5.0, cfg.sample_rate_hz)
    run(root / "warm", root / "pkg", root / "out-warm")
    fixed = min(run(root / "warm", root / "pkg", root / f"out-warm{i}")[1] for i in range(2))
    with GpuSampler() if args.use_gpu else contextlib.nullcontext() as gpu:
        best_s = min(run(root / "archive", root / "pkg", root / f"out-{i}")[1] for i in range(2))
    best = audio_s / best_s
    other = "decoder" if classify.mel_on_model(ClassifyConfig(archive="a", model="m", out="o",
                                                               use_gpu=args.use_gpu)) else "model"
    other_s = min(run(root / "archive", root / "pkg", root / f"out-mel-{i}", mel_on=other)[1] for i in range(2))
    emb_s = run(root / "archive", root / "pkg", root / "out-emb", keep_embeddings=True)[1]

    def clip_bytes(out: Path) -> float:
        return sum(f.stat().st_size for f in (out / "clips").glob("*.parquet"))
    slower = min(feat_rt, model_rt)
    print(f"\n{args.files} x {args.seconds:g} s of 16 kHz WAV ({audio_s / 3600:.2f} h), model {args.model}, "
          f"batch {args.batch_size}, {args.cpus} CPU(s){', model on ' + torch.cuda.get_device_name() if gpu else ''}")
    print(f"{'pipeline':<40}{'x realtime':>12}")
    print(f"{'melbatch classify (Ray Data, end to end)':<40}{best:>12,.0f}")
    print(f"{'melbatch classify less its fixed cost':<40}{audio_s / max(1e-9, best_s - fixed):>12,.0f}")
    print(f"{f'melbatch classify --mel-on {other}':<40}{audio_s / other_s:>12,.0f}")
    print(f"{'bare featurize (1 process)':<40}{feat_rt:>12,.0f}")
    print(f"{'bare decode + cut, no mel (1 process)':<40}{decode_rt:>12,.0f}")
    print(f"{f'bare model loop ({device}, {threads} thread(s))':<40}{model_rt:>12,.0f}")
    print(f"{'bare model loop, decoding beside it':<40}{busy_rt:>12,.0f}")
    print(f"classify / slower bare loop: {best / slower:.0%}  (target >= 80%)")
    print(f"classify / bare model loop with the same decode load beside it: {best / busy_rt:.0%}")
    if gpu:
        decoders = args.cpus - 1  # the model actor keeps one CPU
        steady = audio_s / max(1e-9, best_s - fixed)
        print(f"classify less its fixed cost / (bare featurize x {decoders} decoding CPUs): "
              f"{steady / (feat_rt * decoders):.0%}; "
              f"GPU utilisation during classify: "
              f"{'n/a (no pynvml)' if gpu.mean is None else f'{gpu.mean:.0f}% mean of {len(gpu.samples)} samples'}")
        print(f"CPU cores that would keep this GPU's bare model loop busy: {model_rt / feat_rt:.0f} "
              f"(bare model loop / bare featurize per core)")
    print(f"fixed cost of a run (2 files of 5 s: model actor start, listing, manifest): {fixed:.1f} s")
    print(f"the CPU stage per core: decode + log-mel {feat_rt:,.0f} x realtime, decode only {decode_rt:,.0f} "
          f"({decode_rt / feat_rt:.1f}x)")
    clips_per_core = {"mel on the CPUs": feat_rt / cfg.clip_s, "mel on the GPU": decode_rt / cfg.clip_s}
    for name, images_per_s in GPU_IMAGES_PER_S.items():
        need = ", ".join(f"{where}: {images_per_s / rate:,.0f}" for where, rate in clips_per_core.items())
        print(f"CPU cores one GPU needs for {name} at {images_per_s:,} images/s ({GPU_SOURCE}): {need}")
    clips = max(1, read_tables(str(root / "out-0"), "clips").num_rows)
    plain_b, emb_b = clip_bytes(root / "out-0"), clip_bytes(root / "out-emb")
    print(f"with --keep-embeddings: {audio_s / emb_s:,.0f} x realtime ({best_s / emb_s:.0%} of the speed without); "
          f"clips/ {emb_b / clips:,.0f} bytes per clip vs {plain_b / clips:,.0f} without ({emb_b / plain_b:.0f}x; "
          f"{emb_b / (audio_s / 3600) / 1e6:,.1f} MB per hour of audio)")
    if not args.use_gpu:
        instant_rows(root, cfg, args)
    if args.many_files > 0:
        many_batches(root, args.many_files, args.cpus, args.batch_size)
    if args.memory_files <= 0:
        return

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
