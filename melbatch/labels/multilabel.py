"""Several labels at once (birds over rain, a knock over a hum): how a clip's label set is written, and
how a multi-label model is scored.

A clip's labels travel in the shards' ``label`` column as one string, the names sorted and joined by
:data:`SEP` (``"knock;rain"``); the empty string is a clip with none of the labels (a negative for
all). A single-label archive never holds either, so its shards are unchanged.

Scoring (:func:`scores`): per label, average precision over the validation clips (its mean over the
labels with a positive is the macro mAP), and the threshold that maximises the label's F1 there,
with the precision, recall and F1 it gives; overall, the macro F1 at those thresholds and the share
of clips whose whole label set is right (exact match).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SEP = ";"


def split(label: str | None) -> list[str]:
    """The label names in a clip's label string (none for ``""``)."""
    return [s for s in (label or "").split(SEP) if s]


def join(names: Iterable[str]) -> str:
    """One label string for a set of names (sorted, each once)."""
    return SEP.join(sorted(set(names)))


def vocabulary(label_strings: Iterable[str]) -> list[str]:
    """Every label name the strings mention, sorted."""
    return sorted({n for s in label_strings for n in split(s)})


def targets(label_strings: Sequence[str], index: dict[str, int]) -> np.ndarray:
    """``(clips, labels)`` float32 multi-hot targets."""
    y = np.zeros((len(label_strings), len(index)), np.float32)
    for i, s in enumerate(label_strings):
        for n in split(s):
            y[i, index[n]] = 1.0
    return y


def average_precision(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each positive (ties broken by
    rank, as scikit-learn's ``average_precision_score`` does without interpolation); NaN without positives."""
    positives = float(truth.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-score, kind="stable")
    hits = truth[order] > 0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / positives)


def best_threshold(score: np.ndarray, truth: np.ndarray) -> tuple[float, float, float, float]:
    """The threshold on ``score`` with the highest F1 (the midpoint between neighbouring scores, 0.5 when
    the label has no positives), and its (precision, recall, F1)."""
    positives = float(truth.sum())
    if positives == 0:
        return 0.5, 0.0, 0.0, 0.0
    order = np.argsort(-score, kind="stable")
    s, hits = score[order], truth[order] > 0
    tp = np.cumsum(hits)
    k = np.arange(1, len(s) + 1)  # predicting the top k positive
    f1 = 2 * tp / (k + positives)
    last = np.r_[s[1:] != s[:-1], True]  # only cut between different scores
    f1 = np.where(last, f1, -1)
    best = int(np.argmax(f1))
    threshold = float((s[best] + s[best + 1]) / 2) if best + 1 < len(s) else float(s[best]) * 0.999
    return threshold, float(tp[best] / (best + 1)), float(tp[best] / positives), float(f1[best])


def scores(probs: np.ndarray, truth: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Validation metrics of a multi-label model: ``val_map`` (macro mAP over labels with a positive),
    ``macro_f1`` and ``val_accuracy`` (exact match) at the per-label thresholds chosen here, and per label
    its AP, threshold, precision, recall, F1 and support."""
    per_class, chosen = {}, []
    for j, lab in enumerate(labels):
        ap = average_precision(probs[:, j], truth[:, j])
        t, p, r, f = best_threshold(probs[:, j], truth[:, j])
        chosen.append(t)
        per_class[lab] = {"ap": None if np.isnan(ap) else ap, "threshold": t, "precision": p, "recall": r, "f1": f,
                          "support": int(truth[:, j].sum())}
    aps = [c["ap"] for c in per_class.values() if c["ap"] is not None]
    predicted = probs >= np.asarray(chosen)[None, :]
    return {"val_map": float(np.mean(aps)) if aps else 0.0,
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values() if c["support"]] or [0.0])),
            "val_accuracy": float((predicted == (truth > 0)).all(axis=1).mean()) if len(truth) else 0.0,
            "per_class": per_class, "thresholds": dict(zip(labels, chosen, strict=True))}
