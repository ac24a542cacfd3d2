"""melbatch discover: what an unlabelled archive holds, as groups of clips that sound alike, one page
to name whole groups at once, and ``labels.csv`` to train from.

Top-down (:func:`run`):

1. :func:`objects` lists ARCHIVE (``--sample N``: N files taken in turn from each folder).
2. :func:`embedder` is the model whose pooled features describe each clip: a trained package
   (``--model``), an audio backbone (``--backbone birdnet`` or ``speaker``: clips of its own window), or
   an ImageNet backbone as it is (:func:`backbone_package`: its features fitted to the recordings as
   featurize fits them, each clip standardised on its own).
3. classify runs it over the objects on Ray with ``--keep-embeddings`` (its decode, features,
   streaming and quarantine): ``OUT/discover/embeddings``.
4. :func:`~melbatch.stages.grouping.group` groups the clips by k-means on Ray, k chosen by
   silhouette (or ``--groups``), and writes ``OUT/discover/groups.parquet`` and ``summary.json``.
5. :func:`write_page` draws ``OUT/discover/index.html``: per group, largest first, its size, the
   clips nearest its centre and at its edge (spectrogram and audio), where in the archive they come
   from, a label box for the group and one per clip shown; **Save labels.csv** writes the answers in
   the format ``train --extra-labels`` and ``featurize --labels`` read.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from melbatch import URI, listing, storage
from melbatch.config import ClassifyConfig, ConfigError, DiscoverConfig, FeatureConfig, FeaturizeConfig
from melbatch.labels.sources import REVIEWED_COLUMNS, SKIP
from melbatch.look.html import Section, esc, facts, note, page
from melbatch.look.review import CARD_STYLE, Card, cards, media
from melbatch.model import backbones
from melbatch.model.package import ModelError, create_model, read_package_meta, save_package
from melbatch.model.weights import resolve
from melbatch.shards import DISCOVER_DIR, DISCOVER_SUMMARY, GROUPS_FILE, REVIEW_PAGE, read_manifest
from melbatch.stages import classify, featurize, grouping
from melbatch.stages.runs import init_ray
from melbatch.train import heads

MIXED = "mixed"  # a group labelled so (or left empty) gives its clips no label
TIME_IN_KEY = re.compile(r"(?<!\d)(?:19|20)\d\d-?[01]\d-?[0-3]\d[T_ -]?([0-2]\d)[-:h]?[0-5]\d")


@dataclass(frozen=True)
class Summary:
    dest: URI
    objects: int
    quarantined: int
    clips: int
    k: int
    chosen_by: str
    sizes: list[int]
    seconds: float

    def render(self) -> str:
        sizes = ", ".join(str(s) for s in self.sizes[:12]) + (", ..." if len(self.sizes) > 12 else "")
        return "\n".join([
            f"discover: {self.clips:,} clips of {self.objects - self.quarantined:,} files ({self.quarantined} "
            f"quarantined) in {self.k} groups ({self.chosen_by}), {self.seconds:.0f} s",
            f"groups: {sizes} clips, largest first",
            f"page:   {storage.join(self.dest, REVIEW_PAGE)} (name the groups, then Save labels.csv)",
            "then:   melbatch featurize ARCHIVE FEATURES --labels labels.csv && melbatch train FEATURES MODEL"])


def run(cfg: DiscoverConfig, progress: bool = True) -> Summary:
    """Embed, group, and publish; returns what was written."""
    t0 = time.perf_counter()
    dest = storage.join(storage.canonical(cfg.out), DISCOVER_DIR)
    storage.check_readable(cfg.archive)
    storage.check_writable(cfg.out)
    refs = objects(cfg)
    model = embedder(cfg, refs, dest)
    emb = storage.join(dest, "embeddings")
    earlier = (read_manifest(emb) or {}).get("model_id")  # a re-run with the same model resumes (and regroups)
    ccfg = ClassifyConfig(archive=cfg.archive, model=model, out=emb, keep_embeddings=True, top_k=1,
                          use_gpu=cfg.use_gpu, include=cfg.include, exclude=cfg.exclude, extensions=cfg.extensions,
                          address=cfg.address, max_quarantine_rate=1.0,
                          overwrite=earlier not in (None, read_package_meta(model)["model_id"]))
    meta = classify.preflight(ccfg)
    done = classify.classify_objects(ccfg, meta, refs, emb, progress)
    files = [storage.join(emb, rel) for rel in (read_manifest(emb) or {}).get("clips", [])]
    if done.clips < 2:
        raise ConfigError(f"{cfg.archive}: {done.clips} clip(s) could be read ({done.quarantined} file(s) "
                          f"quarantined, see {emb}/quarantine.parquet): nothing to group")
    init_ray(cfg.address)
    ks = list(range(cfg.min_groups, cfg.max_groups + 1))
    print(f"grouping {done.clips:,} clips: " + (f"k = {cfg.groups} (--groups)" if cfg.groups else
          f"k from {cfg.min_groups} to {cfg.max_groups}, chosen by silhouette on a sample"), flush=True)
    try:
        found = grouping.group(files, cfg.groups, ks, cfg.iterations, cfg.seed)
    except ValueError as e:
        raise ConfigError(f"{e}: give --groups lower, or a bigger archive") from None
    scores = ", ".join(f"{k}: {v:.3f}" for k, v in found.silhouettes.items())
    print(f"grouped: k = {len(found.sizes)}" + (f" (silhouette {scores})" if scores else "")
          + f", {found.passes} pass(es) over every clip on Ray; writing the page", flush=True)
    groups_uri = storage.join(dest, GROUPS_FILE)
    grouping.assign(files, found.centres, groups_uri)
    rows = _read_groups(groups_uri)
    cutoffs = _cutoffs(rows, len(found.sizes), cfg.within)
    storage.write_bytes(storage.join(dest, DISCOVER_SUMMARY), json.dumps(_summary(cfg, found, cutoffs, done, model),
                                                                         indent=2).encode())
    write_page(dest, rows, found, cutoffs, FeatureConfig.from_dict(meta["feature_config"]), cfg)
    return Summary(dest, len(refs), done.quarantined, rows.num_rows, len(found.sizes), found.chosen_by,
                   found.sizes, time.perf_counter() - t0)


def objects(cfg: DiscoverConfig) -> list[storage.ObjectRef]:
    """ARCHIVE's audio objects; with ``--sample N`` N of them, taken in turn from each folder (in a
    seeded order within each), so that every folder (site, device, day) is in the sample."""
    refs = list(listing.list_objects(storage.canonical(cfg.archive), cfg.include, cfg.exclude, cfg.extensions))
    if not refs:
        raise listing.nothing_matches(cfg.archive, cfg.include, cfg.exclude, cfg.extensions)
    if not cfg.sample or cfg.sample >= len(refs):
        return refs
    rng = np.random.default_rng(cfg.seed)
    folders: dict[str, list[storage.ObjectRef]] = {}
    for r in refs:
        folders.setdefault(r.uri.rsplit("/", 1)[0], []).append(r)
    queues = [list(np.array(rs, dtype=object)[rng.permutation(len(rs))]) for _, rs in sorted(folders.items())]
    taken: list[storage.ObjectRef] = []
    while len(taken) < cfg.sample:
        for q in queues:
            if q and len(taken) < cfg.sample:
                taken.append(q.pop())
    return sorted(taken, key=lambda r: r.uri)


def embedder(cfg: DiscoverConfig, refs: list[storage.ObjectRef], dest: URI) -> URI:
    """The package whose embeddings group the clips: ``--model``, or the ImageNet backbone's."""
    if cfg.model:
        try:
            read_package_meta(cfg.model)
        except ModelError as e:
            raise ConfigError(f"--model: {e}") from None
        return cfg.model
    return backbone_package(cfg, refs, storage.join(dest, "backbone"))


def backbone_package(cfg: DiscoverConfig, refs: list[storage.ObjectRef], out: URI) -> URI:
    """A package of ``cfg.backbone`` and an unused one-label head: an audio backbone's
    (:mod:`melbatch.model.backbones`; clips of its own window) or a timm model's with its ImageNet
    weights, whose features are the defaults fitted to the recordings (featurize's rule, from the same
    sample), each image standardised on its own (no dataset statistics to measure first)."""
    if cfg.backbone in backbones.REGISTRY:
        b = backbones.get(cfg.backbone)
        if why := b.missing():
            raise ConfigError(f"--backbone {b.name}: {why}")
        backbones.announce(b)
    fitted = featurize.fit_clips(FeaturizeConfig(src=cfg.archive, dst=out), refs).features
    if cfg.backbone in backbones.REGISTRY:  # its own window, the shortest clip kept as fitted (FSDD: 0.1 s)
        return heads.embedding_package(b, heads.features_for(b, fitted), out)
    source = resolve(cfg.backbone, True, cfg.weights)
    try:
        with torch.random.fork_rng():  # the unused head the same every time: the same package id, so a re-run resumes
            torch.manual_seed(0)
            model = create_model(cfg.backbone, 1, fitted.shape, source=source)
    except ModelError as e:
        raise ConfigError(f"--backbone: {e}") from None
    meta = {"model_name": cfg.backbone, "labels": ["unlabelled"], "feature_config": fitted.to_dict(),
            "config_hash": fitted.hash(), "normalization": {"kind": "clip"}, "initial_weights": source.to_dict(),
            "purpose": "discover: the backbone's embeddings, untrained"}
    return save_package(out, model, meta)


def _read_groups(uri: URI) -> pa.Table:
    with storage.arrow_input(uri) as f:
        return pq.read_table(f)


def _cutoffs(rows: pa.Table, k: int, within: float) -> list[float]:
    """Per group, the distance within which its label applies: the ``within`` quantile of its clips'."""
    g, d = np.asarray(rows.column("group")), np.asarray(rows.column("distance"))
    return [float(np.quantile(d[g == i], within)) if (g == i).any() else 0.0 for i in range(k)]


def _summary(cfg: DiscoverConfig, found: grouping.Grouping, cutoffs: list[float], done: classify.Summary,
             model: URI) -> dict[str, Any]:
    return {"k": len(found.sizes), "chosen_by": found.chosen_by,
            "silhouettes": {str(k): round(v, 4) for k, v in found.silhouettes.items()},
            "sizes": found.sizes, "label_within": {"quantile": cfg.within, "distance": [round(c, 4) for c in cutoffs]},
            "passes": found.passes, "clips": found.clips, "files": done.classified, "quarantined": done.quarantined,
            "audio_hours": round(done.audio_s / 3600, 4), "model": model,
            "archive": storage.canonical(cfg.archive), "sample": cfg.sample, "seed": cfg.seed}


# ------------------------------------------------------------------------------------------------ page

def _where(uris: list[str], archive: URI) -> tuple[list[tuple[str, int]], list[int] | None]:
    """The folders a group's clips come from (most first) and, when the keys carry a time, clips per hour."""
    base = storage.canonical(archive).rstrip("/") + "/"
    folders = Counter(u.removeprefix(base).rsplit("/", 1)[0] if "/" in u.removeprefix(base) else "." for u in uris)
    hours = [int(m.group(1)) for u in uris if (m := TIME_IN_KEY.search(u.rsplit("/", 1)[-1])) and int(m.group(1)) < 24]
    return folders.most_common(), (np.bincount(hours, minlength=24).tolist() if len(hours) > len(uris) / 2 else None)


def _shown(rows: pa.Table, g: int, n: int) -> tuple[list[dict], list[dict]]:
    """Group ``g``'s ``n`` clips nearest its centre and ``n // 2`` (at least 1) farthest from it."""
    mine = rows.filter(pc.equal(rows.column("group"), g))
    order = np.argsort(np.asarray(mine.column("distance")), kind="stable")
    near = order[:n].tolist()
    far = [i for i in order[::-1][: max(1, n // 2)].tolist() if i not in near]
    return mine.take(pa.array(near, pa.int64())).to_pylist(), mine.take(pa.array(far, pa.int64())).to_pylist()


def write_page(dest: URI, rows: pa.Table, found: grouping.Grouping, cutoffs: list[float], features: FeatureConfig,
               cfg: DiscoverConfig) -> None:
    """``dest/index.html``: one section per group, largest first, and the script that writes labels.csv."""
    uris = rows.column("uri").to_pylist()
    groups, distances = np.asarray(rows.column("group")), np.asarray(rows.column("distance"))
    picked = [_shown(rows, g, cfg.shown) for g in range(len(found.sizes))]
    shown = [Card({**r, "where": where}, f"distance {r['distance']:.3f}", {}) for near, far in picked
             for where, part in (("near", near), ("edge", far)) for r in part]
    cards(shown, features)  # each clip's spectrogram and audio, read again from the archive
    sections, at = [], 0
    for g, size in enumerate(found.sizes):
        mine = shown[at: at + len(picked[g][0]) + len(picked[g][1])]
        folders, hours = _where([u for u, x in zip(uris, groups, strict=True) if x == g], cfg.archive)
        inside = int(((groups == g) & (distances <= cutoffs[g])).sum())
        s = Section(f"Group {g + 1}: {size:,} clips ({100 * size / max(1, rows.num_rows):.0f}%)")
        s.add(f'<p><label>label of group {g + 1} <input class="group" data-group="{g}" list="known" '
              f'autocomplete="off"></label> <span class="note">goes to the {inside:,} clips within distance '
              f"{cutoffs[g]:.3f} of its centre (the {100 * cfg.within:g}% nearest); empty or "
              f"<code>{MIXED}</code> labels none; a clip's own box below wins</span></p>")
        s.add(facts([("from", ", ".join(f"{f} ({n})" for f, n in folders[:6]) + (", ..." if len(folders) > 6
                                                                                 else ""))]
                     + ([("hour of day (from the keys)", " ".join(f"{h:02d}h:{n}" for h, n in enumerate(hours)
                                                                   if n))] if hours else [])))
        s.add("".join(_card(at + i, c) for i, c in enumerate(mine)))
        sections.append(s)
        at += len(mine)
    how = Section("How to label").add(
        f"<p>Each group below holds clips that sound alike to the model, largest first: look at and listen to the "
        f"clips nearest its centre and at its edge, then type one label for the group (or <code>{MIXED}</code>, or "
        f"nothing, for a group that mixes sounds), and correct single clips in their own boxes (<code>{SKIP}</code> "
        f"leaves a clip out). <b>Save labels.csv</b> writes one row per labelled clip, in the format "
        f"<code>melbatch train --extra-labels</code> and <code>melbatch featurize --labels</code> read: "
        f"<code>melbatch featurize ARCHIVE FEATURES --labels labels.csv</code>, then "
        f"<code>melbatch train FEATURES MODEL</code>.</p>")
    how.add(facts([("archive", storage.canonical(cfg.archive)), ("clips", f"{rows.num_rows:,}"),
                   ("groups", f"{len(found.sizes)}: {found.chosen_by}"),
                   ("embeddings", cfg.model or f"{cfg.backbone} (ImageNet weights, untrained)")]))
    how.add('<p><button id="save">Save labels.csv</button> <span id="filled" class="note"></span></p>')
    if not found.sizes:
        how.add(note("no groups"))
    data = {"columns": list(REVIEWED_COLUMNS), "uris": sorted(set(uris)), "cutoffs": cutoffs,
            "mixed": [MIXED, SKIP]}
    index = {u: i for i, u in enumerate(data["uris"])}
    data["clips"] = [[index[u], c, round(s, 3), round(e, 3), int(g), round(float(d), 4)] for u, c, s, e, g, d in zip(
        uris, *(rows.column(n).to_pylist() for n in ("clip_index", "start_s", "end_s", "group", "distance")),
        strict=True)]
    data["shown"] = [[index[c.row["uri"]], c.row["clip_index"]] for c in shown]
    blob = json.dumps(data).replace("<", "\\u003c")
    tail = (f"<style>{CARD_STYLE}</style><datalist id=\"known\"><option value=\"{MIXED}\"></datalist>"
            f'<script type="application/json" id="rows">{blob}</script><script>{SCRIPT}</script>')
    storage.write_bytes(storage.join(dest, REVIEW_PAGE), page(f"melbatch discover: {cfg.archive}", cfg.out,
                                                             [how, *sections], tail).encode())


def _card(i: int, c: Card) -> str:
    r = c.row
    return (f'<div class="card"><div class="head"><b>{"nearest" if r["where"] == "near" else "edge"}</b> · '
            f"{esc(c.why)}</div><div class=\"uri\">{esc(r['uri'])}</div>{media(c)}<div class=\"note\">clip "
            f"{r['clip_index'] + 1}: {r['start_s']:.1f}–{r['end_s']:.1f} s</div><label>this clip <input "
            f'class="clip" data-shown="{i}" list="known" autocomplete="off"></label></div>')


SCRIPT = """
const data = JSON.parse(document.getElementById('rows').textContent);
const groupBoxes = Array.from(document.querySelectorAll('input.group'));
const clipBoxes = Array.from(document.querySelectorAll('input.clip'));
const cell = v => /[",\\n\\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
const none = v => !v || data.mixed.includes(v.toLowerCase());
function answers() {
  const label = {};
  groupBoxes.forEach(b => { label[b.dataset.group] = b.value.trim(); });
  const own = new Map();
  clipBoxes.forEach(b => {
    const s = data.shown[b.dataset.shown];
    if (b.value.trim()) own.set(s[0] + '#' + s[1], b.value.trim());
  });
  const rows = [];
  data.clips.forEach(([u, c, s, e, g, d]) => {
    const mine = own.get(u + '#' + c);
    const lab = mine !== undefined ? mine : (d <= data.cutoffs[g] ? label[g] : '');
    if (!none(lab)) rows.push([data.uris[u], c, s.toFixed(3), e.toFixed(3), 'group ' + (g + 1), '', lab]);
  });
  return rows;
}
function filled() {
  document.getElementById('filled').textContent = answers().length + ' of ' + data.clips.length + ' clips labelled';
}
[...groupBoxes, ...clipBoxes].forEach(b => b.addEventListener('input', filled));
document.getElementById('save').addEventListener('click', () => {
  const lines = [data.columns.join(',')].concat(answers().map(r => r.map(v => cell(String(v))).join(',')));
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([lines.join('\\n') + '\\n'], {type: 'text/csv'}));
  a.download = 'labels.csv';
  a.click();
});
filled();
"""


__all__ = ["MIXED", "Summary", "run"]
