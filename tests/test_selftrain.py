"""train --unlabelled with the ImageNet fine-tune (melbatch.train.selftrain): the supervised teacher, its
guesses over an unlabelled archive on S3, the student on Ray Train, and a resume mid-round after a crash."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FAST, MILD_FIELD, new_bucket

from melbatch import storage
from melbatch.config import ConfigError, FeaturizeConfig, TrainConfig
from melbatch.look import report
from melbatch.model.package import load_package, read_package_meta
from melbatch.shards import GUESSES, PSEUDO_RECORD, read_manifest
from melbatch.stages import featurize
from melbatch.testing import archives
from melbatch.train import driver, selftrain


def _table(uri: str):
    with storage.arrow_input(uri) as f:
        return pq.read_table(f)


@pytest.mark.ray
def test_self_training_guesses_the_archive_trains_a_student_and_resumes_mid_round(ray_session, monkeypatch):
    b = new_bucket()
    archives.make_archive(f"{b}/labelled", "engine", files_per_class=12, seconds=4.0, seed=31)
    unl = archives.make_archive(f"{b}/archive", "engine", files_per_class=16, seconds=4.0, seed=32)  # 64 clips
    featurize.run(FeaturizeConfig(src=f"{b}/labelled", dst=f"{b}/shards", features=FAST, fit_clips=False),
                  progress=False)
    featurize.run(FeaturizeConfig(src=f"{b}/archive", dst=f"{b}/ushards", features=FAST, labels="none",
                                  fit_clips=False), progress=False)
    cfg = TrainConfig(shards=f"{b}/shards", out=f"{b}/model", unlabelled=f"{b}/ushards", model="test_resnet",
                      pretrained=False, epochs=4, batch_size=8, lr=3e-3, min_steps=0, max_failures=0,
                      augment=MILD_FIELD)
    monkeypatch.setattr(selftrain, "HERE_MB", 0)  # the guesses stream through Ray Data, as a big archive's do
    monkeypatch.setenv("MELBATCH_CRASH_AT", "raise:2")  # once per train OUT: the teacher's, then the student's
    for crashed in ("round-0", "round-1"):
        with pytest.raises(Exception, match="injected crash"):
            driver.run(cfg, progress=False)
        assert storage.exists(storage.join(selftrain.round_dir(cfg.out, int(crashed[-1])), "_injected_crash"))
    round1 = selftrain.round_dir(cfg.out, 1)
    guesses_before = storage.read_bytes(storage.join(round1, GUESSES))  # committed before the student crashed
    m = driver.run(cfg, progress=False)

    # the round's data was not made again, and the student resumed from its checkpoint
    assert storage.read_bytes(storage.join(round1, GUESSES)) == guesses_before
    student = json.loads(storage.read_bytes(storage.join(round1, "metrics.json")))
    assert [e["attempt_start_epoch"] for e in student["epochs"]] == [0, 0, 2, 2]
    # every unlabelled clip guessed; per label at most --pseudo-keep of an equal share taken, with the guess
    guesses = _table(storage.join(round1, GUESSES))
    clips = read_manifest(f"{b}/ushards")["counts"]["clips"]
    assert guesses.num_rows == clips > 0
    record = json.loads(storage.read_bytes(storage.join(round1, PSEUDO_RECORD)))
    cap = math.ceil(cfg.pseudo_keep * clips / 2)
    assert record["taken"] == sum(record["per_label"].values()) == sum(guesses.column("taken").to_pylist()) > 0
    assert max(record["per_label"].values()) <= cap
    # guessed by the teacher adapted to the archive (64 clips: enough statistics), kept beside the guesses
    assert record["adapted"] and record["guessed_by"] == read_package_meta(storage.join(round1, "teacher"))["model_id"]
    assert read_package_meta(storage.join(round1, "teacher"))["adapted"]["clips"] == clips
    pseudo = selftrain.load(round1)
    copied = [_table(u) for u in pseudo.uris]
    rows = [(u, i, lab) for t in copied for u, i, lab in zip(*(t.column(c).to_pylist() for c in
                                                                ("uri", "clip_index", "label")), strict=True)]
    taken = guesses.filter(guesses.column("taken"))
    assert sorted(rows) == sorted(zip(*(taken.column(c).to_pylist() for c in ("uri", "clip_index", "guess")),
                                      strict=True))
    # the teacher learned the engines, so its surest guesses name the unlabelled files' true folders
    truth = {f.uri: f.label for f in unl}
    assert np.mean([truth[u] == lab for u, _, lab in rows]) >= 0.8, record
    # OUT holds the student's package, its validation on the teacher's files, and every round
    rounds = m["self_training"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["taken"] == record["taken"]
    assert storage.read_bytes(f"{b}/model/split.csv") == storage.read_bytes(
        storage.join(selftrain.round_dir(cfg.out, 0), "split.csv"))
    assert m["val_file_accuracy"] == student["val_file_accuracy"] == rounds[1]["val_file_accuracy"]
    assert load_package(f"{b}/model").labels == ["faulty", "healthy"]
    assert json.loads(storage.read_bytes(f"{b}/model/metrics.json"))["self_training"]["rounds"] == rounds
    page = storage.read_bytes(report.write(f"{b}/model")[0]).decode()  # the train report shows every round
    assert "Self-training (--unlabelled)" in page and f"{record['taken']:,} of {clips:,}" in page
    assert "the supervised teacher" in page


def test_self_training_refuses_an_unlabelled_archive_of_other_features_before_any_cluster_work(tmp_path):
    archives.make_archive(str(tmp_path / "lab"), "engine", files_per_class=2, seconds=3.0, seed=1)
    archives.make_archive(str(tmp_path / "unl"), "engine", files_per_class=2, seconds=3.0, seed=2)
    featurize.run(FeaturizeConfig(src=str(tmp_path / "lab"), dst=str(tmp_path / "shards"), features=FAST,
                                  fit_clips=False, runner="local"), progress=False)
    featurize.run(FeaturizeConfig(src=str(tmp_path / "unl"), dst=str(tmp_path / "ushards"), labels="none",
                                  features=replace(FAST, n_mels=32), fit_clips=False, runner="local"), progress=False)
    cfg = TrainConfig(shards=str(tmp_path / "shards"), out=str(tmp_path / "out"), model="test_resnet",
                      pretrained=False, unlabelled=str(tmp_path / "ushards"))
    with pytest.raises(ConfigError, match=r"n_mels 32 \(SHARDS: 64\).*--no-fit-clips"):
        driver.run(cfg, progress=False)
    assert not (tmp_path / "out" / "self-training").exists()
    with pytest.raises(ConfigError, match="multi-label"):
        driver.run(replace(cfg, multi_label=True), progress=False)
    # a round of the fine-tune is a whole training run, a head's a refit: one round and three by default
    assert TrainConfig(shards="a", out="b").rounds == 1
    assert TrainConfig(shards="a", out="b", backbone="speaker").rounds == 3
