"""'None of these' by distance (melbatch.model.novelty): the rule a package stores at training, and
classify --unknown auto applying it to an archive that holds sounds the model has no label for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from melbatch import shards, storage
from melbatch.config import ClassifyConfig, ConfigError
from melbatch.model import novelty
from melbatch.model.package import UNKNOWN, load_package, read_package_meta
from melbatch.stages import classify
from melbatch.testing import archives


def test_the_distance_rule_keeps_the_known_and_sets_aside_what_lies_far_from_every_label():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 3, (4, 32))
    y = np.repeat(np.arange(4), 60)
    x = centres[y] + rng.normal(0, 1, (240, 32))
    fitted = novelty.fit(x, y, 4)
    val = centres[np.repeat(np.arange(4), 25)] + rng.normal(0, 1, (100, 32))
    far = rng.normal(0, 1, (100, 32)) + 12.0  # a sound like none of them
    conf = rng.uniform(0.6, 1.0, 100)  # the probability rule cannot tell these apart
    rule = novelty.choose(conf, fitted.distances(val))
    assert rule["kept"] >= novelty.KEEP and 0 < rule["quantile"] < 1
    assert novelty.unknown(conf, fitted.distances(val), rule).mean() <= 1 - novelty.KEEP
    assert novelty.unknown(conf, fitted.distances(far), rule).all()
    assert novelty.unknown(conf, fitted.distances(far), rule, "distance").all()
    assert novelty.unknown(conf, fitted.distances(far), rule, "probability").mean() < 0.2  # blind to them
    assert novelty.unknown(conf, fitted.distances(val), rule, "distance").mean() <= 1 - novelty.KEEP
    # the nearest centre counts: a clip at another label's centre is as known as one at its own
    assert fitted.distances(centres).max() < np.median(fitted.distances(val))
    assert novelty.file_means(["a", "b", "a"], np.array([1.0, 5.0, 3.0])) == {"a": 2.0, "b": 5.0}


@pytest.mark.ray
def test_unknown_auto_sets_aside_voices_an_engine_model_has_no_label_for(engine_model, ray_session):
    b = engine_model
    meta = read_package_meta(f"{b}/model")
    rule = meta["novelty"]  # stored by train: the thresholds chosen on its validation files
    assert rule["kept"] >= novelty.KEEP and {"probability_below", "distance_above"} <= set(rule)
    assert load_package(f"{b}/model").novelty.centres.shape[0] == len(meta["labels"])
    metrics = json.loads(storage.read_bytes(f"{b}/model/metrics.json"))
    assert metrics["novelty"] == rule
    archive = f"{b}/mixed-incoming"
    engines = archives.make_archive(archive, "engine", files_per_class=3, seconds=5.0, seed=77)
    voices = archives.make_archive(f"{archive}/other", "voice", files_per_class=4, seconds=3.0, seed=78)
    out = f"{b}/mixed-pred"
    s = classify.run(ClassifyConfig(archive=archive, model=f"{b}/model", out=out, unknown="auto",
                                    cpus_per_actor=0.5, max_quarantine_rate=1.0), progress=False)
    assert s.classified == len(engines) + len(voices)
    rows = shards.read_tables(out, "files").to_pylist()
    assert all(r["distance"] is not None and np.isfinite(r["distance"]) for r in rows)
    known = [r for r in rows if "/other/" not in r["uri"]]
    foreign = [r for r in rows if "/other/" in r["uri"]]
    seen = [(r["uri"].rsplit("/", 2)[-2], r["label"], round(r["probability"], 3), round(r["distance"], 1))
            for r in rows]
    # classify applied the stored rule, file by file (rows within a rounding of a threshold left out)
    near = [abs(r["probability"] - rule["probability_below"]) < 1e-4 or abs(r["distance"] - rule["distance_above"])
            < 1e-4 for r in rows]
    said = novelty.unknown(np.array([r["probability"] for r in rows]), np.array([r["distance"] for r in rows]), rule)
    assert all(n or (r["label"] == UNKNOWN) == u for r, u, n in zip(rows, said, near, strict=True)), (rule, seen)
    # The foreign voices lie farther from every label than the known engines: at least 85 % of the (foreign,
    # known) pairs in that order (a distance blind to them: 50 %). How many the rule sets aside moves with the
    # 6-epoch random-init test model and its 10 validation files, whose farthest sets the distance threshold:
    # runs of 2026-12-07 set aside 5 to 8 of the 8 voices (thresholds 7.3-10.2), with 100 %, 94 % and 100 % of
    # the pairs in order in the three that printed them all. So the bar on the count is half; the 80 % target is
    # measured on real recordings by bench/backbones.py --unknown, not on this toy model.
    far = np.mean([f["distance"] > k["distance"] for f in foreign for k in known])
    assert far >= 0.85, (far, rule, seen)
    assert sum(r["label"] != UNKNOWN for r in known) >= len(known) - 1, (rule, seen)
    assert sum(r["label"] == UNKNOWN for r in foreign) >= 0.5 * len(foreign), (rule, seen)
    # what the probability rule alone would keep at the same 95 % of validation files
    below = metrics["calibration"]["unknown_below_keeping"]["95%"]
    assert sum(r["probability"] < below for r in foreign) < sum(r["label"] == UNKNOWN for r in foreign)


@pytest.mark.ray
def test_unknown_auto_without_a_stored_rule_fails_before_any_cluster_work(engine_model, tmp_path):
    """A package trained before the rule existed (its model.json without ``novelty``)."""
    old = tmp_path / "old" / "model"
    old.mkdir(parents=True)
    meta = json.loads(storage.read_bytes(f"{engine_model}/model/model/model.json"))
    del meta["novelty"]
    (old / "model.json").write_text(json.dumps(meta))
    (old / "model.safetensors").write_bytes(storage.read_bytes(f"{engine_model}/model/model/model.safetensors"))
    assert load_package(str(old)).novelty is None
    with pytest.raises(ConfigError, match=r"no distance rule.*train it again"):
        classify.preflight(ClassifyConfig(archive=str(tmp_path / "old"), model=str(tmp_path / "old"),
                                          out=str(tmp_path / "o"), unknown="auto"))
