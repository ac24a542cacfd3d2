"""melbatch similar: the clips of an archive that sound most like a query, by the cosine similarity
of the model's embeddings (its pooled penultimate features: what ``classify --keep-embeddings``
stores per clip).

Top-down (:func:`run`): :func:`sources` lists the clip files of a classify OUT (or, for a scan OUT,
those holding each live object's current clips); :func:`query_vector` embeds the query (an audio
object, cut and imaged as classify does with the package's features, its clips' embeddings averaged;
or a stored clip ``URI#CLIP_INDEX``); :func:`search` streams the clip files and keeps the ``k`` best.

Memory does not grow with the archive: each clips file is read alone (a few at once, ``readers``),
its similarities are one matrix product, and only the best ``k`` rows so far are kept (an exact
search, not an approximate index: a 1M-clip archive of 1,280-dim embeddings is 5 GB to stream, a
minute or two on a few cores, which a person waiting for one answer can afford; an index would have
to be rebuilt by every scan).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from melbatch import URI, ledger, storage
from melbatch.audio.decode import DecodeError, decode_clips
from melbatch.config import ConfigError, FeatureConfig, SimilarConfig
from melbatch.console import shown
from melbatch.look.pictures import Rendered, audio_panel, render
from melbatch.model.package import load_package, predict_clips
from melbatch.shards import embedding_matrix, read_manifest

COLUMNS = ["uri", "clip_index", "start_s", "end_s", "label", "probability", "embedding"]
CLIP_REF = re.compile(r"^(?P<uri>.+)#(?P<index>\d+)$")


@dataclass(frozen=True)
class Match:
    """One clip of the archive and how like the query it sounds (cosine similarity, 1 = the same)."""

    similarity: float
    uri: URI
    clip_index: int
    start_s: float
    end_s: float
    label: str
    probability: float


@dataclass(frozen=True)
class Source:
    """One clips file, and (for a scan OUT) the objects whose current clips it holds."""

    uri: URI
    live: pa.Array | None = None


def run(cfg: SimilarConfig) -> tuple[str, list[Match], Rendered | None]:
    """(what the query was, the ``k`` nearest clips best first, the sheet if ``cfg.output``)."""
    files, model, features = sources(cfg.out)
    q, described = query_vector(cfg.query, files, model, features)
    matches = search(files, q, cfg.k, cfg.readers)
    sheet = draw(cfg, matches, features) if cfg.output else None
    return described, matches, sheet


def sources(out: URI) -> tuple[list[Source], URI, FeatureConfig]:
    """The clip files of a classify or scan OUT, the model package that made them, and its features."""
    files, manifest = [], {}
    for root, live in ledger.prediction_roots(out):
        manifest = read_manifest(root) or {}
        files += [Source(storage.join(root, rel), live) for rel in manifest.get("clips", [])]
    if not files:
        raise ConfigError(f"{out} holds no classified clips: nothing to search")
    with storage.arrow_input(files[0].uri, whole=False) as f:  # the schema alone
        if "embedding" not in pq.ParquetFile(f).schema_arrow.names:
            raise ConfigError(f"{out} was classified without embeddings: classify it again with --keep-embeddings "
                              "(search compares the model's embeddings of the clips)")
    return files, manifest["model"], FeatureConfig.from_dict(manifest["feature_config"])


def _read(src: Source) -> pa.Table:
    with storage.arrow_input(src.uri) as f:
        t = pq.read_table(f, columns=COLUMNS)
    return t if src.live is None else t.filter(pc.is_in(t.column("uri"), value_set=src.live))


def _stream(files: list[Source], readers: int) -> Iterator[pa.Table]:
    """The clip files' rows, one file at a time, ``readers`` read ahead (bounded: never all at once)."""
    with ThreadPoolExecutor(readers) as pool:
        pending = [pool.submit(_read, s) for s in files[:readers]]
        try:
            for nxt in files[readers:] + [None] * readers:
                table = pending.pop(0).result()
                if nxt is not None:
                    pending.append(pool.submit(_read, nxt))
                yield table
                if not pending:
                    return
        finally:  # a reader that stops early (closing the stream) waits for no read it did not take
            for f in pending:
                f.cancel()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def query_vector(query: str, files: list[Source], model: URI, features: FeatureConfig) -> tuple[np.ndarray, str]:
    """The query's unit embedding, and what it was. ``URI#N`` that names a clip in OUT uses its stored
    embedding; anything else is an audio object, embedded by the package as classify would."""
    ref = CLIP_REF.match(query)
    if ref:
        uri, index = storage.canonical(ref["uri"]), int(ref["index"])
        # closed here, not at exit: a stream left open kept its reader threads until the interpreter's
        # teardown, which aborted the process after its output (SIGABRT, "terminate called", CI of 2026-12-05)
        with closing(_stream(files, 4)) as tables:
            for t in tables:
                hit = t.filter(pc.and_(pc.equal(t.column("uri"), uri), pc.equal(t.column("clip_index"), index)))
                if hit.num_rows:
                    return _unit(embedding_matrix(hit)[0]), f"clip {index} of {uri} (stored)"
        if not storage.exists(query):
            raise ConfigError(f"{uri} has no clip {index} in this output (and {query} is no object to read)")
    pkg = load_package(model)
    try:
        with storage.open_input(query) as f:
            _, cut = decode_clips(f, features)
            clips = list(cut)
    except DecodeError as e:
        raise ConfigError(f"cannot use {query} as a query: {e}") from None
    except (OSError, storage.StorageError) as e:
        raise ConfigError(f"cannot read the query {query}: {e}") from None
    if not clips:
        raise ConfigError(f"{query} is shorter than one clip's minimum ({features.min_tail_s} s): nothing to compare")
    with torch.inference_mode():
        _, emb = predict_clips(pkg, clips, embeddings=True)
    return _unit(_unit(emb).mean(0)), f"{query} ({len(clips)} clip(s) embedded by {pkg.meta['model_id']})"


def search(files: list[Source], q: np.ndarray, k: int, readers: int = 4) -> list[Match]:
    """The ``k`` clips whose embeddings are nearest ``q`` by cosine, best first (ties: uri, clip)."""
    best: list[tuple[float, str, int, dict]] = []
    for t in _stream(files, readers):
        if not t.num_rows:
            continue
        e = embedding_matrix(t)
        if e.shape[1] != len(q):
            raise ConfigError(f"the query's embedding has {len(q)} values and the stored ones {e.shape[1]}: "
                              "they come from different models")
        sims = _unit(e) @ q
        top = np.argpartition(-sims, min(k, len(sims)) - 1)[:k] if len(sims) > k else np.arange(len(sims))
        rows = t.take(pa.array(top)).drop_columns(["embedding"]).to_pylist()
        best += [(-float(sims[i]), r["uri"], r["clip_index"], r) for i, r in zip(top, rows, strict=True)]
        best = sorted(best, key=lambda b: b[:3])[:k]
    return [Match(-s, r["uri"], r["clip_index"], r["start_s"], r["end_s"], r["label"], r["probability"])
            for s, _, _, r in best]


def render_table(described: str, matches: list[Match]) -> str:
    lines = [f"query: {shown(described)}", f"{'rank':>4}  {'similarity':>10}  {'label':<14} {'prob':>5}  clip"]
    for i, m in enumerate(matches, 1):
        lines.append(f"{i:>4}  {m.similarity:>10.4f}  {shown(m.label):<14} {m.probability:>5.3f}  "
                     f"{shown(m.uri)}#{m.clip_index} ({m.start_s:.1f}-{m.end_s:.1f} s)")
    return "\n".join(lines)


def draw(cfg: SimilarConfig, matches: list[Match], features: FeatureConfig) -> Rendered:
    """The query (its first clip's length) and each neighbour, as one PNG sheet."""
    ref = CLIP_REF.match(cfg.query)
    if ref and not storage.exists(cfg.query):
        hit = next((m for m in matches if m.uri == storage.canonical(ref["uri"]) and
                    m.clip_index == int(ref["index"])), None)
        start = hit.start_s if hit else int(ref["index"]) * features.clip_hop_s
        first = audio_panel(ref["uri"], features, start, features.clip_s, f"query: clip {ref['index']}")
    else:
        first = audio_panel(cfg.query, features, 0.0, features.clip_s, "query")
    panels = [first] + [audio_panel(m.uri, features, m.start_s, m.end_s - m.start_s,
                                    f"{i}. {m.similarity:.3f} · {m.label} · {m.uri.rsplit('/', 1)[-1]}#{m.clip_index}")
                        for i, m in enumerate(matches, 1)]
    return render(panels, features, cfg.output)

