"""Spectrogram-level augmentation for training, on batches of (N, 1, n_mels, frames) tensors.

Pure torch, vectorised over the batch, so it runs on the training device: random time crop,
SpecAugment (time and frequency masks, filled with the batch mean, i.e. zero after
normalisation) and mixup (with soft targets).
"""

from __future__ import annotations

import torch


def random_time_crop(x: torch.Tensor, frames: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Crop every image to ``frames`` columns at its own random offset."""
    n, _, _, t = x.shape
    if frames >= t:
        return x
    start = torch.randint(0, t - frames + 1, (n,), generator=gen, device="cpu").to(x.device)
    idx = start[:, None] + torch.arange(frames, device=x.device)[None, :]
    return torch.gather(x, 3, idx[:, None, None, :].expand(n, x.shape[1], x.shape[2], frames))


def _masks(n: int, size: int, count: int, max_width: int, gen: torch.Generator | None,
           device: torch.device) -> torch.Tensor:
    """(n, size) boolean: ``count`` random bands of width 0..max_width per row."""
    out = torch.zeros(n, size, dtype=torch.bool, device=device)
    if count <= 0 or max_width <= 0:
        return out
    pos = torch.arange(size, device=device)[None, :]
    for _ in range(count):
        width = torch.randint(0, max_width + 1, (n, 1), generator=gen).to(device)
        start = (torch.rand(n, 1, generator=gen).to(device) * (size - width + 1)).long()
        out |= (pos >= start) & (pos < start + width)
    return out


def spec_augment(x: torch.Tensor, time_masks: int, time_frac: float, freq_masks: int, freq_frac: float,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) without time warping; masked cells become 0 (the normalised mean)."""
    n, _, f, t = x.shape
    tm = _masks(n, t, time_masks, int(time_frac * t), gen, x.device)
    fm = _masks(n, f, freq_masks, int(freq_frac * f), gen, x.device)
    keep = ~(tm[:, None, None, :] | fm[:, None, :, None])
    return x * keep


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float,
          gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each example with a random partner: x' = λx + (1-λ)x[perm], same for soft targets."""
    if alpha <= 0 or len(x) < 2:
        return x, targets
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    lam = max(lam, 1 - lam)  # keep the original dominant, so the label stays meaningful
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot with label smoothing: (1-ε) on the class, ε/K spread over all."""
    t = torch.full((len(y), num_classes), smoothing / num_classes, device=y.device)
    return t.scatter_(1, y[:, None], 1 - smoothing + smoothing / num_classes)
