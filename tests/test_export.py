"""melbatch export: one ONNX graph, audio in and probabilities out, that onnxruntime runs without melbatch
and that agrees with melbatch's own predictions, for plain features and with every feature-engineering step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from melbatch.audio.logmel import compute_logmel
from melbatch.cli import commands
from melbatch.config import FeatureConfig
from melbatch.model import export
from melbatch.model import package as mb_model
from melbatch.testing import archives

PLAIN = FeatureConfig(n_mels=64, clip_s=2.0, clip_hop_s=2.0)
ENGINEERED = FeatureConfig(n_mels=64, clip_s=2.0, clip_hop_s=2.0, band_emphasis=((1500.0, 4000.0, 6.0),),
                           compression="pcen", denoise="gate", clip_norm="band_mean")
ROOT = Path(__file__).resolve().parents[1]


def _package(root: Path, cfg: FeatureConfig, norm: dict) -> str:
    """A random-init test_resnet package over ``cfg``; its head scaled so the probabilities spread out
    (a near-uniform output would hide differences)."""
    torch.manual_seed(0)
    m = mb_model.create_model("test_resnet", 3, cfg.shape, pretrained=False).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in mb_model.classifier_names(m):
                p.mul_(8.0)
    mb_model.save_package(str(root), m, {"model_name": "test_resnet", "labels": ["healthy", "faulty", "idle"],
                                         "feature_config": cfg.to_dict(), "config_hash": cfg.hash(),
                                         "normalization": norm})
    return str(root)


def _clips(cfg: FeatureConfig, n: int = 5) -> np.ndarray:
    """Generated machine clips at the package's rate: healthy and faulty, one quiet."""
    rng = np.random.default_rng(3)
    clips = [archives.engine_sound(rng, cfg.clip_s, cfg.sample_rate_hz, faulty=i % 2 == 1) for i in range(n)]
    clips[-1] = clips[-1] * 0.01
    return np.stack(clips).astype(np.float32)


@pytest.mark.parametrize("cfg,norm", [(PLAIN, {"kind": "dataset", "mean": -40.0, "std": 20.0}),
                                      (ENGINEERED, {"kind": "clip"})], ids=["plain", "band-emphasis-pcen-gate"])
def test_the_graph_gives_melbatchs_probabilities_and_images(tmp_path, cfg, norm):
    pkg_uri = _package(tmp_path / "train", cfg, norm)
    dest = tmp_path / "model.onnx"
    assert commands.main(["export", pkg_uri, str(dest)]) == 0
    session = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert inp.name == "audio" and inp.shape[1] == cfg.clip_samples and not isinstance(inp.shape[0], int)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == ["healthy", "faulty", "idle"]
    assert int(meta["sample_rate_hz"]) == cfg.sample_rate_hz and meta["config_hash"] == cfg.hash()

    clips = _clips(cfg)  # a batch of 5: another size than the export traced
    probs, images = session.run(["probabilities", "logmel"], {"audio": clips})
    pkg = mb_model.load_package(pkg_uri)
    want = export.melbatch_probabilities(pkg, clips)
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs, want, atol=1e-3)
    assert want.max(1).min() < 0.99 and np.ptp(want[:, 0]) > 0.05  # informative probabilities, not saturated
    # the image inside the graph is the one featurize and classify make (float16 storage rounding)
    stored = np.stack([compute_logmel(c, cfg) for c in clips]).astype(cfg.dtype).astype(np.float32)
    # at most one float16 step at each value (the graph's float32 sums round the other way at times); near
    # zero, where a band-mean normalised image has values of 1e-4, float32 arithmetic itself (measured 2e-6)
    step = np.maximum(np.spacing(np.abs(stored).astype(np.float16)).astype(np.float32), 1e-5)
    assert np.all(np.abs(images - stored) <= step)


def test_the_docs_example_runs_the_graph_on_a_recording(tmp_path):
    """The export page's onnxruntime example, run as written on a 7-second recording: one line per clip."""
    pkg_uri = _package(tmp_path / "train", PLAIN, {"kind": "dataset", "mean": -40.0, "std": 20.0})
    export.export(pkg_uri, str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(1)
    sf.write(tmp_path / "recording.wav", archives.engine_sound(rng, 7.0, 16_000, faulty=True), 16_000)
    page = (ROOT / "docs" / "commands" / "export.md").read_text()
    code = re.search(r"```python\n(import json, numpy as np, onnxruntime.*?)```", page, re.S)
    assert code, "the export page's onnxruntime example"
    assert len(code.group(1).strip().splitlines()) <= 12
    p = subprocess.run([sys.executable, "-c", code.group(1)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["0.0", "s"]  # 7 s in 2 s clips, the last padded
    assert all(line.split()[2] in ("healthy", "faulty", "idle") for line in lines)


def test_export_of_what_is_not_a_package_fails_with_exit_2(tmp_path, capsys):
    assert commands.main(["export", str(tmp_path / "nothing"), str(tmp_path / "m.onnx")]) == 2
    assert "no model package" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
