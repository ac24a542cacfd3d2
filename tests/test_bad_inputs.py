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

from melbatch import ledger as mb_ledger
from melbatch import listing, shards, storage
from melbatch.config import AUDIO_EXTENSIONS, ClassifyConfig, FeaturizeConfig
from melbatch.stages import classify, featurize
from melbatch.testing import archives

pytestmark = [pytest.mark.chaos, pytest.mark.ray]

# Decodes every object of a folder in one process, as classify's decode stage does, and prints the
# process's peak memory: a crash (segfault) would end it without output, a leak would show there.
DECODE_ALL = """
import json, sys
from melbatch import listing, storage
from melbatch.stages import chunks
sys.path.insert(0, sys.argv[3])
import peakmem
work = chunks.work_table([("all", list(listing.list_objects(sys.argv[1])))])
peakmem.start()
for out in chunks.decode_batch(work, sys.argv[2], -70.0):
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
    bad = archives.write_bad_corpus(f"{bucket}/archive", seed=3)
    good = archives.make_archive(f"{bucket}/archive", "engine", files_per_class=2, seconds=3.0, seed=4)
    assert len(bad) >= 100 and set(Counter(f.bad_kind for f in bad)) == {
        "empty", "truncated", "corrupt", "not_audio", "bad_header", "non_finite", "out_of_range", "silent", "too_short"}
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
    from melbatch.model import package

    out = str(tmp_path_factory.mktemp("tiny") / "model")
    net = package.create_model("test_resnet", 2, FAST.shape, pretrained=False)
    package.save_package(out, net, {"model_name": "test_resnet", "labels": ["faulty", "healthy"],
                                  "feature_config": FAST.to_dict(), "config_hash": FAST.hash(),
                                  "normalization": {"kind": "clip"}})
    return out


def test_no_bad_object_crashes_or_swells_the_decoding_process(tmp_path, chaos_log):
    """All of the corpus and three 3 GB sparse files through one process: it survives, and its peak
    memory stays far below the 9 GB the sparse files alone would take if anything read them whole."""
    folder = str(tmp_path / "archive")
    bad = archives.write_bad_corpus(folder, seed=5) + archives.write_sparse_files(f"{folder}/sparse", gigabytes=3.0)
    assert sum(os.path.getsize(storage.filesystem(f.uri)[1]) for f in bad) > 9 * 2**30
    r = _decode_in_a_fresh_process(folder)
    assert r["quarantined"] == sum(f.bad_kind is not None for f in bad) and r["files"] == 1
    assert 0 < r["grew_mb"] < 600, r  # the decoding itself (torch's first STFT and resampler included)
    chaos_log("the corpus + three 3 GB sparse files, one process", len(bad), 1,
              f"no crash; peak grew {r['grew_mb']:.0f} MB")


def test_sparse_multi_gb_files_are_judged_from_their_first_bytes(tmp_path, ray_session, chaos_log):
    files = archives.write_sparse_files(str(tmp_path / "archive" / "big"), gigabytes=4.0)
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
    x = archives.encode(archives.engine_sound(np.random.default_rng(0), 3.0, 16000, False), 16000, archives.FORMATS[0])
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
    from melbatch.config import ScanConfig
    from melbatch.stages import scan

    x = archives.encode(archives.engine_sound(np.random.default_rng(0), 3.0, 16000, False), 16000, archives.FORMATS[0])
    names = [b"caf\xe9.wav", b"50%\xb0 r\xe9gime.wav", "100% ok é.wav".encode()]
    (tmp_path / "archive" / "healthy").mkdir(parents=True)
    for n in names:
        with open(os.path.join(os.fsencode(tmp_path / "archive" / "healthy"), n), "wb") as f:
            f.write(x)
    src = storage.canonical(str(tmp_path / "archive"))
    want = {f"{src}/healthy/caf%E9.wav", f"{src}/healthy/50%25%B0 r%E9gime.wav", f"{src}/healthy/100% ok é.wav"}
    assert {r.uri for r in listing.list_objects(src)} == want
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
    from melbatch.look import report

    page, _ = report.write(str(tmp_path / "pred"))
    assert "caf%E9.wav" in Path(page.removeprefix("file://")).read_text()  # the report names it as listed
    chaos_log("file names that are not UTF-8 (Latin-1 bytes)", len(names), 3,
              "read under lossless %XX-escaped URIs in featurize, classify and scan")


# ------------------------------------------------------------------ hostile archives: links, loops, folders

def _engine_wav(seed: int = 0) -> bytes:
    return archives.encode(archives.engine_sound(np.random.default_rng(seed), 2.0, 16000, False), 16000,
                          archives.FORMATS[0])


def _linked_archive(root: Path, outside: Path) -> set[str]:
    """An archive as NAS mounts and shared drives shape them: a folder link back up (``awb/loop -> ..``),
    a link to itself, links to a file and a folder listed at their own place, a link out of the archive
    (followed) that holds a link back in, a link to nothing, a FIFO, a link to a device and one into
    /proc. Returns the URIs each real file must
    be listed under, once."""
    for d in ("awb", "bdl", "cmu"):
        (root / d).mkdir(parents=True)
        (root / d / f"{d}1.wav").write_bytes(_engine_wav())
    (root / "awb" / "loop").symlink_to("..")
    (root / "cmu" / "self").symlink_to("self")
    (root / "bdl" / "same-as-awb1.wav").symlink_to("../awb/awb1.wav")
    (root / "bdl" / "cmu-again").symlink_to("../cmu")
    (root / "bdl" / "gone.wav").symlink_to("/nonexistent/melbatch/gone.wav")
    (outside / "disk2").mkdir(parents=True)
    (outside / "disk2" / "ext1.wav").write_bytes(_engine_wav(1))
    (outside / "disk2" / "back").symlink_to(root)
    (root / "ext").symlink_to(outside / "disk2")
    (root / "ext2").symlink_to(outside / "disk2")  # the same outside folder twice: listed once
    os.mkfifo(root / "bdl" / "pipe.wav")  # reading it would block forever
    (root / "bdl" / "zero.wav").symlink_to("/dev/zero")  # would never end
    (root / "proc").symlink_to("/proc/self")  # the system's own files, thousands of them
    base = storage.canonical(str(root))
    return {f"{base}/awb/awb1.wav", f"{base}/bdl/bdl1.wav", f"{base}/cmu/cmu1.wav", f"{base}/ext/ext1.wav"}


def test_link_loops_and_repeated_links_are_listed_once_and_told(tmp_path, ray_session, tiny_model, capsys,
                                                               chaos_log):
    """Issue 30, 1: ``awb/loop -> ..`` ended the whole run (ELOOP, exit 3). Each real file is listed once,
    at its own place; the loop is a warning; featurize (the CLI, exit 0), classify and scan read the rest."""
    from melbatch.cli import commands
    from melbatch.config import ScanConfig
    from melbatch.stages import scan

    want = _linked_archive(tmp_path / "archive", tmp_path / "elsewhere")
    src = storage.canonical(str(tmp_path / "archive"))
    notes = listing.ListingNotes()
    assert [r.uri for r in listing.list_objects(src, notes=notes)] == sorted(want)
    told = notes.as_dict()
    assert told["loop"]["count"] == 3 and "awb/loop -> .." in told["loop"]["examples"]  # awb/loop, cmu/self, back
    assert told["repeat"]["count"] == 3  # bdl/same-as-awb1.wav, bdl/cmu-again, ext2
    assert told["dangling"] == {"count": 1, "examples": ["bdl/gone.wav -> /nonexistent/melbatch/gone.wav"]}
    assert told["special"] == {"count": 3, "examples": ["bdl/pipe.wav (a FIFO)", "bdl/zero.wav (a character device)",
                                                        "proc -> /proc/self (the system's own files)"]}

    dst = str(tmp_path / "features")
    assert commands.main(["featurize", src, dst, "--clip-s", "2", "--n-mels", "64"]) == 0
    printed = capsys.readouterr().out
    assert "links to a folder that holds them: not followed: awb/loop -> .." in printed
    manifest = shards.read_manifest(dst)
    assert manifest["counts"]["inputs"] == manifest["counts"]["featurized"] == 4
    assert manifest["listing"]["loop"]["count"] == 3
    assert {r["uri"] for r in shards.iter_clips(dst)} == want

    p = classify.run(ClassifyConfig(archive=src, model=tiny_model, out=str(tmp_path / "pred")), progress=False)
    assert p.inputs == p.classified == 4 and p.listing["loop"]["count"] == 3
    sc = scan.run(ScanConfig(ClassifyConfig(archive=src, model=tiny_model, out=str(tmp_path / "scan"))),
                  progress=False)
    assert sc.counts["listed"] == sc.counts["classified"] == 4 and sc.listing["repeat"]["count"] == 3
    assert "warning" in sc.render()
    chaos_log("link loops, links to files/folders listed already, links out and back, dangling links, a FIFO, a "
              "link to /dev/zero, a link into /proc", 12, 12, "each real file listed once at its own place; loops (3), "
              "repeats (3), the dangling link and the special files (3, never read) told")


def test_a_folder_that_vanishes_mid_listing_is_told_and_a_scan_does_not_take_its_files_for_deleted(tmp_path):
    """A mount that goes away while the archive is listed: the listing goes on, says which folder it
    could not read, and a scan keeps that folder's objects in its ledger instead of marking them deleted."""
    from melbatch.stages import scan

    root = tmp_path / "archive"
    for d in ("a", "b", "c"):
        (root / d).mkdir(parents=True)
        for i in range(2):
            (root / d / f"{i}.wav").write_bytes(b"x" * (i + 1))
    src = storage.canonical(str(root))
    before = listing.list_table(src)
    notes = listing.ListingNotes()
    listed = []
    for ref in listing.list_objects(src, notes=notes):  # the listing is lazy: b/ goes while a/ is being passed on
        listed.append(ref.uri)
        if ref.uri.endswith("a/1.wav"):
            import shutil

            shutil.rmtree(root / "b")
    assert listed == [f"{src}/a/0.wav", f"{src}/a/1.wav", f"{src}/c/0.wav", f"{src}/c/1.wav"]
    assert notes.counts["unreadable"] == 1 and notes.unreadable_uris == [f"{src}/b/"]
    assert notes.examples["unreadable"] == ["b/ (gone while listed)"]

    ledger = pa_ledger(before)
    after = listing.list_table(src)  # b/ is gone for good now, and this listing read every folder there is
    kept = scan.diff(after, ledger, "m", False, False, tuple(notes.unreadable_uris))
    assert kept.deleted.num_rows == 0  # the folder the listing could not read is not taken for deleted
    gone = scan.diff(after, ledger, "m", False, False, ())
    assert sorted(gone.deleted["uri"].to_pylist()) == [f"{src}/b/0.wav", f"{src}/b/1.wav"]


def pa_ledger(listing):
    """A ledger in which model ``m`` classified every object of ``listing`` (verdict columns empty)."""
    import pyarrow as pa

    n = listing.num_rows
    have = {"uri": listing["uri"], "etag": listing["etag"], "size": listing["size"], "status": ["classified"] * n,
            "run_id": ["000001"] * n, "attempt": ["x"] * n, "model_id": ["m"] * n}
    return pa.table({f.name: have.get(f.name, pa.nulls(n, f.type)) for f in mb_ledger.LEDGER_SCHEMA},
                    schema=mb_ledger.LEDGER_SCHEMA)


NOBODY_LISTS = """
import json, sys
from melbatch import listing, storage
notes = listing.ListingNotes()
uris = [r.uri for r in listing.list_objects(sys.argv[1], notes=notes)]
print(json.dumps({"uris": uris, "notes": notes.as_dict(), "unreadable": notes.unreadable_uris}))
"""


def test_a_folder_without_permission_is_told_and_the_rest_is_listed(tmp_path):
    """A folder the user may not read (mode 000; and one they may read but not enter, mode 444), listed as
    an ordinary user would (``nobody``, since root reads everything): the others are listed, both are told."""
    import shutil
    import tempfile

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="melbatch-perm-"))
    try:
        top.chmod(0o755)
        for d, mode in (("open", 0o755), ("closed", 0o000), ("no-entry", 0o444)):
            (top / d).mkdir()
            (top / d / "x.wav").write_bytes(b"RIFF")
            (top / d / "x.wav").chmod(0o644)
            (top / d).chmod(mode)
        run = [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        if subprocess.run([*run, "-c", "import melbatch"], capture_output=True).returncode != 0:
            pytest.skip(f"user nobody cannot import melbatch from {Path(__file__).parents[1]} (a private folder)")
        done = subprocess.run([*run, "-c", NOBODY_LISTS, str(top)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        src = storage.canonical(str(top))
        assert got["uris"] == [f"{src}/open/x.wav"]
        assert got["notes"]["unreadable"]["count"] == 2
        assert sorted(got["unreadable"]) == [f"{src}/closed/", f"{src}/no-entry/x.wav"]
    finally:
        for d in top.iterdir():
            d.chmod(0o755)
        shutil.rmtree(top)


def test_one_label_is_a_configuration_error_before_any_training(tmp_path, capsys):
    """Issue 30, 2: shards whose only label is ``only`` trained 100 steps into a package that calls
    everything ``only`` (val_acc 1.000). Now: exit 2 before cluster work, saying what to do."""
    from melbatch.cli import commands

    for i in range(4):
        (tmp_path / "archive" / "only").mkdir(parents=True, exist_ok=True)
        (tmp_path / "archive" / "only" / f"{i}.wav").write_bytes(_engine_wav(i))
    dst, out = str(tmp_path / "features"), tmp_path / "out"
    assert commands.main(["featurize", str(tmp_path / "archive"), dst, "--clip-s", "2", "--n-mels", "64"]) == 0
    capsys.readouterr()
    assert commands.main(["train", dst, str(out), "--model", "test_resnet", "--no-pretrained", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds clips of 1 label(s) (only): a classifier needs at least two" in err
    assert "--labels" in err and "SRC/<label>/<file>" in err
    assert not (out / "ray-train").exists() and not (out / "model").exists()


@pytest.mark.s3
def test_manifest_rows_that_name_no_object_are_counted_and_shown(bucket, tmp_path, capsys):
    """Issue 30, 3: a ``--labels`` row for ``missing.wav`` (a typo, a file deleted since) was silent. The
    summary counts such rows and shows a few (a name that differs only in case says so), ``--json``
    carries the count; a name in the other Unicode normal form (NFD from a Mac, NFC in the CSV) matches."""
    import unicodedata

    from melbatch.cli import commands

    nfd = unicodedata.normalize("NFD", "café.wav")
    fs, root = storage.filesystem(f"{bucket}/archive")
    for name in ("a.wav", nfd, "Loud.wav", "unlisted.wav"):
        fs.pipe(f"{root}/{name}", _engine_wav())
    manifest = tmp_path / "labels.csv"
    manifest.write_text("uri,label\na.wav,x\n" + unicodedata.normalize("NFC", "café.wav") + ",y\n"
                        "missing.wav,x\nloud.wav,y\n")
    dst = f"{bucket}/features"
    code = commands.main(["featurize", f"{bucket}/archive", dst, "--labels", str(manifest), "--clip-s", "2", "--n-mels",
                     "64", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["manifest_unmatched"] == 2
    assert summary["manifest_unmatched_examples"] == [
        f"{bucket}/archive/loud.wav (listed as {bucket}/archive/Loud.wav: the names differ in case)",
        f"{bucket}/archive/missing.wav"]
    assert summary["featurized"] == 2 and summary["quarantine_kinds"] == {"unlabelled": 2}  # Loud, unlisted
    assert shards.read_manifest(dst)["counts"]["manifest_rows_unmatched"] == 2
    assert commands.main(["featurize", f"{bucket}/archive", f"{bucket}/features2", "--labels", str(manifest),
                     "--clip-s", "2", "--n-mels", "64"]) == 0
    assert "2  label manifest rows name no object listed" in capsys.readouterr().out


def test_control_characters_in_names_and_labels_reach_the_console_escaped(tmp_path, ray_session, tiny_model,
                                                                         capsys, chaos_log):
    """Issue 44, case 8: a label folder ``lab<ESC>[2J<ESC>[31mRED`` cleared the screen and turned the summary
    red, a manifest row naming ``<ESC>]0;...<BEL>`` retitled the terminal, and a file name holding a newline
    printed as two rows of ``results``. Every name is printed with its control characters escaped."""
    from melbatch.cli import commands

    label = "lab\x1b[2J\x1b[31mRED"
    src = tmp_path / "archive"
    for folder, name in ((label, "a.wav"), (label, "b.wav"), ("healthy", "two\nrows.wav"), ("healthy", "c.wav")):
        (src / folder).mkdir(parents=True, exist_ok=True)
        (src / folder / name).write_bytes(_engine_wav(len(name)))
    assert commands.main(["featurize", str(src), str(tmp_path / "features"), "--clip-s", "2", "--n-mels", "64"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "label lab\\x1b[2J\\x1b[31mRED" in out, out
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"uri,label\n{src}/healthy/c.wav,healthy\n\"{src}/gone\x1b]0;pwned\x07.wav\",healthy\n")
    assert commands.main(["featurize", str(src), str(tmp_path / "features2"), "--labels", str(manifest),
                          "--clip-s", "2", "--n-mels", "64"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "gone\\x1b]0;pwned\\x07.wav" in out, out
    assert commands.main(["scan", str(src), tiny_model, str(tmp_path / "scan")]) == 0
    assert "\x1b" not in capsys.readouterr().out
    assert commands.main(["results", str(tmp_path / "scan")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 1 + 4 and any("two\\nrows.wav" in r for r in rows), rows  # a header and one row a file
    assert not any("\x1b" in r for r in rows)
    chaos_log("control characters in label folders, file names and manifest rows", 3, 3,
              "printed escaped (\\x1b, \\n) in featurize's summary and warnings, scan's labels and results' rows")


def test_unreachable_schemes_outputs_inside_inputs_devices_and_a_full_disk_are_one_clear_line(
        tmp_path, ray_session, tiny_model, capsys, chaos_log):
    """Issue 44, case 9 and its neighbours: an ftp:// SRC was a gaierror traceback; DST inside SRC was taken
    silently; `results -o /dev/full` replaced the device with a CSV (atomic writes rename into place) and
    `results -o x.wav` a recording; a full disk was an 11-frame traceback. Each is now one line and an exit
    code, and nothing is replaced."""
    import shutil

    from melbatch.cli import commands

    assert commands.main(["featurize", "ftp://melbatch-no-such-host.invalid/x", str(tmp_path / "f")]) == 3
    err = capsys.readouterr().err
    assert "cannot open 'ftp://melbatch-no-such-host.invalid/x'" in err and "Traceback" not in err, err
    src = tmp_path / "archive"
    for i in range(3):
        (src / "healthy").mkdir(parents=True, exist_ok=True)
        (src / "healthy" / f"{i}.wav").write_bytes(_engine_wav(i))
    assert commands.main(["featurize", str(src), str(src / "features")]) == 2
    assert "is inside SRC" in capsys.readouterr().err
    assert commands.main(["classify", str(src), tiny_model, f"file://{src}/predictions"]) == 2
    assert "is inside ARCHIVE" in capsys.readouterr().err
    assert commands.main(["scan", str(src), tiny_model, str(tmp_path / "scan")]) == 0
    capsys.readouterr()
    recording = src / "healthy" / "0.wav"
    before = recording.read_bytes()
    assert commands.main(["results", str(tmp_path / "scan"), "-o", str(recording)]) == 2
    assert "will not write over it" in capsys.readouterr().err and recording.read_bytes() == before
    fifo = tmp_path / "a-pipe"
    os.mkfifo(fifo)
    assert commands.main(["results", str(tmp_path / "scan"), "-o", str(fifo), "--format", "csv"]) == 3
    assert "is not a regular file" in capsys.readouterr().err and fifo.is_fifo()
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(tiny)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a 48 kB tmpfs here (not root?): the full-disk part needs one")
    try:
        assert commands.main(["featurize", str(src), str(tiny / "features"), "--no-progress"]) == 3
        err = capsys.readouterr().err
        assert f"no space left on the device holding {tiny / 'features'}" in err and "Traceback" not in err, err
        assert "re-run the same command to resume" in err
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
    chaos_log("an ftp:// SRC, DST inside SRC, results over a recording and a pipe, a full disk", 5, 5,
              "one line each: exit 3 / 2 / 2 / 3 / 3, nothing replaced")
