"""One review round, measured: does labelling N clips the model is unsure of raise held-out accuracy?

    python bench/review.py                                   # generated engine archive, 'faulty' rare
    python bench/review.py --fsdd ../shared/data/fsdd        # real recordings: spoken digits, few labelled

The data (seeded): a small labelled archive (one label rare in the generated case; a few recordings
per digit with --fsdd), an unlabelled pool (the bench knows its labels and plays the reviewer) and a
held-out test archive. Then, at melbatch's defaults (tf_efficientnet_lite0 from ImageNet):

1. featurize + train on the labelled archive: the **before** model;
2. classify the pool; ``melbatch review`` picks N clips (``--strategy``, and ``random`` as the
   control); the bench answers them with the true labels, as a person would;
3. train again with ``--extra-labels`` (same seed, same epochs): the **after** models;
4. classify the test archive with each model: per-file accuracy, and per-label recall.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from melbatch import storage
from melbatch.config import ClassifyConfig, FeaturizeConfig, ReviewConfig, TrainConfig
from melbatch.look import review
from melbatch.shards import read_tables
from melbatch.stages import classify, featurize
from melbatch.testing import archives
from melbatch.train import driver


def engine_archives(root: Path, rare: int, common: int, pool: int, test: int) -> None:
    """labelled/ (``common`` healthy, ``rare`` faulty), pool/ and test/ (balanced), all different recordings."""
    for name, per, seed in (("labelled", common, 1), ("pool", pool, 2), ("test", test, 3)):
        archives.make_archive(str(root / name), "engine", files_per_class=per, seconds=6.0, seed=seed)
    for f in sorted((root / "labelled" / "faulty").iterdir())[rare:]:
        f.unlink()


def fsdd_archives(root: Path, fsdd: Path, labelled: int, pool: int, test: int, seed: int) -> None:
    """labelled/, pool/ and test/ <digit>/ folders of FSDD recordings, disjoint, speakers mixed."""
    rng = np.random.default_rng(seed)
    for digit in sorted(p.name for p in fsdd.iterdir() if p.is_dir()):
        files = rng.permutation(sorted((fsdd / digit).glob("*.wav")))
        for name, part in (("labelled", files[:labelled]), ("pool", files[labelled:labelled + pool]),
                           ("test", files[labelled + pool:labelled + pool + test])):
            (root / name / digit).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, root / name / digit / f.name)


def truth(archive: Path) -> dict[str, str]:
    return {storage.canonical(str(f)): f.parent.name for f in archive.rglob("*") if f.is_file()}


def score(out: str, labels: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Per-file accuracy of a classify output, and recall per true label."""
    files = read_tables(out, "files").to_pylist()
    right = {f["uri"]: f["label"] == labels[f["uri"]] for f in files}
    recall = {}
    for lab in sorted(set(labels.values())):
        mine = [right[u] for u in right if labels[u] == lab]
        recall[lab] = sum(mine) / max(1, len(mine))
    return sum(right.values()) / max(1, len(right)), recall


def answer(review_dir: Path, labels: dict[str, str]) -> int:
    """Fill labels.csv with the true labels (the bench is the reviewer); returns the rows answered."""
    rows = list(csv.DictReader(io.StringIO((review_dir / "labels.csv").read_text())))
    for r in rows:
        r["label"] = labels[r["uri"]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["uri"])
    w.writeheader()
    w.writerows(rows)
    (review_dir / "labels.csv").write_text(buf.getvalue())
    return len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdd", default=None, help="the FSDD folder (<digit>/*.wav): real recordings instead")
    p.add_argument("--count", type=int, default=24, help="clips reviewed in the round (N)")
    p.add_argument("--strategy", default="uncertainty", help="how review picks them (random is the control)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rare", type=int, default=2, help="generated: labelled faulty recordings")
    p.add_argument("--common", type=int, default=16, help="generated: labelled healthy recordings")
    p.add_argument("--labelled", type=int, default=3, help="--fsdd: labelled recordings per digit")
    p.add_argument("--pool", type=int, default=20, help="unlabelled recordings per label in the pool")
    p.add_argument("--test", type=int, default=15, help="test recordings per label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the outputs in this folder (default: a temp folder, removed)")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="melbatch-bench-review-"))
    t0 = time.perf_counter()
    if args.fsdd:
        fsdd_archives(root, Path(args.fsdd), args.labelled, args.pool, args.test, args.seed)
        what = f"FSDD: {args.labelled} labelled recordings per digit"
    else:
        engine_archives(root, args.rare, args.common, args.pool, args.test)
        what = f"generated engines: {args.common} healthy and {args.rare} faulty labelled"
    pool_truth, test_truth = truth(root / "pool"), truth(root / "test")

    featurize.run(FeaturizeConfig(src=str(root / "labelled"), dst=str(root / "features")), progress=False)
    base = TrainConfig(shards=str(root / "features"), out=str(root / "before"), epochs=args.epochs, seed=args.seed)
    driver.run(base, progress=False)

    def test_score(model: str) -> tuple[float, dict[str, float]]:
        out = str(root / f"test-{model}")
        classify.run(ClassifyConfig(archive=str(root / "test"), model=str(root / model), out=out), progress=False)
        return score(out, test_truth)

    rows = [("before: no review", 0, *test_score("before"))]
    classify.run(ClassifyConfig(archive=str(root / "pool"), model=str(root / "before"), out=str(root / "pool-out")),
                 progress=False)
    for strategy in dict.fromkeys([args.strategy, "random"]):
        dest = root / f"review-{strategy}"
        review.run(ReviewConfig(out=str(root / "pool-out"), strategy=strategy, count=args.count, seed=args.seed,
                                dest=str(dest)))
        n = answer(dest, pool_truth)
        after = f"after-{strategy}"
        driver.run(replace(base, out=str(root / after), extra_labels=str(dest / "labels.csv")), progress=False)
        rows.append((f"after {n} {strategy} clips", n, *test_score(after)))

    print(f"\n{what}; pool {args.pool} and test {args.test} recordings per label; {args.epochs} epochs, "
          f"defaults otherwise; {time.perf_counter() - t0:.0f} s")
    labels = sorted(set(test_truth.values()))
    print(f"{'model':<32}{'test file accuracy':>20}  recall per label ({', '.join(labels)})")
    for name, _, acc, recall in rows:
        print(f"{name:<32}{acc:>20.3f}  {' '.join(f'{recall[lab]:.2f}' for lab in labels)}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
