"""A scan's driver at 10k / 100k / 1M objects: time and memory per object for listing, the ledger diff
and the next ledger, and for `melbatch results`, each size in a fresh process.

    python bench/scan.py                              # 10k, 100k, 1M local files under a temp folder
    python bench/scan.py --sizes 10000,100000 --dir /data/bench-scan
    python bench/scan.py --sizes '' --results-sizes 1000000  # only `melbatch results`, locally and on S3 (moto)

The archive is N empty-ish local files in folders of 1,000 (made once, kept with ``--dir``). The
ledger holds every object but the last ``--new`` (the state after yesterday's scan), so the diff finds
``--new`` new objects, as a nightly scan of a growing archive does. Steps, as ``scan.run`` does them:
  list     listing.list_table (the archive's listing as columns)
  diff     scan.diff and the objects to read (Diff.todo)
  ledger   scan.next_ledger and writing it as Parquet
Memory is the process's peak RSS above what it held after its imports (VmHWM), per object.

Then `melbatch results` on scan OUTs of N objects: streamed (what it does), built whole first (what it
did before) and every attempt file read in turn (before that); locally, and on the S3-compatible
server the tests use (moto, on 127.0.0.1, started here) unless ``--no-s3``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def make_archive(root: Path, n: int) -> None:
    if (root / ".complete").exists():
        return
    for i in range(n):
        d = root / f"site{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:08d}.wav").write_bytes(b"x" * (i % 7 + 1))
    (root / ".complete").write_text("")


def peak_mb() -> float:
    """This process's peak RSS in MB: Linux's VmHWM, which starts again at exec (ru_maxrss keeps the
    parent's peak across fork and exec, so a child of a big parent would read the parent's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_attempt(root: Path, listing: pa.Table, per_file: int = 32) -> list[str]:
    """A classify output for the objects of ``listing`` as a scan's attempt holds it: a ``files/*.parquet``
    per work batch of ``per_file`` objects, an empty quarantine, the manifest naming them."""
    import json

    from melbatch.shards import file_prediction_schema

    (root / "files").mkdir(parents=True, exist_ok=True)
    schema = file_prediction_schema(["healthy", "faulty"])
    names = []
    for b in range(0, listing.num_rows, per_file):
        part = listing.slice(b, per_file)
        k = part.num_rows
        table = pa.table({"uri": part["uri"], "etag": part["etag"], "size": part["size"], "label": ["faulty"] * k,
                          "probability": [0.9] * k, "clips": [6] * k, "scores": [[0.1, 0.9]] * k,
                          "duration_s": [30.0] * k, "decoder": ["soundfile"] * k, "source_sample_rate_hz": [16000] * k,
                          "source_channels": [1] * k, "model_id": ["m"] * k, "config_hash": ["h"] * k,
                          "distance": [None] * k}, schema=schema)
        names.append(f"files/b{b:09d}.parquet")
        pq.write_table(table, root / names[-1])
    pq.write_table(pa.table({"uri": pa.array([], pa.string()), "kind": pa.array([], pa.string()),
                             "message": pa.array([], pa.string())}), root / "quarantine.parquet")
    (root / "_manifest.json").write_text(json.dumps({"kind": "predictions", "files": names}))
    return names


def one(root: Path, n: int, new: int, work: Path) -> None:
    """One size, in this (fresh) process: prints one line of numbers."""
    from melbatch.ledger import LEDGER_SCHEMA, write_ledger
    from melbatch.listing import list_table
    from melbatch.stages import scan

    base = peak_mb()
    t0 = time.perf_counter()
    listing = list_table(str(root), extensions=("wav",))
    t_list, m_list = time.perf_counter() - t0, peak_mb() - base
    write_attempt(work / "attempts" / "x", listing.slice(listing.num_rows - new))  # what classify made of them
    old = listing.slice(0, listing.num_rows - new)
    k = old.num_rows
    ledger = pa.table({"uri": old["uri"], "etag": old["etag"], "size": old["size"],
                       "status": pa.repeat(pa.scalar("classified"), k), "run_id": pa.repeat(pa.scalar("000001"), k),
                       "attempt": pa.repeat(pa.scalar("attempts/w"), k), "model_id": pa.repeat(pa.scalar("m"), k),
                       "label": pa.repeat(pa.scalar("faulty"), k), "probability": pa.repeat(pa.scalar(0.9), k),
                       "clips": pa.repeat(pa.scalar(6), k), "reason": pa.nulls(k, pa.string())}).cast(LEDGER_SCHEMA)
    t0 = time.perf_counter()
    d = scan.diff(listing, ledger, "m", rescan_on_model_change=False, retry_quarantined=False)
    todo = d.todo
    t_diff = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_ledger(str(work / "ledger.parquet"), scan.next_ledger(ledger, d, "000002", "attempts/x", str(work), "m"))
    t_ledger, m_ledger = time.perf_counter() - t0, peak_mb() - base
    assert len(todo) == new and d.unchanged.num_rows == n - new, (len(todo), d.unchanged.num_rows)
    per = 2**20 / n
    print(f"{n:>10,}{t_list:>8.2f}{t_list / n * 1e6:>7.1f}{m_list * per:>8.0f}"
          f"{t_diff:>8.2f}{t_ledger:>8.2f}{(t_diff + t_ledger) / n * 1e6:>7.1f}{m_ledger:>9.0f}{m_ledger * per:>8.0f}",
          flush=True)


FILES_UP_TO = 1_000_000  # larger OUTs are made without the attempt's files (results do not read them)


def make_scan_out(out: Path, n: int, per_file: int = 32) -> None:
    """A scan OUT as ``melbatch scan`` leaves it after one run over ``n`` objects: one attempt with a
    ``files/*.parquet`` per batch of ``per_file`` objects (up to :data:`FILES_UP_TO` objects), its
    quarantine, its ledger and the summary."""
    import json

    from melbatch.ledger import LEDGER_SCHEMA, write_ledger

    if (out / ".complete").exists():
        return
    attempt = "attempts/000001-bench"
    uris = [f"s3://archive/site{i // 1000:04d}/{i:08d}.wav" for i in range(n)]
    etags = [f"e{i - i % per_file}" for i in range(n)]
    if n <= FILES_UP_TO:
        write_attempt(out / attempt, pa.table({"uri": uris, "etag": etags, "size": [1000] * n}), per_file)
    write_ledger(str(out / attempt / "ledger.parquet"),
                 pa.table({"uri": uris, "etag": etags, "size": [1000] * n,
                           "status": ["classified"] * n, "run_id": ["000001"] * n, "attempt": [attempt] * n,
                           "model_id": ["m"] * n, "label": ["faulty"] * n, "probability": [0.9] * n,
                           "clips": [6] * n, "reason": [None] * n}, schema=LEDGER_SCHEMA))
    (out / "runs" / "000001").mkdir(parents=True, exist_ok=True)
    (out / "runs" / "000001" / "summary.json").write_text(json.dumps({"ledger": f"{attempt}/ledger.parquet",
                                                                       "attempt": attempt}))
    (out / ".complete").write_text("")


RESULT_MODES = {
    "stream": "melbatch results OUT --format csv -o FILE (streamed a ledger row group at a time)",
    "whole": "the same built whole first (ledger.current + export: what results did before)",
    "files": "every files/*.parquet of the attempt read one after another (what results did before that)",
}


def one_results(out: str, n: int, mode: str, files: int) -> None:
    """One way of getting the results of the scan OUT of ``n`` objects, in this (fresh) process: prints
    its time and its peak memory above the imports."""
    folder = Path(tempfile.mkdtemp(prefix="melbatch-results-"))
    try:
        _one_results(out, n, mode, files, folder / "results.csv")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _one_results(out: str, n: int, mode: str, files: int, dest: Path) -> None:
    import json

    from melbatch import ledger
    from melbatch.cli import commands

    base = peak_mb()
    t0 = time.perf_counter()
    if mode == "stream":
        with contextlib.redirect_stderr(io.StringIO()):  # its "N objects -> FILE"
            assert commands.main(["results", out, "--format", "csv", "-o", str(dest)]) == 0
    elif mode == "whole":
        dest.write_bytes(ledger.export(ledger.current(out), "csv"))
    else:  # local only
        attempt = Path(out) / "attempts" / "000001-bench"
        for rel in json.loads((attempt / "_manifest.json").read_text())["files"]:
            pq.read_table(attempt / rel)
    t = time.perf_counter() - t0
    m = peak_mb() - base
    if mode != "files":
        with open(dest, "rb") as f:
            assert sum(1 for _ in f) == n + 1
    where = "s3 (moto)" if out.startswith("s3://") else "local"
    print(f"{n:>10,}{files:>8,}  {where:<10}{mode:<8}{t:>9.2f}{t / n * 1e6:>7.1f}{m:>9.0f}{m * 2**20 / n:>8.0f}",
          flush=True)


def s3_copy(out: Path, bucket: str) -> str:
    """Put the part of a scan OUT that results read (its summaries and ledger) into ``bucket`` on the S3
    server the environment names (AWS_ENDPOINT_URL); its URI there."""
    import json

    from melbatch import storage

    fs, _ = storage.filesystem(f"s3://{bucket}")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for summary in (out / "runs").glob("*/summary.json"):
        for rel in (str(summary.relative_to(out)), json.loads(summary.read_text())["ledger"]):
            storage.write_bytes(f"s3://{bucket}/{out.name}/{rel}", (out / rel).read_bytes())
    return f"s3://{bucket}/{out.name}"


def moto_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """``moto_server`` on a free loopback port (the S3-compatible server the tests use) and the env that
    points at it."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    return proc, env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated object counts")
    p.add_argument("--new", type=int, default=1000, help="objects the ledger does not know yet")
    p.add_argument("--dir", default=None, help="where the archives are made (kept; default: a temp folder)")
    p.add_argument("--results-sizes", default="100000,1000000,3000000",
                   help="comma-separated object counts of the scan OUTs `melbatch results` reads ('' skips them)")
    p.add_argument("--no-s3", action="store_true", help="skip `melbatch results` on the S3 server (moto)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one size
    p.add_argument("--one-results", nargs=4, default=None, help=argparse.SUPPRESS)  # a child: OUT N MODE FILES
    args = p.parse_args()
    if args.one is not None:  # a child: --dir is its parent's folder
        work = Path(tempfile.mkdtemp(prefix="melbatch-scan-out-"))
        try:
            one(Path(args.dir) / f"a{args.one}", args.one, args.new, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.one_results is not None:
        out, n, mode, files = args.one_results
        one_results(out, int(n), mode, int(files))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="melbatch-bench-scan-"))
    try:
        run_all(args, root)
    finally:
        if not args.dir:  # a temp folder of its own: archives of up to millions of files, gone afterwards
            shutil.rmtree(root, ignore_errors=True)


def run_all(args: argparse.Namespace, root: Path) -> None:
    """Every size of both benches, each in a fresh child process, under ``root``."""
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for n in sizes:
        make_archive(root / f"a{n}", n)
    if sizes:
        print(f"scan's driver: listing {args.new} new objects among N local files, diff against a ledger of the "
              f"rest, next ledger; a fresh process per size; {os.cpu_count()} CPU(s)")
        print(f"{'objects':>10}{'list s':>8}{'us/obj':>7}{'B/obj':>8}{'diff s':>8}{'ledger s':>8}{'us/obj':>7}"
              f"{'peak MB':>9}{'B/obj':>8}")
    for n in sizes:
        subprocess.run([sys.executable, __file__, "--dir", str(root), "--new", str(args.new), "--one", str(n)],
                       check=True)
    if sizes:
        print("list: listing time and peak memory over the imports; diff + ledger: their time per object; "
              "peak MB / B/obj: the whole driver's peak above its imports after the ledger is written")
    sizes = [int(s) for s in args.results_sizes.split(",") if s]
    if not sizes:
        return
    for n in sizes:
        make_scan_out(root / f"out{n}", n)
    print(f"\nthe results of a scan OUT of N objects (32 per files/*.parquet), each in a fresh process; "
          f"{os.cpu_count()} CPU(s)")
    for mode, what in RESULT_MODES.items():
        print(f"  {mode:<7} {what}")
    print(f"{'objects':>10}{'files':>8}  {'store':<10}{'mode':<8}{'seconds':>9}{'us/obj':>7}{'peak MB':>9}{'B/obj':>8}")

    def child(out: str, n: int, mode: str) -> None:
        subprocess.run([sys.executable, __file__, "--one-results", out, str(n), mode, str(-(-n // 32))], check=True)

    for n in sizes:
        for mode in RESULT_MODES:
            if mode != "files" or n <= FILES_UP_TO:
                child(str(root / f"out{n}"), n, mode)
    if args.no_s3:
        return
    proc, env = moto_server()
    os.environ.update(env)
    try:
        for n in sizes:
            uri = s3_copy(root / f"out{n}", "bench")
            for mode in ("stream", "whole"):
                child(uri, n, mode)
    finally:
        proc.terminate()
        proc.wait(10)
    print("stream / whole: the same CSV; peak MB: the process's peak RSS above its imports. On S3 only the "
          "summaries and the ledger are put (results read nothing else); files is local only")


if __name__ == "__main__":
    sys.exit(main())
