"""classify --adapt: a package's normalisation statistics re-estimated on the archive it classifies
(melbatch.model.adapt), kept in OUT/_adapted, reused on resume, refused where it cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melbatch import shards, storage
from melbatch.config import ClassifyConfig, ConfigError, ScanConfig
from melbatch.model import adapt
from melbatch.model.package import Package, load_package, read_package_meta
from melbatch.stages import classify
from melbatch.testing import archives


def test_adapting_sets_every_batchnorm_to_the_samples_statistics_and_leaves_the_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    pkg = Package(net, {"model_id": "net-1", "normalization": {"kind": "dataset", "mean": 0.0, "std": 1.0}})
    sample = np.random.default_rng(0).normal(3.0, 2.0, (96, 16, 20)).astype(np.float32)  # a shifted archive
    new = adapt.adapted(pkg, sample, batch_size=32)
    with torch.no_grad():
        conv = net[0](torch.from_numpy(sample).unsqueeze(1))
    bn = new.model[1]
    assert torch.allclose(bn.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-4)
    assert bn.momentum == net[1].momentum and not bn.training  # restored, in eval mode
    assert torch.equal(net[1].running_mean, torch.zeros(4))  # the package it came from is untouched
    assert torch.equal(new.model[0].weight, net[0].weight) and torch.equal(new.model[5].weight, net[5].weight)
    assert new.meta["adapted"] == {"from_model_id": "net-1", "clips": 96, "statistics": "1 BatchNorm layers"}
    with pytest.raises(ValueError, match="no clips"):
        adapt.adapted(pkg, sample[:0])


@pytest.mark.ray
def test_classify_adapt_classifies_with_a_package_fitted_to_the_archive_and_reuses_it(engine_model, ray_session):
    b = engine_model
    archive = f"{b}/adapt-incoming"
    files = archives.make_archive(archive, "engine", files_per_class=14, seconds=6.0, seed=91)
    cfg = ClassifyConfig(archive=archive, model=f"{b}/model", out=f"{b}/adapt-pred", adapt=True, cpus_per_actor=0.5,
                         max_quarantine_rate=1.0)
    s = classify.run(cfg, progress=False)
    assert s.classified == len(files)
    original = read_package_meta(f"{b}/model")
    made = read_package_meta(f"{b}/adapt-pred/_adapted")
    assert made["adapted"]["from_model_id"] == original["model_id"] != made["model_id"]
    assert made["adapted"]["files"] == len(files) and made["adapted"]["clips"] > 0
    assert made["labels"] == original["labels"] and made["novelty"] == original["novelty"]
    manifest = shards.read_manifest(f"{b}/adapt-pred")
    assert manifest["model_id"] == made["model_id"] and manifest["adapted"]["from_model_id"] == original["model_id"]
    assert {r["model_id"] for r in shards.read_tables(f"{b}/adapt-pred", "files").to_pylist()} == {made["model_id"]}
    before, after = load_package(f"{b}/model").model, load_package(f"{b}/adapt-pred/_adapted").model
    bns = [(x, y) for x, y in zip(adapt.batchnorms(before), adapt.batchnorms(after), strict=True)]
    assert bns and any(not torch.allclose(x.running_mean, y.running_mean) for x, y in bns)
    # the same command again: the adapted package is found and used, not made again
    weights = f"{b}/adapt-pred/_adapted/model/model.safetensors"
    stamp = storage.read_bytes(weights)
    again = classify.run(cfg, progress=False)
    assert again.classified == len(files) and storage.read_bytes(weights) == stamp
    with pytest.raises(ConfigError, match="OUT/_adapted as MODEL"):
        ScanConfig(cfg)


@pytest.mark.ray
def test_classify_adapt_refuses_an_archive_too_small_to_give_statistics(engine_model, ray_session):
    b = engine_model
    archives.make_archive(f"{b}/adapt-few", "engine", files_per_class=2, seconds=4.0, seed=92)
    with pytest.raises(ConfigError, match=f"fewer than {adapt.FEW_CLIPS} clips.*without --adapt"):
        classify.run(ClassifyConfig(archive=f"{b}/adapt-few", model=f"{b}/model", out=f"{b}/adapt-few-pred",
                                    adapt=True), progress=False)
    assert not storage.exists(f"{b}/adapt-few-pred/_adapted/model/model.json")
