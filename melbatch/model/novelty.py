"""'None of these' by distance: how far a clip's embedding lies from everything the model learned.

A top-probability threshold (``classify --unknown-below``) only sees what the model is unsure of; a
sound unlike every label can still get a confident softmax. So a package also stores a class-conditional
Gaussian of its training clips' embeddings (one centre per label, one shared covariance, shrunk towards
its mean variance: Lee et al. 2018's Mahalanobis detector, without input perturbation) and a clip's
distance is its Mahalanobis distance to the nearest centre, a file's the mean over its clips.

:func:`choose` picks the stored rule on the validation files: a file is ``unknown`` when its best
probability is below ``probability_below`` **or** its distance is above ``distance_above``, both set at
one validation quantile so that together they keep :data:`KEEP` of the known files. Either rule alone
misses what the other sees (measured on BirdNET heads, 2026-12-07, files set aside at 95 % of
validation files kept): a digits model against 100 bird recordings, probability 0.74, distance 1.00,
both 1.00; a birds model against 500 spoken digits, probability 0.83, distance 0.00 (bird recordings
are full of quiet clips that lie near a quiet room with one word in it), both 0.79.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KEEP = 0.95  # the share of validation files the stored rule keeps
SHRINK = 0.1  # covariance shrinkage towards its mean variance: 1,024 dimensions from a few hundred clips


@dataclass(frozen=True)
class Novelty:
    """The fitted Gaussian: standardisation (``mean``, ``scale``), one centre per label (rows of
    ``centres``) and the shared precision matrix, all float32 arrays."""

    mean: np.ndarray
    scale: np.ndarray
    centres: np.ndarray
    precision: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "centres": self.centres, "precision": self.precision}

    def distances(self, emb: np.ndarray) -> np.ndarray:
        """Each row's Mahalanobis distance to the nearest centre, float64 ``(n,)``."""
        if not len(emb):
            return np.zeros(0)
        z = (np.asarray(emb, np.float64) - self.mean) / self.scale
        p = self.precision.astype(np.float64)
        d2 = [np.einsum("ij,jk,ik->i", z - c, p, z - c) for c in self.centres.astype(np.float64)]
        return np.sqrt(np.maximum(np.min(d2, axis=0), 0.0))


def fit(x: np.ndarray, y: np.ndarray, labels: int, shrink: float = SHRINK) -> Novelty:
    """The Gaussian of training embeddings ``x`` (n, d) with label indices ``y``; a label without clips
    keeps its centre at the overall mean."""
    x = np.asarray(x, np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    centres = np.stack([z[y == c].mean(0) if (y == c).any() else np.zeros(z.shape[1]) for c in range(labels)])
    r = z - centres[y]
    cov = r.T @ r / max(len(z), 1)
    cov = (1 - shrink) * cov + shrink * (np.trace(cov) / len(cov) + 1e-6) * np.eye(len(cov))
    f32 = np.float32
    return Novelty(mean.astype(f32), scale.astype(f32), centres.astype(f32), np.linalg.inv(cov).astype(f32))


def file_means(uris: list[str], values: np.ndarray) -> dict[str, float]:
    """Per file, the mean of its clips' ``values``."""
    sums: dict[str, tuple[float, int]] = {}
    for u, v in zip(uris, values, strict=True):
        s, n = sums.get(u, (0.0, 0))
        sums[u] = (s + float(v), n + 1)
    return {u: s / n for u, (s, n) in sums.items()}


def choose(confidence: np.ndarray, distance: np.ndarray, keep: float = KEEP) -> dict[str, Any]:
    """The stored rule from the validation files' best probabilities and distances (same order): the
    distance alone at ``keep``, and both rules at the one quantile ``q`` (searched from ``keep`` up) at
    which together they still keep ``keep`` of the files."""
    confidence, distance = np.asarray(confidence, np.float64), np.asarray(distance, np.float64)
    rule: dict[str, Any] = {"keep": keep, "files": len(distance),
                            "distance_alone_above": float(np.quantile(distance, keep)) if len(distance) else 0.0,
                            "probability_alone_below": float(np.quantile(confidence, 1 - keep)) if len(distance)
                            else 0.0}
    for q in np.arange(keep, 1.0, 0.0025):
        below, above = float(np.quantile(confidence, 1 - q)), float(np.quantile(distance, q))
        kept = float(np.mean((confidence >= below) & (distance <= above)))
        if kept >= keep:
            return {**rule, "quantile": round(float(q), 4), "probability_below": below, "distance_above": above,
                    "kept": kept}
    return {**rule, "quantile": 1.0, "probability_below": float(confidence.min()),
            "distance_above": float(distance.max()), "kept": 1.0}


def unknown(confidence: np.ndarray, distance: np.ndarray, rule: dict[str, Any], use: str = "both") -> np.ndarray:
    """Which files the stored rule calls ``unknown`` (bool per file): by ``both`` thresholds (the rule),
    or by the ``probability`` or the ``distance`` alone at its own :data:`KEEP` threshold."""
    confidence, distance = np.asarray(confidence), np.asarray(distance)
    if use == "probability":
        return confidence < rule["probability_alone_below"]
    if use == "distance":
        return distance > rule["distance_alone_above"]
    return (confidence < rule["probability_below"]) | (distance > rule["distance_above"])


__all__ = ["KEEP", "Novelty", "choose", "file_means", "fit", "unknown"]
