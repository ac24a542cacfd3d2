"""Each audio backbone's head on real recordings, held out as the field holds them out, in one run.

    make bench-backbones        # or: python bench/backbones.py --fsdd DIR --birds DIR [--imagenet]

Sets (labels from the recordings' names and folders; ../shared/data, not part of the project):
  birds         xc_birds10: 10 species, the first 7 recordings of each (by name) train, the other 3 (30) are
                held out (the README's split; BirdNET's own reference: 29 of 30)
  fsdd speaker  FSDD's 6 speakers: recordings 5-49 train (2,700), 0-4 (300) held out: other takes of the
                same speakers
  fsdd digit    FSDD digits: 4 speakers train (jackson, nicolas, theo, yweweler; all 2,000), the other two
                (george, lucas; 1,000) held out: what is said, by voices never heard
  voice m/f     male or female, made here with espeak-ng (FSDD's six speakers are all men): voices en+m1-m3
                and en+f1-f2 train, en+m4-m7 and en+f3-f5 are held out (voices never heard), 24 phrases each,
                every voice's pitch drawn from the same range (30-70), so pitch alone does not tell them apart

With ``--self-train``, the fsdd digit set again with self-training (issue 43): the two new speakers'
even-numbered takes (500 files) become an unlabelled archive (featurized with ``--labels none``) that
``train --unlabelled`` learns from, and their odd-numbered takes (500) are the held-out test, for
both the supervised head and the self-trained one.

With ``--unknown``, "none of these" (issue 43): every model is also given archives of sounds it has no
label for, classified with ``--unknown auto``: espeak-ng phrases (the voice m/f set's 288) for the
birds models, the 100 bird recordings for the others, and 24 synthetic engine recordings
for all. Per model and archive, the share of files set aside by the probability rule alone (the
probability that keeps 95 % of the validation files), by the distance alone (its threshold at 95 %)
and by the stored rule (both, at the quantile that together keeps 95 %).

Per set and backbone: accuracy per held-out file (the mean of its clips' probabilities, as classify
decides), per clip, and the seconds to a model on this machine (featurize once per set, not counted;
then the embedding pass, which is cached beside the shards, and the head's fit), and the embedding
rate: clips a second per core. ``--imagenet`` adds the default ImageNet fine-tune (tf_efficientnet_lite0,
the defaults; 10-110 minutes a set on 2 CPUs, issue 45) on the same split. Installed backbones only
(make extras).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from melbatch import shards as shard_tables
from melbatch import storage
from melbatch.config import ClassifyConfig, FeaturizeConfig, TrainConfig
from melbatch.model import backbones
from melbatch.stages import classify, featurize
from melbatch.testing import archives
from melbatch.train import driver

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_SPEAKERS = ("jackson", "nicolas", "theo", "yweweler")


PHRASES = ["the quick brown fox", "seven green bottles", "where is the station", "turn left at the bridge",
           "it will rain tomorrow", "my number is four two nine", "please call me back", "the meeting starts now",
           "open the window", "bring the red box", "how much does it cost", "the river is cold",
           "she sells sea shells", "a cup of strong coffee", "the train is late again", "good morning everyone",
           "the cat sat on the mat", "we need more paper", "count from one to five", "the bell rang twice",
           "this is a test", "read the next line", "the dog ran away", "thank you very much"]
TRAIN_VOICES = ("m1", "m2", "m3", "f1", "f2")
HELD_VOICES = ("m4", "m5", "m6", "m7", "f3", "f4", "f5")


def voices(src: Path, split: list[str]) -> None:
    """The male/female set, spoken by espeak-ng into ``src/<male|female>/<voice>_<n>.wav``."""
    rng = np.random.default_rng(0)
    for voice in TRAIN_VOICES + HELD_VOICES:
        label = "female" if voice.startswith("f") else "male"
        (src / label).mkdir(parents=True, exist_ok=True)
        for n, phrase in enumerate(PHRASES):
            f = src / label / f"{voice}_{n:02d}.wav"
            subprocess.run(["espeak-ng", "-v", f"en+{voice}", "-p", str(int(rng.integers(30, 71))),
                            "-s", str(int(rng.integers(130, 190))), "-w", str(f), phrase], check=True,
                           capture_output=True)
            split.append(f"{storage.canonical(str(f))},{'train' if voice in TRAIN_VOICES else 'val'}")


def link_set(name: str, fsdd: Path, birds: Path, work: Path) -> tuple[Path, Path, Path | None]:
    """The set's recordings linked under ``work`` (SRC), its split.csv and, for FSDD, its labels.csv."""
    src, split, labels = work / name / "src", ["uri,split"], ["uri,label"]
    if name == "voice m/f":
        voices(src, split)
        (work / name / "split.csv").write_text("\n".join(split) + "\n")
        return src, work / name / "split.csv", None
    if name == "birds":
        for species in sorted(p for p in birds.iterdir() if p.is_dir()):
            for i, f in enumerate(sorted(species.glob("*.mp3"))):
                uri = _link(f, src / species.name / f.name)
                split.append(f"{uri},{'train' if i < 7 else 'val'}")
    else:
        for f in sorted(fsdd.glob("*/*.wav")):
            digit, speaker, index = f.stem.split("_")
            uri = _link(f, src / digit / f.name)
            held = int(index) < 5 if name == "fsdd speaker" else speaker not in TRAIN_SPEAKERS
            split.append(f"{uri},{'val' if held else 'train'}")
            labels.append(f"{uri},{speaker if name == 'fsdd speaker' else digit}")
    (work / name / "split.csv").write_text("\n".join(split) + "\n")
    if name == "birds":
        return src, work / name / "split.csv", None
    (work / name / "labels.csv").write_text("\n".join(labels) + "\n")
    return src, work / name / "split.csv", work / name / "labels.csv"


def self_train_rows(fsdd: Path, work: Path, names: list[str]) -> list[tuple]:
    """FSDD digits: 4 speakers labelled, the other two's even takes unlabelled, their odd takes held out."""
    src, unl, split, labels = work / "st" / "src", work / "st" / "unlabelled", ["uri,split"], ["uri,label"]
    for f in sorted(fsdd.glob("*/*.wav")):
        digit, speaker, index = f.stem.split("_")
        if speaker not in TRAIN_SPEAKERS and int(index) % 2 == 0:
            _link(f, unl / digit / f.name)
            continue
        uri = _link(f, src / digit / f.name)
        split.append(f"{uri},{'train' if speaker in TRAIN_SPEAKERS else 'val'}")
        labels.append(f"{uri},{digit}")
        if speaker not in TRAIN_SPEAKERS:  # the test half again, as an archive to classify
            _link(f, work / "st" / "test" / digit / f.name)
    (work / "st" / "split.csv").write_text("\n".join(split) + "\n")
    (work / "st" / "labels.csv").write_text("\n".join(labels) + "\n")
    st = work / "st"
    featurize.run(FeaturizeConfig(src=str(src), dst=str(st / "shards"), labels=str(st / "labels.csv")), progress=False)
    featurize.run(FeaturizeConfig(src=str(unl), dst=str(work / "st" / "ushards"), labels="none"), progress=False)
    rows = []
    for bb in [n for n in names if n != "imagenet"]:
        for how, unlabelled in (("supervised", None), ("+ self-training", str(work / "st" / "ushards"))):
            t0 = time.perf_counter()
            m = driver.run(TrainConfig(shards=str(work / "st" / "shards"), out=str(work / "st" / f"{bb}-{how[:4]}"),
                                       backbone=bb, split_manifest=str(work / "st" / "split.csv"),
                                       unlabelled=unlabelled), progress=False)
            secs = time.perf_counter() - t0
            rows.append((f"fsdd digit {how}", bb, m["val_file_accuracy"], m["val_accuracy"], m["split"]["val_files"],
                         secs, None))
            print(f"fsdd digit {how} / {bb}: {m['val_file_accuracy']:.3f} per file of the test half in {secs:.0f} s",
                  flush=True)
            for adapt in (False, True):  # classify's own path over the test half, and with --adapt
                t0 = time.perf_counter()
                out = work / "st" / f"{bb}-{how[:4]}-classified{'-adapted' if adapt else ''}"
                model = work / "st" / f"{bb}-{how[:4]}"
                classify.run(ClassifyConfig(archive=str(work / "st" / "test"), model=str(model), out=str(out),
                                            adapt=adapt), progress=False)
                files = shard_tables.read_tables(str(out), "files").to_pylist()
                right = float(np.mean([f["label"] == f["uri"].split("/")[-2] for f in files]))
                rows.append((f"fsdd digit {how}, classify{' --adapt' if adapt else ''}", bb, right, float("nan"),
                             len(files), time.perf_counter() - t0, None))
                print(f"  classify{' --adapt' if adapt else ''}: {right:.3f}", flush=True)
    return rows


def foreign_archives(birds: Path, work: Path) -> dict[str, Path]:
    """Archives of sounds with no label in some of the sets: spoken phrases, bird recordings, engines."""
    found = {"voices": work / "foreign" / "voices", "birds": work / "foreign" / "birds",
             "engines": work / "foreign" / "engines"}
    voices(found["voices"], [])  # FSDD's words are under a second: a bird model's 3 s window quarantines them
    for f in sorted(birds.glob("*/*.mp3")):
        _link(f, found["birds"] / f.parent.name / f.name)
    archives.make_archive(str(found["engines"]), "engine", files_per_class=12, seconds=5.0, seed=9)
    return found


def unknown_rows(model: Path, name: str, bb: str, foreign: dict[str, Path], work: Path) -> list[tuple]:
    """The model's stored rule applied to the archives it has no label for (classify --unknown auto)."""
    m = json.loads((model / "metrics.json").read_text())
    rule, below = m["novelty"], m["calibration"]["unknown_below_keeping"]["95%"]
    rows = []
    for what, arch in foreign.items():
        if what not in (("voices", "engines") if name == "birds" else ("birds", "engines")):
            continue  # its own kind of sound
        out = work / "unknown" / f"{name}-{bb}-{what}"
        classify.run(ClassifyConfig(archive=str(arch), model=str(model), out=str(out), unknown="auto",
                                    max_quarantine_rate=1.0), progress=False)
        files = shard_tables.read_tables(str(out), "files").to_pylist()
        p = np.array([f["probability"] for f in files])
        d = np.array([f["distance"] for f in files])
        rows.append((name, bb, what, len(files), float(np.mean(p < below)),
                     float(np.mean(d > rule["distance_alone_above"])),
                     float(np.mean([f["label"] == "unknown" for f in files]))))
        print(f"{name} / {bb} vs {what}: set aside {rows[-1][4]:.2f} by probability, {rows[-1][5]:.2f} by distance, "
              f"{rows[-1][6]:.2f} by both", flush=True)
    return rows


def _link(f: Path, to: Path) -> str:
    to.parent.mkdir(parents=True, exist_ok=True)
    to.symlink_to(f)
    return storage.canonical(str(to))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdd", default=str(SHARED / "fsdd"), help="FSDD folder (default: %(default)s)")
    p.add_argument("--birds", default=str(SHARED / "xc_birds10"), help="xc_birds10 folder (default: %(default)s)")
    p.add_argument("--sets", default="birds,fsdd speaker,fsdd digit,voice m/f",
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--imagenet", action="store_true", help="also the default ImageNet fine-tune (slow on CPUs)")
    p.add_argument("--self-train", action="store_true", help="also FSDD digits with the new speakers' other half "
                   "as an unlabelled archive (train --unlabelled), beside the supervised head")
    p.add_argument("--unknown", action="store_true", help="also each model against archives of sounds it has "
                   "no label for (classify --unknown auto)")
    p.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed afterwards)")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="melbatch-bench-backbones-"))
    names = [b.name for b in backbones.installed()] + (["imagenet"] if args.imagenet else [])
    print(f"backbones: {', '.join(names) or 'none installed (make extras)'}; {os.cpu_count()} CPUs", flush=True)
    rows, unknown = [], []
    try:
        foreign = foreign_archives(Path(args.birds), work) if args.unknown else {}
        for name in [n for n in args.sets.split(",") if n]:
            src, split, labels = link_set(name, Path(args.fsdd), Path(args.birds), work)
            shards = work / name / "shards"
            featurize.run(FeaturizeConfig(src=str(src), dst=str(shards), **({"labels": str(labels)} if labels else {})),
                          progress=False)
            for bb in names:
                t0 = time.perf_counter()
                m = driver.run(TrainConfig(shards=str(shards), out=str(work / name / bb), backbone=bb,
                                           split_manifest=str(split)), progress=False)
                secs = time.perf_counter() - t0
                head = m.get("head", {})
                rate = head["train_clips"] and (head["train_clips"] + head["val_clips"]) / max(1e-9, head["embed_s"])
                rows.append((name, bb, m["val_file_accuracy"], m["val_accuracy"], m["split"]["val_files"], secs,
                             rate if head else None))
                print(f"{name} / {bb}: {m['val_file_accuracy']:.3f} per file in {secs:.0f} s", flush=True)
                if foreign:
                    unknown += unknown_rows(work / name / bb, name, bb, foreign, work)
        if args.self_train:
            rows += self_train_rows(Path(args.fsdd), work, names)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'set':<40}{'backbone':<10}{'per file':>9}{'per clip':>9}{'held out':>9}{'s to model':>11}"
          f"{'clips/s':>9}")
    for name, bb, fa, ca, n, secs, rate in rows:
        print(f"{name:<40}{bb:<10}{fa:>9.3f}{ca:>9.3f}{n:>9}{secs:>11.0f}{f'{rate:.1f}' if rate else '-':>9}")
    print("\ns to model: the embedding pass (classify's pipeline; on 2 CPUs one model actor embeds on 1 CPU while "
          "the other decodes, so clips/s is one core's embedding rate) + the head's fit; the cache beside the shards "
          "makes a second train on the same shards take the fit alone")
    if unknown:
        print(f"\nfiles set aside as unknown (each rule keeps 95 % of the model's validation files)\n"
              f"{'model (set)':<16}{'backbone':<10}{'archive':<12}{'files':>6}{'probability':>12}{'distance':>9}"
              f"{'both':>6}")
        for name, bb, what, n, by_p, by_d, both in unknown:
            print(f"{name:<16}{bb:<10}{what:<12}{n:>6}{by_p:>12.2f}{by_d:>9.2f}{both:>6.2f}")


if __name__ == "__main__":
    main()
