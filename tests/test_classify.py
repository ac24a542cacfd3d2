"""classify end to end on real parts: a model trained here, the local S3 server, a real local Ray."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FAST, decode_images

from melbatch import listing, shards, storage
from melbatch.cli import commands
from melbatch.config import ClassifyConfig, ConfigError
from melbatch.model import package as model
from melbatch.stages import classify
from melbatch.storage import ObjectRef
from melbatch.testing import archives

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def engine(engine_model):
    """The session's tiny model (FAST features: 2 s clips, 64 mels) on a new archive with broken files."""
    b = engine_model
    files = archives.make_archive(f"{b}/archive", "engine", files_per_class=10, seconds=5.0, seed=12, bad=True)
    cfg = ClassifyConfig(archive=f"{b}/archive", model=f"{b}/model", out=f"{b}/pred", files_per_task=6, top_k=2,
                         keep_embeddings=True, max_quarantine_rate=0.5)
    return b, files, cfg, classify.run(cfg, progress=False)


def test_every_input_is_classified_or_quarantined_exactly_once_and_verdicts_are_right(engine):
    _, files, cfg, summary = engine
    manifest = shards.open_dataset(cfg.out)
    verdicts = shards.read_tables(cfg.out, "files").to_pylist()
    quarantine = shards.read_quarantine(cfg.out).to_pylist()
    classified = [v["uri"] for v in verdicts]
    assert len(classified) == len(set(classified))
    assert set(classified) | {q["uri"] for q in quarantine} == {f.uri for f in files}
    assert not set(classified) & {q["uri"] for q in quarantine}
    assert {q["uri"]: q["kind"] for q in quarantine} == {f.uri: f.bad_kind for f in files if f.bad_kind}
    c = manifest["counts"]
    assert c["inputs"] == len(files) == c["classified"] + c["quarantined"] == summary.inputs
    assert c["classified"] == len(verdicts) == 20 and c["quarantined"] == len(quarantine) == 9
    truth = {f.uri: f.label for f in files}
    right = sum(v["label"] == truth[v["uri"]] for v in verdicts)
    assert right / len(verdicts) >= 0.9, [(v["uri"], v["label"], v["probability"]) for v in verdicts]


def test_output_contract_and_the_package_feature_config_is_honoured(engine):
    b, _, cfg, _ = engine
    manifest = shards.read_manifest(cfg.out)
    pkg_meta = json.loads(storage.read_bytes(f"{b}/model/model/model.json"))
    assert manifest["model_id"] == pkg_meta["model_id"] and manifest["config_hash"] == FAST.hash()
    assert manifest["labels"] == ["faulty", "healthy"] and "mean of clip probabilities" in manifest["aggregation"]
    verdicts = shards.read_tables(cfg.out, "files")
    clips = shards.read_tables(cfg.out, "clips")
    assert {"uri", "label", "probability", "clips"} <= set(verdicts.column_names)
    # 5 s files in FAST's 2 s clips (0-2, 2-4, a 1 s tail padded): 3 each; default features would give 1
    assert set(verdicts.column("clips").to_pylist()) == {3}
    assert clips.num_rows == sum(verdicts.column("clips").to_pylist()) == manifest["counts"]["clips"]
    assert set(clips.column("model_id").to_pylist()) == set(verdicts.column("model_id").to_pylist()) == {
        pkg_meta["model_id"]}
    assert set(clips.column("config_hash").to_pylist()) == {FAST.hash()}
    rows = clips.to_pylist()
    for r in rows:
        assert r["top_labels"][0] == r["label"] and r["top_probabilities"][0] == pytest.approx(r["probability"])
        assert r["top_probabilities"][0] >= r["top_probabilities"][1] and sum(r["top_probabilities"]) <= 1.0001
        assert len(r["embedding"]) > 0 and np.isfinite(r["embedding"]).all()
    # the file verdict is the mean of its clips' probabilities
    v = verdicts.to_pylist()[0]
    mine = [r for r in rows if r["uri"] == v["uri"]]
    p = np.mean([dict(zip(r["top_labels"], r["top_probabilities"], strict=True))[v["label"]] for r in mine])
    assert v["probability"] == pytest.approx(p, abs=1e-5) and v["scores"][manifest["labels"].index(v["label"])] == \
        pytest.approx(v["probability"])


def test_classify_makes_the_images_featurize_makes(engine, tmp_path):
    """Same decode + mel code path: the decode stage's images equal the featurize shards' bytes."""
    b, _, _, _ = engine
    rows = [r for r in shards.iter_clips(f"{b}/features")]
    uri = rows[0]["uri"]
    ref = next(r for r in listing.list_objects(f"{b}/train-archive") if r.uri == uri)
    mels, _ = decode_images([ref], FAST)
    stored = sorted((r for r in rows if r["uri"] == uri), key=lambda r: r["clip_index"])
    assert len(mels) == len(stored) and all(np.array_equal(m, r["mel"]) for m, r in zip(mels, stored, strict=True))


def test_with_the_mel_on_the_model_actors_the_verdicts_are_the_same(engine, tmp_path, capsys):
    """--mel-on model (what --use-gpu chooses): decoders send 16-bit PCM, the model actors make the
    images; every input ends the same way and each file's scores agree within 2e-3."""
    _, files, cfg, _ = engine
    other = ClassifyConfig(**{**cfg.__dict__, "out": str(tmp_path / "pred"), "mel_on": "model"})
    summary = classify.run(other, progress=False)
    assert "log-mel images: made by the model actors (--mel-on model)" in capsys.readouterr().out
    assert shards.read_manifest(other.out)["classify"]["mel_on"] == "model"
    a = {v["uri"]: v for v in shards.read_tables(cfg.out, "files").to_pylist()}
    b = {v["uri"]: v for v in shards.read_tables(other.out, "files").to_pylist()}
    assert set(a) == set(b) and summary.quarantined == 9
    assert {q["uri"] for q in shards.read_quarantine(other.out).to_pylist()} == {f.uri for f in files if f.bad_kind}
    for uri, v in a.items():
        assert v["label"] == b[uri]["label"] and v["clips"] == b[uri]["clips"]
        np.testing.assert_allclose(v["scores"], b[uri]["scores"], atol=2e-3)


def test_rerun_is_a_noop_and_a_lost_batch_is_redone_without_duplicates(engine):
    _, _, cfg, first = engine
    again = classify.run(cfg, progress=False)
    assert again.resumed_batches == again.batches == first.batches
    # lose one batch's outputs and part file, and the manifest (a crash before the end)
    manifest = shards.read_manifest(cfg.out)
    lost = manifest["files"][0]
    bid = lost.split("/")[-1].removesuffix(".parquet")
    storage.delete([storage.join(cfg.out, p) for p in (lost, f"clips/{bid}-00000.parquet", f"_parts/{bid}.json",
                                                       "_manifest.json")])
    third = classify.run(cfg, progress=False)
    assert third.resumed_batches == third.batches - 1
    verdicts = shards.read_tables(cfg.out, "files").column("uri").to_pylist()
    assert len(verdicts) == len(set(verdicts)) == third.classified == first.classified


def test_too_many_quarantined_exits_4_and_bad_settings_fail_fast(engine, capsys):
    b, _, cfg, _ = engine
    args = ["classify", cfg.archive, cfg.model, cfg.out, "--files-per-task", "6", "--top-k", "2",
            "--keep-embeddings", "--no-progress"]
    assert commands.main([*args, "--max-quarantine-rate", "0.5"]) == 0
    assert commands.main([*args, "--max-quarantine-rate", "0.2"]) == 4  # 9 of 29 inputs are broken
    assert "quarantined, more than --max-quarantine-rate" in capsys.readouterr().err
    assert commands.main(["classify", cfg.archive, f"{b}/no-model", f"{b}/p2", "--no-progress"]) == 2
    assert "holds no model package" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="leave 0 of the cluster's 2 CPUs for decoding"):
        classify.run(ClassifyConfig(archive=cfg.archive, model=cfg.model, out=f"{b}/p3", cpus_per_actor=1.0,
                                    concurrency=2), progress=False)


def test_another_models_output_is_refused(engine, tmp_path):
    _, _, cfg, _ = engine
    out = tmp_path / "pred"
    out.mkdir()
    (out / "_manifest.json").write_text(json.dumps({"kind": "predictions", "model_id": "other-123"}))
    with pytest.raises(ConfigError, match="predictions of model other-123"):
        classify.preflight(ClassifyConfig(archive=cfg.archive, model=cfg.model, out=str(out)))


def test_batch_plan_caps_files_and_bytes():
    refs = [ObjectRef(f"s3://b/{i}.wav", "e", size) for i, size in enumerate([10, 10, 10, 50, 200, 10])]
    plan = classify.batch_plan(refs, files_per_task=2, task_bytes=60)
    assert [[r.size for r in b] for b in plan] == [[10, 10], [10, 50], [200], [10]]
    assert [r for b in plan for r in b] == refs


def test_shard_files_are_parquet_with_the_documented_schema(engine):
    _, _, cfg, _ = engine
    manifest = shards.read_manifest(cfg.out)
    with storage.arrow_input(storage.join(cfg.out, manifest["clips"][0])) as f:
        schema = pq.ParquetFile(f).schema_arrow
    assert schema.field("top_labels").type.list_size == 2 and schema.field("embedding").type.list_size > 0


def test_unknown_below_labels_the_unlikely_files_unknown_and_nothing_else(engine, tmp_path):
    """``--unknown-below P``: a file whose best (calibrated) probability is below P is ``unknown``; the
    others keep their label, and the run's counts still add up (a scan reads the same verdicts). An
    untrained package, whose probabilities spread around 0.5 (the session's model is sure of every file)."""
    b, _, cfg, _ = engine
    package = str(tmp_path / "untrained")
    net = model.create_model("test_resnet", 2, FAST.shape, pretrained=False)
    model.save_package(package, net, {"model_name": "test_resnet", "labels": ["faulty", "healthy"],
                                      "feature_config": FAST.to_dict(), "config_hash": FAST.hash(),
                                      "normalization": {"kind": "clip"}})
    plain = replace(cfg, model=package, out=f"{b}/pred-untrained", keep_embeddings=False)
    classify.run(plain, progress=False)
    before = {v["uri"]: v for v in shards.read_tables(plain.out, "files").to_pylist()}
    probs = sorted(v["probability"] for v in before.values())
    assert probs[0] < probs[-1], probs
    cut = (probs[0] + probs[-1]) / 2
    s = classify.run(replace(plain, out=f"{b}/pred-unknown", unknown_below=cut), progress=False)
    after = {v["uri"]: v for v in shards.read_tables(f"{b}/pred-unknown", "files").to_pylist()}
    assert set(after) == set(before) and s.classified == len(after)
    for uri, v in after.items():
        assert v["probability"] == pytest.approx(before[uri]["probability"], abs=1e-6)
        assert v["label"] == ("unknown" if v["probability"] < cut else before[uri]["label"])
    assert 0 < s.labels.get("unknown", 0) < len(after)
