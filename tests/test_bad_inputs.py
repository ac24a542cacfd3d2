"""Bad inputs are data: a corpus of more than 100 broken objects under odd keys, multi-GB sparse
files, and keys that look like paths out of DST. Nothing crashes or swells a worker, each broken
object is quarantined with its own kind, counts add up, and nothing is written outside DST."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST

from melbatch import classify, featurize, samples, shards, storage
from melbatch import ledger as mb_ledger
from melbatch.config import AUDIO_EXTENSIONS, ClassifyConfig, FeaturizeConfig

pytestmark = [pytest.mark.chaos, pytest.mark.ray]

# Decodes every object of a folder in one process, as classify's decode stage does, and prints the
# process's peak memory: a crash (segfault) would end it without output, a leak would show there.
DECODE_ALL = """
import json, sys
from melbatch import classify, storage
sys.path.insert(0, sys.argv[3])
import peakmem
work = classify.work_table([("all", list(storage.list_objects(sys.argv[1])))])
peakmem.start()
for out in classify.decode_batch(work, sys.argv[2], -70.0):
    row = out.to_pylist()[0]
print(json.dumps({"quarantined": len(row["quarantine"]), "files": len(row["files"]), "grew_mb": peakmem.grown_mb()}))
"""


def _decode_in_a_fresh_process(folder: str) -> dict:
    done = subprocess.run([sys.executable, "-c", DECODE_ALL, folder, FAST.canonical_json(), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # no decoder crashed the process
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.s3
@pytest.mark.slow
def test_a_corpus_of_over_100_bad_objects_is_quarantined_kind_by_kind(bucket, tiny_model, ray_session, chaos_log):
    bad = samples.write_bad_corpus(f"{bucket}/archive", seed=3)
    good = samples.make_archive(f"{bucket}/archive", "engine", files_per_class=2, seconds=3.0, seed=4)
    assert len(bad) >= 100 and set(Counter(f.bad_kind for f in bad)) == {
        "empty", "truncated", "corrupt", "not_audio", "bad_header", "non_finite", "silent", "too_short"}
    s = featurize.run(FeaturizeConfig(src=f"{bucket}/archive", dst=f"{bucket}/features", features=FAST,
                                      files_per_task=16), progress=False)
    # .m4a and .aiff are not among the default --extensions: counted and named as skipped, not read
    left_out = Counter("." + f.uri.rsplit(".", 1)[1].lower() for f in bad if f.uri.lower().endswith((".m4a", ".aiff")))
    assert s.skipped == dict(left_out) and s.inputs == len(bad) + len(good) - left_out.total()
    assert "objects the filters leave out" in s.render()
    s = featurize.run(FeaturizeConfig(src=f"{bucket}/archive", dst=f"{bucket}/features", features=FAST,
                                      files_per_task=16, extensions=AUDIO_EXTENSIONS, overwrite=True), progress=False)
    assert s.inputs == len(bad) + len(good) == s.featurized + s.quarantined and not s.skipped
    quarantine = {q["uri"]: q for q in shards.read_quarantine(f"{bucket}/features").to_pylist()}
    wrong = [(f.uri, f.bad_kind, quarantine.get(f.uri, {}).get("kind")) for f in bad
             if quarantine.get(f.uri, {}).get("kind") != f.bad_kind]
    assert not wrong, wrong
    assert all(q["message"] for q in quarantine.values()) and len(quarantine) == len(bad)
    assert {r["uri"] for r in shards.iter_clips(f"{bucket}/features")} == {f.uri for f in good}
    # classify's decode stage gives every broken object the same verdict
    p = classify.run(ClassifyConfig(archive=f"{bucket}/archive", model=tiny_model, out=f"{bucket}/pred",
                                    files_per_task=16, max_quarantine_rate=1.0, extensions=AUDIO_EXTENSIONS),
                     progress=False)
    assert p.inputs == p.classified + p.quarantined and p.classified == len(good)
    assert {q["uri"]: q["kind"] for q in shards.read_quarantine(f"{bucket}/pred").to_pylist()} == {
        u: q["kind"] for u, q in quarantine.items()}
    chaos_log(f"bad objects under odd keys ({len(Counter(f.bad_kind for f in bad))} kinds)", len(bad), 3,
              "each quarantined with its own kind by featurize and classify; counts add up")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """An untrained model package with FAST features (what it predicts does not matter here)."""
    from melbatch import model

    out = str(tmp_path_factory.mktemp("tiny") / "model")
    net = model.create_model("test_resnet", 2, FAST.shape, pretrained=False)
    model.save_package(out, net, {"model_name": "test_resnet", "labels": ["faulty", "healthy"],
                                  "feature_config": FAST.to_dict(), "config_hash": FAST.hash(),
                                  "normalization": {"kind": "clip"}})
    return out


def test_no_bad_object_crashes_or_swells_the_decoding_process(tmp_path, chaos_log):
    """All of the corpus and three 3 GB sparse files through one process: it survives, and its peak
    memory stays far below the 9 GB the sparse files alone would take if anything read them whole."""
    folder = str(tmp_path / "archive")
    bad = samples.write_bad_corpus(folder, seed=5) + samples.write_sparse_files(f"{folder}/sparse", gigabytes=3.0)
    assert sum(os.path.getsize(storage.filesystem(f.uri)[1]) for f in bad) > 9 * 2**30
    r = _decode_in_a_fresh_process(folder)
    assert r["quarantined"] == sum(f.bad_kind is not None for f in bad) and r["files"] == 1
    assert 0 < r["grew_mb"] < 600, r  # the decoding itself (torch's first STFT and resampler included)
    chaos_log("the corpus + three 3 GB sparse files, one process", len(bad), 1,
              f"no crash; peak grew {r['grew_mb']:.0f} MB")


def test_sparse_multi_gb_files_are_judged_from_their_first_bytes(tmp_path, ray_session, chaos_log):
    files = samples.write_sparse_files(str(tmp_path / "archive" / "big"), gigabytes=4.0)
    s = featurize.run(FeaturizeConfig(src=str(tmp_path / "archive"), dst=str(tmp_path / "f"), features=FAST),
                      progress=False)
    kinds = {q["uri"]: q["kind"] for q in shards.read_quarantine(str(tmp_path / "f")).to_pylist()}
    assert kinds == {f.uri: f.bad_kind for f in files if f.bad_kind}
    assert s.featurized == 1 and s.clips == 2  # the 3 s recording before the hole: 0-2 s and a padded tail
    assert s.elapsed_s < 60
    chaos_log("4 GB sparse files (featurize)", len(files), 1, f"judged from their first bytes in {s.elapsed_s:.0f} s")


@pytest.mark.s3
def test_keys_that_look_like_paths_out_of_dst_are_only_data(bucket, tmp_path, ray_session, tiny_model, chaos_log):
    """Object keys with ``..``, ``//``, ``%2F``, ``?``, ``#`` and backslashes are read and named as
    they are; every output lands inside DST (a local folder), and nothing is written anywhere else."""
    x = samples.encode(samples.engine_sound(np.random.default_rng(0), 3.0, 16000, False), 16000, samples.FORMATS[0])
    keys = ["healthy/../../../../escape.wav", "../up.wav", "healthy/..%2F..%2Fenc.wav", "healthy/./dot.wav",
            "healthy//double.wav", "healthy/q?x=1&y=..%2F.wav", "healthy/h#frag.wav", "healthy/ back\\slash.wav",
            "/abs/olute.wav"]
    for k in keys:
        storage.write_bytes(f"{bucket}/archive/{k}", x)
    root = tmp_path / "jail"
    root.mkdir()
    before = set(os.listdir(tmp_path))
    s = featurize.run(FeaturizeConfig(src=f"{bucket}/archive", dst=str(root / "features"), features=FAST),
                      progress=False)
    assert s.inputs == len(keys) == s.featurized  # read under the keys as listed, none lost
    uris = {r["uri"] for r in shards.iter_clips(str(root / "features"))}
    assert uris == {f"{bucket}/archive/{k}" for k in keys}
    labels = Counter(r["label"] for r in shards.iter_clips(str(root / "features")))
    assert "" not in labels and labels[".."] > 0  # a folder called ".." is a label, not a way up
    p = classify.run(ClassifyConfig(archive=f"{bucket}/archive", model=tiny_model, out=str(root / "pred"),
                                    max_quarantine_rate=0.0), progress=False)
    assert p.classified == len(keys)
    assert set(os.listdir(tmp_path)) == before  # nothing new beside the jail
    for dirpath, _, names in os.walk(root):
        for n in names:
            real = os.path.realpath(os.path.join(dirpath, n))
            assert real.startswith(str(root.resolve()) + os.sep), real
    assert set(os.listdir(root)) == {"features", "pred"}
    chaos_log("keys with .., //, %2F, ?, #, \\ and a leading /", len(keys), 2,
              "read as listed; outputs only inside DST")


def test_file_names_that_are_not_utf8_are_featurized_classified_and_scanned(tmp_path, ray_session, tiny_model,
                                                                          chaos_log):
    """An old recorder's Latin-1 names (``café.wav`` as the byte 0xE9) next to a UTF-8 ``%`` name:
    each is read under an escaped, lossless URI, in featurize, classify, scan and its results."""
    from melbatch import scan
    from melbatch.config import ScanConfig

    x = samples.encode(samples.engine_sound(np.random.default_rng(0), 3.0, 16000, False), 16000, samples.FORMATS[0])
    names = [b"caf\xe9.wav", b"50%\xb0 r\xe9gime.wav", "100% ok é.wav".encode()]
    (tmp_path / "archive" / "healthy").mkdir(parents=True)
    for n in names:
        with open(os.path.join(os.fsencode(tmp_path / "archive" / "healthy"), n), "wb") as f:
            f.write(x)
    src = storage.canonical(str(tmp_path / "archive"))
    want = {f"{src}/healthy/caf%E9.wav", f"{src}/healthy/50%25%B0 r%E9gime.wav", f"{src}/healthy/100% ok é.wav"}
    assert {r.uri for r in storage.list_objects(src)} == want
    for u in want:  # each URI leads back to its own file
        assert storage.read_bytes(u) == x and storage.escape_name(storage.unescape_name(u)) == u

    s = featurize.run(FeaturizeConfig(src=src, dst=str(tmp_path / "features"), features=FAST), progress=False)
    assert s.inputs == s.featurized == 3 and s.quarantined == 0
    assert {r["uri"] for r in shards.iter_clips(str(tmp_path / "features"))} == want
    p = classify.run(ClassifyConfig(archive=src, model=tiny_model, out=str(tmp_path / "pred")), progress=False)
    assert p.inputs == p.classified == 3
    assert {r["uri"] for r in shards.read_tables(str(tmp_path / "pred"), "files").to_pylist()} == want
    sc = scan.run(ScanConfig(ClassifyConfig(archive=src, model=tiny_model, out=str(tmp_path / "scan"))),
                  progress=False)
    assert sc.counts["classified"] == 3
    assert set(mb_ledger.current(str(tmp_path / "scan")).column("uri").to_pylist()) == want
    from melbatch import report

    page, _ = report.write(str(tmp_path / "pred"))
    assert "caf%E9.wav" in Path(page.removeprefix("file://")).read_text()  # the report names it as listed
    chaos_log("file names that are not UTF-8 (Latin-1 bytes)", len(names), 3,
              "read under lossless %XX-escaped URIs in featurize, classify and scan")
