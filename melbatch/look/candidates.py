"""Which classified clips are worth a person's time: rank them by a strategy, take them under caps.

Pure arithmetic on a classify clip table (no storage, no model): ``melbatch review`` builds its page
from it and the classify report marks the same clips on its archive map.

- ``uncertainty``: the lowest top probability first;
- ``margin``: the smallest gap between the two best labels first;
- ``disagreement``: only clips whose label differs from their file's verdict (or from the file's known
  label), the most confident first (a confident clip against its file is a mistake or another sound);
- ``random``: a seeded control sample.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from melbatch import URI
from melbatch.config import ConfigError


def rank(t: pa.Table, verdicts: dict[URI, str], strategy: str, known: dict[URI, str] | None = None,
         seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Indices of the candidate clips of a classify clip table ``t`` (its ``uri``, ``clip_index``,
    ``label`` and ``top_probabilities``), most worth a person's time first, and per clip the reason
    (its number under the strategy). ``verdicts`` is each file's predicted label, ``known`` its true
    one where known. Ties go by (uri, clip_index), so a ranking is the same every time."""
    top = np.asarray(t.column("top_probabilities").combine_chunks().flatten()).reshape(t.num_rows, -1)
    p1 = top[:, 0].astype(np.float64)
    p2 = top[:, 1].astype(np.float64) if top.shape[1] > 1 else np.zeros(t.num_rows)
    uris, labels = t.column("uri").to_pylist(), t.column("label").to_pylist()
    keep = np.ones(t.num_rows, bool)
    if strategy == "uncertainty":
        key, why = p1, [f"top probability {p:.3f}" for p in p1]
    elif strategy == "margin":
        key, why = p1 - p2, [f"margin {a - b:.3f} between the top two" for a, b in zip(p1, p2, strict=True)]
    elif strategy == "disagreement":
        ref = [(known or {}).get(u) or verdicts[u] for u in uris]
        keep = np.array([a != b for a, b in zip(labels, ref, strict=True)], bool)
        whose = ["known label" if known and u in known else "file verdict" for u in uris]
        key, why = -p1, [f"clip says {a} ({p:.3f}), {w} {b}" for a, p, w, b in zip(labels, p1, whose, ref,
                                                                                  strict=True)]
    elif strategy == "random":
        key, why = np.random.default_rng(seed).permutation(t.num_rows).astype(np.float64), ["random"] * t.num_rows
    else:
        raise ConfigError(f"unknown review strategy {strategy!r}")
    place = {u: i for i, u in enumerate(sorted(set(uris)))}
    order = np.lexsort((np.asarray(t.column("clip_index")), np.array([place[u] for u in uris]), key))
    return order[keep[order]], why


def select(labels: list[str], order: np.ndarray, count: int, per_label: int) -> list[int]:
    """The first ``count`` clips of ``order``, at most ``per_label`` (0: any number) of each predicted label."""
    taken: Counter = Counter()
    out = []
    for i in order.tolist():
        if per_label and taken[labels[i]] >= per_label:
            continue
        taken[labels[i]] += 1
        out.append(i)
        if len(out) == count:
            break
    return out


