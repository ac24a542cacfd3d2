"""Training throughput: melbatch train (Ray Train + Ray Data) against a bare PyTorch loop, same run.

    python bench/train.py                       # test_resnet on a generated engine archive, CPU
    python bench/train.py --model resnet18 --weights resnet18.safetensors   # adds the transfer-gain table

Rows: samples/s of the training phase of each epoch (best epoch after the first, so start-up and
warm-up are excluded) for
  melbatch train   1 Ray Train worker reading its Ray Data shard, with melbatch's augmentations:
                   with the defaults (a set that fits --hold-mb and 512 MB is read by the worker itself
                   before the first epoch; a bigger one through Ray Data, held after the first epoch),
                   and again with --hold-mb 0, streaming the shards through Ray Data every epoch
  bare loop        one process, the same shards already decoded in memory as one tensor, the same
                   model, batch size and augmentations, a plain forward/backward/step loop
Target (issue #3): melbatch >= 90% of the bare loop. Then the bare model alone (forward, backward and a
step on random images of the same size and batch) on one thread and on two: the ceiling of any loop on
this machine (issue 45). With --weights, also validation accuracy per
epoch for ImageNet init vs random init on the same data and budget. With --use-gpu both loops run on
the GPU (bfloat16 autocast, as train --use-gpu).

The ingest's ceiling (issue 32): the same shards with an **instant model** (``melbatch_band_means``,
~100,000 images/s on one thread) and no field shifts, so a step costs next to nothing and what is
measured is getting the clips to it: melbatch train (held; the training clips read every epoch and
the validation clips held, what a set over --hold-mb gets; and --hold-mb 0: Ray Data every epoch
for both) against a bare reader, one process that reads the shard files every epoch (Parquet → one tensor),
normalises, shifts in time and steps the same model. Target: >= 80% of the bare reader. Over an
archive of its own, ``--instant-files-per-class`` (240: 1,920 clips, so an epoch is more than Ray
Data's start). ``--only instant`` runs this part alone.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import tempfile
import time

import numpy as np
import torch

from melbatch import shards, storage
from melbatch.audio.logmel import logmel_tensor
from melbatch.config import AugmentConfig, FeatureConfig, FeaturizeConfig, TrainConfig
from melbatch.model.package import create_model
from melbatch.shards import TRAIN_CONFIG
from melbatch.stages import featurize
from melbatch.testing import archives
from melbatch.train import augment, driver


def threads_of(root: str) -> int:
    """The torch threads melbatch's worker stepped on in the default run (its CPUs, as train sizes them)."""
    cfg = json.loads(storage.read_bytes(f"{root}/out-default/{TRAIN_CONFIG}"))["train"]
    return max(1, int(cfg["cpus_per_worker"]))


def bare_loop(feat: str, cfg: TrainConfig, epochs: int) -> float:
    """Best samples/s of a plain single-process loop over the same shards held in memory.

    It does the same work per batch as melbatch's workers: with ``cfg.augment.wave_augment`` it augments
    the stored waveforms and recomputes their images, otherwise it uses the stored images.
    """
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.use_gpu and cfg.amp)
    rows = list(shards.iter_clips(feat))
    features = FeatureConfig.from_dict(shards.read_manifest(feat)["feature_config"])
    labels = sorted({r["label"] for r in rows})
    x_all = torch.from_numpy(np.stack([r["mel"] for r in rows]).astype(np.float32)).unsqueeze(1).to(device)
    mean, std = x_all.mean(), x_all.std()
    wave = torch.from_numpy(np.stack([r["audio"] for r in rows])).to(device) if cfg.augment.wave_augment else None
    aug = augment.WaveAugment.of(cfg.augment, features.sample_rate_hz)
    y_all = torch.tensor([labels.index(r["label"]) for r in rows], device=device)
    model = create_model(cfg.model, len(labels), features.shape, pretrained=False,
                         time_pool=cfg.time_pool or 1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    shift = round(cfg.augment.time_shift_frac * x_all.shape[-1])
    best = 0.0
    for _ in range(epochs):
        t0, seen = time.perf_counter(), 0
        for idx in torch.randperm(len(y_all), generator=gen).to(device).split(cfg.batch_size):
            if wave is not None:
                with torch.no_grad():
                    x = logmel_tensor(augment.augment_waveforms(wave[idx], aug, None, gen), features).unsqueeze(1)
            else:
                x = x_all[idx]
            x = augment.random_time_shift((x - mean) / std, shift, gen)
            a = cfg.augment
            x = augment.spec_augment(x, a.time_masks, a.time_mask_frac, a.freq_masks, a.freq_mask_frac, gen)
            t = augment.soft_targets(y_all[idx], len(labels), cfg.label_smoothing)
            x, t = augment.mixup(x, t, cfg.augment.mixup_alpha, gen)
            with autocast:
                logits = model(x)
            loss = -(t * torch.log_softmax(logits.float(), 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
        if cfg.use_gpu:
            torch.cuda.synchronize()
        best = max(best, seen / (time.perf_counter() - t0))
    return best


def bare_model_rate(model_name: str, shape: tuple[int, int], batch: int, threads: int, steps: int = 3,
                    time_pool: int = 1) -> float:
    """Samples/s of the model alone: forward, backward and an AdamW step on random images of ``shape``
    on ``threads`` threads, channels-last as train's workers, seeing the images at ``time_pool`` as they
    do (best of ``steps`` after a warm-up step). The ceiling of any loop around it: what a step costs at
    this image size on this machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = create_model(model_name, 4, shape, pretrained=False, time_pool=time_pool).to(
            memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch, 1, *shape), torch.randint(0, 4, (batch,))
        best = math.inf
        for i in range(steps + 1):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                best = min(best, time.perf_counter() - t0)
        return batch / best
    finally:
        torch.set_num_threads(before)


INSTANT = "melbatch_band_means"  # the instant model (melbatch.model.baseline)


def bare_reader(feat: str, cfg: TrainConfig, epochs: int) -> float:
    """Best samples/s of one process that reads every shard file of ``feat`` each epoch (Parquet →
    one float32 tensor of images), normalises, shifts in time and steps ``cfg.model``: the ingest
    melbatch train's is compared with (the epoch's reading is inside its time)."""
    manifest = shards.read_manifest(feat)
    features = FeatureConfig.from_dict(manifest["feature_config"])
    uris = shards.shard_uris(feat, manifest)
    first = shards.read_files(uris, ["label"])
    labels = sorted(set(first.column("label").to_pylist()))
    model = create_model(cfg.model, len(labels), features.shape, pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    shift = round(cfg.augment.time_shift_frac * features.shape[1])
    best = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        table = shards.read_files(uris, ["label", "mel"])
        x_all = torch.from_numpy(shards.mel_array(table).astype(np.float32)).unsqueeze(1)
        index = {lab: i for i, lab in enumerate(labels)}
        y_all = torch.tensor([index[v] for v in table.column("label").to_pylist()])
        mean, std = x_all.mean(), x_all.std()
        for idx in torch.randperm(len(y_all), generator=gen).split(cfg.batch_size):
            x = augment.random_time_shift((x_all[idx] - mean) / std, shift, gen)
            loss = torch.nn.functional.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        best = max(best, len(y_all) / (time.perf_counter() - t0))
    return best


def instant_rows(root: str, base: dict, epochs: int, files_per_class: int) -> None:
    """The ingest's ceiling: melbatch train with the instant model against the bare reader and the bare
    in-memory loop, the same shards (an archive of its own), batch and CPUs."""
    archives.make_archive(f"{root}/archive-instant", "engine", files_per_class=files_per_class, seconds=10.0)
    featurize.run(FeaturizeConfig(src=f"{root}/archive-instant", dst=f"{root}/features-instant"), progress=False)
    plain = {**base, "model": INSTANT, "augment": AugmentConfig(field_augment=False, wave_augment=False),
             "shards": f"{root}/features-instant"}
    best, feat = {}, f"{root}/features-instant"
    for name, hold_mb in (("held", TrainConfig.hold_mb), ("validation held", None), ("streamed", 0)):
        if hold_mb is None:  # enough for the validation clips alone: the training clips are read every epoch
            held = json.loads(storage.read_bytes(f"{root}/out-instant-held/{TRAIN_CONFIG}"))["hold"]
            hold_mb = math.ceil(held["val_share_bytes"] / 2**20)
        m = driver.run(TrainConfig(out=f"{root}/out-instant-{name.replace(' ', '-')}", hold_mb=hold_mb, **plain))
        best[name] = max(m["epochs"][1:] or m["epochs"], key=lambda e: e["samples_per_s"])
    sps = {name: e["samples_per_s"] for name, e in best.items()}
    batch = json.loads(storage.read_bytes(f"{root}/out-instant-held/{TRAIN_CONFIG}"))["budget"]["batch_size"]
    cfg = TrainConfig(out=f"{root}/unused", **{**plain, "batch_size": batch})
    reader, memory = bare_reader(feat, cfg, epochs), bare_loop(feat, cfg, epochs)
    clips = shards.read_manifest(feat)["counts"]["clips"]
    print(f"\nthe ingest's ceiling: instant model ({INSTANT}), no field shifts, {clips:,} clips, batch {batch}, "
          f"{base['cpus_per_worker']:g} CPU(s) for the worker")
    print(f"{'loop':<52}{'samples/s':>10}{'of reader':>10}")
    for what, v in (("melbatch train (held after the first epoch)", sps["held"]),
                    ("melbatch train, training clips read every epoch", sps["validation held"]),
                    ("melbatch train --hold-mb 0 (Ray Data every epoch)", sps["streamed"]),
                    ("bare reader (Parquet every epoch, one process)", reader),
                    ("bare loop (images already in memory)", memory)):
        print(f"{what:<52}{v:>10,.0f}{v / reader:>10.0%}")
    print(f"melbatch train / bare reader: {sps['held'] / reader:.0%} held, {sps['validation held'] / reader:.0%} "
          f"training clips read every epoch, {sps['streamed'] / reader:.0%} streamed (target >= 80%)")
    for name, e in best.items():  # where the best epoch's time went
        print(f"{name}: best epoch {e['epoch_s']:.2f} s: training {e['train_s']:.2f} s (waiting for data "
              f"{e['data_wait_s']:.2f} s, {e['first_batch_s']:.2f} s of it for the first batch), validation "
              f"{e['val_s']:.2f} s ({e['val_from']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--files-per-class", type=int, default=48)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--weights", default=None, help="ImageNet weights file for the transfer-gain table")
    p.add_argument("--use-gpu", action="store_true", help="both loops on the GPU (bfloat16 autocast)")
    p.add_argument("--min-steps", type=int, default=None,
                   help="train's --min-steps (default: train's own floor; a small number keeps a try on a CPU short)")
    p.add_argument("--no-wave-augment", dest="wave_augment", action="store_false",
                   help="both loops use the stored images instead of augmenting waveforms")
    p.add_argument("--instant-files-per-class", type=int, default=240,
                   help="files of 10 s per label in the instant model's archive")
    p.add_argument("--only", choices=["instant"], default=None,
                   help="run one part alone: 'instant', the ingest's ceiling with the instant model")
    args = p.parse_args()

    import ray

    root = tempfile.mkdtemp(prefix="melbatch-bench-train-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # archives, shards, runs: 1.9 GB at 8,000 clips
    features = FeatureConfig()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    archives.make_archive(f"{root}/archive", "engine", files_per_class=args.files_per_class, seconds=10.0)
    featurize.run(FeaturizeConfig(src=f"{root}/archive", dst=f"{root}/features", features=features,
                                  keep_audio=args.wave_augment), progress=False)  # waveforms, to augment them
    n_clips = shards.read_manifest(f"{root}/features")["counts"]["clips"]
    # one worker gets the machine but one CPU, which Ray Data keeps for reading (the bare loop gets the same)
    base = dict(shards=f"{root}/features", model=args.model, pretrained=False, epochs=args.epochs,
                batch_size=args.batch_size, workers=1, cpus_per_worker=max(0.5, args.cpus - 1.0), max_failures=0,
                augment=AugmentConfig(wave_augment=args.wave_augment), use_gpu=args.use_gpu, min_steps=args.min_steps)
    torch.set_num_threads(max(1, int(args.cpus - 1)))
    if args.only == "instant" or not args.use_gpu:
        instant_rows(root, base, args.epochs, args.instant_files_per_class)
        if args.only == "instant":
            return
    sps = {}
    for name, hold_mb in (("default", TrainConfig.hold_mb), ("streamed", 0)):  # the default, then every epoch read
        m = driver.run(TrainConfig(out=f"{root}/out-{name}", hold_mb=hold_mb, **base))
        sps[name] = max(e["samples_per_s"] for e in m["epochs"][1:] or m["epochs"])
    ray.shutdown()
    # the same batch as melbatch's workers took (on little data the budget lowers --batch-size)
    ran = json.loads(storage.read_bytes(f"{root}/out-default/{TRAIN_CONFIG}"))
    batch, pool = ran["budget"]["batch_size"], ran["train"]["time_pool"] or 1  # and the frames its model saw
    bare_sps = bare_loop(f"{root}/features", TrainConfig(out=f"{root}/unused", **{**base, "batch_size": batch,
                                                                                  "time_pool": pool}), args.epochs)

    device = f", {torch.cuda.get_device_name()}" if args.use_gpu else ""
    print(f"\n{n_clips} clips of {features.shape[0]}x{features.shape[1]} (--time-pool {pool}: the model sees "
          f"{features.shape[0]}x{math.ceil(features.shape[1] / pool)}), model {args.model}, batch {batch} (of "
          f"--batch-size {args.batch_size}), {args.cpus} CPU(s){device}, waveform augmentation "
          f"{'on' if args.wave_augment else 'off'}")
    print(f"{'loop':<44}{'samples/s':>10}{'of bare':>9}")
    for name, what in (("default", "melbatch train (the defaults)"),
                       ("streamed", "melbatch train --hold-mb 0 (read each epoch)")):
        print(f"{what:<44}{sps[name]:>10.1f}{sps[name] / bare_sps:>9.0%}")
    print(f"{'bare PyTorch loop (in memory)':<44}{bare_sps:>10.1f}{1:>9.0%}")
    print(f"melbatch / bare: {sps['default'] / bare_sps:.0%} by default  (target >= 90%)")
    if not args.use_gpu:  # the model's own cost at this image size: what no loop can beat (issue 45)
        for threads in (1, 2):
            rate = bare_model_rate(args.model, features.shape, batch, threads, time_pool=pool)
            print(f"{f'bare model, forward+backward, {threads} thread(s)':<44}{rate:>10.1f}{rate / bare_sps:>9.0%}")
        print(f"(melbatch's worker steps on {threads_of(root)} thread(s): its CPUs)")

    if args.weights:
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        curves = {}
        for name, kw in (("imagenet", {"weights": args.weights}), ("random", {})):
            r = driver.run(TrainConfig(out=f"{root}/out-{name}", **{**base, "pretrained": False, **kw}))
            curves[name] = [e["val_accuracy"] for e in r["epochs"]]
        print(f"\n{'epoch':<8}{'imagenet init':>15}{'random init':>14}")
        for i, (a, b) in enumerate(zip(curves["imagenet"], curves["random"], strict=True), 1):
            print(f"{i:<8}{a:>15.3f}{b:>14.3f}")
    else:
        print("\ntransfer gain: skipped (no --weights file; see the README for getting ImageNet weights)")


if __name__ == "__main__":
    main()
