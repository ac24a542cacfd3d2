"""A head on a frozen audio backbone's embeddings (:mod:`melbatch.model.backbones`): the embeddings
standardised with the training clips' mean and spread, then one linear layer, i.e. multinomial
logistic regression. Fitted full-batch by L-BFGS with an L2 penalty as scikit-learn's
``LogisticRegression(C=1)`` sets it (``||W||^2 / 2C`` against the summed loss), class-weighted: a few
seconds for thousands of clips on one CPU, where fine-tuning a network takes minutes to hours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Head(torch.nn.Module):
    """Standardise, then a linear layer: embeddings ``(n, dim)`` → logits ``(n, labels)``."""

    def __init__(self, dim: int, labels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = torch.nn.Linear(dim, labels)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear((emb - self.mean) / self.std)


def fit_head(x: np.ndarray, y: np.ndarray, labels: int, class_weights: np.ndarray | None = None,
             c: float = 1.0, iterations: int = 300) -> Head:
    """A :class:`Head` fitted to embeddings ``x`` (n, dim) and label indices ``y`` (n,); ``class_weights``
    per label (default: each label's clips weigh as much in total as any other's)."""
    xt = torch.as_tensor(np.array(x, np.float32))
    yt = torch.as_tensor(np.array(y, np.int64))
    if class_weights is None:
        counts = np.bincount(np.asarray(y), minlength=labels).astype(np.float64)
        class_weights = np.where(counts > 0, len(y) / (labels * np.maximum(counts, 1)), 0.0)
    w = torch.as_tensor(np.array(class_weights, np.float32))[yt]
    head = Head(xt.shape[1], labels)
    head.mean.copy_(xt.mean(0))
    head.std.copy_(xt.std(0, unbiased=False).clamp_min(1e-6))
    z = (xt - head.mean) / head.std
    lin = head.linear
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = torch.nn.functional.cross_entropy(lin(z), yt, reduction="none")
        loss = (w * nll).sum() + lin.weight.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return head.eval()


def probabilities_of(head: Head, x: np.ndarray) -> np.ndarray:
    """The head's class probabilities (softmax, T = 1) for embeddings ``x``."""
    with torch.inference_mode():
        return torch.softmax(head(torch.as_tensor(np.array(x, np.float32))), dim=1).numpy()


def pseudo_labels(probs: np.ndarray, keep: float) -> tuple[np.ndarray, np.ndarray]:
    """Which unlabelled clips to take, and their labels: per predicted label its most confident clips, at
    most ``keep`` times an equal share of the clips (``keep * n / labels``), so no label swallows the
    archive however many clips the model gives it (per-label thresholds, class balance)."""
    labels, conf = probs.argmax(1), probs.max(1)
    cap = max(1, int(np.ceil(keep * len(probs) / probs.shape[1])))
    take = np.zeros(len(probs), bool)
    for c in range(probs.shape[1]):
        mine = np.flatnonzero(labels == c)
        take[mine[np.argsort(-conf[mine], kind="stable")[:cap]]] = True
    return take, labels


def self_train(x: np.ndarray, y: np.ndarray, unlabelled: np.ndarray, labels: int, rounds: int, keep: float,
               score: Any = None) -> tuple[Head, list[dict[str, Any]]]:
    """Self-training (a noisy-student round without the noise: the embeddings are frozen): fit on the
    labelled clips, label the unlabelled ones, keep the confident ones (:func:`pseudo_labels`), fit again
    on both; ``rounds`` times. Returns the last head and, per round, the clips taken per label, their
    agreement with the round before, and ``score(head)``'s dict (e.g. validation accuracy)."""
    head = fit_head(x, y, labels)
    log: list[dict[str, Any]] = []
    before = None
    for r in range(rounds):
        take, pseudo = pseudo_labels(probabilities_of(head, unlabelled), keep)
        agree = None if before is None else float((pseudo == before).mean())
        head = fit_head(np.concatenate([x, unlabelled[take]]), np.concatenate([y, pseudo[take]]), labels)
        log.append({"round": r + 1, "taken": int(take.sum()), "of": len(unlabelled),
                    "per_label": np.bincount(pseudo[take], minlength=labels).tolist(),
                    "agreement_with_previous": agree, **(score(head) if score else {})})
        before = pseudo
    return head, log
