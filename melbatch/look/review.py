"""melbatch review: the clips of a classify or scan output a person should check, one page to look
at and listen to them, and ``labels.csv`` for the answers (``melbatch train --extra-labels`` learns
from them).

Top-down (:func:`run`):

1. :func:`load` reads the clip and file predictions: a classify OUT, or what a scan OUT holds now
   (each live object's clips from the attempt that holds its current verdict).
2. :func:`~melbatch.look.candidates.rank` orders the clips by the strategy
   (:data:`~melbatch.config.REVIEW_STRATEGIES`) and :func:`~melbatch.look.candidates.select` takes them in
   that order under ``--count`` and ``--per-label``.
3. :func:`cards` reads each chosen clip again from the archive (each file once, decoded and cut as
   classify cut it): the image the model saw, the clip's own audio, where it sits in its file.
4. :func:`write` publishes ``index.html`` (self-contained: images and audio embedded) and
   ``labels.csv`` with an empty ``label`` column, for the reviewer.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from melbatch import URI, ledger, storage
from melbatch.audio.decode import DecodeError, decode_clips
from melbatch.audio.logmel import logmel_tensor
from melbatch.config import ConfigError, FeatureConfig, ReviewConfig
from melbatch.labels.sources import NO_LABEL, REVIEWED_COLUMNS, SKIP, Labeler, reviewed_csv
from melbatch.look.candidates import rank, select
from melbatch.look.html import Section, esc, facts, note, page
from melbatch.look.pictures import thumbnail
from melbatch.shards import REVIEW_DIR, REVIEW_LABELS, REVIEW_PAGE, read_manifest
from melbatch.testing.archives import encode

READERS = 8  # files read at once (object storage: latency, not bandwidth)
FLAC = ("FLAC", "PCM_16", "flac")


@dataclass(frozen=True)
class Predictions:
    """What review reads from one output: a clip table, each file's verdict, the features and archive."""

    clips: pa.Table  # classify's clip rows (uri, clip_index, start_s, end_s, label, probability, top_*)
    files: dict[URI, dict[str, Any]]  # uri -> its file row (label, probability, clips, duration_s, scores)
    labels: list[str]  # the model's labels
    features: FeatureConfig
    archive: URI
    model: str


@dataclass
class Card:
    """One chosen clip, with what the page shows of it."""

    row: dict[str, Any]  # the clip's prediction row
    why: str  # the strategy's number for it
    file: dict[str, Any]
    known: str | None = None
    png: bytes | None = field(default=None, repr=False)
    audio: bytes | None = field(default=None, repr=False)
    error: str | None = None


@dataclass(frozen=True)
class Summary:
    dest: URI
    strategy: str
    candidates: int  # clips the strategy ranks (all, or for disagreement those that disagree)
    chosen: int
    unreadable: int  # chosen clips whose audio could not be read again
    per_label: dict[str, int]

    def render(self) -> str:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(self.per_label.items()))
        lines = [f"review: {self.chosen} clip(s) of {self.candidates} candidate(s) by {self.strategy} ({labels})",
                 f"page:   {storage.join(self.dest, REVIEW_PAGE)}",
                 f"labels: {storage.join(self.dest, REVIEW_LABELS)} (fill the label column, then "
                 f"`melbatch train SHARDS OUT --extra-labels` it)"]
        if self.unreadable:
            lines.append(f"warning: the audio of {self.unreadable} clip(s) could not be read again (see their cards)")
        return "\n".join(lines)


def run(cfg: ReviewConfig) -> Summary:
    """Choose, draw and publish; returns what was written."""
    pred = load(cfg.out)
    known = known_labels(cfg.labels, pred.archive, sorted(pred.files)) if cfg.labels else None
    order, why = rank(pred.clips, {u: f["label"] for u, f in pred.files.items()}, cfg.strategy, known, cfg.seed)
    chosen = select(pred.clips.column("label").to_pylist(), order, cfg.count, cfg.per_label)
    rows = pred.clips.take(pa.array(chosen, pa.int64())).to_pylist() if chosen else []
    chosen_cards = [Card(r, why[i], pred.files[r["uri"]], (known or {}).get(r["uri"])) for r, i in zip(
        rows, chosen, strict=True)]
    cards(chosen_cards, pred.features)
    dest = cfg.dest or storage.join(cfg.out, REVIEW_DIR)
    write(dest, chosen_cards, pred, cfg)
    return Summary(dest, cfg.strategy, len(order), len(chosen_cards), sum(c.error is not None for c in chosen_cards),
                   dict(Counter(c.row["label"] for c in chosen_cards)))


def load(out: URI) -> Predictions:
    """The predictions of a classify OUT (``_manifest.json`` of kind predictions) or a scan OUT."""
    roots = ledger.prediction_roots(out)
    clips, files = ledger.predictions(roots, "clips"), ledger.predictions(roots, "files")
    newest = read_manifest(roots[-1][0]) or {}
    if not clips.num_rows:
        raise ConfigError(f"{out} holds no classified clips: nothing to review")
    labels = json.loads(files.schema.field("scores").metadata[b"labels"])
    return Predictions(clips, {f["uri"]: f for f in files.to_pylist()}, labels,
                       FeatureConfig.from_dict(newest["feature_config"]), newest["archive"],
                       f"{newest.get('model_name', '')} ({newest.get('model_id', '')})")


def known_labels(spec: str, archive: URI, uris: list[URI]) -> dict[URI, str]:
    """uri → known label for the files ``spec`` labels: 'folder' (each file's folder under the archive)
    or a manifest URI; files it does not label are left out."""
    labeler = Labeler(spec, archive)
    found = {u: lab for u in uris if isinstance(lab := labeler(u), str)}
    if not found:
        raise ConfigError(f"--labels {spec}: no classified file has a known label there "
                          f"({labeler.why_missing() if labeler(uris[0]) is NO_LABEL else 'no match'})")
    return found


def cards(chosen: list[Card], features: FeatureConfig) -> None:
    """Fill each card's image (what the model saw) and audio (the clip itself, FLAC) from the archive."""
    by_file: dict[URI, list[Card]] = {}
    for c in chosen:
        by_file.setdefault(c.row["uri"], []).append(c)
    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(lambda item: _draw_file(item[0], item[1], features), by_file.items()))


def _draw_file(uri: URI, mine: list[Card], cfg: FeatureConfig) -> None:
    wanted = {c.row["clip_index"]: c for c in mine}
    try:
        with storage.open_input(uri) as f:
            _, clips = decode_clips(f, cfg)
            for clip in clips:
                card = wanted.pop(clip.index, None)
                if card is not None:
                    with torch.inference_mode():
                        mel = logmel_tensor(torch.from_numpy(np.ascontiguousarray(clip.samples, np.float32)),
                                            cfg).numpy()
                    card.png = thumbnail(mel, cfg, width_in=3.4)
                    real = clip.samples[: max(1, round((clip.end_s - clip.start_s) * cfg.sample_rate_hz))]
                    card.audio = encode(real, cfg.sample_rate_hz, FLAC)
                if not wanted:
                    break
    except (DecodeError, OSError, storage.StorageError) as e:
        for c in wanted.values():
            c.error = f"cannot read the audio again: {type(e).__name__}: {e}"
        return
    for c in wanted.values():  # the file is shorter now than when it was classified
        c.error = f"clip {c.row['clip_index']} is no longer in {uri} (the file changed since it was classified)"


def write(dest: URI, chosen: list[Card], pred: Predictions, cfg: ReviewConfig) -> None:
    """``dest/labels.csv`` first, then ``dest/index.html`` (each published whole)."""
    storage.write_bytes(storage.join(dest, REVIEW_LABELS), reviewed_csv([c.row for c in chosen]))
    how = Section("How to review").add(
        f"<p>Look at each clip and listen to it, then type its true label in its box: one of the model's labels "
        f"({esc(', '.join(pred.labels))}) or a new one, or <code>{SKIP}</code> (or nothing) to leave it out. "
        f"<b>Save labels.csv</b> downloads your answers as <code>{esc(REVIEW_LABELS)}</code>; or fill the empty "
        f"<code>label</code> column of <code>{esc(storage.join(dest, REVIEW_LABELS))}</code> in a spreadsheet. "
        f"Then train again with them: <code>melbatch train SHARDS NEW_OUT --extra-labels {esc(REVIEW_LABELS)}"
        f"</code> (a corrected label wins over the folder's; clips from outside SHARDS are added to training).</p>")
    how.add(facts([("output", cfg.out), ("archive", pred.archive), ("model", pred.model),
                   ("strategy", cfg.strategy), ("clips", f"{len(chosen)} of {pred.clips.num_rows} classified"),
                   ("per label", cfg.per_label or "no cap"), ("known labels", cfg.labels or "none")]))
    how.add('<p><button id="save">Save labels.csv</button> <span id="filled" class="note"></span></p>')
    body = Section(f"Clips ({cfg.strategy})").add("".join(_card_html(i, c, pred) for i, c in enumerate(chosen))
                                                  or note("no clip matches the strategy"))
    rows = [{k: c.row[k] for k in ("uri", "clip_index")} | {"start_s": f"{c.row['start_s']:.3f}",
            "end_s": f"{c.row['end_s']:.3f}", "predicted": c.row["label"],
            "probability": f"{c.row['probability']:.4f}"} for c in chosen]
    data = json.dumps({"columns": REVIEWED_COLUMNS, "rows": rows}).replace("<", "\\u003c")
    tail = (f"<style>{CARD_STYLE}</style>"
            f'<datalist id="labels">{"".join(f"<option value={_attr(x)}>" for x in [*pred.labels, SKIP])}</datalist>'
            f'<script type="application/json" id="rows">{data}</script><script>{SCRIPT}</script>')
    storage.write_bytes(storage.join(dest, REVIEW_PAGE),
                        page(f"melbatch review of {cfg.out}", cfg.out, [how, body], tail).encode())


def _attr(value: Any) -> str:
    return f'"{esc(value)}"'


def media(c: Card) -> str:
    """A drawn card's spectrogram and audio player (embedded), or why they could not be drawn."""
    if c.error is not None or c.png is None or c.audio is None:
        return note(c.error or "not drawn")
    return (f'<img alt="spectrogram of clip {c.row["clip_index"]}" src="data:image/png;base64,'
            f'{base64.b64encode(c.png).decode()}"><audio controls preload="metadata" src="data:audio/flac;base64,'
            f'{base64.b64encode(c.audio).decode()}"></audio>')


def _card_html(i: int, c: Card, pred: Predictions) -> str:
    r, f = c.row, c.file
    dur = max(float(f["duration_s"]), float(r["end_s"]), 1e-9)
    left, width = 100 * r["start_s"] / dur, max(0.5, 100 * (r["end_s"] - r["start_s"]) / dur)
    top = "".join(f"<tr><td>{esc(lab)}</td><td>{p:.3f}</td></tr>" for lab, p in zip(
        r["top_labels"], r["top_probabilities"], strict=True))
    scores = sorted(zip(pred.labels, f["scores"], strict=True), key=lambda x: -x[1])[:3]
    known = f"<div>known label: <b>{esc(c.known)}</b></div>" if c.known else ""
    return (f'<div class="card" id="c{i}"><div class="head"><b>{esc(r["label"])}</b> {r["probability"]:.3f} · '
            f'{esc(c.why)}</div><div class="uri">{esc(r["uri"])}</div>{media(c)}'
            f'<div class="where" title="where the clip sits in the file"><span style="left:{left:.2f}%;'
            f'width:{width:.2f}%"></span></div><div class="note">clip {r["clip_index"] + 1} of {f["clips"]}: '
            f'{r["start_s"]:.1f}–{r["end_s"]:.1f} s of {f["duration_s"]:.1f} s · file verdict '
            f'{esc(f["label"])} {f["probability"]:.3f} ({esc(", ".join(f"{a} {b:.2f}" for a, b in scores))})</div>'
            f'{known}<table>{top}</table><label>label <input list="labels" data-row="{i}" autocomplete="off">'
            f"</label></div>")


CARD_STYLE = """
.card{display:inline-block;vertical-align:top;width:340px;margin:0 .8em 1em 0;padding:.6em;border:1px solid #ddd;
border-radius:6px}.card .uri{font-size:11px;color:#555;word-break:break-all}.card audio{width:100%}
.card table{margin:.3em 0}.where{position:relative;height:6px;background:#e5e5e5;margin:.3em 0}
.where span{position:absolute;top:0;height:6px;background:#c0392b}.card input{width:12em}
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('rows').textContent);
const boxes = Array.from(document.querySelectorAll('input[data-row]'));
const cell = v => /[",\\n\\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
function filled() {
  const n = boxes.filter(b => b.value.trim() && b.value.trim() !== 'skip').length;
  document.getElementById('filled').textContent = n + ' of ' + boxes.length + ' labelled';
}
boxes.forEach(b => b.addEventListener('input', filled));
document.getElementById('save').addEventListener('click', () => {
  const lines = [data.columns.join(',')];
  data.rows.forEach((r, i) => lines.push([r.uri, r.clip_index, r.start_s, r.end_s, r.predicted, r.probability,
    boxes[i].value.trim()].map(v => cell(String(v))).join(',')));
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([lines.join('\\n') + '\\n'], {type: 'text/csv'}));
  a.download = 'labels.csv';
  a.click();
});
filled();
"""
