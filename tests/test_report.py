"""Run reports: built from real featurize/train/classify/scan outputs and opened in headless Chromium.

Chromium loads each report from disk (file://, no server) inside a test page that inspects it: every
image must have decoded (a broken one counts as a failure; a corrupted copy proves the check can
fail), the tables must be there, and no script may exist in it, although object keys and labels
in the inputs were made of HTML.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, HOSTILE_KEY, HOSTILE_LABEL

from melbatch import ledger as mb_ledger
from melbatch import storage
from melbatch.cli import commands
from melbatch.config import ClassifyConfig, FeaturizeConfig, ScanConfig
from melbatch.look import report
from melbatch.stages import classify, featurize, scan
from melbatch.testing import archives

pytestmark = [pytest.mark.ray, pytest.mark.s3]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHECK_PAGE = """<!DOCTYPE html><html><body><iframe id="f" src="{src}"></iframe><script>
document.getElementById('f').onload = () => {{
  const d = document.getElementById('f').contentDocument;
  const imgs = [...d.images];
  const res = {{images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    tables: d.querySelectorAll('table').length, rows: d.querySelectorAll('tbody tr').length,
    scripts: d.querySelectorAll('script').length, title: d.title,
    sections: [...d.querySelectorAll('h2')].map(h => h.textContent), text: d.body.innerText}};
  const pre = document.createElement('pre'); pre.id = 'result'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
}};
</script></body></html>"""


def open_in_chromium(page: Path, tmp: Path) -> dict:
    """What headless Chromium sees in the report at ``page`` (file://, no server)."""
    check = tmp / f"check-{page.stem}-{abs(hash(str(page)))}.html"
    check.write_text(CHECK_PAGE.format(src=page.resolve().as_uri()))
    return chromium_result(check, budget_ms=15_000)


def chromium_result(check: Path, budget_ms: int, autoplay: bool = False) -> dict:
    """The JSON a checking page (``check``, file://) leaves in its ``<pre id="result">`` once headless
    Chromium has run it for ``budget_ms`` of virtual time (``autoplay``: media may play unasked)."""
    if CHROMIUM is None:
        pytest.fail("headless Chromium is not installed: run `make system-deps` (CI does)")
    flags = ["--autoplay-policy=no-user-gesture-required"] if autoplay else []
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          *flags, f"--virtual-time-budget={budget_ms}", "--dump-dom", check.as_uri()],
                         capture_output=True, text=True, timeout=60 + 4 * budget_ms // 1000)
    found = re.search(r'<pre id="result">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the page did not load in Chromium: {out.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def local_copy(uri: str, tmp: Path) -> Path:
    path = tmp / f"{abs(hash(uri))}.html"
    path.write_bytes(storage.read_bytes(uri))
    return path


@pytest.fixture(scope="module")
def outputs(engine_model, tmp_path_factory) -> dict[str, str]:
    """featurize, train, classify and scan outputs, with HTML in object keys and labels."""
    b = engine_model
    tmp = tmp_path_factory.mktemp("report")
    # featurize: a local archive with a hostile label folder and every kind of broken file
    archive = tmp / "archive"
    archives.make_archive(str(archive), "engine", files_per_class=2, seconds=3.0, seed=3, bad=True)
    (archive / "healthy").rename(archive / HOSTILE_LABEL)
    featurize.run(FeaturizeConfig(src=str(archive), dst=str(tmp / "features"), features=FAST), progress=False)
    # classify: new recordings on S3, one of them under a hostile key
    incoming = f"{b}/report-incoming"
    files = archives.make_archive(incoming, "engine", files_per_class=2, seconds=3.0, seed=21, bad=True)
    good = next(f for f in files if f.bad_kind is None)
    storage.write_bytes(f"{incoming}/healthy/{HOSTILE_KEY}", storage.read_bytes(good.uri))
    ccfg = ClassifyConfig(archive=incoming, model=f"{b}/model", out=f"{b}/report-predictions", files_per_task=4,
                          cpus_per_actor=0.5, max_quarantine_rate=1.0)
    classify.run(ccfg, progress=False)
    # scan: two nights, two new files in between
    nightly = f"{b}/report-nightly"
    archives.make_archive(nightly, "engine", files_per_class=1, seconds=3.0, seed=31)
    scfg = ScanConfig(classify=ClassifyConfig(archive=nightly, model=f"{b}/model", out=f"{b}/report-scan",
                                              files_per_task=2, cpus_per_actor=0.5, max_quarantine_rate=1.0))
    scan.run(scfg, progress=False)
    archives.make_archive(f"{nightly}/more", "engine", files_per_class=1, seconds=3.0, seed=32)
    scan.run(scfg, progress=False)
    return {"featurize": str(tmp / "features"), "train": f"{b}/model", "classify": f"{b}/report-predictions",
            "scan": f"{b}/report-scan", "tmp": str(tmp)}


@pytest.mark.slow
@pytest.mark.parametrize("kind,sections,min_images", [
    ("featurize", ["Overview", "Labels", "Stored clips", "Features", "Quarantine (9"], 3),
    ("train", ["Overview", "Training curves", "Per class", "Most confidently wrong", "Calibration", "Features"], 2),
    ("classify", ["Overview", "Verdicts", "Least confident clips", "Timelines", "Archive map", "Features",
                  "Quarantine (9"], 4),
    ("scan", ["Now", "Trend over 2 committed scan(s)", "Quarantine (0"], 2),
])
def test_reports_render_in_chromium_with_their_images_and_tables(outputs, kind, sections, min_images):
    tmp = Path(outputs["tmp"])
    uri, got_kind = report.write(outputs[kind])
    assert got_kind == kind and uri == storage.join(storage.canonical(outputs[kind]), "report.html")
    page = local_copy(uri, tmp)
    seen = open_in_chromium(page, tmp)
    assert seen["broken"] == 0 and seen["images"] >= min_images, seen
    assert seen["scripts"] == 0 and seen["tables"] >= 2 and seen["rows"] >= 4
    assert seen["title"] == f"melbatch {kind}: {storage.canonical(outputs[kind])}"
    for want, got in zip(sections, seen["sections"], strict=False):
        assert got.startswith(want), (want, seen["sections"])
    assert len(seen["sections"]) == len(sections)
    text = seen["text"]
    if kind == "featurize":  # the hostile label is shown as text, exactly, and counted
        assert HOSTILE_LABEL in text and "not_audio" in text and "inputs = featurized + quarantined\nyes" in text
    if kind == "classify":
        assert HOSTILE_KEY in text and "inputs = classified + quarantined\nyes" in text
    if kind == "train":
        assert "confusion matrix" in text and "validation accuracy (files)" in text
        assert "temperature scaling: T = " in text and "--unknown-below P" in text
    if kind == "scan":
        runs = tuple(mb_ledger.committed_runs(outputs["scan"]))
        trend = [line for line in text.splitlines() if line.startswith(runs) and line.count("\t") >= 9]
        assert len(trend) == 2  # one row per committed run, newest first
        assert trend[0].split("\t")[4] == "2" and trend[1].split("\t")[4] == "2"  # 2 new files each night


@pytest.mark.slow
def test_hostile_keys_and_labels_are_escaped_and_a_broken_image_is_caught(outputs):
    tmp = Path(outputs["tmp"])
    for kind in ("featurize", "classify"):
        uri, _ = report.write(outputs[kind], storage.join(outputs["tmp"], f"{kind}-escaped.html"))
        source = storage.read_bytes(uri).decode()
        assert "<img src=x" not in source and "<b onclick" not in source and "<script" not in source
        assert "&lt;img src=x onerror=alert(1)&gt;" in source or kind == "featurize"
        assert "&lt;b onclick=alert(2)&gt;healthy &amp; &#x27;calm&#x27;" in source or kind == "classify"
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in source  # credentials never reach a report
        manifest = storage.read_bytes(storage.join(outputs[kind], "_manifest.json")).decode()
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in manifest and os.environ["AWS_ACCESS_KEY_ID"] not in manifest
    # the check can fail: one corrupted picture is reported broken
    page = Path(outputs["tmp"]) / "classify-escaped.html"
    source = page.read_text()
    start = source.index("base64,") + len("base64,")
    png = base64.b64decode(source[start: source.index('"', start)])
    broken = base64.b64encode(png[:40] + b"\x00" * 64).decode()
    page.write_text(source[:start] + broken + source[source.index('"', start):])
    assert open_in_chromium(page, tmp)["broken"] == 1


def test_report_cli_refuses_what_is_not_an_output(tmp_path, capsys):
    assert commands.main(["report", str(tmp_path)]) == 2
    assert "not a finished featurize, train, classify or scan output" in capsys.readouterr().err


@pytest.mark.slow
def test_classified_and_mistaken_clips_are_pictured_with_their_predictions(outputs, engine_model, capsys):
    import pyarrow.parquet as pq

    from melbatch.look import pictures
    from melbatch.shards import read_tables

    cfg, panels = pictures.prediction_panels(outputs["classify"], limit=4)
    clips = read_tables(outputs["classify"], "clips").to_pylist()
    assert cfg == FAST and 1 <= len(panels) <= 4 and all(p.title.startswith("predicted ") for p in panels)
    for label in {p.title.split(" ")[1] for p in panels}:  # each label's least confident clip comes first
        lowest = min(c["probability"] for c in clips if c["label"] == label)
        first = next(p for p in panels if p.title.split(" ")[1] == label)
        assert float(first.title.split(" ")[2]) == pytest.approx(lowest, abs=0.005)
    hostile = storage.join(storage.canonical(f"{engine_model}/report-incoming"), "healthy", HOSTILE_KEY)
    _, [p0, p1] = pictures.prediction_panels(outputs["classify"], [hostile], per_file=2)
    assert HOSTILE_KEY in p0.title and p0.mel.shape == FAST.shape and p1.start_s == FAST.clip_hop_s
    out = str(Path(outputs["tmp"]) / "predicted.png")
    assert commands.main(["show", "--predictions", outputs["classify"], hostile, "-o", out]) == 0
    assert "1 panel(s)" in capsys.readouterr().out
    # validation clips by (file, clip): the stored images, in the order asked
    with storage.arrow_input(f"{engine_model}/model/val_predictions.parquet") as f:
        val = pq.read_table(f).to_pylist()[:3]
    keys = [(r["uri"], r["clip_index"]) for r in reversed(val)]
    _, stored = pictures.stored_clips(f"{engine_model}/features", keys, [f"#{i}" for i in range(3)])
    assert [p.title for p in stored] == ["#0", "#1", "#2"] and [p.start_s for p in stored] == \
        [r["start_s"] for r in reversed(val)]
