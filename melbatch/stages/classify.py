"""classify: a trained model package over a whole audio archive, as one streaming Ray Data pipeline.

Top-down:

1. :func:`preflight` checks the model package, ARCHIVE and OUT before any cluster work.
2. The driver lists ARCHIVE once and groups the objects, in key order, into work batches of at
   most ``files_per_task`` files and ``task_mb`` MB, each named after its content and the model
   (:func:`batch_plan`). Batches an earlier attempt finished (their part file exists) are skipped.
3. One Ray Data pipeline streams the remaining batches, one row per batch:
   :func:`~melbatch.stages.chunks.decode_batch` (CPU tasks: read → decode → clips → log-mel, the
   featurize code path, with the package's feature config; the images leave in chunks of at most
   :data:`~melbatch.stages.chunks.CHUNK_BYTES`) → :class:`~melbatch.stages.chunks.Predictor` (an
   actor pool that loads the package once per actor; GPUs with ``use_gpu``) →
   :func:`~melbatch.stages.chunks.write_batch` (CPU tasks: ``clips/<batch>-<chunk>.parquet``).
   Between the stages a chunk is one row of typed, named columns (:mod:`melbatch.stages.chunks`). The driver finishes a
   batch once all its chunks are written, always there (:func:`finish_batch`):
   ``files/<batch>.parquet``, then ``_parts/<batch>.json``. Outputs are named after their batch, so
   retries and re-runs never duplicate rows; Ray Data's backpressure keeps only a few chunks in
   flight, and a file's clips wait on local disk beyond :data:`~melbatch.audio.objects.SPILL_BYTES`, so
   memory is bounded whatever the archive's size or the length of its recordings.
4. The driver writes ``quarantine.parquet``, then ``_manifest.json`` last, then deletes what earlier
   attempts left that the manifest does not name.

Per-file verdict: the mean of the file's clip probabilities per label; the label with the highest
mean wins and its mean is the file's ``probability``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import ray

from melbatch import URI, listing, storage
from melbatch.audio.decode import DecodeError
from melbatch.audio.objects import SPILL_BYTES, logmels_of_object
from melbatch.config import ClassifyConfig, ConfigError, FeatureConfig
from melbatch.console import progress as progress_bar
from melbatch.model import adapt, backbones, novelty
from melbatch.model.package import (
    META,
    PACKAGE_DIR,
    UNKNOWN,
    FileSums,
    ModelError,
    aggregate_files,
    file_labels,
    load_package,
    package_root,
    read_package_meta,
    verdicts,
)
from melbatch.shards import (
    DETECTION_DIR,
    MANIFEST,
    PREDICTION_DIRS,
    QUARANTINE,
    file_prediction_schema,
    read_manifest,
    write_table,
)
from melbatch.stages import detections
from melbatch.stages.chunks import CHUNK_BYTES, FILE, Predictor, decode_batch, work_table, write_batch
from melbatch.stages.runs import (
    BatchResult,
    RunSummary,
    commit,
    content_id,
    crash_point,
    init_ray,
    manifest_header,
    read_parts,
    stopped_by_storage,
    write_part,
)

# A decode task's own memory (imports, one file's decode and clips): measured up to ~490 MiB.
DECODE_WORKER_BYTES = 560e6
# The driver finishes batches (two small writes each) in this many threads: on object storage a write
# takes tens of ms, and a big cluster delivers many batches a second.
FINISHERS = 8
# A writer task (clips/*.parquet) asks for this much of a CPU; the decode tasks leave it room, or it waits
# for one of them to end (on 2 CPUs: one decode task at 1 CPU and a 1-CPU actor left the writer none).
WRITER_CPUS = 0.25
BATCHES_PER_BLOCK = 16  # most work batches in one input block (one decode task)
BLOCKS_PER_CPU = 8  # fewest input blocks per decoding CPU
AGGREGATION = "mean of clip probabilities per label; the highest mean is the file's label and probability"


@dataclass(kw_only=True)
class Summary(RunSummary):
    """What one classify run did; ``inputs == classified + quarantined`` always."""

    DONE: ClassVar[str] = "classified"
    LABEL_UNIT: ClassVar[str] = "files"  # files per verdict
    archive: URI
    out: URI
    model_id: str
    config_hash: str
    classified: int = 0
    events: dict[str, int] = dataclasses.field(default_factory=dict)  # label -> events detected
    new_audio_s: float = 0.0  # audio in batches this run did (not resumed): what the throughput counts

    def _head(self) -> list[str]:
        return [f"classify {self.archive} -> {self.out}",
                f"  model        {self.model_id}  (features {self.config_hash})"]

    def _rated_audio_s(self) -> float:
        return self.new_audio_s

    def _clips_line(self) -> str:
        found = ", ".join(f"{label} {n}" for label, n in sorted(self.events.items()))
        return (f"  clips        {self.clips:>8}\n  events       {sum(self.events.values()):>8}"
                f"{f'  ({found}; detections/)' if found else ''}")

    def _quarantine_uri(self) -> URI:
        return storage.join(self.out, QUARANTINE)


# --------------------------------------------------------------------------------------------- driver

def preflight_model(cfg: ClassifyConfig) -> dict[str, Any]:
    """The package's meta (plus its canonical ``root``); ARCHIVE readable and OUT writable."""
    try:
        meta = {**read_package_meta(cfg.model), "root": storage.canonical(package_root(cfg.model))}
        backbones.usable(meta)  # a head on an audio backbone: its extra installed here (the actors load it)
    except (ModelError, backbones.BackboneError) as e:
        raise ConfigError(f"MODEL: {e}") from None
    detection(cfg, meta)  # a --threshold for a label the model does not have fails here
    if cfg.unknown != "off" and not meta.get("novelty"):
        raise ConfigError(f"MODEL: {cfg.model} stores no distance rule for --unknown {cfg.unknown} (packages trained "
                          "before 2026-12-07 and multi-label packages have none): train it again, or use "
                          "--unknown-below P")
    storage.check_readable(cfg.archive)
    storage.check_writable(cfg.out)
    return meta


def detection(cfg: ClassifyConfig, meta: dict[str, Any]) -> detections.Settings:
    """How this run detects events: the thresholds per label (a multi-label package's own where --threshold
    does not set them), and the clip hop (``--clip-hop-s``, else the model's)."""
    hop = cfg.clip_hop_s or FeatureConfig.from_dict(meta["feature_config"]).clip_hop_s
    d = cfg.detect
    return detections.Settings.of(d.threshold, meta["labels"], hop, d.min_event_s, d.gap_s, meta.get("thresholds"))


def mel_on_model(cfg: ClassifyConfig) -> bool:
    """Whether the model actors make the images (``--mel-on``; ``auto``: with GPUs)."""
    return cfg.mel_on == "model" or (cfg.mel_on == "auto" and cfg.use_gpu)


def decode_features(meta: dict[str, Any], detect: detections.Settings) -> FeatureConfig:
    """The package's features, clips cut ``detect.hop_s`` apart: each image is made as in training (the
    hop says where clips start, not what an image is), so the outputs keep the package's config hash."""
    return dataclasses.replace(FeatureConfig.from_dict(meta["feature_config"]), clip_hop_s=detect.hop_s)


def preflight(cfg: ClassifyConfig) -> dict[str, Any]:
    """Everything checkable without a cluster: the package, ARCHIVE readable, OUT writable and ours."""
    meta = preflight_model(cfg)
    existing = read_manifest(cfg.out)
    if existing and not cfg.overwrite and existing.get("kind") != "predictions":
        raise ConfigError(f"{cfg.out} holds a {existing.get('kind')} output, not predictions: use another OUT")
    made_by = (existing or {}).get("adapted", {}) or {}
    if existing and not cfg.overwrite and made_by.get("from_model_id", existing.get("model_id")) != meta["model_id"]:
        raise ConfigError(f"{cfg.out} already holds predictions of model {existing.get('model_id')}, and MODEL is "
                          f"{meta['model_id']}: use another OUT, or --overwrite to replace them")
    return meta


def batch_plan(refs: list[storage.ObjectRef], files_per_task: int, task_bytes: float) -> list[list[storage.ObjectRef]]:
    """Consecutive groups of at most ``files_per_task`` objects and ``task_bytes`` bytes (a bigger object alone)."""
    batches: list[list[storage.ObjectRef]] = []
    size = 0
    for ref in refs:
        if not batches or len(batches[-1]) >= files_per_task or size + ref.size > task_bytes:
            batches.append([])
            size = 0
        batches[-1].append(ref)
        size += ref.size
    return batches


def run(cfg: ClassifyConfig, progress: bool = True) -> Summary:
    """Classify ``cfg.archive`` into ``cfg.out``; returns the summary (also in the manifest)."""
    meta = preflight(cfg)
    skipped: Counter = Counter()
    notes = listing.ListingNotes()
    refs = listing.refs_of(list_archive(cfg, skipped, notes))
    if not refs:
        raise listing.nothing_matches(cfg.archive, cfg.include, cfg.exclude, cfg.extensions)
    if cfg.adapt:
        meta = adapt_model(cfg, meta, refs, progress)
    return classify_objects(cfg, meta, refs, storage.canonical(cfg.out), progress, dict(skipped), notes.as_dict())


ADAPTED_DIR = "_adapted"  # OUT/_adapted/model/: the package classify --adapt made and classified with


def adapt_model(cfg: ClassifyConfig, meta: dict[str, Any], refs: list[storage.ObjectRef],
                progress: bool = True) -> dict[str, Any]:
    """``--adapt``: the package re-fitted to a sample of the archive's clips (:mod:`melbatch.model.adapt`),
    written to ``OUT/_adapted/`` and returned as the meta to classify with; a re-run (resume) finds it
    there and uses it again, so every batch of one OUT is classified by the same adapted model."""
    where = storage.join(storage.canonical(cfg.out), ADAPTED_DIR)
    if storage.exists(storage.join(where, PACKAGE_DIR, META)):
        old = read_package_meta(where)
        if old.get("adapted", {}).get("from_model_id") == meta["model_id"]:
            return {**old, "root": storage.canonical(package_root(where))}
    pkg = load_package(cfg.model)
    if not adapt.can_adapt(pkg):
        raise ConfigError(f"MODEL: {meta['model_id']} has no normalisation statistics to adapt (no BatchNorm "
                          "layers): classify without --adapt")
    t0 = time.perf_counter()
    sample, files = archive_sample(refs, pkg.features, pkg.embedder is None, cfg.silence_dbfs)
    if len(sample) < adapt.FEW_CLIPS:
        raise ConfigError(f"--adapt found {len(sample)} usable clips in {files} sampled files of {cfg.archive}: "
                          f"statistics of fewer than {adapt.FEW_CLIPS} clips are noise; classify without --adapt")
    new = adapt.adapted(pkg, sample)
    new.meta["adapted"] = {**new.meta["adapted"], "files": files, "archive": storage.canonical(cfg.archive)}
    adapt.save(new, where)
    adapted_meta = {**read_package_meta(where), "root": storage.canonical(package_root(where))}
    if progress:
        print(f"adapted {meta['model_id']} to {cfg.archive}: {new.meta['adapted']['statistics']} re-estimated on "
              f"{len(sample)} clips of {files} files in {time.perf_counter() - t0:.1f} s -> "
              f"{adapted_meta['model_id']} ({where})", flush=True)
    return adapted_meta


def archive_sample(refs: list[storage.ObjectRef], features: FeatureConfig, images: bool,
                   silence_dbfs: float) -> tuple[np.ndarray, int]:
    """Up to :data:`~melbatch.model.adapt.ADAPT_CLIPS` clips of up to :data:`~melbatch.model.adapt.ADAPT_FILES`
    files spread over the archive (its key order), a share of each: their log-mel images, or (not
    ``images``) their 16-bit audio; files that cannot be decoded are passed over (classify quarantines
    them). Returns the clips and how many files were sampled."""
    picked = [refs[i] for i in sorted(set(np.linspace(0, len(refs) - 1, min(len(refs), adapt.ADAPT_FILES))
                                          .astype(int).tolist()))]
    per_file = max(1, math.ceil(adapt.ADAPT_CLIPS / len(picked)))
    clips: list[np.ndarray] = []
    for ref in picked:
        try:
            _, staged = logmels_of_object(ref, features, silence_dbfs, keep_audio=not images, images=images)
        except DecodeError:
            continue
        with staged:
            got = [mel if images else clip.samples for clip, mel in staged]
        clips += [got[i] for i in sorted(set(np.linspace(0, len(got) - 1, min(len(got), per_file)).astype(int)))]
    if len(clips) > adapt.ADAPT_CLIPS:
        clips = [clips[i] for i in np.linspace(0, len(clips) - 1, adapt.ADAPT_CLIPS).astype(int)]
    return (np.stack(clips) if clips else np.zeros(0)), len(picked)


def list_archive(cfg: ClassifyConfig, skipped: Counter | None = None,
                 notes: listing.ListingNotes | None = None) -> pa.Table:
    """Every audio object under ARCHIVE that passes the filters, in key order (one listing, as a
    :data:`~melbatch.listing.LISTING_SCHEMA` table); the others are counted by extension into ``skipped``,
    and links, loops and unreadable folders are told in ``notes``."""
    return listing.list_table(storage.canonical(cfg.archive), cfg.include, cfg.exclude, cfg.extensions, skipped,
                              notes)


def classify_objects(cfg: ClassifyConfig, meta: dict[str, Any], refs: list[storage.ObjectRef], out: URI,
                     progress: bool = True, skipped: dict[str, int] | None = None,
                     listing: dict[str, dict] | None = None) -> Summary:
    """Classify exactly ``refs`` into ``out`` (resuming batches an earlier attempt finished)."""
    t0 = time.perf_counter()
    summary = Summary(archive=storage.canonical(cfg.archive), out=out, model_id=meta["model_id"],
                      config_hash=meta["config_hash"], inputs=len(refs), skipped=skipped or {},
                      listing=listing or {})
    detect = detection(cfg, meta)
    salt = (f"classify {meta['model_id']} {meta['config_hash']} top{cfg.top_k} emb{int(cfg.keep_embeddings)} "
            f"detect {detect}" + (f" unknown<{cfg.unknown_below:g}" if cfg.unknown_below else "")
            + (f" unknown {cfg.unknown}" if cfg.unknown != "off" else ""))
    batches = [(content_id(salt, (r.key() for r in b)), b)
               for b in batch_plan(refs, cfg.files_per_task, cfg.task_mb * 1e6)]
    crash_point("classify:listed")
    summary.batches = len(batches)
    results = {} if cfg.overwrite else read_parts(out, {bid for bid, _ in batches})
    resumed = set(results)
    summary.resumed_batches = len(resumed)
    todo = [(bid, b) for bid, b in batches if bid not in results]
    bar = progress_bar(len(refs), progress, "classify")
    bar.update(sum(len(b) for bid, b in batches if bid in results))
    if todo:
        init_ray(cfg.address)
        try:
            results |= _stream(cfg, meta, detect, out, todo, bar)
        except Exception as e:
            raise stopped_by_storage("classify", e, out, {bid for bid, _ in batches}) from None
    bar.close()
    quarantine, outputs = _gathered(summary, [(bid, results[bid]) for bid, _ in batches], resumed)
    summary.close(quarantine, t0)
    commit(out, "classify", quarantine, _manifest(cfg, meta, detect, summary, outputs), PREDICTION_DIRS,
           {p for d in PREDICTION_DIRS for p in outputs[d]}, {bid for bid, _ in batches})
    return summary


def _stream(cfg: ClassifyConfig, meta: dict[str, Any], detect: detections.Settings, out: URI,
            todo: list[tuple[str, list[storage.ObjectRef]]], bar: Any) -> dict[str, BatchResult]:
    """The pipeline over the batches still to do; the driver finishes each batch (in a few threads)
    as soon as all its chunks are in. Returns their results."""
    results: dict[str, BatchResult] = {}
    chunks: dict[str, list[dict[str, Any]]] = {}  # a batch's chunks, until all are in
    finishing: set[Future] = set()

    def collect(done: set[Future]) -> None:
        for f in done:
            r = f.result()
            results[r.batch] = r
            bar.update(r.done + len(r.quarantine))
            crash_point("classify:batch")

    with ThreadPoolExecutor(FINISHERS) as pool:
        for chunk in pipeline(cfg, meta, detect, out, todo).iter_rows():
            parts = chunks.setdefault(chunk["batch"], [])
            parts.append(chunk)
            if _complete(parts):
                finishing.add(pool.submit(finish_batch, out, chunk["batch"], chunks.pop(chunk["batch"]), meta,
                                          detect, cfg.unknown_below, unknown_rule(cfg, meta)))
            done = {f for f in finishing if f.done()}
            finishing -= done
            collect(done)
        collect(finishing)  # waits for the last ones
    return results


def _gathered(summary: Summary, results: list[tuple[str, BatchResult]],
              resumed: set[str]) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Every batch's result added into ``summary``, in batch order: (the quarantine rows, the output
    files by folder)."""
    quarantine: list[dict[str, Any]] = []
    outputs: dict[str, list[str]] = {d: [] for d in PREDICTION_DIRS}
    for bid, r in results:
        summary.add(r)
        for label, n in r.events.items():
            summary.events[label] = summary.events.get(label, 0) + n
        summary.new_audio_s += r.audio_s if bid not in resumed else 0.0
        quarantine.extend(r.quarantine)
        for d in PREDICTION_DIRS:
            outputs[d].extend(r.outputs.get(d, []))
    return quarantine, outputs


def size_actors(cfg: ClassifyConfig, cpus: float, gpus: float) -> tuple[int, float, str]:
    """(model actors, CPUs per actor, the line that says so): what is not given is chosen from the cluster.

    Decoding needs a whole CPU; without one the model actors wait for images forever. Chosen: one
    actor per GPU with --use-gpu, else one per 8 CPUs; on CPU the actors share half the CPUs (at most
    all but one), in steps of 0.05; an explicit value that leaves decoding no CPU is an error.
    """
    actors = cfg.concurrency or (int(gpus) if cfg.use_gpu else max(1, int(cpus // 8)))
    chosen = cfg.concurrency == 0 or cfg.cpus_per_actor is None
    if cfg.cpus_per_actor is not None:
        each = cfg.cpus_per_actor
        if cpus - actors * each < 1:
            raise ConfigError(f"{actors} model actor(s) x {each:g} CPU leave {cpus - actors * each:g} of the cluster's "
                              f"{cpus:g} CPUs for decoding, which needs at least 1: lower --cpus-per-actor "
                              "(fractions are fine), leave it out to size it from the cluster, or lower --concurrency")
    else:
        share = 1.0 if cfg.use_gpu else min(cpus / 2, cpus - 1) / actors
        each = math.floor(min(share, (cpus - 1) / actors) * 20) / 20
        if each < 0.05:
            raise ConfigError(f"the cluster has {cpus:g} CPU(s): {actors} model actor(s) and decoding's 1 CPU do not "
                              "fit; lower --concurrency or join a bigger cluster")
    how = f" (chosen from the cluster's {cpus:g} CPUs; --concurrency, --cpus-per-actor to choose)" if chosen else ""
    return actors, each, (f"model actors: {actors} x {each:g} CPU{' + 1 GPU' if cfg.use_gpu else ''}, "
                          f"decoding on the other {cpus - actors * each:g} CPU(s){how}")


def pipeline(cfg: ClassifyConfig, meta: dict[str, Any], detect: detections.Settings, out: URI,
             todo: list[tuple[str, list]]) -> Any:
    """The streaming Ray Data pipeline over the work batches still to do: decode → model → write."""
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.use_gpu and gpus < 1:
        raise ConfigError("--use-gpu, but the Ray cluster has no GPUs: drop --use-gpu or join a GPU cluster")
    actors, per_actor, line = size_actors(cfg, cpus, gpus)
    print(line, flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # melbatch's own bar counts files
    # Bounded memory whatever the archive's size: Ray Data's default budget for blocks in flight is a
    # share of the whole object store (GBs), and decoding outruns the model, so decoded images would
    # queue up to that budget. A fixed budget makes the decoders wait for the model instead.
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=cfg.inflight_mb * 1e6)
    features_json = decode_features(meta, detect).canonical_json()
    # from_items, not from_arrow of one-row tables: measured 15% faster end to end (bench/classify.py's
    # decode-bound setting: 160 x 30 s, test_resnet, 4 files per batch)
    rows = work_table(todo).to_pylist()
    ds = ray.data.from_items(rows, override_num_blocks=input_blocks(len(rows), cpus - actors * per_actor))
    # A decode task's worker holds torch (~350 MB measured) and one work batch's images (at most about
    # 4x its input bytes). Saying so also keeps Ray Data from fusing decoding into the model actors (it
    # fuses stages with equal resource requests), which would decode on the actors' CPUs one batch at a
    # time instead of on every CPU.
    images_here = not mel_on_model(cfg) and not meta.get("backbone")
    if meta.get("backbone"):  # a head on an audio backbone hears the clips, at the backbone's rate
        print(f"clips: cut by the decoding CPU tasks at {meta['feature_config']['sample_rate_hz']} Hz; the "
              f"{meta['backbone']['name']} backbone embeds them in the model actors", flush=True)
    else:
        print(f"log-mel images: made {'by the decoding CPU tasks' if images_here else 'by the model actors'} "
              f"(--mel-on {cfg.mel_on})", flush=True)
    writers = max(1, actors)
    ds = ds.map_batches(decode_batch, batch_size=1, batch_format="pyarrow",
                        num_cpus=decode_task_cpus(cpus - actors * per_actor - writers * WRITER_CPUS),
                        memory=DECODE_WORKER_BYTES + 2 * CHUNK_BYTES + SPILL_BYTES,
                        fn_kwargs={"features_json": features_json, "silence_dbfs": cfg.silence_dbfs,
                                   "images": images_here})
    ds = ds.map_batches(Predictor, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=per_actor, num_gpus=1 if cfg.use_gpu else 0,
                        fn_constructor_kwargs={"model_uri": meta["root"], "batch_size": cfg.batch_size,
                                               "top_k": cfg.top_k, "embeddings": cfg.keep_embeddings,
                                               "use_gpu": cfg.use_gpu, "threads": max(1, int(per_actor)),
                                               "thresholds": detect.thresholds})
    # writers are light (a fraction of a CPU) and few: each is a process that would otherwise linger
    return ds.map_batches(write_batch, batch_size=1, batch_format="pyarrow", num_cpus=WRITER_CPUS,
                          compute=ray.data.TaskPoolStrategy(size=writers), fn_kwargs={"out": out})


def decode_task_cpus(decode_cpus: float) -> float:
    """The CPUs each decode task asks for: one while the CPUs left to decoding are whole, else those
    CPUs shared by as many tasks as there are cores to run them, so that a model actor's fraction of a
    CPU (a light model: ``--cpus-per-actor 0.25``) and the writers' leave no core idle: on 2 CPUs with
    a 0.25-CPU actor and a 0.25-CPU writer, two tasks at 0.75 CPU instead of one at 1 (make
    bench-classify, the instant model rows)."""
    tasks = max(1, math.ceil(decode_cpus - 1e-6))
    return min(1.0, decode_cpus / tasks)


def input_blocks(batches: int, decode_cpus: float) -> int:
    """How many blocks the work batches go in. Ray Data pays per block (a put in the driver, a task:
    ~21 ms per one-batch block measured on 2 CPUs, ~2.4 ms per batch with 16 to a block), so a big run
    puts up to :data:`BATCHES_PER_BLOCK` batches in a block, while every run keeps at least
    :data:`BLOCKS_PER_CPU` blocks per decoding CPU, so the work stays spread to its end. A decode task
    still writes nothing and yields each batch's chunks as it goes: resuming is per batch as before."""
    per_block = max(1, min(BATCHES_PER_BLOCK, int(batches // (BLOCKS_PER_CPU * max(1.0, decode_cpus)))))
    return math.ceil(batches / per_block) if batches else 0


def _manifest(cfg: ClassifyConfig, meta: dict[str, Any], detect: detections.Settings, summary: Summary,
              outputs: dict[str, list[str]]) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("address",)}
    return {
        **manifest_header("predictions"),
        "archive": summary.archive,
        "model": meta["root"],
        "model_id": meta["model_id"],
        "model_name": meta["model_name"],
        "adapted": meta.get("adapted"),  # classify --adapt: from which package, on how many clips
        "labels": meta["labels"],
        "feature_config": meta["feature_config"],
        "config_hash": meta["config_hash"],
        "aggregation": AGGREGATION,
        "clip_hop_s": detect.hop_s,  # where clips start here (the package's feature_config keeps its own)
        "detection": detect.describe(meta["labels"]),
        **{d: sorted(outputs[d]) for d in PREDICTION_DIRS},
        "counts": {"inputs": summary.inputs, "classified": summary.classified, "quarantined": summary.quarantined,
                   "clips": summary.clips, "audio_seconds": round(summary.audio_s, 3),
                   "skipped_by_filters": sum(summary.skipped.values()), "events": sum(summary.events.values())},
        "event_counts": dict(sorted(summary.events.items())),
        "skipped": summary.skipped,
        "listing": summary.listing,
        "label_counts": dict(sorted(summary.labels.items())),
        "quarantine_kinds": summary.quarantine_kinds,
        "decoders": summary.decoders,
        "nodes": summary.nodes,
        "elapsed_s": round(summary.elapsed_s, 3),
        "classify": settings,
    }


def _complete(chunks: list[dict[str, Any]]) -> bool:
    """Whether every chunk of a batch is in: the last one and all before it."""
    last = [c["seq"] for c in chunks if c["last"]]
    return bool(last) and len(chunks) == last[0] + 1


def unknown_rule(cfg: ClassifyConfig, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The package's stored rule and which of its parts ``--unknown`` uses (``None``: off)."""
    if cfg.unknown == "off":
        return None
    return {**meta["novelty"], "use": "both" if cfg.unknown == "auto" else cfg.unknown}


def finish_batch(out: URI, bid: str, chunks: list[dict[str, Any]], meta: dict[str, Any],
                 detect: detections.Settings, unknown_below: float = 0.0,
                 rule: dict[str, Any] | None = None) -> BatchResult:
    """A batch whose chunks are all written (the driver's rows of :func:`write_batch`): its per-file
    verdicts (``files/<batch>.parquet``: the mean of each file's clip probabilities, the best label
    wins, or :data:`~melbatch.model.package.UNKNOWN` below ``unknown_below`` or where the package's
    distance ``rule`` sets it aside, :func:`melbatch.model.novelty.unknown`; its mean distance), its events
    (``detections/<batch>.parquet``, when there are any), then its part file, which marks it done;
    returns its result."""
    chunks = sorted(chunks, key=lambda c: c["seq"])
    files, labels = chunks[-1]["files"], meta["labels"]
    sums: FileSums = {}
    far: dict[str, float] = {}
    for c in chunks:
        sums = aggregate_files([s["uri"] for s in c["sums"]], [np.asarray(s["probability_sum"]) for s in c["sums"]],
                               [s["clips"] for s in c["sums"]], into=sums)
        for s in c["sums"]:
            if s["distance_sum"] is not None:
                far[s["uri"]] = far.get(s["uri"], 0.0) + s["distance_sum"]
    uris = [f["uri"] for f in files]
    scores, best = verdicts(sums, uris, len(labels))
    distance = [far[u] / sums[u][1] if u in far else None for u in uris]
    names = file_labels(labels, scores, best, unknown_below)
    if rule and files:
        confidence = scores[np.arange(len(files)), best]
        names = [UNKNOWN if out else n for n, out in zip(names, novelty.unknown(
            confidence, np.array([np.inf if d is None else d for d in distance]), rule, rule["use"]), strict=True)]
    table = pa.Table.from_pydict({
        **{k: [f[k] for f in files] for k in FILE.names},
        "label": names, "distance": distance,
        "probability": scores[np.arange(len(files)), best].tolist(),
        "clips": [sums[f["uri"]][1] for f in files], "scores": scores.tolist(),
        "model_id": [meta["model_id"]] * len(files), "config_hash": [meta["config_hash"]] * len(files),
    }, schema=file_prediction_schema(labels))
    outputs = {"clips": [c["clips_file"] for c in chunks if c["clips_file"]]}
    if files:
        outputs["files"] = [f"files/{bid}.parquet"]
        write_table(storage.join(out, outputs["files"][0]), table)
    hits = pa.Table.from_pylist([h for c in chunks for h in c["hits"]], pa.schema(list(detections.HIT)))
    found = detections.events(hits, labels, {f["uri"]: f["etag"] for f in files}, detect.hop_s, detect.min_event_s,
                              detect.gap_s, meta["model_id"])
    if found.num_rows:
        outputs[DETECTION_DIR] = [f"{DETECTION_DIR}/{bid}.parquet"]
        write_table(storage.join(out, outputs[DETECTION_DIR][0]), found)
    result = BatchResult(bid, len(files), sum(c["clips"] for c in chunks), sum(f["duration_s"] for f in files),
                         chunks[-1]["quarantine"], dict(Counter(table.column("label").to_pylist())),
                         dict(Counter(f["decoder"] for f in files)),
                         dict(Counter(c["node"] for c in chunks if c["seq"] == 0)),
                         events=dict(Counter(found.column("label").to_pylist())), outputs=outputs)
    write_part(out, result)
    return result


__all__ = ["AGGREGATION", "MANIFEST", "Predictor", "Summary", "batch_plan", "finish_batch", "preflight", "run"]
