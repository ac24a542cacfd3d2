"""melbatch discover: k-means on Ray that finds what is there, a page that names whole groups, and the
loop back to training: discover → labels.csv (typed in headless Chromium) → featurize → train."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FAST, HOSTILE_KEY, HOSTILE_LABEL, MILD_FIELD
from test_review import label_in_chromium

from melbatch import storage
from melbatch.config import ConfigError, DiscoverConfig, FeaturizeConfig, TrainConfig
from melbatch.labels.sources import REVIEWED_COLUMNS, read_reviewed
from melbatch.look import discover
from melbatch.stages import featurize, grouping
from melbatch.testing import archives
from melbatch.train import driver


def _blobs(rng: np.random.Generator, k: int, per: int, dim: int = 32, spread: float = 0.15):
    centres = grouping.unit(rng.normal(size=(k, dim)))
    truth = np.repeat(np.arange(k), per)
    return grouping.unit(centres[truth] + spread * rng.normal(size=(k * per, dim))), truth


def test_the_silhouette_is_sklearns_and_picks_the_number_of_groups_there_are():
    """The silhouette is Rousseeuw's (sklearn's value to 1e-5), and choose_k finds 4 blobs among 2..7,
    the groups it makes pure; on one blob with no structure no k scores high."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(3)
    x, truth = _blobs(rng, 4, 80)
    k, centres, scores = grouping.choose_k(x, list(range(2, 8)), rng)
    assert k == 4 and max(scores, key=scores.get) == 4
    got = grouping.nearest(x, centres)[0]
    assert abs(grouping.silhouette(x, got) - silhouette_score(x, got)) < 1e-5
    assert all(len(set(truth[got == g])) == 1 for g in range(4))  # every group one blob
    noise = grouping.unit(rng.normal(size=(300, 32)))
    _, _, flat = grouping.choose_k(noise, [2, 3, 4], rng)
    assert max(flat.values()) < 0.1 < scores[4]


def test_a_sample_takes_files_from_every_folder_in_turn(tmp_path):
    for site, n in (("site-a", 12), ("site-b", 3), ("site-c/2024-06-01", 5)):
        (tmp_path / site).mkdir(parents=True)
        for i in range(n):
            (tmp_path / site / f"{i:02d}.wav").write_bytes(b"RIFF")
    cfg = DiscoverConfig(archive=str(tmp_path), out=str(tmp_path / "out"), sample=9)
    taken = Counter(r.uri.rsplit("/", 1)[0].rsplit("/", 1)[-1] for r in discover.objects(cfg))
    assert taken == {"site-a": 3, "site-b": 3, "2024-06-01": 3}
    assert discover.objects(cfg) == discover.objects(cfg)  # seeded
    assert len(discover.objects(DiscoverConfig(archive=str(tmp_path), out=str(tmp_path / "o")))) == 20
    with pytest.raises(ConfigError, match="min_groups"):
        DiscoverConfig(archive="a", out="b", min_groups=5, max_groups=3)



@pytest.mark.slow
@pytest.mark.ray
def test_discover_groups_an_unlabelled_archive_and_its_labels_train_a_model(ray_session, tmp_path):
    """An archive of two engine sounds, labels hidden (the folders say nothing to discover), one file under
    a hostile key and folder: discover's ImageNet embeddings put the two sounds in two pure groups on Ray; the page
    shows and plays every clip it draws, escapes the folder and key, and its group boxes (one typed as a hostile
    label) write labels.csv; featurize reads it as its label manifest and train learns the two sounds
    (validation accuracy >= 0.8 on held-out files)."""
    archive = tmp_path / "archive"
    files = archives.make_archive(str(archive), "engine", files_per_class=20, seconds=4.0, seed=7)
    truth = {f.uri: f.label for f in files}
    for i, f in enumerate(files):  # hide the labels: every file in one folder, under a neutral name
        (archive / "field" / "recorder-1").mkdir(parents=True, exist_ok=True)
        name = f"rec{(i * 7919) % 1000:03d}_20240601_{i % 24:02d}1500.{f.uri.rsplit('.', 1)[-1]}"
        shutil.move(f.uri.removeprefix("file://"), archive / "field" / "recorder-1" / name)
        truth[storage.canonical(str(archive / "field" / "recorder-1" / name))] = truth.pop(f.uri)
    hostile = archive / "field" / HOSTILE_LABEL / HOSTILE_KEY  # a folder the page lists, a key it may show
    hostile.parent.mkdir()
    first = next(iter(truth))
    shutil.copy(first.removeprefix("file://"), hostile)
    truth[storage.canonical(str(hostile))] = truth[first]
    shutil.rmtree(archive / "healthy")
    shutil.rmtree(archive / "faulty")

    out = tmp_path / "out"
    summary = discover.run(DiscoverConfig(archive=str(archive), out=str(out), groups=2, shown=3), progress=False)
    dest = out / "discover"
    rows = pq.read_table(dest / "groups.parquet").to_pylist()
    assert summary.clips == len(rows) == len(truth) and summary.k == 2 and sum(summary.sizes) == len(rows)
    assert [set(r) for r in rows[:1]] == [set(grouping.GROUPS_SCHEMA.names)]
    per_group = [Counter(truth[r["uri"]] for r in rows if r["group"] == g) for g in range(2)]
    purity = sum(c.most_common(1)[0][1] for c in per_group) / len(rows)
    assert purity >= 0.9, per_group  # measured: 1.0
    assert [sum(c.values()) for c in per_group] == summary.sizes == sorted(summary.sizes, reverse=True)
    saved = json.loads((dest / "summary.json").read_text())
    assert saved["k"] == 2 and saved["sizes"] == summary.sizes and saved["clips"] == len(rows)

    majority = [c.most_common(1)[0][0] for c in per_group]
    typed = [HOSTILE_LABEL if majority[0] == "healthy" else majority[0], majority[1]]
    # each group's box typed, and the first clip's box set to skip
    seen = label_in_chromium(dest / "index.html", f"""const groups = {json.dumps(typed)};
  [...d.querySelectorAll('input.group')].forEach((b, i) => {{
    b.value = groups[i]; b.dispatchEvent(new w.Event('input'));
  }});
  const first = d.querySelector('input.clip'); first.value = 'skip'; first.dispatchEvent(new w.Event('input'));""",
                             tmp_path)
    assert seen["images"] == len(seen["durations"]) >= 6 and seen["broken"] == 0
    assert all(d > 0 for d in seen["durations"]), seen["durations"]  # every clip plays
    assert seen["injected"] == 0 and seen["scripts"] == 2 and f"field/{HOSTILE_LABEL} (1)" in seen["text"]

    (tmp_path / "labels.csv").write_text(seen["csv"])
    assert next(csv.reader(io.StringIO(seen["csv"]))) == list(REVIEWED_COLUMNS)
    got, _ = read_reviewed(str(tmp_path / "labels.csv"))
    cut = saved["label_within"]["distance"]
    inside = [r for r in rows if r["distance"] <= cut[r["group"]]]
    assert len(got) == len(inside) - 1  # the first clip shown was skipped
    assert seen["filled"] == f"{len(got)} of {len(rows)} clips labelled"
    assert {g.label for g in got} == set(typed)
    wrong = sum((g.label == HOSTILE_LABEL and truth[g.uri] != "healthy") or (g.label != HOSTILE_LABEL and
                                                                             g.label != truth[g.uri]) for g in got)
    assert wrong <= len(got) // 10

    features = tmp_path / "features"
    fs = featurize.run(FeaturizeConfig(src=str(archive), dst=str(features), features=FAST,
                                       labels=str(tmp_path / "labels.csv")), progress=False)
    assert fs.featurized == len({g.uri for g in got}) and fs.quarantine_kinds == {
        "unlabelled": len(truth) - fs.featurized}
    m = driver.run(TrainConfig(shards=str(features), out=str(tmp_path / "model"), model="test_resnet",
                               pretrained=False, epochs=6, batch_size=8, workers=1, cpus_per_worker=0.5, lr=3e-3,
                               augment=MILD_FIELD), progress=False)
    assert m["val_accuracy"] >= 0.8, m["epochs"]
