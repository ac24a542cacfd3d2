"""Models in the field: accuracy away from the training room, recipe by recipe, in one table.

    python bench/field.py                    # hours on 2 CPUs: the recipes below, FSDD digits and xc_birds10
                                             # (one digits training of the defaults ~13 min, one of birds ~1 h)
    python bench/field.py --quick            # a few minutes: fewer files and epochs (what the suite runs)
    python bench/field.py --recipe defaults --recipe 'before issue 29'   # some recipes only
    python bench/field.py --recipe defaults --self-train --no-random --no-plain   # + self-training (issue 43)

Digits (``../shared/data/fsdd``): train on 4 speakers (jackson, nicolas, theo, yweweler; recordings 5 and
up), then score per file

- **clean**: their held-out recordings 0-4 (the split the old defaults were chosen on);
- **new speakers**: george and lucas, never heard (recordings 0-4);
- **shifted**: the clean files through each of: a phone line (300-3400 Hz, 8 kHz, 8-bit mu-law), MP3 at
  8 kbit/s, stationary noise and babble of three other speakers at 0-10 dB SNR, a room (RT60
  0.3-0.9 s), gain -30..+6 dB with clipping, tempo +-15 % (ffmpeg's atempo, pitch kept). Every shift is
  made here, seeded, with maths and codecs melbatch's own augmentation does not use.

Birds (``../shared/data/xc_birds10``): the first 7 recordings of each species train, the other 3 are
scored per file (reference: BirdNET 29/30 zero-shot).

**field** = mean(new speakers, shifted, birds); **train s** / **birds train s**: seconds to a model (train
alone, on this machine). Each melbatch recipe is trained from ImageNet and, for
the gain, from random init; the plain script (bench/plain.py) with and without augmentation is a row
of its own. A recipe is a set of ``train.*`` / ``features.*`` / ``featurize.*`` overrides on melbatch's
defaults.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import plain
import torch
from transfer import write_csv

from melbatch import shards
from melbatch.config import FeatureConfig, FeaturizeConfig, TrainConfig, build
from melbatch.model import adapt as adapting
from melbatch.model import package as model
from melbatch.model import weights
from melbatch.stages import featurize
from melbatch.testing import archives
from melbatch.train import driver

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
TRAIN_SPEAKERS = ("jackson", "nicolas", "theo", "yweweler")
NEW_SPEAKERS = ("george", "lucas")
SHIFTS = archives.FIELD_SHIFTS
# time to a model: melbatch train's wall-clock seconds (Ray Train's start, steps, validation, the package),
# featurize not included (the shards are made once per recipe and reused by both inits)
TIMES = ("train s", "birds train s")
# What each recipe changes from melbatch's defaults of today (train.* / features.* / featurize.*).
RECIPES: dict[str, dict[str, object]] = {
    "defaults": {},
    "before issue 29": {"train.augment.field_augment": False, "train.normalize": "dataset",
                        "train.augment.time_masks": 0, "train.augment.freq_masks": 0},
}


# ------------------------------------------------------------------------------------------- the data

def fsdd(data: Path, per_digit: int, test_per_digit: int) -> dict[str, list[tuple[str, str]]]:
    """(path, digit) lists: train, clean (training speakers' held-out recordings), new speakers, babble
    sources (other speakers' recordings used nowhere else); for ``--self-train``, ``unlabelled new``
    (the new speakers' recordings 5 to 5 + ``per_digit``, never scored) and ``unlabelled takes`` (one
    other take per digit and training speaker, recording 5 + ``per_digit``, never trained or scored)."""
    out: dict[str, list[tuple[str, str]]] = {"train": [], "clean": [], "new speakers": [], "babble": [],
                                             "unlabelled new": [], "unlabelled takes": []}
    for f in sorted(data.glob("*/*.wav")):
        m = FSDD_NAME.match(f.name)
        if not m:
            continue
        digit, speaker, index = m.group(1), m.group(2), int(m.group(3))
        if speaker in TRAIN_SPEAKERS:
            if index < test_per_digit:
                out["clean"].append((str(f), digit))
            elif 5 <= index < 5 + per_digit:
                out["train"].append((str(f), digit))
            elif index == 5 + per_digit:
                out["unlabelled takes"].append((str(f), digit))
        elif index < test_per_digit:
            out["new speakers"].append((str(f), digit))
        elif 5 <= index < 5 + per_digit:
            out["unlabelled new"].append((str(f), digit))
        elif index >= 45:
            out["babble"].append((str(f), digit))
    return out


def birds(data: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {"train": [], "birds": []}
    for species in sorted(p for p in data.iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(species.glob("*.mp3"))):
            out["train" if i < 7 else "birds"].append((str(f), species.name))
    return out


# ------------------------------------------------------------------------------------------ melbatch

def overrides(recipe: dict[str, object], section: str) -> dict[str, object]:
    """The recipe's keys of one section, a dotted key as a section of its own (train.augment.noise_prob)."""
    out: dict[str, object] = {}
    for key, value in recipe.items():
        if key.startswith(section + "."):
            *path, last = key.split(".")[1:]
            into = out
            for part in path:
                into = into.setdefault(part, {})  # type: ignore[assignment]
            into[last] = value
    return out


def featurize_sets(sets: dict[str, list[tuple[str, str]]], out: Path, recipe: dict[str, object],
                   fitted: FeatureConfig | None = None) -> tuple[str, FeatureConfig, dict[str, list[tuple[str, str]]]]:
    """Featurize every file of ``sets`` into one shard folder, labels from a manifest, each set linked into
    a folder of its own (``out``.src/<set>/); the features (the recipe's ``features.*`` and ``featurize.*``)
    are fitted to the files unless ``fitted`` gives them. Returns the shards, their features and the sets
    as (URI, label) of the links."""
    src = out.with_suffix(".src")
    if src.exists():
        shutil.rmtree(src)
    linked: dict[str, list[tuple[str, str]]] = {}
    for name, rows in sets.items():
        (src / name).mkdir(parents=True)
        linked[name] = []
        for path, label in rows:
            (src / name / Path(path).name).symlink_to(path)
            linked[name].append((f"file://{src / name / Path(path).name}", label))
    labels = write_csv(out.with_suffix(".labels.csv"), ["uri", "label"], [r for rows in linked.values() for r in rows])
    fit = {"fit_clips": True, **overrides(recipe, "featurize")} if fitted is None else {
        "fit_clips": False, "fit_rate": False}
    cfg = FeaturizeConfig(src=str(src), dst=str(out), overwrite=True, labels=labels, files_per_task=512,
                          features=fitted or build(FeatureConfig, overrides(recipe, "features"), "features"), **fit)
    featurize.run(cfg, progress=False)
    return str(out), FeatureConfig.from_dict(shards.read_manifest(str(out))["feature_config"]), linked


def score(package: str, feats: str, sets: dict[str, list[tuple[str, str]]],
          adapt: bool = False) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per-file accuracy of the package on each set of (URI, label) (the one prediction path: model.predict
    + verdicts; a file that made no clip counts as wrong), and each file's best probability. ``adapt``:
    each set is scored by the package adapted to that set's own clips (classify --adapt, on up to
    ADAPT_CLIPS of them), as if it were the archive being classified."""
    pkg = model.load_package(package)
    table = shards.read_tables(feats, "shards", ["uri", "start_s", "end_s", "mel"])
    mels, uris = shards.mel_array(table), table.column("uri").to_pylist()
    padded = model.padded(table.column("start_s").to_numpy(), table.column("end_s").to_numpy(), pkg.features.clip_s)
    if adapt:
        sums = {}
        for rows in sets.values():
            mine = {u for u, _ in rows}
            at = np.flatnonzero([u in mine for u in uris])
            if not len(at):
                continue
            sample = at[np.linspace(0, len(at) - 1, min(len(at), adapting.ADAPT_CLIPS)).astype(int)]
            fitted = adapting.adapted(pkg, mels[sample])
            probs, _ = model.predict(fitted, mels[at], batch_size=128, padded_clips=padded[at])
            sums.update(model.aggregate_files([uris[i] for i in at], probs))
    else:
        probs, _ = model.predict(pkg, mels, batch_size=128, padded_clips=padded)
        sums = model.aggregate_files(uris, probs)
    accuracy, confidence = {}, {}
    for name, rows in sets.items():
        known = [(u, lab) for u, lab in rows if u in sums]
        scores, best = model.verdicts(sums, [u for u, _ in known], len(pkg.labels))
        right = sum(pkg.labels[b] == lab for b, (_, lab) in zip(best, known, strict=True))
        accuracy[name] = float(right / max(1, len(rows)))
        confidence[name] = scores.max(axis=1) if len(known) else np.zeros(0)
    return accuracy, confidence


def unknown_share(known: np.ndarray, unknown: np.ndarray) -> float:
    """The share of files of labels the model never saw that fall below the probability keeping 95 % of
    the known files (what ``classify --unknown-below`` would set aside)."""
    return float((unknown < np.quantile(known, 0.05)).mean()) if len(known) and len(unknown) else float("nan")


def train_package(feats: str, split: list[tuple[str, str]], out: Path, recipe: dict[str, object],
                  pretrained: bool, epochs: int, seed: int, unlabelled: str | None = None) -> str:
    split_csv = write_csv(out.with_suffix(".split.csv"), ["uri", "split"], split)
    if out.exists():
        shutil.rmtree(out)
    cfg = build(TrainConfig, {"shards": feats, "out": str(out), "pretrained": pretrained, "epochs": epochs,
                              "split_manifest": split_csv, "seed": seed, "unlabelled": unlabelled,
                              **overrides(recipe, "train")}, "train")
    driver.run(cfg, progress=False)
    return str(out)


def unlabelled_archive(digits: dict, rng: np.random.Generator, out: Path, fc: FeatureConfig) -> str:
    """``--self-train``'s archive, featurized without labels with the digits' features: the new speakers'
    unlabelled half and each field shift of the training speakers' unused takes (other recordings than
    the ones scored), as an archive the model will meet."""
    src = out.with_suffix(".src")
    if src.exists():
        shutil.rmtree(src)
    (src / "new").mkdir(parents=True)
    for path, _ in digits["unlabelled new"]:
        (src / "new" / Path(path).name).symlink_to(path)
    for kind in SHIFTS:
        archives.field_shifted(digits["unlabelled takes"], kind, src / kind, [p for p, _ in digits["babble"]], rng)
    featurize.run(FeaturizeConfig(src=str(src), dst=str(out), overwrite=True, labels="none", files_per_task=512,
                                  features=fc, fit_clips=False), progress=False)
    return str(out)


# ------------------------------------------------------------------------------------------ the bench

def _value(text: str) -> object:
    """A --set value: JSON where it parses (numbers, true/false, lists), else the text itself
    (train.model=tf_efficientnet_lite1)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding fsdd/ and xc_birds10/ (../shared/data)")
    ap.add_argument("--quick", action="store_true", help="3 training files per digit and speaker, 2 test "
                    "recordings, 4 epochs: a few minutes")
    ap.add_argument("--recipe", action="append", choices=list(RECIPES), help="recipes to run (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a recipe of its own, 'custom': these overrides on the defaults (repeatable; alone "
                    "unless --recipe names others too)")
    ap.add_argument("--no-random", action="store_true", help="skip the random-init runs (no gain column)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-script rows")
    ap.add_argument("--no-birds", action="store_true", help="digits only")
    ap.add_argument("--epochs", type=int, default=None, help="melbatch epochs (default: the defaults; --quick 4)")
    ap.add_argument("--out", default="bench-output/field")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapt", action="store_true", help="also each digits column scored by the model adapted to "
                    "that column's own clips (classify --adapt: BatchNorm statistics re-estimated, no labels)")
    ap.add_argument("--self-train", action="store_true", help="also each recipe's digits model self-trained "
                    "(train --unlabelled, one round): the new speakers' other recordings and the field shifts of "
                    "the training speakers' unused takes as the unlabelled archive; digits only (no birds)")
    args = ap.parse_args()
    if args.self_train:
        args.no_birds = True
    if not (args.data / "fsdd").is_dir():
        raise SystemExit(f"{args.data}/fsdd is not here: give --data, the folder holding fsdd/ and xc_birds10/")
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg makes the MP3 and tempo shifts: install it (make system-deps)")
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    digits = fsdd(args.data / "fsdd", 3 if args.quick else 10, 2 if args.quick else 5)
    tests = {"clean": digits["clean"], "new speakers": digits["new speakers"]}
    for kind in SHIFTS:
        tests[kind] = archives.field_shifted(digits["clean"], kind, out / "shifted" / kind,
                                            [p for p, _ in digits["babble"]], rng)
    bird_sets = birds(args.data / "xc_birds10") if not args.no_birds and (args.data / "xc_birds10").is_dir() else None
    print(f"digits: {len(digits['train'])} training files of 4 speakers; clean {len(tests['clean'])}, new speakers "
          f"{len(tests['new speakers'])}, each shift {len(tests['clean'])} files"
          + (f"; birds: {len(bird_sets['train'])} training, {len(bird_sets['birds'])} held out" if bird_sets else ""),
          flush=True)

    recipes = {name: RECIPES[name] for name in (args.recipe or ([] if args.set else RECIPES))}
    if args.set:
        recipes["custom"] = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    epochs = args.epochs or (4 if args.quick else TrainConfig.__dataclass_fields__["epochs"].default)
    results: dict[str, dict[str, float]] = {}
    for name, recipe in recipes.items():
        for init in ("imagenet",) if args.no_random else ("imagenet", "random"):
            t0 = time.perf_counter()
            where = out / f"{name}-{init}".replace(" ", "_")
            row, extra = run_recipe(recipe, init == "imagenet", digits, tests, bird_sets, where, epochs, args.seed,
                                    args.adapt, args.self_train)
            results[f"{name}, {init}"] = row
            results.update({f"{name}{more}, {init}": got for more, got in extra.items()})
            print(f"{name}, {init}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.no_plain:
        for aug in (False, True):
            t0 = time.perf_counter()
            row = run_plain(digits, tests, bird_sets, epochs, aug, args.seed)
            results[f"plain script{', augmented' if aug else ''}, imagenet"] = row
            print(f"plain{' augmented' if aug else ''}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print_table(results)
    (out / "result.json").write_text(json.dumps(results, indent=2))
    print(f"\n{time.perf_counter() - t_start:.0f} s in all; {out / 'result.json'}")


def with_field(row: dict[str, float], has_birds: bool) -> dict[str, float]:
    row["shifted"] = float(np.mean([row[k] for k in SHIFTS]))
    parts = [row["new speakers"], row["shifted"]] + ([row["birds"]] if has_birds else [])
    row["field"] = float(np.mean(parts))
    return row


def run_recipe(recipe: dict[str, object], pretrained: bool, digits: dict, tests: dict, bird_sets: dict | None,
               out: Path, epochs: int, seed: int, adapt: bool = False,
               self_train: bool = False) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Train the recipe on digits (and birds), score every column; ``unknown``: the share of files of the
    other task (birds for the digit model, voices for the bird model) set aside at the 95 % threshold.
    Returns the row and more rows by what they add to the recipe's name: with ``adapt``, `` + adapt``
    (the digits columns scored by the model adapted to each). With ``self_train``, the digits model is
    trained with ``--unlabelled`` (:func:`unlabelled_archive`): the row is its supervised teacher's
    (round 0), `` + self-training`` the student's digits columns (``train s``: teacher and student
    together), and with ``adapt`` `` + self-training + adapt``."""
    out.mkdir(parents=True, exist_ok=True)
    feats, fc, linked = featurize_sets({"train": digits["train"], "val": digits["clean"]}, out / "digits-features",
                                       recipe)
    unl = unlabelled_archive(digits, np.random.default_rng(seed + 1), out / "unlabelled", fc) if self_train else None
    t0, wall = time.perf_counter(), time.time()
    package = train_package(feats, split_rows(linked), out / "digits", recipe, pretrained, epochs, seed, unl)
    took = {"train s": time.perf_counter() - t0}
    others = {"other": bird_sets["birds"]} if bird_sets else {}
    test_feats, _, linked = featurize_sets({**tests, **others}, out / "digits-tests", {}, fitted=fc)
    extra: dict[str, dict[str, float]] = {}

    def digits_only(got: dict[str, float]) -> dict[str, float]:
        return with_field({k: v for k, v in got.items() if k != "other"}, False)

    if unl:
        extra[" + self-training"] = {**digits_only(score(package, test_feats, linked)[0]), **took}
        if adapt:
            extra[" + self-training + adapt"] = digits_only(score(package, test_feats, linked, adapt=True)[0])
        teacher = Path(package) / "self-training" / "round-0"
        took = {"train s": (teacher / "metrics.json").stat().st_mtime - wall}
        package = str(teacher)
    row, confidence = score(package, test_feats, linked)
    if adapt:
        extra[" + adapt"] = digits_only(score(package, test_feats, linked, adapt=True)[0])
    unknown = [unknown_share(confidence["clean"], confidence["other"])] if bird_sets else []
    row.pop("other", None)
    if bird_sets:
        feats, bird_fc, linked = featurize_sets({"train": bird_sets["train"], "val": bird_sets["birds"]},
                                                out / "birds-features", recipe)
        t0 = time.perf_counter()
        package = train_package(feats, split_rows(linked), out / "birds", recipe, pretrained, epochs, seed)
        took["birds train s"] = time.perf_counter() - t0
        voices, _, other = featurize_sets({"other": tests["new speakers"]}, out / "birds-others", {}, fitted=bird_fc)
        got, confidence = score(package, feats, {"birds": linked["val"]})
        row["birds"] = got["birds"]
        unknown.append(unknown_share(confidence["birds"], score(package, voices, other)[1]["other"]))
    row = with_field(row, bird_sets is not None)
    row["unknown"] = float(np.nanmean(unknown)) if unknown else float("nan")
    return {**row, **took}, extra


def split_rows(linked: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    return [(u, side) for side in ("train", "val") for u, _ in linked[side]]


def run_plain(digits: dict, tests: dict, bird_sets: dict | None, epochs: int, augmented: bool,
              seed: int) -> dict[str, float]:
    name = "tf_efficientnet_lite0"
    w = str(weights.converted_wheel_weights(name)[0])
    row = plain.fit_and_score(digits["train"], tests, name, w, epochs=epochs, augmented=augmented, seed=seed)
    if bird_sets:
        row.update(plain.fit_and_score(bird_sets["train"], {"birds": bird_sets["birds"]}, name, w, epochs=epochs,
                                       augmented=augmented, seed=seed, sr=22050, clip_s=3.0))
    return with_field(row, bird_sets is not None)


def print_table(results: dict[str, dict[str, float]]) -> None:
    cols = ["clean", "new speakers", "shifted", *SHIFTS, "birds", "field", "unknown", *TIMES]
    cols = [c for c in cols if any(c in r for r in results.values())]
    print("\nper-file accuracy (digits: 4 training speakers; birds: 30 held-out recordings); unknown: the share of "
          "the other task's files set aside at the probability that keeps 95 % of the known ones")
    print(f"{'recipe':<34}" + "".join(f"{c:>13}" for c in cols))
    for name, row in results.items():
        print(f"{name:<34}" + "".join((f"{row[c]:>13.0f}" if c in TIMES else f"{row[c]:>13.3f}") if c in row
                                      else " " * 13 for c in cols))
    for name in {n.rsplit(", ", 1)[0] for n in results}:
        a, b = results.get(f"{name}, imagenet"), results.get(f"{name}, random")
        if a and b:
            print(f"ImageNet - random, {name}: " + ", ".join(f"{c} {a[c] - b[c]:+.3f}" for c in cols
                                                               if c in a and c not in TIMES))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
