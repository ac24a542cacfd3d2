"""classify's three stages run here, in one process, on local files: the typed rows they pass on, and
the one place a batch is finished. The same batch cut into one chunk or into many ends the same."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from melbatch import listing, shards, storage
from melbatch.audio import logmel
from melbatch.config import FeatureConfig
from melbatch.model import package as mb_model
from melbatch.model.package import predict
from melbatch.stages import chunks, classify, detections
from melbatch.stages.runs import BatchResult, read_parts
from melbatch.testing import archives

FEATURES = FeatureConfig(n_mels=64, clip_s=2.0, clip_hop_s=2.0)
# a random-init model's probabilities sit near 0.5: this threshold detects some clips and not others
DETECT = detections.Settings.of(["0.5"], ["faulty", "healthy"], FEATURES.clip_hop_s)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A local archive with broken files, and a random-init package over FEATURES."""
    root = tmp_path_factory.mktemp("stages")
    files = archives.make_archive(str(root / "archive"), "engine", files_per_class=3, seconds=5.0, seed=5, bad=True)
    torch.manual_seed(0)
    m = mb_model.create_model("test_convnext", 2, FEATURES.shape, pretrained=False).eval()
    mb_model.save_package(str(root / "train"), m, {
        "model_name": "test_convnext", "labels": ["faulty", "healthy"], "feature_config": FEATURES.to_dict(),
        "config_hash": FEATURES.hash(), "normalization": {"kind": "dataset", "mean": -40.0, "std": 20.0},
        "padded_views": mb_model.PADDED_VIEWS})
    refs = list(listing.list_objects(str(root / "archive")))
    return root, files, refs, mb_model.load_package(str(root / "train"))


def _same_schema(got: pa.Schema, want: pa.Schema) -> bool:
    """Equal as written (Parquet names a list's item ``element``; nothing else may differ)."""
    def described(schema: pa.Schema) -> list:
        return [(f.name, str(f.type).replace("<element:", "<item:"), f.nullable, f.metadata) for f in schema]
    return described(got) == described(want) and got.metadata == want.metadata


def _run_stages(root, refs, pkg, out: str, images: bool = True) -> tuple[list[dict], dict]:
    """decode → model → write for one work batch, then the driver's finish: (the chunks the driver
    got, the batch's result). Without ``images`` the model stage makes them from the clips' PCM."""
    work = chunks.work_table([("b1", refs)])
    predictor = chunks.Predictor(str(root / "train"), batch_size=4, top_k=2, embeddings=True, use_gpu=False,
                                 threads=1, thresholds=DETECT.thresholds)
    done = []
    for decoded in chunks.decode_batch(work, FEATURES.canonical_json(), -70.0, images=images):
        assert ("mel" in decoded.column_names) == images and ("audio" in decoded.column_names) != images
        assert decoded.num_rows == 1
        predicted = predictor(decoded)
        # what the model stage gets and gives is typed and named, no JSON or bytes inside columns
        assert pa.types.is_struct(predicted.schema.field("clips").type.value_type)
        assert predicted.schema.field("sums").type.value_type == chunks.SUMS
        done += chunks.write_batch(predicted, out).to_pylist()
    assert classify._complete(done)
    return done, classify.finish_batch(out, "b1", done, {**pkg.meta, "labels": pkg.labels}, DETECT)


def test_one_chunk_or_many_the_batch_ends_the_same(setting, monkeypatch, tmp_path):
    root, files, refs, pkg = setting
    one, r1 = _run_stages(root, refs, pkg, str(tmp_path / "one"))
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 3 * FEATURES.n_mels * FEATURES.n_frames * 2)  # 3 clips a chunk
    many, r2 = _run_stages(root, refs, pkg, str(tmp_path / "many"))
    assert len(one) == 1 and len(many) > 3 and [c["seq"] for c in many] == list(range(len(many)))
    assert all(c["clips"] <= 3 for c in many) and sum(c["clips"] for c in many) == one[0]["clips"] == r1.clips

    # every input once: classified or quarantined, with the kind the archive was broken with
    bad = {f.uri: f.bad_kind for f in files if f.bad_kind}
    assert {q["uri"]: q["kind"] for q in r1.quarantine} == bad
    assert r1.done + len(r1.quarantine) == len(refs) == len(files)
    for key in ("done", "clips", "quarantine", "labels", "decoders", "events"):
        assert getattr(r1, key) == getattr(r2, key), key
    # events that cross chunk boundaries are merged by the driver: the same events either way
    e1, e2 = (pq.read_table(storage.join(str(tmp_path / d), r.outputs["detections"][0])).to_pylist()
              for d, r in (("one", r1), ("many", r2)))
    assert sum(r1.events.values()) == len(e1) > 0 and len(e1) == len(e2)
    for a, b in zip(e1, e2, strict=True):  # a padded clip's extra views run in a batch of another size: 1e-7
        assert a == {k: pytest.approx(v, abs=1e-6) if isinstance(v, float) else v for k, v in b.items()}
    assert len(r2.outputs["clips"]) == len([c for c in many if c["clips"]])

    v1 = pq.read_table(storage.join(str(tmp_path / "one"), r1.outputs["files"][0]))
    v2 = pq.read_table(storage.join(str(tmp_path / "many"), r2.outputs["files"][0]))
    assert _same_schema(v1.schema, shards.file_prediction_schema(pkg.labels))
    assert v1.column("uri").to_pylist() == v2.column("uri").to_pylist()
    assert v1.column("label").to_pylist() == v2.column("label").to_pylist()
    np.testing.assert_allclose(np.array(v1.column("scores").to_pylist()), np.array(v2.column("scores").to_pylist()),
                               atol=1e-6)
    # the part file, written last, holds the result the driver got; one written before results were typed
    # (the done count under the stage's own word) reads the same
    one_out = storage.canonical(str(tmp_path / "one"))
    part = storage.join(one_out, "_parts", "b1.json")
    assert read_parts(one_out, {"b1", "b2"}) == {"b1": r1}
    old = json.loads(storage.read_bytes(part))
    old["classified"] = old.pop("done")
    storage.write_bytes(part, json.dumps(old).encode())
    assert read_parts(one_out, {"b1"}) == {"b1": r1}


def test_clip_predictions_are_the_models_on_the_images_featurize_would_make(setting, tmp_path):
    root, _, refs, pkg = setting
    done, result = _run_stages(root, refs, pkg, str(tmp_path / "out"))
    clips = pq.read_table(storage.join(str(tmp_path / "out"), done[0]["clips_file"]))
    assert _same_schema(clips.schema, shards.clip_prediction_schema(2, clips.schema.field("embedding").type.list_size))
    decoded = next(chunks.decode_batch(chunks.work_table([("b1", refs)]), FEATURES.canonical_json(), -70.0))
    images = chunks.chunk_images(decoded, FEATURES)
    assert images.shape == (clips.num_rows, *FEATURES.shape) and images.dtype == np.dtype(FEATURES.dtype)
    padded = mb_model.padded(clips.column("start_s").to_numpy(), clips.column("end_s").to_numpy(), FEATURES.clip_s)
    assert padded.any() and not padded.all()  # a file's last clip ends inside its window: three views
    probs, _ = predict(pkg, images, batch_size=64, padded_clips=padded)
    top = np.array(clips.column("top_probabilities").to_pylist())
    np.testing.assert_allclose(top[:, 0], probs.max(1), atol=1e-5)
    assert clips.column("label").to_pylist() == [pkg.labels[i] for i in probs.argmax(1)]
    # per file, the verdict is the mean of its clips' probabilities
    verdict = pq.read_table(storage.join(str(tmp_path / "out"), result.outputs["files"][0])).to_pylist()
    uris = clips.column("uri").to_pylist()
    for v in verdict:
        mine = probs[[i for i, u in enumerate(uris) if u == v["uri"]]]
        assert v["clips"] == len(mine)
        np.testing.assert_allclose(v["scores"], mine.mean(0), atol=1e-5)


def test_with_the_mel_on_the_model_the_decoders_send_pcm_and_the_model_makes_the_same_images(setting, tmp_path):
    """--mel-on model: the decode stage only cuts clips (16-bit PCM), the model actor makes the images on
    its device with featurize's function; they are featurize's images to the tolerance the shards' own
    audio gives (16-bit PCM vs float, stored as float16), and the batch ends the same."""
    root, _, refs, pkg = setting
    work = chunks.work_table([("b1", refs)])
    with_mel = next(chunks.decode_batch(work, FEATURES.canonical_json(), -70.0))
    pcm = next(chunks.decode_batch(work, FEATURES.canonical_json(), -70.0, images=False))
    audio = chunks.chunk_audio(pcm, FEATURES)
    assert audio.dtype == np.int16 and audio.shape == (len(chunks.chunk_images(with_mel, FEATURES)),
                                                       FEATURES.clip_samples)
    made = logmel.clip_images(audio, FEATURES, torch.device("cpu"), 8).float().numpy()
    stored = chunks.chunk_images(with_mel, FEATURES).astype(np.float32)
    loud = stored > stored.max(axis=(1, 2), keepdims=True) - 60
    assert made.shape == stored.shape and np.abs(made - stored)[loud].max() < 0.25

    _, ra = _run_stages(root, refs, pkg, str(tmp_path / "cpu"))
    _, rb = _run_stages(root, refs, pkg, str(tmp_path / "model"), images=False)
    for key in ("done", "clips", "quarantine", "labels"):
        assert getattr(ra, key) == getattr(rb, key), key
    va = pq.read_table(storage.join(str(tmp_path / "cpu"), ra.outputs["files"][0]))
    vb = pq.read_table(storage.join(str(tmp_path / "model"), rb.outputs["files"][0]))
    np.testing.assert_allclose(np.array(va.column("scores").to_pylist()), np.array(vb.column("scores").to_pylist()),
                               atol=2e-3)


def test_the_run_summary_adds_batch_results_and_accounts_for_every_input():
    """featurize and classify share one summary type: the same sums, the same check, the same lines."""
    from melbatch.stages.featurize import Summary as FeaturizeSummary

    s = classify.Summary(archive="s3://a", out="s3://o", model_id="m-1", config_hash="h", inputs=3, batches=2)
    s.add(BatchResult("b1", 1, 4, 8.0, [], {"x": 1}, {"soundfile": 1}, {"n1": 1}))
    s.add(BatchResult("b2", 1, 2, 4.0, [], {"x": 1}, {"torchcodec": 1}, {"n1": 1}))
    s.close([{"kind": "empty"}], started=0.0)
    assert (s.classified, s.clips, s.audio_s, s.quarantined, s.quarantine_rate) == (2, 6, 12.0, 1, 1 / 3)
    assert s.labels == {"x": 2} and s.decoders == {"soundfile": 1, "torchcodec": 1} and s.nodes == {"n1": 2}
    lines = s.render().splitlines()
    assert lines[:3] == ["classify s3://a -> s3://o", "  model        m-1  (features h)",
                         "  inputs              3  = classified 2 + quarantined 1"]
    assert "  label x                   2 files" in lines and "  quarantine   s3://o/quarantine.parquet" in lines
    f = FeaturizeSummary(src="s3://a", dst="s3://d", config_hash="h", inputs=2)
    f.add(BatchResult("b1", 1, 3, 6.0, [], {"y": 3}, {}, {}))
    with pytest.raises(AssertionError):  # an input neither done nor quarantined is a bug, not a count
        f.close([], started=0.0)
    assert "  inputs              2  = featurized 1 + quarantined 0" in f.render()


def test_decode_tasks_share_the_cpus_a_light_model_leaves_and_never_ask_for_more_than_one():
    """Beside a model actor on a fraction of a CPU, as many decode tasks run as there are cores left
    to run them, and together they ask for no more than is left."""
    assert classify.decode_task_cpus(1.0) == 1.0 and classify.decode_task_cpus(7.0) == 1.0  # whole CPUs
    assert classify.decode_task_cpus(1.75) == 0.875  # 2 CPUs, a 0.25-CPU actor: two tasks, not one
    for left in (1.0, 1.05, 1.5, 1.75, 2.95, 6.5, 15.75):
        each = classify.decode_task_cpus(left)
        tasks = int(left / each + 1e-9)
        assert each <= 1.0 and tasks == math.ceil(left - 1e-6) and tasks * each <= left + 1e-9


def test_big_runs_put_up_to_16_batches_in_an_input_block_and_keep_8_blocks_per_decoding_cpu():
    """Ray Data pays per input block; a run of many work batches groups them, a small one does not."""
    assert classify.input_blocks(0, 1) == 0 and classify.input_blocks(10, 1) == 10  # small: a batch a block
    assert classify.input_blocks(1000, 1) == 63  # 16 a block (62 full, 1 of 8)
    assert classify.input_blocks(1000, 14) == 125  # 8 a block: 8 blocks for each of 14 decoding CPUs
    assert classify.input_blocks(1000, 0.5) == 63  # a fraction of a CPU counts as one
    for batches in (1, 7, 40, 129, 5000, 123_457):
        for cpus in (1, 3, 64):
            blocks = classify.input_blocks(batches, cpus)
            per_block = -(-batches // blocks)
            assert 1 <= per_block <= classify.BATCHES_PER_BLOCK
            assert blocks >= min(batches, classify.BLOCKS_PER_CPU * cpus)
