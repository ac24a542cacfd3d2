"""Band means: a model with almost nothing inside, registered with timm as ``melbatch_band_means``.

Each clip's image becomes its mean over time in each of :data:`BANDS` bands (the mel bands averaged
down to :data:`BANDS`), and one linear layer maps those numbers to the labels: what a clip's average
spectrum says, with no shapes in time or frequency. Its forward pass is one addition per pixel
(~6x10^4 for a default 128 x 501 image, against ~2x10^9 multiply-adds for resnet18 and ~5x10^8 for
efficientnet_lite0: their published counts at 224 x 224, scaled by the pixels); measured on one
thread of this project's CPUs, ~100,000 images/s (64 a call), against 49 for timm's test_resnet and
15 for resnet18 (a standard deviation per band as well cost 25x more: 3,900 images/s). So it is

- **the instant model** of the benchmarks: classify or train with it shows what the pipeline around a
  model can feed, the share of the CPUs that reaches the model (``make bench-classify``,
  ``make bench-train``);
- **a floor** for a trained network: ``melbatch train SHARDS OUT --model melbatch_band_means
  --no-pretrained``. A network that does not beat it by a margin is telling the labels apart by
  loudness or spectrum alone.

It has no ImageNet weights (train it with ``--no-pretrained``). Importing this module registers it;
:func:`melbatch.model.package.create_model` does so before it asks timm for a model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from timm.models import register_model

BANDS = 32  # the mel bands are averaged down to this many, so the head's size does not depend on n_mels


class BandMeans(torch.nn.Module):
    """Per band: the mean over time, then a linear head (timm's interface:
    ``forward_features``, ``forward_head(pre_logits=...)``, ``num_features``, ``num_classes``)."""

    default_cfg: ClassVar[dict[str, Any]] = {"classifier": "head"}  # what timm's models say of their head

    def __init__(self, num_classes: int = 1000, in_chans: int = 1, **_: Any) -> None:
        super().__init__()
        self.num_classes, self.num_features = num_classes, BANDS * in_chans
        self.head = torch.nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool1d(x.mean(dim=-1), BANDS).flatten(1)  # (N, C x BANDS)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> torch.nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, *_: Any, **__: Any) -> None:
        self.num_classes = num_classes
        self.head = torch.nn.Linear(self.num_features, num_classes)


@register_model
def melbatch_band_means(pretrained: bool = False, **kwargs: Any) -> BandMeans:
    """timm's entry point (``timm.create_model("melbatch_band_means", num_classes=..., in_chans=1)``)."""
    if pretrained:
        raise ValueError("melbatch_band_means has no pretrained weights: train it with --no-pretrained")
    return BandMeans(**{k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans")})
