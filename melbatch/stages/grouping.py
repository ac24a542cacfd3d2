"""Group an archive's clips by their embeddings: k-means on Ray, the driver holding only the centres.

Top-down (:func:`group`):

1. :func:`sample_rows` takes up to ``SAMPLE_CLIPS`` clip embeddings, spread over every clip file;
   embeddings are compared as unit vectors (:func:`unit`: cosine, as ``melbatch similar`` does).
2. :func:`choose_k`: k-means++ and Lloyd on the sample for each k tried (the best of
   :data:`STARTS` starts); the largest k whose silhouette is within one standard error of the best
   wins (or the k asked for).
3. :func:`refine`: Lloyd passes over every clip, each pass one Ray task per few clip files
   (:func:`partial_sums`: per group the sum of its clips' vectors and their count), until the
   centres stop moving. The driver holds k centres, never the embeddings.
4. :func:`assign`: one more pass; each task returns its files' rows (``uri``, ``clip_index``,
   ``start_s``, ``end_s``, ``group``, ``distance``) and the driver streams them into one Parquet file.

Memory: a task holds one clip file's embeddings (a 1,280-dim float32 row is 5 KB: 100,000 clips
0.5 GB); the driver the sample (``SAMPLE_CLIPS`` rows) and the silhouette's sample-by-sample
distances (``SILHOUETTE_CLIPS`` squared floats: 64 MB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from melbatch import URI, storage

SAMPLE_CLIPS = 20_000  # the sample k is chosen and the centres started on
SILHOUETTE_CLIPS = 4_000  # the silhouette of each k is measured on this many of them
FILES_PER_TASK = 8  # clip files per Ray task in a pass
STARTS = 5  # k-means++ starts on the sample, the one with the least inertia kept (scikit-learn's n_init is 10)
MOVED = 1e-4  # a pass that moves no centre further than this (on unit vectors) ends the refinement
COLUMNS = ["uri", "clip_index", "start_s", "end_s"]
GROUPS_SCHEMA = pa.schema([pa.field("uri", pa.string(), nullable=False),
                           pa.field("clip_index", pa.int32(), nullable=False),
                           pa.field("start_s", pa.float64(), nullable=False),
                           pa.field("end_s", pa.float64(), nullable=False),
                           pa.field("group", pa.int32(), nullable=False),
                           pa.field("distance", pa.float32(), nullable=False)])


@dataclass
class Grouping:
    """What :func:`group` found: the centres (unit vectors, largest group first), how k was chosen."""

    centres: np.ndarray
    sizes: list[int]
    chosen_by: str
    silhouettes: dict[int, float] = field(default_factory=dict)
    passes: int = 0
    clips: int = 0


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), float32."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _read(uri: URI, embeddings: bool = True) -> pa.Table:
    with storage.arrow_input(uri) as f:
        return pq.read_table(f, columns=[*COLUMNS, *(["embedding"] if embeddings else [])])


def _vectors(t: pa.Table) -> np.ndarray:
    col = t.column("embedding").combine_chunks()
    return unit(np.asarray(col.flatten(), np.float32).reshape(t.num_rows, -1))


def nearest(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre and its Euclidean distance to it (unit vectors: 0 to 2)."""
    d2 = np.maximum((x * x).sum(1, keepdims=True) - 2 * x @ centres.T + (centres * centres).sum(1), 0.0)
    best = d2.argmin(1)
    return best, np.sqrt(d2[np.arange(len(x)), best])


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ starting centres (Arthur & Vassilvitskii 2007) drawn from the rows of ``x``."""
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centres.append(x[rng.choice(len(x), p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    return np.stack(centres)


def lloyd(x: np.ndarray, centres: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Lloyd's passes over rows held here (the sample); an emptied group keeps its centre."""
    for _ in range(iterations):
        best, _ = nearest(x, centres)
        new = centres.copy()
        for g in range(len(centres)):
            if (best == g).any():
                new[g] = x[best == g].mean(0)
        new = unit(new)
        if np.abs(new - centres).max() < MOVED:
            return new
        centres = new
    return centres


def best_start(x: np.ndarray, k: int, rng: np.random.Generator, starts: int = STARTS) -> np.ndarray:
    """The centres of the best of ``starts`` k-means runs on rows held here (the least inertia): one
    start can settle in a poor split (measured on FSDD speakers, 600 files, k = 6: purity 0.50 from
    one start, 0.59 from scikit-learn's best of 10)."""
    best: tuple[float, np.ndarray] | None = None
    for _ in range(starts):
        centres = lloyd(x, kmeans_pp(x, k, rng))
        inertia = float((nearest(x, centres)[1] ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres)
    assert best is not None
    return best[1]


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw 1987) of rows ``x`` grouped by ``labels``, Euclidean distances."""
    return float(silhouettes(x, labels).mean())


def silhouettes(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's silhouette (-1 for every row when there is one group)."""
    d = np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2 * x @ x.T + (x * x).sum(1)[None, :], 0.0))
    groups = np.unique(labels)
    if len(groups) < 2:
        return np.full(len(x), -1.0)
    mean_to = np.stack([d[:, labels == g].mean(1) for g in groups], axis=1)  # (n, groups)
    own = np.searchsorted(groups, labels)
    size = np.array([(labels == g).sum() for g in groups])[own]
    a = mean_to[np.arange(len(x)), own] * size / np.maximum(size - 1, 1)  # leave the clip itself out
    mean_to[np.arange(len(x)), own] = np.inf
    b = mean_to.min(1)
    return np.where(size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)


def choose_k(sample: np.ndarray, ks: list[int], rng: np.random.Generator) -> tuple[int, np.ndarray, dict[int, float]]:
    """The largest k of ``ks`` whose silhouette on the sample is within one standard error of the best
    one's, its centres, and every k's mean silhouette.

    Why the largest of the ties: a silhouette measured on a few hundred clips moves by its standard
    error from one sample to the next, and two k within it are not told apart; between them, more groups
    cost the person naming them little (two groups get one name), where too few leave mixed groups that
    need a name per clip. Measured (bench/discover.py, FSDD, 600 files, the speaker backbone): the best
    silhouette picked k = 2 (0.153) over k = 6 (0.153); six speakers."""
    scored: dict[int, float] = {}
    spread: dict[int, float] = {}
    centres_of: dict[int, np.ndarray] = {}
    probe = sample[rng.permutation(len(sample))[:SILHOUETTE_CLIPS]]
    for k in ks:
        centres_of[k] = best_start(sample, k, rng)
        values = silhouettes(probe, nearest(probe, centres_of[k])[0])
        scored[k], spread[k] = float(values.mean()), float(values.std() / np.sqrt(max(1, len(values))))
    top = max(ks, key=lambda k: (scored[k], -k))
    chosen = max(k for k in ks if scored[k] >= scored[top] - spread[top])
    return chosen, centres_of[chosen], scored


def sample_rows(files: list[URI], limit: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``limit`` unit embeddings, the same share of every clip file (read one at a time)."""
    rows = 0
    for u in files:
        with storage.arrow_input(u, whole=False) as f:  # the footer alone
            rows += pq.ParquetFile(f).metadata.num_rows
    share = min(1.0, limit / max(rows, 1))
    parts = []
    for u in files:
        x = _vectors(_read(u))
        take = rng.random(len(x)) < share
        parts.append(x[take] if share < 1 else x)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def partial_sums(files: list[URI], centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """One task of a pass: per group the sum of its clips' unit vectors, their count, and the squared
    distances' sum (the inertia)."""
    sums, counts, inertia = np.zeros_like(centres, np.float64), np.zeros(len(centres), np.int64), 0.0
    for u in files:
        x = _vectors(_read(u))
        best, dist = nearest(x, centres)
        np.add.at(sums, best, x)
        counts += np.bincount(best, minlength=len(centres))
        inertia += float((dist.astype(np.float64) ** 2).sum())
    return sums, counts, inertia


def assignments(files: list[URI], centres: np.ndarray) -> pa.Table:
    """One task of the last pass: the files' clip rows with their group and distance to its centre."""
    out = []
    for u in files:
        t = _read(u)
        best, dist = nearest(_vectors(t), centres)
        out.append(t.select(COLUMNS).append_column("group", pa.array(best, pa.int32()))
                   .append_column("distance", pa.array(dist, pa.float32())).cast(GROUPS_SCHEMA))
    return pa.concat_tables(out) if out else GROUPS_SCHEMA.empty_table()


def _tasks(files: list[URI]) -> list[list[URI]]:
    return [files[i: i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]


def refine(files: list[URI], centres: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Lloyd passes over every clip on Ray (one task per :data:`FILES_PER_TASK` clip files); returns the
    centres, each group's size at the last pass, and the passes made."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(partial_sums)
    counts = np.zeros(len(centres), np.int64)
    for n in range(1, iterations + 1):
        sums, counts = np.zeros_like(centres, np.float64), np.zeros(len(centres), np.int64)
        for s, c, _ in ray.get([task.remote(part, centres) for part in _tasks(files)]):
            sums += s
            counts += c
        new = unit(np.where(counts[:, None] > 0, sums, centres))  # an emptied group keeps its centre
        moved = float(np.abs(new - centres).max())
        centres = new
        if moved < MOVED:
            return centres, counts, n
    return centres, counts, iterations


def assign(files: list[URI], centres: np.ndarray, dest: URI) -> int:
    """The last pass on Ray: every clip's group and distance, written to ``dest`` as one Parquet file,
    streamed (the driver holds one task's rows at a time, the file published whole); returns the rows."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=3)(assignments)
    pending, rows = [task.remote(part, centres) for part in _tasks(files)], 0
    with storage.atomic_open(dest) as f, pq.ParquetWriter(f, GROUPS_SCHEMA, compression="zstd") as w:
        for ref in pending:
            t = ray.get(ref)
            w.write_table(t)
            rows += t.num_rows
    return rows


def group(files: list[URI], k: int, ks: list[int], iterations: int, seed: int) -> Grouping:
    """Centres for the clips of ``files`` (``k`` of them, or the best of ``ks`` by silhouette), refined
    over every clip on Ray, ordered largest group first."""
    rng = np.random.default_rng(seed)
    sample = sample_rows(files, SAMPLE_CLIPS, rng)
    ks = [k] if k else [n for n in ks if n < len(sample)]
    if not ks:
        raise ValueError(f"{len(sample)} clips are too few to group into {k or 'at least 2'} groups")
    if len(ks) == 1:
        centres, scores = best_start(sample, ks[0], rng), {}
    else:
        _, centres, scores = choose_k(sample, ks, rng)
    centres, counts, passes = refine(files, centres, iterations)
    order = np.argsort(-counts, kind="stable")
    how = f"given (--groups {k})" if k else (f"the largest k of {min(ks)}..{max(ks)} within a standard error of the "
                                             f"best silhouette on a sample of {min(len(sample), SILHOUETTE_CLIPS):,} "
                                             "clips")
    return Grouping(centres[order], counts[order].tolist(), how, scores, passes, int(counts.sum()))
