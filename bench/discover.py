"""How well ``melbatch discover`` finds what real archives hold, against a plain baseline, in one run.

    make bench-discover                     # or: python bench/discover.py --fsdd DIR --birds DIR

The labels of the archives are hidden from discover (it reads the audio only) and used here to score
its groups: ``../shared/data/fsdd`` (spoken digits: 10 digits, 6 speakers; ``--fsdd-files`` of the
3,000, the same share of every digit folder) and ``../shared/data/xc_birds10`` (10 species).

Rows, for each archive and each truth (digit, speaker, species), at k = the number of true classes
and at the k discover chooses itself:
  purity   the share of files whose group's majority is their own class (files: a file's clips vote)
  NMI      normalised mutual information between groups and classes (0 = unrelated, 1 = the same)
Grouped by: discover's ImageNet backbone (tf_efficientnet_lite0 as it is), the audio backbones
``--backbones`` names (birdnet, speaker), a trained package when ``--model`` gives one, and a plain
baseline: each file's MFCC means and standard deviations (20 coefficients, librosa, 16 kHz),
standardised, k-means (scikit-learn, 10 starts).
Then the cost: clips per second of the whole discover run on this machine's CPUs (embedding and
grouping), the hours a million clips would take at that rate, and the driver's peak memory.

Accuracy per label given (``--labels-given 10,20``, FSDD digits): discover groups ``--fsdd-files`` of
FSDD's training files (indices 5-49) into k groups; a person labelling each group once is played by
the hidden truth (each group gets its majority digit, for its clips within the page's distance); a
model is trained from those labels with the defaults (bench/field.py's featurize and train, ImageNet
weights) and scored per file on FSDD's official test files (indices 0-4, 300 files); against k clips
chosen at random from the same files, each labelled with its true digit (k labels given either way).
With ``--given-backbone birdnet`` (or ``speaker``) the same comparison runs on xc_birds10 instead: its
70 training files grouped by that audio backbone and named by group, or k of them named at random; a
head on the backbone trained from either and scored on the 30 held-out files (``--skip-archives``
leaves out the purity rows).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import librosa
import numpy as np
import pyarrow.parquet as pq
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from melbatch import storage
from melbatch.config import DiscoverConfig, FeaturizeConfig, TrainConfig
from melbatch.look import discover

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def purity(groups: list[int], truth: list[str]) -> float:
    per: dict[int, Counter] = {}
    for g, t in zip(groups, truth, strict=True):
        per.setdefault(g, Counter())[t] += 1
    return sum(c.most_common(1)[0][1] for c in per.values()) / len(truth)


def file_groups(groups_parquet: Path) -> dict[str, int]:
    """Each file's group: the one most of its clips are in."""
    votes: dict[str, Counter] = {}
    for r in pq.read_table(groups_parquet, columns=["uri", "group"]).to_pylist():
        votes.setdefault(r["uri"], Counter())[r["group"]] += 1
    return {u: c.most_common(1)[0][0] for u, c in votes.items()}


def mfcc_groups(paths: list[str], k: int, seed: int) -> list[int]:
    """The plain baseline: MFCC means and deviations per file, standardised, k-means."""
    feats = []
    for p in paths:
        y, sr = librosa.load(p, sr=16000, mono=True)
        m = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20)
        feats.append(np.concatenate([m.mean(1), m.std(1)]))
    x = np.asarray(feats)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-9)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(x).tolist()


def truths(name: str, uri: str) -> dict[str, str]:
    """The hidden classes of one file of an archive."""
    stem, folder = uri.rsplit("/", 1)[-1], uri.rsplit("/", 2)[-2]
    if name == "fsdd":
        digit, speaker, _ = stem.split("_", 2)
        return {"digit": digit, "speaker": speaker}
    return {"species": folder}


def bench_archive(name: str, root: Path, sample: int, work: Path, model: str | None, seed: int,
                  audio_backbones: list[str]) -> list[tuple]:
    rows = []
    out = work / name
    runs: dict[str, tuple[dict[str, int], float, int]] = {}
    kinds = [("ImageNet backbone", None, "tf_efficientnet_lite0")] + \
        [(f"{b} backbone", None, b) for b in audio_backbones] + ([("trained package", model, "")] if model else [])
    classes_of: dict[str, int] = {}
    for what, pkg, bb in kinds:
        t0 = time.perf_counter()
        s = discover.run(DiscoverConfig(archive=str(root), out=str(out / what.replace(" ", "-")), model=pkg,
                                        backbone=bb or "tf_efficientnet_lite0", sample=sample, seed=seed,
                                        max_groups=12), progress=False)
        wall = time.perf_counter() - t0
        dest = out / what.replace(" ", "-") / "discover"
        runs[f"{what}, k chosen ({s.k})"] = (file_groups(dest / "groups.parquet"), wall, s.clips)
        files = sorted(runs[f"{what}, k chosen ({s.k})"][0])
        for truth in truths(name, files[0]):
            k = len({truths(name, u)[truth] for u in files})
            classes_of[truth] = k
            t0 = time.perf_counter()
            discover.run(DiscoverConfig(archive=str(root), out=str(out / what.replace(" ", "-")), model=pkg,
                                        backbone=bb or "tf_efficientnet_lite0", sample=sample, seed=seed, groups=k),
                         progress=False)
            runs[f"{what}, k = {k}"] = (file_groups(dest / "groups.parquet"), time.perf_counter() - t0, s.clips)
    files = sorted(next(iter(runs.values()))[0])
    for truth, k in classes_of.items():
        labels = [truths(name, u)[truth] for u in files]
        for key, (groups, _, _) in runs.items():
            if key.endswith(f"k = {k}") or "chosen" in key:
                g = [groups[u] for u in files]
                rows.append((name, truth, k, key, purity(g, labels), normalized_mutual_info_score(labels, g)))
        g = mfcc_groups([u.removeprefix("file://") for u in files], k, seed)
        rows.append((name, truth, k, f"MFCC means + k-means, k = {k}", purity(g, labels),
                     normalized_mutual_info_score(labels, g)))
    first = runs[next(iter(runs))]
    print(f"{name}: {len(files)} files, {first[2]} clips; discover (embed + group) {first[1]:.0f} s: "
          f"{first[2] / first[1]:.1f} clips/s on this machine, {1e6 / (first[2] / first[1]) / 3600:,.0f} h per "
          "million clips at that rate (regrouping the same embeddings at another k: "
          f"{min(r[1] for k, r in runs.items() if 'k =' in k):.0f} s)", flush=True)
    return rows


def labels_given(root: Path, work: Path, ks: list[int], sample: int, seed: int) -> tuple[list[tuple], str]:
    """Held-out accuracy from k group labels vs k random clip labels (see the module docstring)."""
    from field import featurize_sets, score, split_rows, train_package

    test = [(str(f), f.name.split("_")[0]) for f in sorted(root.glob("*/*_[0-4].wav"))]
    rows, rng, trained = [], np.random.default_rng(seed), ""
    for k in ks:
        cfg = DiscoverConfig(archive=str(root), out=str(work / "given"), sample=sample, seed=seed, groups=k,
                             exclude=("*_[0-4].wav",))
        discover.run(cfg, progress=False)
        dest = work / "given" / "discover"
        cut = json.loads((dest / "summary.json").read_text())["label_within"]["distance"]
        clips = pq.read_table(dest / "groups.parquet").to_pylist()
        digit = {r["uri"]: truths("fsdd", r["uri"])["digit"] for r in clips}
        majority = {g: Counter(digit[r["uri"]] for r in clips if r["group"] == g).most_common(1)[0][0]
                    for g in range(k)}
        named = sorted({r["uri"].removeprefix("file://"): majority[r["group"]] for r in sorted(
            clips, key=lambda r: -r["clip_index"]) if r["distance"] <= cut[r["group"]]}.items())  # a file's first clip
        files = sorted(digit)
        chosen = [(u.removeprefix("file://"), digit[u]) for u in rng.choice(files, k, replace=False)]
        for how, train in ((f"{k} groups named (their majority digit)", named),
                           (f"{k} random clips named (their digit)", chosen)):
            t0 = time.perf_counter()
            tag = f"{'groups' if 'groups' in how else 'random'}-{k}"
            feats, _, linked = featurize_sets({"train": train, "val": test}, work / f"{tag}-features", {})
            pkg = train_package(feats, split_rows(linked), work / tag, {}, True, TrainConfig.epochs, seed)
            got, _ = score(pkg, feats, {"held-out": linked["val"]})
            wrong = sum(lab != digit["file://" + p] for p, lab in train)
            rows.append((k, how, len(train), wrong, len({lab for _, lab in train}), got["held-out"],
                         time.perf_counter() - t0))
            print(f"labels given: {how}: {len(train)} clips labelled ({wrong} wrongly), held-out accuracy "
                  f"{got['held-out']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if "groups" in how and k == max(ks):
                trained = pkg
    return rows, trained


def labels_given_birds(root: Path, work: Path, ks: list[int], backbone: str, seed: int) -> list[tuple]:
    """Held-out accuracy per label given on xc_birds10 with an audio backbone: its 70 training files (the
    first 7 of each species) grouped by discover --backbone into k groups, each group named once by its
    majority species (the hidden truth plays the person; a file takes its clips' majority), against k
    training files chosen at random and named; a head on the same backbone trained from either and scored
    per file on the 30 held-out recordings (the backbones page's split)."""
    from melbatch.stages import featurize
    from melbatch.train import driver

    species_of, held = {}, []
    everything = work / f"birds-{backbone}"  # train/<species>/ (what discover groups) and held/<species>/
    src = everything / "train"
    for sp in sorted(p for p in root.iterdir() if p.is_dir()):
        for i, f in enumerate(sorted(sp.glob("*.mp3"))):
            to = (src if i < 7 else everything / "held") / sp.name / f.name
            to.parent.mkdir(parents=True, exist_ok=True)
            to.symlink_to(f)
            if i < 7:
                species_of[storage.canonical(str(to))] = sp.name
            else:
                held.append((storage.canonical(str(to)), sp.name))
    rows, rng = [], np.random.default_rng(seed)
    for k in ks:
        out = work / f"birds-given-{backbone}"
        discover.run(DiscoverConfig(archive=str(src), out=str(out), backbone=backbone, groups=k, seed=seed),
                     progress=False)
        clips = pq.read_table(out / "discover" / "groups.parquet").to_pylist()
        majority = {g: Counter(species_of[r["uri"]] for r in clips if r["group"] == g).most_common(1)[0][0]
                    for g in {r["group"] for r in clips}}
        votes: dict[str, Counter] = {}
        for r in clips:
            votes.setdefault(r["uri"], Counter())[majority[r["group"]]] += 1
        named = {u: c.most_common(1)[0][0] for u, c in votes.items()}
        chosen = {u: species_of[u] for u in rng.choice(sorted(species_of), k, replace=False)}
        for how, given in ((f"{k} groups named ({backbone})", named), (f"{k} random files named", chosen)):
            t0 = time.perf_counter()
            tag = f"{'groups' if 'groups' in how else 'random'}-{k}-{backbone}"
            labels = work / f"{tag}.csv"
            split = work / f"{tag}-split.csv"
            labels.write_text("uri,label\n" + "".join(f"{u},{lab}\n" for u, lab in [*given.items(), *held]))
            split.write_text("uri,split\n" + "".join(f"{u},train\n" for u in given)
                             + "".join(f"{u},val\n" for u, _ in held))
            # the files without a label (random: the training files not chosen) are set aside as unlabelled
            featurize.run(FeaturizeConfig(src=str(everything), dst=str(work / f"{tag}-shards"), labels=str(labels)),
                          progress=False)
            m = driver.run(TrainConfig(shards=str(work / f"{tag}-shards"), out=str(work / tag), backbone=backbone,
                                       split_manifest=str(split)), progress=False)
            wrong = sum(lab != species_of[u] for u, lab in given.items())
            rows.append((k, how, len(given), wrong, len(set(given.values())), m["val_file_accuracy"],
                         time.perf_counter() - t0))
            print(f"labels given: {how}: {len(given)} files labelled ({wrong} wrongly), held-out accuracy "
                  f"{m['val_file_accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def trained_rows(root: Path, work: Path, pkg: str, seed: int) -> list[tuple]:
    """Purity and NMI on FSDD's 300 test files (never trained on) with the embeddings of a package trained
    from group labels, beside the backbone and MFCC on the same files."""
    rows = []
    for what, model in (("ImageNet backbone", None), ("package trained from group labels", pkg)):
        out = work / "test-files" / what.replace(" ", "-")
        discover.run(DiscoverConfig(archive=str(root), out=str(out), model=model, include=("*_[0-4].wav",),
                                    groups=10, seed=seed), progress=False)
        groups = file_groups(out / "discover" / "groups.parquet")
        files = sorted(groups)
        for truth in ("digit", "speaker"):
            labels = [truths("fsdd", u)[truth] for u in files]
            g = [groups[u] for u in files]
            rows.append(("fsdd test", truth, 10, f"{what}, k = 10", purity(g, labels),
                         normalized_mutual_info_score(labels, g)))
    labels = [truths("fsdd", u)["digit"] for u in files]
    g = mfcc_groups([u.removeprefix("file://") for u in files], 10, seed)
    rows.append(("fsdd test", "digit", 10, "MFCC means + k-means, k = 10", purity(g, labels),
                 normalized_mutual_info_score(labels, g)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdd", default=str(SHARED / "fsdd"), help="FSDD folder (default: %(default)s)")
    p.add_argument("--birds", default=str(SHARED / "xc_birds10"), help="xc_birds10 folder (default: %(default)s)")
    p.add_argument("--fsdd-files", type=int, default=600, help="FSDD files discovered (the same share of each "
                   "digit folder; 0: all 3,000)")
    p.add_argument("--model", default=None, help="also group with this trained package's embeddings")
    p.add_argument("--backbones", default="", help="comma-separated audio backbones (birdnet, speaker; their "
                   "extras installed) whose embeddings also group each archive")
    p.add_argument("--labels-given", default="", help="comma-separated k: also train from k group labels vs k random "
                   "clip labels on FSDD digits (two default trainings per k; ~10 min each on 2 CPUs)")
    p.add_argument("--given-backbone", default="", help="with --labels-given: name groups of xc_birds10's training "
                   "files made by this audio backbone (birdnet, speaker) and train its head, instead of FSDD digits "
                   "with the ImageNet fine-tune (seconds per training, not minutes)")
    p.add_argument("--skip-archives", action="store_true", help="only the --labels-given rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed afterwards)")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="melbatch-bench-discover-"))
    rows = []
    for name, root, sample in (("fsdd", args.fsdd, args.fsdd_files), ("xc_birds10", args.birds, 0)):
        if args.skip_archives:
            break
        if not Path(root).is_dir():
            print(f"{name}: {root} is not a folder; skipped")
            continue
        rows += bench_archive(name, Path(root), sample, work, args.model, args.seed,
                              [b for b in args.backbones.split(",") if b])
    if args.labels_given and args.given_backbone:
        given = labels_given_birds(Path(args.birds), work, [int(k) for k in args.labels_given.split(",")],
                                   args.given_backbone, args.seed)
        print(f"\n{'labels given (xc_birds10, 70 train / 30 held out)':<52}{'files':>7}{'wrong':>7}{'species':>8}"
              f"{'held-out acc':>14}{'s':>6}")
        for _, how, n, wrong, species, acc, secs in given:
            print(f"{how:<52}{n:>7}{wrong:>7}{species:>8}{acc:>14.3f}{secs:>6.0f}")
    elif args.labels_given:
        given, trained = labels_given(Path(args.fsdd), work, [int(k) for k in args.labels_given.split(",")],
                                      args.fsdd_files, args.seed)
        rows += trained_rows(Path(args.fsdd), work, trained, args.seed)
        print(f"\n{'labels given':<44}{'clips':>7}{'wrong':>7}{'digits':>8}{'held-out acc':>14}{'s':>6}")
        for _, how, n, wrong, digits, acc, secs in given:
            print(f"{how:<44}{n:>7}{wrong:>7}{digits:>8}{acc:>14.3f}{secs:>6.0f}")
    print(f"\n{'archive':<12}{'truth':<9}{'classes':>8}  {'grouped by':<46}{'purity':>8}{'NMI':>7}")
    for name, truth, k, what, pur, nmi in rows:
        print(f"{name:<12}{truth:<9}{k:>8}  {what:<46}{pur:>8.2f}{nmi:>7.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\nthe driver's peak memory: {peak:,.0f} MB (this process: Ray's workers, which embed, are not in it); "
          "grouping holds k centres and a sample of at most 20,000 embeddings (100 MB at 1,280 dims) whatever the "
          "archive's size, each task one clip file")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
