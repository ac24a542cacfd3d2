"""featurize: an audio archive → log-mel Parquet shards, a quarantine table and a manifest, on Ray.

Top-down:

1. :func:`preflight` checks config, SRC and DST before any cluster work (fails fast).
2. The driver lists SRC once, attaches labels, quarantines unlabelled objects, and groups the rest
   into batches of ``files_per_task`` in a hashed (deterministic, label-mixing) order.
3. Each batch is one Ray task (:func:`featurize_batch`): read → decode → clips → log-mel → shards
   named after the batch's content, then a small ``_parts/<batch>.json`` that marks the batch done.
   With ``use_gpu`` the task cuts clips only and makes their images in batches on its node's GPU
   (:class:`_BatchedImages`), the GPUs shared by all the node's tasks.
   A retried task rewrites the same names, and a re-run skips batches whose part file exists.
4. The driver writes ``quarantine.parquet``, then ``_manifest.json`` last (the commit marker),
   then deletes files from earlier attempts that the manifest does not name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from melbatch import URI, listing, storage
from melbatch.audio.decode import DecodeError, open_audio
from melbatch.audio.logmel import clip_images
from melbatch.audio.objects import logmels_of_object
from melbatch.config import LOCAL_WORK_BYTES, ConfigError, FeatureConfig, FeaturizeConfig
from melbatch.console import progress as progress_bar
from melbatch.console import shown
from melbatch.labels.sources import NO_LABEL, Labeler, Spans, clip_label
from melbatch.shards import (
    AUDIO_DTYPE,
    MANIFEST,
    QUARANTINE,
    SHARD_DIR,
    ClipRow,
    ShardWriter,
    read_manifest,
)
from melbatch.stages import workers
from melbatch.stages.runs import (
    BatchResult,
    RunSummary,
    chunked,
    commit,
    content_id,
    crash_point,
    init_ray,
    manifest_header,
    quarantine_row,
    read_parts,
    stopped_by_storage,
    this_node,
    write_part,
)

FIT_SAMPLE = 64  # recordings probed for their duration when clips are fitted
BAND_SAMPLE, BAND_PROBE_S = 32, 10.0  # recordings probed (their first seconds) for the band their sound fills
BAND_DEFAULT_HZ, BAND_EDGE_HZ = 16_000, 7_000  # fit the rate from this one when 1 % of the energy is above the edge
BAND_GRID_HZ = np.arange(0.0, 24000.0, 100.0)  # the 100 Hz bands a probe sums the energy in
SETTLE_S = 30.0  # how long a failed run waits for its tasks in flight before counting what is kept
MEL_BATCH = 128  # clips imaged at once with use_gpu: 20 MB of 16-bit PCM at the defaults (5 s, 16 kHz)


@dataclass(kw_only=True)
class Summary(RunSummary):
    """What one featurize run did; ``inputs == featurized + quarantined`` always."""

    DONE: ClassVar[str] = "featurized"
    LABEL_UNIT: ClassVar[str] = "clips"
    src: URI
    dst: URI
    config_hash: str
    featurized: int = 0
    task_s: float = 0.0  # wall time spent inside tasks, summed (excludes batches resumed from a previous run)
    shards: int = 0
    manifest_unmatched: int = 0  # rows of the --labels manifest that named no object listed
    manifest_unmatched_examples: list[str] = field(default_factory=list)

    def _head(self) -> list[str]:
        return [f"featurize {self.src} -> {self.dst}"]

    def _clips_line(self) -> str:
        line = f"  clips        {self.clips:>8}  in {self.shards} shard(s), config {self.config_hash}"
        if self.manifest_unmatched:
            more = ", ..." if self.manifest_unmatched > len(self.manifest_unmatched_examples) else ""
            line += (f"\n  warning      {self.manifest_unmatched:>8}  label manifest rows name no object listed (a "
                     f"typo, a file deleted since, one the filters leave out): "
                     f"{', '.join(shown(e) for e in self.manifest_unmatched_examples)}{more}")
        return line

    def _quarantine_uri(self) -> URI:
        return storage.join(self.dst, QUARANTINE)


# --------------------------------------------------------------------------------------------- driver

def preflight(cfg: FeaturizeConfig) -> None:
    """Everything that can be checked without a cluster: storage reachable, DST writable, a GPU to use."""
    if cfg.use_gpu and not torch.cuda.is_available() and not _joins_cluster(cfg):
        raise ConfigError("--use-gpu, but this machine has no GPU that torch can use and no cluster address is "
                          "given: drop --use-gpu, or run it on a GPU node or with --address of a GPU cluster")
    storage.check_readable(cfg.src)
    storage.check_writable(cfg.dst)


def check_existing(cfg: FeaturizeConfig) -> None:
    """DST holds nothing, or features made with the same config (a resume), or --overwrite is given."""
    existing = read_manifest(cfg.dst)
    if existing and not cfg.overwrite:
        have = FeatureConfig.from_dict(existing["feature_config"])
        if have.hash() != cfg.features.hash():
            diff = ", ".join(f"{k}={b} (was {a})" for k, (a, b) in have.diff(cfg.features).items())
            raise ConfigError(f"{cfg.dst} already holds features with config {have.hash()} and this run asks for "
                              f"{cfg.features.hash()} ({diff}). Use another DST, or --overwrite to replace them.")


def run(cfg: FeaturizeConfig, progress: bool = True) -> Summary:
    """Featurize ``cfg.src`` into ``cfg.dst``; returns the summary (also written into the manifest)."""
    t0 = time.perf_counter()
    preflight(cfg)
    labeler = Labeler(cfg.labels, cfg.src, cfg.label_depth)
    src, dst = storage.canonical(cfg.src), storage.canonical(cfg.dst)

    skipped: Counter = Counter()
    notes = listing.ListingNotes()
    refs = list(listing.list_objects(src, cfg.include, cfg.exclude, cfg.extensions, skipped, notes))
    if not refs:
        raise listing.nothing_matches(src, cfg.include, cfg.exclude, cfg.extensions)
    if cfg.fit_clips:
        cfg = fit_clips(cfg, refs)
    if cfg.fit_rate:
        cfg = fit_rate(cfg, refs)
    check_existing(cfg)
    summary = Summary(src=src, dst=dst, config_hash=cfg.features.hash(), skipped=dict(skipped),
                      listing=notes.as_dict())
    summary.inputs = len(refs)
    crash_point("featurize:listed")
    quarantine: list[dict[str, Any]] = []
    work: list[tuple[storage.ObjectRef, str | Spans | None]] = []
    for ref in refs:
        label = labeler(ref.uri)
        if label is NO_LABEL:
            quarantine.append(quarantine_row(ref, DecodeError("unlabelled", labeler.why_missing())))
        else:
            work.append((ref, label))
    summary.manifest_unmatched, summary.manifest_unmatched_examples = labeler.unmatched([r.uri for r in refs])

    # batches take files in hashed order, not key order: a shard then mixes labels and folders, which a
    # streaming trainer needs (key order would fill whole shards with one class folder)
    work.sort(key=lambda item: hashlib.sha1(item[0].uri.encode()).digest())
    batches = [(batch_id(cfg.features, b, cfg.keep_audio), b) for b in chunked(work, cfg.files_per_task)]
    summary.batches = len(batches)
    results, resumed = _run_batches(cfg, dst, batches, progress)
    summary.resumed_batches = len(resumed)

    for r in results:
        summary.add(r)
        summary.task_s += r.task_s if r.batch not in resumed else 0.0
        quarantine.extend(r.quarantine)
    shards = [f"{SHARD_DIR}/{name}" for r in results for name, _ in r.shards]
    summary.shards = len(shards)
    summary.close(quarantine, t0)
    commit(dst, "featurize", quarantine, _manifest(cfg, summary, shards, results), [SHARD_DIR], set(shards),
           {bid for bid, _ in batches})
    return summary


def probe_seconds(ref: storage.ObjectRef, limit_s: float) -> float | None:
    """A recording's duration from its header, or by decoding up to ``limit_s`` (None: unreadable)."""
    try:
        with storage.open_input(ref.uri, ref.size) as f:
            info, blocks = open_audio(f)
            if info.declared_frames:
                return info.declared_frames / info.sample_rate_hz
            n = 0
            for b in blocks:
                n += len(b)
                if n > limit_s * info.sample_rate_hz:
                    break
            return n / info.sample_rate_hz
    except Exception:  # best effort: a file that cannot be probed is judged (and quarantined) by its batch
        return None


def fit_clips(cfg: FeaturizeConfig, refs: list[storage.ObjectRef]) -> FeaturizeConfig:
    """``cfg`` with clips fitted to the recordings' durations (:meth:`FeatureConfig.fitted_to`), from a
    sample of up to ``FIT_SAMPLE`` objects, always the same ones for the same archive (so a re-run
    resumes)."""
    sample = sorted(refs, key=lambda r: hashlib.sha1(r.uri.encode()).digest())[:FIT_SAMPLE]
    with ThreadPoolExecutor(8) as pool:
        seconds = [s for s in pool.map(lambda r: probe_seconds(r, cfg.features.clip_s), sample) if s is not None]
    fitted = cfg.features.fitted_to(seconds)
    if fitted == cfg.features:
        return cfg
    print(f"recordings are short (median {np.median(seconds):.2f} s of {len(seconds)} sampled), so clips are "
          f"{fitted.clip_s:g} s instead of {cfg.features.clip_s:g} s (hop {fitted.clip_hop_s:g} s, shortest kept "
          f"{fitted.min_tail_s:g} s); --no-fit-clips keeps the given clip length", flush=True)
    return replace(cfg, features=fitted)


def band_probe(ref: storage.ObjectRef, limit_s: float = BAND_PROBE_S) -> tuple[int, np.ndarray] | None:
    """A recording's native rate and the share of its energy (above 150 Hz: not wind or hum) in each
    100 Hz band up to 24 kHz, from its first ``limit_s`` seconds (None: unreadable or too short)."""
    try:
        with storage.open_input(ref.uri, ref.size) as f:
            info, blocks = open_audio(f)
            parts, n = [], 0
            for b in blocks:
                parts.append(b)
                n += len(b)
                if n > limit_s * info.sample_rate_hz:
                    break
    except Exception:  # best effort: a file that cannot be probed is judged (and quarantined) by its batch
        return None
    x = np.concatenate(parts)[: int(limit_s * info.sample_rate_hz)] if parts else np.zeros(0)
    if len(x) < 2048:
        return None
    frames = np.lib.stride_tricks.sliding_window_view(x, 2048)[::1024] * np.hanning(2048)
    power = np.square(np.abs(np.fft.rfft(frames, axis=1))).mean(0)
    bands = np.interp(BAND_GRID_HZ, np.fft.rfftfreq(2048, 1 / info.sample_rate_hz), power, right=0.0)
    bands[BAND_GRID_HZ < 150] = 0.0
    total = bands.sum()
    return (info.sample_rate_hz, bands / total) if total > 0 else None


def fit_rate(cfg: FeaturizeConfig, refs: list[storage.ObjectRef]) -> FeaturizeConfig:
    """``cfg`` at a sample rate that keeps the recordings' band (:meth:`FeatureConfig.at_rate`): when a
    sample of recordings made at 22.05 kHz or more holds 1 % of its energy above 7 kHz (birdsong, which
    16 kHz cuts at 8 kHz), features are made at 32 kHz (22.05 kHz for recordings made at that rate).
    Measured, the frequency below which 99 % of the energy above 150 Hz lies: xc_birds10 (44.1/48 kHz)
    9.0 kHz over all 100 recordings, 7.4-7.5 kHz in samples of 16-32; FSDD voices 3.4 kHz (made at
    8 kHz); the demo's engines 5.5 kHz. Only from the default 16 kHz; the same sample every time (a
    re-run resumes). Off by default (``--fit-rate``): on xc_birds10 the birds scored 0.57 per file at
    32 kHz against 0.80 at 16 kHz (128 mels, field augmentation, 6 epochs)."""
    if cfg.features.sample_rate_hz != BAND_DEFAULT_HZ:
        return cfg
    sample = sorted(refs, key=lambda r: hashlib.sha1(r.uri.encode()).digest())[:BAND_SAMPLE]
    with ThreadPoolExecutor(8) as pool:
        probed = [p for p in pool.map(band_probe, sample) if p is not None]
    native = float(np.median([r for r, _ in probed])) if probed else 0.0
    if len(probed) < 3 or native < 22050:
        return cfg
    share = np.mean([bands for _, bands in probed], axis=0)
    edge = float(BAND_GRID_HZ[np.searchsorted(np.cumsum(share), 0.99)])
    if edge <= BAND_EDGE_HZ:
        return cfg
    rate = 32000 if native >= 32000 else 22050
    fitted = cfg.features.at_rate(rate)
    print(f"the recordings' sound reaches {edge / 1000:.1f} kHz (99 % of the energy above 150 Hz in {len(probed)} "
          f"sampled, made at {native / 1000:g} kHz), so features are made at {rate / 1000:g} kHz instead of "
          f"{cfg.features.sample_rate_hz / 1000:g} kHz (n_fft {fitted.n_fft}, hop {fitted.hop_length}: the same "
          "frames; --fit-rate)", flush=True)
    return replace(cfg, features=fitted)


def runs_locally(cfg: FeaturizeConfig, todo: list[tuple[str, list]]) -> bool:
    """Whether the batches to do run in this process (``--runner``; ``auto``: without a cluster to join,
    when the work is one batch or small, which one core finishes before Ray would have started)."""
    if cfg.runner != "auto":
        return cfg.runner == "local"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a caller started Ray (a library user, a bench): use it
        return False
    if _joins_cluster(cfg):
        return False
    return len(todo) <= 1 or sum(ref.size for _, batch in todo for ref, _ in batch) <= LOCAL_WORK_BYTES


def _joins_cluster(cfg: FeaturizeConfig) -> bool:
    """Whether a cluster address is given (``--address``, ``RAY_ADDRESS``, or a ``ray job submit`` job)."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def _run_batches(cfg: FeaturizeConfig, dst: URI, batches: list[tuple[str, list]],
                 progress: bool) -> tuple[list[BatchResult], set[str]]:
    """Run every batch, as Ray tasks (at most ``max_inflight`` at once) or in this process
    (:func:`runs_locally`); reuse finished ones.

    Returns the batch results in batch order and the ids of batches resumed from part files.
    """
    results = {} if cfg.overwrite else read_parts(dst, {bid for bid, _ in batches})
    todo = [(bid, batch) for bid, batch in batches if bid not in results]
    resumed = set(results)
    bar = progress_bar(sum(len(b) for _, b in batches), progress, "featurize")
    bar.update(sum(len(b) for bid, b in batches if bid in results))
    feature_json = cfg.features.canonical_json()
    mel_device = "cuda" if cfg.use_gpu else ""
    if todo and runs_locally(cfg, todo):
        threads = torch.get_num_threads()
        try:
            for bid, batch in todo:
                try:
                    result = featurize_batch(bid, batch, feature_json, dst, cfg.rows_per_shard,
                                             cfg.rows_per_row_group, cfg.silence_dbfs, cfg.keep_audio, mel_device)
                except Exception as e:
                    raise stopped_by_storage("featurize", e, dst, {bid for bid, _ in batches}) from None
                results[bid] = result
                bar.update(result.done + len(result.quarantine))
                crash_point("featurize:batch")
        finally:
            torch.set_num_threads(threads)  # featurize_batch sets one thread, as a Ray task
    elif todo:
        import ray  # only now: a local run never pays for importing it

        init_ray(cfg.address)
        cpus, gpus = ray.cluster_resources().get("CPU", 1), ray.cluster_resources().get("GPU", 0)
        if cfg.use_gpu and gpus < 1:
            raise ConfigError("--use-gpu, but the Ray cluster has no GPUs: drop --use-gpu or join a GPU cluster")
        inflight_max = cfg.max_inflight_tasks or max(2, 2 * int(cpus))
        # SPREAD: batches go to every node of a cluster, not first to the driver's until it is full.
        # A task is retried when its worker dies; bad files never fail it (see featurize_batch).
        # With use_gpu every task also takes its share of the GPUs, so every CPU decodes for them.
        task = ray.remote(num_cpus=1, num_gpus=round(min(1.0, gpus / cpus), 4) if cfg.use_gpu else 0,
                          max_retries=3, scheduling_strategy="SPREAD")(featurize_batch)
        pending: dict[Any, str] = {}
        queue = iter(todo)
        try:
            while True:
                for bid, batch in queue:
                    ref = task.remote(bid, batch, feature_json, dst, cfg.rows_per_shard, cfg.rows_per_row_group,
                                      cfg.silence_dbfs, cfg.keep_audio, mel_device)
                    pending[ref] = bid
                    if len(pending) >= inflight_max:
                        break
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    result = ray.get(ref)
                    results[pending.pop(ref)] = result
                    bar.update(result.done + len(result.quarantine))
                    crash_point("featurize:batch")
        except Exception as e:
            # The batches in flight may finish (a re-run resumes what they kept), then the kept ones are
            # counted. They are not cancelled: in Ray 2.60 a cancel that races a task's reply aborts the
            # driver ("Check failed: it != submissible_tasks_.end() Tried to complete task that was not
            # pending"; a clean-clone CI run of test_faults, 2026-12-06; cf. ray-project/ray#54527).
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=SETTLE_S)
            raise stopped_by_storage("featurize", e, dst, {bid for bid, _ in batches}) from None
    bar.close()
    return [results[bid] for bid, _ in batches], resumed


def _manifest(cfg: FeaturizeConfig, summary: Summary, shards: list[str], results: list[BatchResult]) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("features", "address")}
    return {
        **manifest_header("features"),
        "src": summary.src,
        "feature_config": cfg.features.to_dict(),
        "config_hash": summary.config_hash,
        "shape": list(cfg.features.shape),
        "audio": {"kept": cfg.keep_audio, "dtype": AUDIO_DTYPE, "sample_rate_hz": cfg.features.sample_rate_hz,
                  "samples": cfg.features.clip_samples} if cfg.keep_audio else {"kept": False},
        "shards": shards,
        "shard_rows": {f"{SHARD_DIR}/{n}": rows for r in results for n, rows in r.shards},
        "labels": dict(sorted(summary.labels.items())),
        "counts": {
            "inputs": summary.inputs,
            "featurized": summary.featurized,
            "quarantined": summary.quarantined,
            "clips": summary.clips,
            "audio_seconds": round(summary.audio_s, 3),
            "skipped_by_filters": sum(summary.skipped.values()),
            "manifest_rows_unmatched": summary.manifest_unmatched,
        },
        "skipped": summary.skipped,
        "listing": summary.listing,
        "quarantine_kinds": summary.quarantine_kinds,
        "decoders": summary.decoders,
        "nodes": summary.nodes,
        "featurize": settings,
    }


def batch_id(features: FeatureConfig, batch: Iterable[tuple[storage.ObjectRef, str | Spans | None]],
             keep_audio: bool = False) -> str:
    """A name derived from the batch's content: same inputs, features and layout, same name, on every attempt."""
    return content_id(features.hash() + "+audio" * keep_audio, (f"{ref.key()}\t{label}" for ref, label in batch))


def featurize_batch(bid: str, batch: list[tuple[storage.ObjectRef, str | Spans | None]], feature_json: str, dst: URI,
                    rows_per_shard: int, rows_per_row_group: int, silence_dbfs: float,
                    keep_audio: bool = False, mel_device: str = "") -> BatchResult:
    """One Ray task (or a step of a local run): featurize a batch of objects into shards ``shards/<bid>-NNNNN.parquet``.

    ``mel_device`` (``cuda`` for ``--use-gpu``; any torch device): the clips are only cut here and
    their images made :data:`MEL_BATCH` at a time on that device (:class:`_BatchedImages`); empty:
    each clip's image as it is cut, on this CPU.

    Per-file failures are caught and returned as quarantine rows. A store that keeps failing (after
    the retries in :func:`~melbatch.audio.objects.logmels_of_object`) or anything else (e.g. DST not
    writable) fails the task and the run with its message; re-running resumes.
    """
    t0 = time.perf_counter()
    workers.prepare_worker(1)  # one task per CPU: parallelism comes from Ray, not from intra-op threads
    cfg = FeatureConfig.from_dict(json.loads(feature_json))
    writer = ShardWriter(storage.join(dst, SHARD_DIR), bid, cfg, rows_per_shard, rows_per_row_group, keep_audio)
    out = _BatchedImages(writer, cfg, torch.device(mel_device)) if mel_device else writer
    done, n_clips, audio_s = 0, 0, 0.0
    quarantine: list[dict[str, Any]] = []
    labels: Counter[str] = Counter()
    decoders: Counter[str] = Counter()
    try:
        for ref, label in batch:
            try:
                info, clips = logmels_of_object(ref, cfg, silence_dbfs, keep_audio, images=not mel_device)
            except DecodeError as e:
                quarantine.append(quarantine_row(ref, e))
                continue
            with clips:  # the writer takes them a row group at a time, however long the file
                for c, mel in clips:
                    each = clip_label(label, c.start_s, c.end_s)  # a file's own, or its spans' over this clip
                    out.add([ClipRow(ref.uri, ref.etag, ref.size, each, c.index, c.start_s, c.end_s,
                                     info.decoder, info.sample_rate_hz, info.channels, mel,
                                     c.samples if keep_audio or mel_device else None)])
                    if each is not None:
                        labels[each] += 1
            done += 1
            n_clips += len(clips)
            audio_s += info.decoded_frames / info.sample_rate_hz
            decoders[info.decoder] += 1
        if out is not writer:
            out.flush()
        shards = tuple((name, rows) for name, rows in writer.close())
    except BaseException:
        writer.abort()
        raise
    result = BatchResult(bid, done, n_clips, audio_s, quarantine, dict(labels), dict(decoders), {this_node(): 1},
                         task_s=time.perf_counter() - t0, shards=shards)
    write_part(dst, result)
    return result


class _BatchedImages:
    """Clip rows waiting for their images (``featurize --use-gpu``): their 16-bit PCM is imaged
    :data:`MEL_BATCH` clips at a time on ``device`` (:func:`~melbatch.audio.logmel.clip_images`,
    classify's ``--mel-on model`` function), across files, and the rows go to the writer in order,
    with their audio only when the writer keeps it. Rows wait for at most one batch."""

    def __init__(self, writer: ShardWriter, cfg: FeatureConfig, device: torch.device) -> None:
        self.writer, self.cfg, self.device = writer, cfg, device
        self.rows: list[ClipRow] = []

    def add(self, rows: list[ClipRow]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= MEL_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        pcm = np.stack([r.audio for r in self.rows])
        images = clip_images(pcm, self.cfg, self.device, MEL_BATCH).cpu().numpy()
        keep = self.writer.keep_audio
        self.writer.add([replace(r, mel=m, audio=r.audio if keep else None)
                         for r, m in zip(self.rows, images, strict=True)])
        self.rows = []


__all__ = ["MANIFEST", "Summary", "featurize_batch", "preflight", "run"]
