"""A model package as one ONNX graph: mono audio in, class probabilities out, the log-mel inside.

:class:`Portable` chains what classify does to a clip: :func:`~melbatch.audio.logmel.logmel_tensor`
(its portable form: the STFT as a convolution, PCEN's smoother as a product; every feature-engineering
step of the package's config), the storage dtype's rounding (classify feeds the model float16 images
by default), the package's normalisation, the model and its output activation. :func:`export` traces
it into ONNX with a dynamic batch, records labels and features in the graph's metadata, and checks
the graph with onnxruntime against melbatch's own predictions before writing it.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from melbatch import URI, storage
from melbatch.audio.logmel import compute_logmel, logmel_tensor
from melbatch.config import ConfigError
from melbatch.model.package import Package, load_package, normalize, predict, probabilities, read_package_meta

OPSET = 17
INPUT, OUTPUTS = "audio", ("probabilities", "logmel")
TOLERANCE = 1e-3  # the largest difference of a probability from melbatch's own that export accepts


class Portable(torch.nn.Module):
    """``audio (batch, clip_samples)`` float32 at the package's rate → ``(probabilities (batch, labels),
    logmel (batch, n_mels, n_frames))``, as classify computes them for a full clip (a padded clip's extra
    views, :data:`melbatch.model.package.VIEW_SHIFT_S`, are the caller's: the graph sees one window)."""

    def __init__(self, pkg: Package) -> None:
        super().__init__()
        self.model, self.meta, self.cfg = pkg.model.eval(), pkg.meta, pkg.features

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = logmel_tensor(audio, self.cfg, portable=True).to(getattr(torch, self.cfg.dtype)).float()
        logits = self.model(normalize(image.unsqueeze(1), self.meta["normalization"]))
        return probabilities(logits, self.meta), image


@dataclass(frozen=True)
class Exported:
    uri: URI
    bytes: int
    labels: list[str]
    sample_rate_hz: int
    clip_samples: int
    max_difference: float  # largest |probability - melbatch's| on the check clips

    def render(self) -> str:
        seconds = self.clip_samples / self.sample_rate_hz
        return (f"wrote {self.uri} ({self.bytes / 1e6:.1f} MB, ONNX opset {OPSET}): input '{INPUT}' float32 "
                f"[batch, {self.clip_samples}] (mono, {self.sample_rate_hz} Hz, {seconds:g} s clips), outputs "
                f"'probabilities' [batch, {len(self.labels)}] and 'logmel'; labels {self.labels}; "
                f"checked with onnxruntime: largest difference from melbatch's probabilities {self.max_difference:.1e}")


def check_clips(clip_samples: int, sample_rate_hz: int, n: int = 3) -> np.ndarray:
    """Clips to compare the graph with melbatch on: tones, noise and a chirp, seeded."""
    rng = np.random.default_rng(0)
    t = np.arange(clip_samples) / sample_rate_hz
    chirp = np.sin(2 * np.pi * (200 + 0.25 * sample_rate_hz * t / t[-1]) * t)
    clips = [0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(clip_samples),
             0.2 * rng.standard_normal(clip_samples), 0.4 * chirp]
    return np.asarray(clips[:n], np.float32)


def melbatch_probabilities(pkg: Package, clips: np.ndarray) -> np.ndarray:
    """What classify gives for these clips: each clip's image in the storage dtype, then :func:`predict`."""
    images = np.stack([compute_logmel(c, pkg.features) for c in clips]).astype(pkg.features.dtype)
    return predict(pkg, images)[0]


def export(model: URI, dest: URI) -> Exported:
    """Write the package at ``model`` to ``dest`` as ONNX, checked with onnxruntime first."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError(f"melbatch export needs the onnx and onnxruntime packages ({e.name} is missing): "
                          "pip install 'melbatch[onnx]' (make setup installs them)") from None
    meta = read_package_meta(model)
    if bb := meta.get("backbone"):
        raise ConfigError(f"{model} is a head on the {bb['name']} audio backbone, which melbatch cannot export to "
                          "ONNX (BirdNET is a TFLite graph, the speaker encoder is not part of melbatch). Use it "
                          "with melbatch classify/scan, or train with --backbone imagenet for a model that exports")
    pkg = load_package(model)
    cfg = pkg.features
    module = Portable(pkg).eval()
    clips = check_clips(cfg.clip_samples, cfg.sample_rate_hz)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module, (torch.from_numpy(clips),), buf, input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)}, opset_version=OPSET,
                          dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(graph, {
        "labels": json.dumps(pkg.labels), "sample_rate_hz": str(cfg.sample_rate_hz),
        "clip_samples": str(cfg.clip_samples), "feature_config": cfg.canonical_json(),
        "config_hash": pkg.meta["config_hash"], "model_id": pkg.meta["model_id"],
        "model_name": pkg.meta["model_name"], "producer": "melbatch export"})
    data = graph.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {INPUT: clips})[0]
    diff = float(np.abs(got - melbatch_probabilities(pkg, clips)).max())
    if not diff <= TOLERANCE:
        raise RuntimeError(f"the ONNX graph's probabilities differ from melbatch's by {diff:.2e} (> {TOLERANCE}) on "
                           "the check clips; nothing was written. Please report it with the model's name and features")
    storage.write_bytes(dest, data)
    return Exported(dest, len(data), pkg.labels, cfg.sample_rate_hz, cfg.clip_samples, diff)
