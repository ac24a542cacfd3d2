"""featurize end to end on real parts: the local S3 server over HTTP, a real local Ray."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAST, decode_images, new_bucket

from melbatch import listing, shards, storage
from melbatch.audio.logmel import compute_logmel
from melbatch.config import ConfigError, FeatureConfig, FeaturizeConfig
from melbatch.shards import DatasetError
from melbatch.stages import featurize
from melbatch.testing import archives

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.s3]



def _rows(dst: str) -> list[dict]:
    return list(shards.iter_clips(dst))


@pytest.fixture(scope="module")
def engine_on_s3(request):
    """An engine archive with every bad kind, featurized once from S3 to S3."""
    request.getfixturevalue("ray_session")
    bucket = new_bucket()
    files = archives.make_archive(f"{bucket}/archive", "engine", files_per_class=5, seconds=5.0, seed=3, bad=True)
    cfg = FeaturizeConfig(src=f"{bucket}/archive", dst=f"{bucket}/features", features=FAST, files_per_task=4,
                          rows_per_shard=8, rows_per_row_group=4, keep_audio=True)
    summary = featurize.run(cfg, progress=False)
    return files, cfg, summary


def test_every_input_is_featurized_or_quarantined_exactly_once(engine_on_s3):
    files, cfg, summary = engine_on_s3
    manifest = shards.open_dataset(cfg.dst, expect=FAST)
    rows = _rows(cfg.dst)
    quarantine = shards.read_quarantine(cfg.dst).to_pylist()
    featurized_uris = {r["uri"] for r in rows}
    quarantined_uris = [q["uri"] for q in quarantine]
    inputs = {f.uri for f in files}
    assert featurized_uris | set(quarantined_uris) == inputs
    assert not featurized_uris & set(quarantined_uris)
    assert len(quarantined_uris) == len(set(quarantined_uris))
    c = manifest["counts"]
    assert c["inputs"] == len(files) == c["featurized"] + c["quarantined"] == summary.inputs
    assert c["featurized"] == len(featurized_uris) and c["quarantined"] == len(quarantine)
    assert c["clips"] == len(rows) == sum(manifest["labels"].values())
    # no clip twice
    assert len({(r["uri"], r["clip_index"]) for r in rows}) == len(rows)


def test_bad_files_land_in_quarantine_with_their_kind(engine_on_s3):
    files, cfg, _ = engine_on_s3
    got = {q["uri"]: q for q in shards.read_quarantine(cfg.dst).to_pylist()}
    expected = {f.uri: f.bad_kind for f in files if f.bad_kind}
    assert {u: q["kind"] for u, q in got.items()} == expected
    assert all(q["message"] and q["etag"] is not None for q in got.values())
    assert "soundfile" in got[next(u for u, k in expected.items() if k == "not_audio")]["decoders_tried"]


def test_manifest_and_shards_carry_the_contract(engine_on_s3):
    _files, cfg, _ = engine_on_s3
    manifest = shards.read_manifest(cfg.dst)
    for key in ("schema_version", "feature_config", "config_hash", "shards", "labels", "counts"):
        assert key in manifest
    assert manifest["config_hash"] == FAST.hash()
    assert FeatureConfig.from_dict(manifest["feature_config"]) == FAST
    assert manifest["labels"].keys() == {"healthy", "faulty"}
    assert sum(manifest["shard_rows"].values()) == manifest["counts"]["clips"]
    for uri in shards.shard_uris(cfg.dst, manifest):
        with storage.arrow_input(uri) as f:
            pf = pq.ParquetFile(f)
            assert shards.feature_config_of(pf.schema_arrow) == FAST
            assert pf.metadata.num_rows <= cfg.rows_per_shard
            assert all(pf.metadata.row_group(i).num_rows <= cfg.rows_per_row_group
                       for i in range(pf.metadata.num_row_groups))
    rows = _rows(cfg.dst)
    r = rows[0]
    assert r["mel"].shape == FAST.shape and r["mel"].dtype == np.float16
    assert r["decoder"] == "soundfile" and r["etag"] and r["size"] > 0
    assert {r["source_sample_rate_hz"] for r in rows} == {8000, 16000, 22050, 44100, 48000}
    # 5 s files with 2 s clips: clips at 0, 2 and a padded tail at 4 (1 s of audio = min_tail_s)
    assert sorted({(x["clip_index"], x["start_s"], round(x["end_s"], 2)) for x in rows}) == [
        (0, 0.0, 2.0), (1, 2.0, 4.0), (2, 4.0, 5.0)]
    assert manifest["audio"] == {"kept": True, "dtype": "int16", "sample_rate_hz": FAST.sample_rate_hz,
                                 "samples": FAST.clip_samples}


def test_kept_audio_gives_back_the_stored_image(engine_on_s3):
    """The audio column is the clip the image was made from: recomputing the image from it agrees."""
    _, cfg, _ = engine_on_s3
    rows = _rows(cfg.dst)
    for r in rows[::4]:
        assert r["audio"].shape == (FAST.clip_samples,) and r["audio"].dtype == np.float32
        again = compute_logmel(r["audio"], FAST)
        stored = r["mel"].astype(np.float32)
        loud = stored > stored.max() - 60  # 16-bit PCM and float16 agree well above the quantisation floor
        assert np.abs(again - stored)[loud].max() < 0.25
    tail = next(r for r in rows if r["clip_index"] == 2)  # 1 s of audio, 1 s of zero padding
    assert not tail["audio"][FAST.sample_rate_hz + 1:].any()


def test_labels_come_from_the_folder_and_the_features_separate_them(engine_on_s3):
    _, cfg, _ = engine_on_s3
    rows = _rows(cfg.dst)
    assert all(r["uri"].split("/")[-2] == r["label"] for r in rows)
    # faulty engines knock and whine above 2 kHz: their upper bands are brighter
    hi = FAST.n_mels // 2
    energy = {lab: np.mean([r["mel"][hi:].astype(np.float32).mean() - r["mel"][:hi].astype(np.float32).mean()
                            for r in rows if r["label"] == lab]) for lab in ("healthy", "faulty")}
    assert energy["faulty"] > energy["healthy"] + 5


def test_ray_data_streams_the_shards_as_tensors(engine_on_s3):
    import ray

    _, cfg, _ = engine_on_s3
    manifest = shards.read_manifest(cfg.dst)
    ds = ray.data.read_parquet(shards.shard_uris(cfg.dst, manifest))
    batch = ds.take_batch(3, batch_format="pyarrow")
    mel = shards.mel_array(batch)
    assert mel.shape == (3, *FAST.shape) and mel.dtype == np.float16
    by_key = {(r["uri"], r["clip_index"]): r["mel"] for r in shards.iter_clips(cfg.dst)}
    for i, (uri, idx) in enumerate(zip(batch["uri"].to_pylist(), batch["clip_index"].to_pylist(), strict=True)):
        assert np.array_equal(mel[i], by_key[(uri, idx)])
    assert ds.count() == manifest["counts"]["clips"]


def test_rerun_is_a_noop_with_no_duplicates(engine_on_s3):
    _files, cfg, first = engine_on_s3
    before = shards.read_manifest(cfg.dst)
    again = featurize.run(cfg, progress=False)
    after = shards.read_manifest(cfg.dst)
    assert again.resumed_batches == again.batches == first.batches
    assert after["shards"] == before["shards"] and after["counts"] == before["counts"]
    assert len(_rows(cfg.dst)) == before["counts"]["clips"]
    # part files written before batch results were typed (the done count under "featurized") still resume
    parts = storage.list_files(storage.join(cfg.dst, "_parts"), ".json")
    for uri in parts:
        old = json.loads(storage.read_bytes(uri))
        old["featurized"] = old.pop("done")
        old["shards"] = [list(s) for s in old["shards"]]
        storage.write_bytes(uri, json.dumps(old).encode())
    third = featurize.run(cfg, progress=False)
    assert third.resumed_batches == third.batches == len(parts) and third.featurized == first.featurized
    assert shards.read_manifest(cfg.dst)["shards"] == before["shards"]


def test_a_retried_task_rewrites_the_same_files(engine_on_s3, bucket):
    """Ray runs tasks at least once: running a batch twice leaves the same names and rows."""
    files, _, _ = engine_on_s3
    good = [f for f in files if not f.bad_kind][:3]
    refs = {r.uri: r for r in listing.list_objects(good[0].uri.rsplit("/", 2)[0])}
    batch = [(refs[f.uri], f.label) for f in good]
    bid = featurize.batch_id(FAST, batch)
    assert bid == featurize.batch_id(FAST, list(batch))
    args = (bid, batch, FAST.canonical_json(), f"{bucket}/retry", 4, 2, -70.0)
    a = featurize.featurize_batch(*args)
    names = storage.list_files(f"{bucket}/retry")
    b = featurize.featurize_batch(*args)
    assert storage.list_files(f"{bucket}/retry") == names
    assert replace(a, task_s=0.0) == replace(b, task_s=0.0)
    assert a.shards == ((f"{bid}-00000.parquet", 4), (f"{bid}-00001.parquet", 4), (f"{bid}-00002.parquet", 1))


def test_other_features_into_the_same_dst_are_refused_then_replaced_with_overwrite(ray_session, tmp_path):
    src, dst = str(tmp_path / "a"), str(tmp_path / "f")
    archives.make_archive(src, "engine", files_per_class=2, seconds=3.0)
    featurize.run(FeaturizeConfig(src=src, dst=dst, features=FAST), progress=False)
    old_shards = set(shards.read_manifest(dst)["shards"])
    other = FeatureConfig(clip_s=2.0, clip_hop_s=2.0, n_mels=32)
    with pytest.raises(ConfigError, match=r"n_mels=32 \(was 64\)"):
        featurize.run(FeaturizeConfig(src=src, dst=dst, features=other), progress=False)
    featurize.run(FeaturizeConfig(src=src, dst=dst, features=other, overwrite=True), progress=False)
    manifest = shards.open_dataset(dst, expect=other)
    left = {storage.relative(u, storage.canonical(dst)) for u in storage.list_files(storage.join(dst, "shards"))}
    assert left == set(manifest["shards"]) and not left & old_shards  # the old shards were collected
    with pytest.raises(DatasetError, match="n_mels"):
        shards.open_dataset(dst, expect=FAST)


def test_local_folder_file_uri_manifest_labels_and_filters(ray_session, tmp_path):
    src = tmp_path / "arch"
    files = archives.make_archive(str(src), "engine", files_per_class=3, seconds=3.0)
    labels = tmp_path / "labels.csv"
    keep = files[:4]
    labels.write_text("uri,label\n" + "".join(
        f"{storage.relative(f.uri, storage.canonical(str(src)))},{'L' + f.label}\n" for f in keep))
    dst = f"file://{tmp_path}/out"
    s = featurize.run(FeaturizeConfig(src=f"file://{src}", dst=dst, features=FAST, labels=str(labels),
                                      exclude=("*.mp3",)), progress=False)
    kept = [f for f in files if not f.uri.endswith(".mp3")]
    assert s.inputs == len(kept)
    q = shards.read_quarantine(dst).to_pylist()
    assert {x["uri"] for x in q} == {f.uri for f in kept} - {f.uri for f in keep}
    assert {x["kind"] for x in q} == {"unlabelled"}
    assert {r["label"] for r in _rows(dst)} == {"Lhealthy", "Lfaulty"}


def test_unlabelled_archive(ray_session, tmp_path):
    src = tmp_path / "flat"
    for i in range(3):
        storage.write_bytes(str(src / f"rec{i}.wav"), archives.encode(
            archives.engine_sound(np.random.default_rng(i), 3.0, 16000, False), 16000, archives.FORMATS[0]))
    dst = str(tmp_path / "out")
    s = featurize.run(FeaturizeConfig(src=str(src), dst=dst, features=FAST, labels="none"), progress=False)
    assert s.featurized == 3 and s.quarantined == 0
    assert {r["label"] for r in _rows(dst)} == {None}
    assert shards.read_manifest(dst)["labels"] == {}
    # by default images only; --keep-audio stores each clip's waveform beside its image
    assert shards.read_manifest(dst)["audio"] == {"kept": False}
    assert all("audio" not in r for r in _rows(dst))
    kept = str(tmp_path / "kept")
    featurize.run(FeaturizeConfig(src=str(src), dst=kept, features=FAST, labels="none", keep_audio=True),
                  progress=False)
    assert shards.read_manifest(kept)["audio"]["kept"] is True
    assert all(r["audio"].shape == (FAST.clip_samples,) for r in _rows(kept))


def test_incomplete_output_is_refused_by_readers(tmp_path):
    with pytest.raises(DatasetError, match="did not finish"):
        shards.open_dataset(str(tmp_path))


def test_nothing_to_read_fails_fast(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("no audio here")
    with pytest.raises(ConfigError, match="no audio objects"):
        featurize.run(FeaturizeConfig(src=str(tmp_path / "src"), dst=str(tmp_path / "o")), progress=False)


def test_summary_counts_render(engine_on_s3):
    _, _, summary = engine_on_s3
    text = summary.render()
    assert f"inputs {summary.inputs:>12}" not in text  # rendered with the featurized/quarantined split
    assert f"featurized {summary.featurized} + quarantined {summary.quarantined}" in text
    assert Counter(summary.quarantine_kinds)["truncated"] == 2  # a .wav and a .flac cut short
    json.dumps(summary.__dict__)


def test_an_object_that_vanishes_after_listing_is_a_read_error(bucket):
    uri = f"{bucket}/gone/a.wav"
    storage.write_bytes(uri, archives.encode(archives.engine_sound(np.random.default_rng(0), 2.0, 16000, False),
                                            16000, archives.FORMATS[0]))
    [ref] = listing.list_objects(f"{bucket}/gone")
    storage.delete([uri])
    result = featurize.featurize_batch("vanished", [(ref, "x")], FAST.canonical_json(), f"{bucket}/out", 4, 2, -70.0)
    [q] = result.quarantine
    assert q["kind"] == "read_error" and "gone/a.wav" in q["message"]
    assert result.done == 0 and result.shards == ()


def test_keys_with_spaces_unicode_and_percent_signs(ray_session, bucket):
    x = archives.engine_sound(np.random.default_rng(0), 2.0, 16000, False)
    keys = ["dog barks/ünïcödé 100% loud.wav", "dog barks/x+y=z (1).flac", "cat/ONE.WAV"]
    for k in keys:
        storage.write_bytes(f"{bucket}/odd/{k}", archives.encode(x, 16000, archives.FORMATS[0 if "wav" in k.lower()
                                                                                          else 1]))
    s = featurize.run(FeaturizeConfig(src=f"{bucket}/odd", dst=f"{bucket}/odd-out", features=FAST), progress=False)
    assert s.featurized == 3
    got = {r["uri"]: r["label"] for r in _rows(f"{bucket}/odd-out")}
    assert got == {f"{bucket}/odd/{k}": k.split("/")[0] for k in keys}


def test_feature_engineering_steps_are_applied_alike_by_featurize_classify_and_train(ray_session, tmp_path):
    """The steps live in the feature config: the shards carry its hash, classify's decode stage makes
    the same images, and train's batched recomputation from the stored waveforms agrees."""
    import torch

    from melbatch.audio.logmel import logmel_tensor

    steps = FeatureConfig(**{**FAST.to_dict(), "denoise": "gate", "band_emphasis": ((1000.0, 4000.0, 6.0),),
                             "compression": "pcen", "clip_norm": "band_mean"})
    src, dst = tmp_path / "a", tmp_path / "f"
    archives.make_archive(str(src), "engine", files_per_class=2, seconds=3.0, seed=8)
    featurize.run(FeaturizeConfig(src=str(src), dst=str(dst), features=steps, keep_audio=True), progress=False)
    manifest = shards.read_manifest(str(dst))
    assert manifest["config_hash"] == steps.hash() != FAST.hash()
    assert FeatureConfig.from_dict(manifest["feature_config"]) == steps
    rows = _rows(str(dst))
    plain = compute_logmel(rows[0]["audio"], FAST)
    assert np.abs(rows[0]["mel"].astype(np.float32) - plain).mean() > 5  # the steps changed the picture
    ref = next(r for r in listing.list_objects(str(src)) if r.uri == rows[0]["uri"])
    mels, _ = decode_images([ref], steps)
    mine = sorted((r for r in rows if r["uri"] == ref.uri), key=lambda r: r["clip_index"])
    assert all(np.array_equal(m, r["mel"]) for m, r in zip(mels, mine, strict=True))  # classify: same bytes
    with torch.inference_mode():
        batch = logmel_tensor(torch.from_numpy(np.stack([r["audio"] for r in rows[:4]])), steps).numpy()
    for img, r in zip(batch, rows[:4], strict=True):  # train: from 16-bit PCM, so close, not equal
        stored = r["mel"].astype(np.float32)
        assert np.median(np.abs(img - stored)) < 0.05 * max(1.0, float(np.abs(stored).max()))


def test_shard_columns_are_built_as_pa_array_builds_them_and_a_small_run_never_imports_pandas(tmp_path):
    """The shards' plain columns are built from their buffers, equal to what ``pa.array`` makes (nulls,
    non-ASCII, empty); so a small local featurize (the fixed cost of a nightly increment) never pays
    for importing pandas, which the first ``pa.array`` call in a process does (~0.3 s)."""
    import subprocess
    import sys

    import pyarrow as pa

    cases = [(["a", None, "é/ß ✓", ""], pa.string()), ([None, None], pa.string()), ([], pa.string()),
             ([1, -2, 3], pa.int16()), ([7, 8], pa.int32()), ([2**40], pa.int64()), ([0.5, -1.25], pa.float64())]
    for values, type_ in cases:
        built = shards.plain_array(values, type_)
        built.validate(full=True)
        assert built.equals(pa.array(values, type_)), (values, type_)
    with pytest.raises(TypeError, match="is not one of"):
        shards.plain_array([True], pa.bool_())
    archives.make_archive(str(tmp_path / "in"), "engine", files_per_class=1, seconds=2.0)
    code = ("import sys; from melbatch import cli; rc = cli.main(['featurize', *sys.argv[1:], '--no-progress']);"
            "print('pandas' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("False"), p.stdout + p.stderr
    assert shards.read_manifest(str(tmp_path / "out"))["counts"]["inputs"] == 2


def test_the_sample_rate_is_fitted_to_where_the_recordings_sound_lies(tmp_path, capsys):
    """With --fit-rate, birdsong-like recordings (trills at 6-11 kHz, made at 48 kHz) are featurized at 32 kHz
    with the same frames (the image keeps its shape); the engines (below 6 kHz) and the default keep 16 kHz."""
    fz = featurize
    fc = FeatureConfig()
    high = fc.at_rate(32000)
    assert (high.n_fft, high.win_length, high.hop_length, high.f_max_hz) == (1024, 800, 320, 16000.0)
    assert high.shape == fc.shape and fc.at_rate(16000) == fc

    rng = np.random.default_rng(0)
    t = np.arange(3 * 48000) / 48000
    for i in range(6):
        (tmp_path / "birds" / "trill").mkdir(parents=True, exist_ok=True)
        f0 = rng.uniform(6000, 11000)
        x = 0.3 * np.sin(2 * np.pi * (f0 + 800 * np.sin(2 * np.pi * 7 * t)) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
        (tmp_path / "birds" / "trill" / f"{i}.wav").write_bytes(archives.encode(x.astype(np.float32), 48000,
                                                                                archives.FORMATS[0]))
    archives.make_archive(str(tmp_path / "engines"), "engine", files_per_class=3, seconds=3.0, seed=3)
    cfg = FeaturizeConfig(src=str(tmp_path / "birds"), dst=str(tmp_path / "f"))
    refs = list(listing.list_objects(cfg.src))
    fitted = fz.fit_rate(cfg, refs)
    assert fitted.features == cfg.features.at_rate(32000)
    assert "so features are made at 32 kHz instead of 16 kHz (n_fft 1024, hop 320" in capsys.readouterr().out
    assert not FeaturizeConfig(src="a", dst="b").fit_rate  # off unless asked (--fit-rate): it lost on xc_birds10
    engines = FeaturizeConfig(src=str(tmp_path / "engines"), dst=str(tmp_path / "g"))
    assert fz.fit_rate(engines, list(listing.list_objects(engines.src))) == engines
    s = featurize.run(cfg, progress=False)  # the default
    assert shards.read_manifest(cfg.dst)["feature_config"]["sample_rate_hz"] == 16000 and s.featurized == 6


def test_with_use_gpu_the_images_are_made_in_batches_on_the_device_as_the_clip_by_clip_path_makes_them(
        tmp_path, monkeypatch):
    """featurize --use-gpu: the task only cuts clips and images them MEL_BATCH at a time on a torch device
    (here the CPU: the same code, another device), in batches that span files: the same quarantine,
    rows, shard names and stored audio as the clip-by-clip path, and images within what the 16-bit PCM's
    quantisation and float16 storage give. Without a GPU, --use-gpu fails before reading anything."""
    files = archives.make_archive(str(tmp_path / "a"), "engine", files_per_class=3, seconds=5.0, seed=5, bad=True)
    refs = {r.uri: r for r in listing.list_objects(str(tmp_path / "a"))}
    batch = [(refs[f.uri], f.label) for f in files]
    runs = {}
    for name, device, per_batch in (("clip", "", 0), ("batched", "cpu", 3)):
        monkeypatch.setattr(featurize, "MEL_BATCH", per_batch or featurize.MEL_BATCH)
        runs[name] = featurize.featurize_batch("b", batch, FAST.canonical_json(), str(tmp_path / name), 4, 2,
                                               -70.0, True, device)
    a, b = runs["clip"], runs["batched"]
    assert b.done == a.done > 0 and b.clips == a.clips > 3 and b.quarantine == a.quarantine and b.labels == a.labels
    assert b.shards == a.shards and len(a.quarantine) > 0
    ta, tb = (pq.read_table([str(tmp_path / n / shards.SHARD_DIR / s) for s, _ in runs[n].shards])
              for n in ("clip", "batched"))
    assert ta.drop_columns(["mel"]).equals(tb.drop_columns(["mel"]))  # rows, labels and audio alike
    ma, mb = shards.mel_array(ta).astype(np.float32), shards.mel_array(tb).astype(np.float32)
    loud = ma > ma.max(axis=(1, 2), keepdims=True) - 60
    assert ma.shape == mb.shape and np.abs(ma - mb)[loud].max() < 0.25 and np.abs(ma - mb).mean() < 0.05

    if not torch.cuda.is_available():
        cfg = FeaturizeConfig(src=str(tmp_path / "a"), dst=str(tmp_path / "gpu"), features=FAST, use_gpu=True)
        with pytest.raises(ConfigError, match="drop --use-gpu"):
            featurize.run(cfg, progress=False)
        assert not (tmp_path / "gpu").exists()
