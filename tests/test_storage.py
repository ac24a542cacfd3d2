"""Storage behind URIs: listing with filters, identities, atomic writes, fail-fast checks, on the
local S3 server (over HTTP) and on local folders."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from melbatch import listing, storage
from melbatch.storage import StorageError

KEYS = ["a/x.wav", "a/y.FLAC", "a/notes.txt", "b/deep/z.mp3", "b/skip_me.wav", "top.ogg"]


def _fill(base: str) -> None:
    for k in KEYS:
        storage.write_bytes(storage.join(base, k), k.encode() * 3)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def place(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "arch")
    return request.getfixturevalue("bucket") + "/arch"


def test_listing_is_recursive_sorted_and_filtered(place):
    _fill(place)
    rels = lambda refs: [storage.relative(r.uri, storage.canonical(place)) for r in refs]  # noqa: E731
    every = list(listing.list_objects(place))
    assert rels(every) == sorted(KEYS)
    assert all(r.etag and r.size == len(storage.relative(r.uri, storage.canonical(place))) * 3 for r in every)
    audio = rels(listing.list_objects(place, extensions=("wav", "flac", "mp3", "ogg")))
    assert audio == ["a/x.wav", "a/y.FLAC", "b/deep/z.mp3", "b/skip_me.wav", "top.ogg"]
    assert rels(listing.list_objects(place, include=("b/*",), exclude=("*skip*",))) == ["b/deep/z.mp3"]


def test_a_changed_object_gets_a_new_identity(place):
    uri = storage.join(place, "k.wav")
    storage.write_bytes(uri, b"one")
    first = next(listing.list_objects(place))
    time.sleep(0.01)
    storage.write_bytes(uri, b"two!")
    second = next(listing.list_objects(place))
    assert first.uri == second.uri and first.key() != second.key()


def test_roundtrip_and_no_temporary_files_left(place):
    uri = storage.join(place, "out", "f.bin")
    storage.write_bytes(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload"
    assert storage.list_files(storage.join(place, "out")) == [storage.canonical(uri)]


def test_failed_atomic_write_publishes_nothing(place):
    uri = storage.join(place, "out", "partial.bin")
    with pytest.raises(RuntimeError), storage.atomic_open(uri) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert not storage.exists(uri)
    assert storage.list_files(storage.join(place, "out")) == []


@pytest.mark.s3
def test_open_input_streams_large_objects_and_fetches_small_ones(bucket):
    uri = f"{bucket}/big.bin"
    data = os.urandom(3 * 1024 * 1024)
    storage.write_bytes(uri, data)
    with storage.open_input(uri, size=len(data)) as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
    with storage.open_input(uri) as f:  # size unknown: streamed in blocks
        f.seek(len(data) - 5)
        assert f.read() == data[-5:]


@pytest.mark.s3
def test_missing_places_fail_fast_with_a_hint(bucket, tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        storage.check_readable(str(tmp_path / "nope"))
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        storage.check_readable("s3://no-such-bucket-melbatch/prefix")
    storage.check_writable(bucket + "/out")
    assert storage.list_files(bucket + "/out") == []  # the probe is gone


@pytest.mark.s3
def test_unreachable_endpoint_fails_fast(tmp_path):
    """A dead endpoint is reported within seconds, with the variable to check."""
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "melbatch.cli", "featurize", "s3://bucket/in", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "cannot reach s3://bucket/in" in out.stderr and "AWS_ENDPOINT_URL" in out.stderr
    assert time.time() - t0 < 60
    assert "Traceback" not in out.stderr


def test_object_store_listings_run_in_parallel_over_prefixes_and_miss_nothing(bucket):
    """An archive laid out by day/device: the parallel listing finds exactly what one flat listing
    finds (objects at every depth, etags, sizes), with several listings in flight at once."""
    import threading

    fs, root = storage.filesystem(f"{bucket}/archive")
    for day in range(6):
        for device in range(4):
            for n in range(3):
                fs.pipe(f"{root}/2026-11-{day:02d}/dev{device}/rec{n}.wav", b"x" * (n + 1))
    fs.pipe(f"{root}/top.wav", b"top")
    fs.pipe(f"{root}/2026-11-00/day-summary.wav", b"mid")
    flat = fs.find(root, detail=True)
    inflight, peak, lock = 0, 0, threading.Lock()
    real_find = fs.find

    def counted(path, **kw):
        nonlocal inflight, peak
        with lock:
            inflight += 1
            peak = max(peak, inflight)
        try:
            time.sleep(0.05)  # long enough for the others to start
            return real_find(path, **kw)
        finally:
            with lock:
                inflight -= 1

    fs.find = counted
    try:
        found = listing.find_parallel(fs, root, parallel=8)
    finally:
        del fs.find
    assert sorted(found) == sorted(flat) and len(found) == 6 * 4 * 3 + 2
    assert {k: listing._etag(v) for k, v in found.items()} == {k: listing._etag(v) for k, v in flat.items()}
    assert peak > 1, "the prefixes were listed one after another"
    refs = list(listing.list_objects(f"{bucket}/archive"))
    assert [r.uri for r in refs] == sorted(r.uri for r in refs) and len(refs) == len(flat)
    assert listing.find_parallel(fs, root, parallel=1) == flat


def test_no_secret_reaches_the_cli_output_on_storage_errors(s3_endpoint, tmp_path):
    """Credentials come from the environment and stay there: a failing run never prints them."""
    secret = "melbatch-do-not-print-7f3a9c"
    for endpoint, src in (("http://127.0.0.1:9", "s3://bucket/in"), (s3_endpoint, "s3://no-such-bucket-x/in")):
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
               "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
        out = subprocess.run([sys.executable, "-m", "melbatch.cli", "featurize", src, str(tmp_path / "o")],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 3, out.stderr
        assert secret not in out.stdout + out.stderr and "AKIDEXAMPLE" not in out.stdout + out.stderr


def test_a_run_stopped_by_storage_counts_the_batches_kept_from_their_part_files(tmp_path, monkeypatch):
    """The count a stopped run prints is what a re-run resumes: the part files (a batch that finished
    after the failure counts), not the results the driver happened to collect; other errors pass as
    they came, and a store that cannot be listed gives no number rather than a wrong one."""
    from melbatch.stages import runs

    dst = storage.canonical(str(tmp_path / "out"))  # as a run's destination is
    for bid in ("a", "b", "stale"):  # "stale": an earlier run's batch, not this run's
        runs.write_part(dst, runs.BatchResult(bid, 0, 0, 0.0, [], {}, {}, {}))
    cause = storage.TransientStorageError("s3://bucket/x.flac: reading failed: Service Unavailable")
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = cause
    err = runs.stopped_by_storage("featurize", wrapped, dst, {"a", "b", "c", "d"})
    assert isinstance(err, storage.TransientStorageError)
    assert str(err) == f"featurize stopped: {cause} (2 of 4 batches are done and kept)"
    other = ValueError("a bug")
    assert runs.stopped_by_storage("featurize", other, dst, {"a"}) is other

    def unlistable(prefix, suffix=""):
        raise storage.StorageError(f"{prefix}: listing failed: Service Unavailable")

    monkeypatch.setattr(storage, "list_files", unlistable)  # the store fails the count as well
    err = runs.stopped_by_storage("classify", wrapped, dst, {"a", "b"})
    assert str(err).endswith("(how many of 2 batches are done and kept could not be listed)"), str(err)
