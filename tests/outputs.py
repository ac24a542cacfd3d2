"""What a committed output holds, reduced to what must not depend on faults: the oracle the
reliability tests compare a faulted run with (a fault-free run of the same inputs)."""

from __future__ import annotations

import hashlib
from typing import Any

from melbatch import shards, storage

# top-level names an output may hold besides the data files its manifest names
BOOKKEEPING = {"_manifest.json", "quarantine.parquet", "_parts"}


def _h(data: Any) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()[:16]


def featurize_digest(dst: str) -> dict[str, Any]:
    """Every clip row (identity, label, image and audio bytes), every quarantine row, the counts
    and the shard names of a complete featurize output."""
    m = shards.open_dataset(dst)
    rows = sorted((r["uri"], r["etag"], r["clip_index"], r["label"], _h(r["mel"].tobytes()),
                   _h(r["audio"].tobytes()) if r.get("audio") is not None else "")
                  for r in shards.iter_clips(dst))
    quarantine = sorted((q["uri"], q["kind"]) for q in shards.read_quarantine(dst).to_pylist())
    return {"rows": rows, "quarantine": quarantine, "counts": m["counts"], "labels": m["labels"],
            "shards": sorted(m["shards"]), "config_hash": m["config_hash"]}


def classify_digest(out: str) -> dict[str, Any]:
    """Every verdict, every clip prediction (probabilities to 1e-5), every event, every quarantine row,
    the counts."""
    m = shards.open_dataset(out)
    files = sorted((r["uri"], r["etag"], r["label"], round(r["probability"], 5), r["clips"])
                   for r in shards.read_tables(out, "files").to_pylist())
    clips = sorted((r["uri"], r["clip_index"], r["label"], round(r["probability"], 5))
                   for r in shards.read_tables(out, "clips").to_pylist())
    events = sorted((r["uri"], r["label"], round(r["start_s"], 3), round(r["end_s"], 3), r["clips"])
                    for r in shards.read_tables(out, shards.DETECTION_DIR).to_pylist())
    quarantine = sorted((q["uri"], q["kind"]) for q in shards.read_quarantine(out).to_pylist())
    return {"files": files, "clips": clips, "events": events, "quarantine": quarantine, "counts": m["counts"],
            "outputs": sorted(p for d in shards.PREDICTION_DIRS for p in m.get(d, []))}


def assert_no_garbage(dst: str, folders: tuple[str, ...]) -> None:
    """Everything under ``dst`` is the manifest, the quarantine table, part files, or a data file the
    manifest names: nothing an interrupted attempt left behind."""
    dst = storage.canonical(dst)
    m = shards.open_dataset(dst)
    named = {p for f in folders for p in m.get(f, [])}
    for uri in storage.list_files(dst):
        rel = storage.relative(uri, dst)
        top = rel.split("/")[0]
        assert rel in named or top in BOOKKEEPING, f"{rel} is under {dst} but no manifest names it"
    for rel in named:
        assert storage.exists(storage.join(dst, rel)), f"the manifest names {rel}, which is missing"
