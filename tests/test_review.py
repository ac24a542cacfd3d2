"""melbatch review: the chosen clips are exactly the strategy's, the page opens in headless Chromium
with every picture and every clip's audio playable (of the clip's length), a reviewer's answers
saved by the page's own button read back as labelled clips, and train --extra-labels trains on
exactly those labels (what its workers counted)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HOSTILE_KEY, HOSTILE_LABEL
from test_report import chromium_result, open_in_chromium

from melbatch import ledger as mb_ledger
from melbatch import storage
from melbatch.audio.decode import decode_all
from melbatch.cli import commands
from melbatch.config import ClassifyConfig, ConfigError, FeatureConfig, ReviewConfig, ScanConfig, SimilarConfig
from melbatch.labels.sources import REVIEWED_COLUMNS, read_reviewed
from melbatch.look import pictures, report, review, similar
from melbatch.model.package import read_package_meta
from melbatch.shards import (
    clip_prediction_schema,
    embedding_matrix,
    read_manifest,
    read_tables,
    shard_uris,
    write_table,
)
from melbatch.stages import detections, scan
from melbatch.testing import archives
from melbatch.train import driver

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def expected(out: str, archive: str, strategy: str, count: int, per_label: int, known: bool, seed: int) -> list:
    """The strategy's clips, computed here from the stored probabilities."""
    clips = read_tables(out, "clips").to_pylist()
    verdict = {f["uri"]: f["label"] for f in read_tables(out, "files").to_pylist()}
    folder = {u: storage.relative(u, archive).split("/")[0] for u in verdict}
    p1 = [c["top_probabilities"][0] for c in clips]
    tie = [(c["uri"], c["clip_index"]) for c in clips]
    if strategy == "uncertainty":
        keys = [(p, *t) for p, t in zip(p1, tie, strict=True)]
        keep = [True] * len(clips)
    elif strategy == "margin":
        keys = [(c["top_probabilities"][0] - c["top_probabilities"][1], *t) for c, t in zip(clips, tie, strict=True)]
        keep = [True] * len(clips)
    elif strategy == "disagreement":
        ref = [(folder if known else verdict)[c["uri"]] for c in clips]
        keys = [(-p, *t) for p, t in zip(p1, tie, strict=True)]
        keep = [c["label"] != r for c, r in zip(clips, ref, strict=True)]
    else:
        perm = np.random.default_rng(seed).permutation(len(clips))
        keys = [(float(perm[i]), *tie[i]) for i in range(len(clips))]
        keep = [True] * len(clips)
    order = sorted((i for i in range(len(clips)) if keep[i]), key=lambda i: keys[i])
    taken, out_rows = Counter(), []
    for i in order:
        if taken[clips[i]["label"]] < per_label:
            taken[clips[i]["label"]] += 1
            out_rows.append(tie[i])
    return out_rows[:count]


def chosen(dest: Path) -> list[tuple[str, int]]:
    rows = list(csv.DictReader(io.StringIO((dest / "labels.csv").read_text())))
    assert all(r["label"] == "" for r in rows)
    return [(r["uri"], int(r["clip_index"])) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,known", [("uncertainty", False), ("margin", False), ("disagreement", False),
                                            ("disagreement", True), ("random", False)])
def test_review_picks_exactly_the_clips_its_strategy_defines(review_predictions, tmp_path, strategy, known):
    _, archive, out, _ = review_predictions
    dest = tmp_path / "review"
    summary = review.run(ReviewConfig(out=out, strategy=strategy, count=5, per_label=3,
                                      labels="folder" if known else None, seed=7, dest=str(dest)))
    want = expected(out, archive, strategy, 5, 3, known, 7)
    assert chosen(dest) == want and summary.chosen == len(want) and summary.unreadable == 0
    if strategy == "disagreement" and known:  # the hostile folder is nobody's verdict: its clips disagree
        assert any(HOSTILE_LABEL in u for u, _ in want)
    if strategy != "disagreement":
        assert len(want) == 5


LABEL_PAGE = """<!DOCTYPE html><html><body><iframe id="f" src="{src}"></iframe><script>
const f = document.getElementById('f');
f.onload = async () => {{
  const w = f.contentWindow, d = f.contentDocument;
  const imgs = [...d.images];
  const audios = [...d.querySelectorAll('audio')];
  const durations = await Promise.all(audios.map(a => a.readyState >= 1 ? a.duration : new Promise(ok => {{
    a.addEventListener('loadedmetadata', () => ok(a.duration)); a.addEventListener('error', () => ok(-1)); a.load();
  }})));
  {fill}
  let csv = null;
  w.HTMLAnchorElement.prototype.click = function () {{
    fetch(this.href).then(r => r.text()).then(t => {{ csv = t; }});
  }};
  d.getElementById('save').click();
  while (csv === null) await new Promise(ok => setTimeout(ok, 50));
  const res = {{images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    durations, injected: d.querySelectorAll('[onerror],[onclick]').length, scripts: d.querySelectorAll('script').length,
    filled: d.getElementById('filled').textContent, csv, text: d.body.innerText}};
  const pre = document.createElement('pre'); pre.id = 'result'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
}};
</script></body></html>"""


def label_in_chromium(page: Path, fill: str, tmp: Path) -> dict:
    """What headless Chromium sees on a labelling page (review's or discover's, file://) once the
    JavaScript ``fill`` has typed into its boxes (``d``: the page's document, ``w``: its window) and
    its save button was clicked: images and broken ones, each clip's playable duration, injected
    handlers, scripts, the counter, the CSV it saved and the page's text."""
    check = tmp / f"label-{abs(hash(str(page)))}.html"
    check.write_text(LABEL_PAGE.format(src=page.resolve().as_uri(), fill=fill))
    return chromium_result(check, budget_ms=30_000, autoplay=True)


@pytest.mark.slow
def test_the_page_shows_and_plays_every_clip_and_saves_the_answers(review_predictions, tmp_path):
    out = review_predictions[2]
    dest = tmp_path / "review"
    review.run(ReviewConfig(out=out, strategy="disagreement", count=40, labels="folder", dest=str(dest)))
    rows = list(csv.DictReader(io.StringIO((dest / "labels.csv").read_text())))
    hostile = [r for r in rows if HOSTILE_LABEL in r["uri"]]
    assert hostile and len(rows) >= 2
    answers = ["faulty", HOSTILE_LABEL, "skip", ""]
    seen = label_in_chromium(dest / "index.html", f"""const answers = {json.dumps(answers)};
  [...d.querySelectorAll('input[data-row]')].forEach((b, i) => {{
    b.value = answers[i % answers.length]; b.dispatchEvent(new w.Event('input'));
  }});""", tmp_path)
    assert seen["images"] == len(rows) and seen["broken"] == 0
    lengths = [float(r["end_s"]) - float(r["start_s"]) for r in rows]
    assert len(seen["durations"]) == len(rows)
    assert all(abs(d - n) < 0.05 for d, n in zip(seen["durations"], lengths, strict=True)), (seen["durations"], lengths)
    assert seen["injected"] == 0 and seen["scripts"] == 2 and HOSTILE_KEY in seen["text"]
    answered = sum(answers[i % 4] not in ("skip", "") for i in range(len(rows)))
    assert seen["filled"] == f"{answered} of {len(rows)} labelled"
    saved = tmp_path / "labels.csv"
    saved.write_text(seen["csv"])
    got, skipped = read_reviewed(str(saved))
    assert skipped == len(rows) - answered and len(got) == answered
    assert [(g.uri, g.clip_index, g.label) for g in got] == [
        (r["uri"], int(r["clip_index"]), answers[i % 4]) for i, r in enumerate(rows) if answers[i % 4] not in
        ("skip", "")]
    assert next(csv.reader(io.StringIO(seen["csv"]))) == list(REVIEWED_COLUMNS)


def test_review_refuses_what_is_not_a_prediction_output(tmp_path, capsys):
    assert commands.main(["review", str(tmp_path)]) == 2
    assert "neither a finished classify output" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="count=0"):
        ReviewConfig(out=str(tmp_path), count=0)


@pytest.mark.slow
def test_reviewed_labels_are_what_the_trainer_saw(review_predictions, engine_training, tmp_path):
    b, _, out, _ = review_predictions
    _, base, _, _ = engine_training
    dest = tmp_path / "review"
    review.run(ReviewConfig(out=out, strategy="uncertainty", count=6, dest=str(dest)))
    rows = list(csv.DictReader(io.StringIO((dest / "labels.csv").read_text())))
    # the reviewer: clips of new files become "knocking" (a new label), one faulty; one is skipped
    answers = ["knocking", "knocking", "faulty", "skip", "knocking", ""]
    for r, a in zip(rows, answers, strict=False):
        r["label"] = a
    # and corrections of clips in the shards: the first clip of two training files and one validation file
    split = dict(csv.reader(io.StringIO(storage.read_bytes(f"{base.out}/split.csv").decode())))
    shards = [row for u in shard_uris(base.shards, read_manifest(base.shards)) for row in pq.read_table(
        io.BytesIO(storage.read_bytes(u)), columns=["uri", "label", "clip_index", "start_s", "end_s"]).to_pylist()]
    first = {r["uri"]: r for r in shards if r["clip_index"] == 0}
    train_files = sorted(u for u in first if split.get(u) == "train")[:2]
    val_file = next(u for u in sorted(first) if split.get(u) == "val")
    flip = {"healthy": "faulty", "faulty": "healthy"}
    for u in [*train_files, val_file]:
        r = first[u]
        rows.append({"uri": u, "clip_index": 0, "start_s": r["start_s"], "end_s": r["end_s"], "predicted": "",
                     "probability": "", "label": flip[r["label"]]})
    labels_csv = tmp_path / "labels.csv"
    with labels_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REVIEWED_COLUMNS)
        w.writeheader()
        w.writerows(rows)

    cfg = dataclasses.replace(base, out=f"{b}/review-train", epochs=1, workers=1, cpus_per_worker=0.5, batch_size=4,
                  min_batch_size=4, extra_labels=str(labels_csv))
    m = driver.run(cfg, progress=False)
    r = m["extra_labels"]
    assert (r["answered"], r["skipped"], r["corrected"], r["confirmed"]) == (7, 2, 2, 0)
    assert r["in_validation_not_applied"] == 1 and r["added"] == 4
    assert r["added_per_label"] == {"faulty": 1, "knocking": 3}
    assert m["labels"] == ["faulty", "healthy", "knocking"]
    # what the workers counted in the epoch: the shards' training clips under the reviewer's labels, plus the added
    counts = Counter(s["label"] for s in shards if split.get(s["uri"]) == "train")
    for u in train_files:
        counts[first[u]["label"]] -= 1
        counts[flip[first[u]["label"]]] += 1
    counts.update({"faulty": 1, "knocking": 3})
    seen = m["epochs"][0]["train_clips_per_label"]
    total = sum(counts.values())
    short = total % 4 == 1  # a last batch of one clip is skipped (batch norm needs two)
    assert sum(seen.values()) == total - short, (seen, counts)
    assert all(abs(seen[k] - counts[k]) <= short for k in counts), (seen, counts)
    meta = read_package_meta(f"{b}/review-train")
    assert meta["extra_labels"] == r and meta["labels"] == m["labels"]


# ------------------------------------------------------------------------------------- similar, the map

def brute_force(out: str, q: np.ndarray, k: int) -> list[tuple[str, int, float]]:
    clips = read_tables(out, "clips")
    e = embedding_matrix(clips)
    sims = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    rows = sorted(zip(-sims, clips.column("uri").to_pylist(), clips.column("clip_index").to_pylist(), strict=True))
    return [(u, i, -s) for s, u, i in rows[:k]]


@pytest.mark.slow
def test_a_copy_of_a_clip_in_another_format_and_rate_finds_its_twin_first(review_predictions, tmp_path, capsys):
    b, _, out, files = review_predictions
    source = files[2].uri
    with storage.open_input(source) as f:
        _, x = decode_all(f, 44_100)
    clip = 1  # FAST features: 2 s clips every 2 s
    query = f"{b}/queries/twin.ogg"
    storage.write_bytes(query, archives.encode(x[2 * 44_100: 4 * 44_100], 44_100, ("OGG", "VORBIS", "ogg")))
    described, matches, sheet = similar.run(SimilarConfig(out=out, query=query, k=6, output=str(tmp_path / "s.png")))
    assert (matches[0].uri, matches[0].clip_index) == (source, clip) and matches[0].similarity > 0.95, matches[:2]
    assert "1 clip(s) embedded" in described and sheet.width > 0 and (tmp_path / "s.png").stat().st_size > 0
    files_, model, features = similar.sources(out)
    q, _ = similar.query_vector(query, files_, model, features)
    want = brute_force(out, q, 6)
    assert [(m.uri, m.clip_index) for m in matches] == [(u, i) for u, i, _ in want]
    assert np.allclose([m.similarity for m in matches], [s for _, _, s in want], atol=1e-5)
    # a stored clip as the query: itself first, similarity 1; the command prints the same ranking
    assert commands.main(["similar", out, f"{source}#{clip}", "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(stored)" in lines[0] and lines[2].split()[1] == "1.0000" and f"{source}#{clip} " in lines[2]


SEARCH = """
import resource, sys
from melbatch.look import similar
from melbatch.config import SimilarConfig
_, matches, _ = similar.run(SimilarConfig(out=sys.argv[1], query=sys.argv[2], k=5, readers=2))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, matches[0].uri, matches[0].clip_index)
"""


def synthetic_output(root: Path, files: int, rows: int, dim: int) -> str:
    """A classify output's clip files with random embeddings (the format classify writes)."""
    rng = np.random.default_rng(files)
    names = []
    for n in range(files):
        e = rng.standard_normal((rows, dim)).astype(np.float32)
        t = pa.table({"uri": [f"file:///archive/f{n:05d}.wav"] * rows, "etag": ["e"] * rows,
                      "clip_index": np.arange(rows, dtype=np.int32), "start_s": np.arange(rows) * 5.0,
                      "end_s": np.arange(rows) * 5.0 + 5.0, "label": ["a"] * rows,
                      "probability": np.ones(rows, np.float32), "top_labels": [["a", "b"]] * rows,
                      "top_probabilities": [[1.0, 0.0]] * rows,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), dim),
                      "model_id": ["m"] * rows, "config_hash": ["h"] * rows},
                     schema=clip_prediction_schema(2, dim))
        names.append(f"clips/b{n:05d}-00000.parquet")
        write_table(str(root / names[-1]), t)
    (root / "_manifest.json").write_text(json.dumps({"kind": "predictions", "clips": names, "files": [],
                                                     "model": "none", "feature_config": FeatureConfig().to_dict()}))
    return str(root)


@pytest.mark.slow
def test_search_memory_does_not_grow_with_the_number_of_embedding_files(tmp_path):
    peaks = []
    for files in (8, 80):  # 8 MB and 80 MB of embeddings
        out = synthetic_output(tmp_path / f"x{files}", files, 2000, 128)
        p = subprocess.run([sys.executable, "-c", SEARCH, out, "file:///archive/f00003.wav#7"], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        peak_kb, uri, index = p.stdout.split()
        assert (uri, index) == ("file:///archive/f00003.wav", "7")  # the stored clip finds itself
        peaks.append(int(peak_kb) * 1024)
    assert peaks[1] - peaks[0] < 30e6, peaks  # 72 MB more embeddings streamed, (almost) no more memory


def test_pca_map_is_deterministic_and_separates_what_differs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 32)) + np.r_[6.0, np.zeros(31)]
    b = rng.standard_normal((200, 32)) - np.r_[6.0, np.zeros(31)]
    xy = pictures.project_2d(np.vstack([a, b]))
    assert np.array_equal(xy, pictures.project_2d(np.vstack([a, b])))
    assert (np.sign(xy[:200, 0]) != np.sign(xy[200:, 0].mean())).mean() > 0.99  # the clusters split on PC1
    assert xy[np.abs(xy[:, 0]).argmax(), 0] > 0 and xy[np.abs(xy[:, 1]).argmax(), 1] > 0  # signed: largest positive


@pytest.mark.slow
def test_the_classify_report_draws_the_archive_map_and_rings_the_review_picks(review_predictions, tmp_path):
    out = review_predictions[2]
    _, kind = report.write(out, str(tmp_path / "r.html"))
    text = (tmp_path / "r.html").read_text()
    assert kind == "classify" and 'alt="archive map"' in text
    n = read_tables(out, "clips").num_rows
    assert f"Ringed: the {min(n, 48)} least confident clips" in text
    seen = open_in_chromium(tmp_path / "r.html", tmp_path)
    assert seen["broken"] == 0 and any(s.startswith("Archive map") for s in seen["sections"])


@pytest.mark.slow
def test_review_and_search_read_what_a_scan_output_holds_now(engine_model, tmp_path):
    b = engine_model
    archive = f"{b}/review-nightly"
    archives.make_archive(archive, "engine", files_per_class=2, seconds=4.0, seed=51)
    scfg = ScanConfig(classify=ClassifyConfig(archive=archive, model=f"{b}/model", out=f"{b}/review-scan",
                                              files_per_task=2, cpus_per_actor=0.5, keep_embeddings=True,
                                              max_quarantine_rate=1.0))
    scan.run(scfg, progress=False)
    archives.make_archive(f"{archive}/more", "engine", files_per_class=1, seconds=4.0, seed=52)
    scan.run(scfg, progress=False)  # two attempts now hold the current clips
    live = {r["uri"] for r in mb_ledger.current(f"{b}/review-scan").to_pylist()}
    dest = tmp_path / "review"
    summary = review.run(ReviewConfig(out=f"{b}/review-scan", count=100, dest=str(dest)))
    got = chosen(dest)
    clips = mb_ledger.predictions(mb_ledger.prediction_roots(f"{b}/review-scan"), "clips")
    assert summary.chosen == clips.num_rows == len(got) and {u for u, _ in got} == live
    uri, index = got[0]
    _, matches, _ = similar.run(SimilarConfig(out=f"{b}/review-scan", query=f"{uri}#{index}", k=3))
    assert (matches[0].uri, matches[0].clip_index) == (uri, index) and matches[0].similarity > 0.9999
    assert {m.uri for m in matches} <= live
    # scans write detections too: the current events are those of the live objects, from their attempts
    events, newest = detections.combined(f"{b}/review-scan")
    assert events.num_rows and set(events.column("uri").to_pylist()) == live
    assert newest["detection"]["thresholds"] == {"faulty": 0.5, "healthy": 0.5}
