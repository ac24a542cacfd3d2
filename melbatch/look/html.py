"""The pieces every page is built from: escaped text, fact lists, tables, embedded PNGs and charts,
and the page frame with its inline style sheet.

Every string that comes from data (object keys, labels, error messages) goes through :func:`esc`;
a :class:`Section` holds fragments that are already escaped, and :func:`page` joins them into one
self-contained file (no server, no network). The report, review and similar pages share these.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from melbatch import URI, __version__
from melbatch.look import pictures


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, already escaped

    def add(self, fragment: str) -> Section:
        self.parts.append(fragment)
        return self


# ------------------------------------------------------------------------------------ HTML pieces

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def facts(pairs: Iterable[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs) + "</dl>"


def table(headers: list[str], rows: Iterable[Iterable[Any]], limit: int | None = None, more: str = "") -> str:
    rows = list(rows)
    shown = rows if limit is None else rows[:limit]
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r) + "</tr>" for r in shown)
    hidden = len(rows) - len(shown)
    tail = note(f"{hidden} more rows not shown{'; ' + more if more else ''}") if hidden else ""
    return (f"<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr></thead>"
            f"<tbody>{body}</tbody></table>{tail}")


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def gallery(items: Iterable[tuple[str, bytes]]) -> str:
    figs = "".join(f"<figure>{image(png, title)}<figcaption>{esc(title)}</figcaption></figure>" for title, png in items)
    return f'<div class="gallery">{figs}</div>' if figs else note("no clips to show")


def confusion(matrix: list[list[float]], labels: list[str]) -> str:
    """The confusion matrix as a table, rows true, columns predicted, shaded by the row's share."""
    head = "".join(f"<th>{esc(lab)}</th>" for lab in labels)
    rows = []
    for lab, counts in zip(labels, matrix, strict=True):
        total = max(1.0, sum(counts))
        cells = "".join(f'<td style="background:rgba(31,78,121,{0.85 * v / total:.2f});color:'
                        f'{"#fff" if v / total > 0.5 else "#000"}">{int(v)}</td>' for v in counts)
        rows.append(f"<tr><th>{esc(lab)}</th>{cells}</tr>")
    return (f'<table class="confusion"><caption>confusion matrix: rows true label, columns predicted</caption>'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds:,.0f} s)"


# ------------------------------------------------------------------------------------------ charts

def figure(width: float = 6.0, height: float = 2.8, ncols: int = 1):
    return pictures.pyplot().subplots(1, ncols, figsize=(width, height), constrained_layout=True)


def png(fig, alt: str) -> str:
    return image(pictures.png_bytes(fig), alt)


def bar_chart(counts: dict[str, int], what: str) -> str:
    if not counts:
        return note(f"no {what}")
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:40]
    fig, ax = figure(6.0, 0.5 + 0.28 * len(items))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#1f4e79")
    ax.set_xlabel(what)
    return png(fig, what)


def histogram(values: list[float], what: str, unit: str) -> str:
    if not values:
        return note(f"no {what}")
    fig, ax = figure()
    ax.hist(values, bins=20, range=(0, 1), color="#1f4e79")
    ax.set_xlabel(what)
    ax.set_ylabel(unit)
    return png(fig, f"histogram of {what}")


def curves_chart(epochs: list[dict[str, Any]]) -> str:
    fig, (left, right) = figure(8.0, 2.8, ncols=2)
    x = [e["epoch"] for e in epochs]
    left.plot(x, [e["train_loss"] for e in epochs], "o-", label="train loss")
    left.plot(x, [e["val_loss"] for e in epochs], "o-", label="validation loss")
    right.plot(x, [e["val_accuracy"] for e in epochs], "o-", label="validation accuracy")
    right.plot(x, [e["macro_f1"] for e in epochs], "o-", label="macro F1")
    right.set_ylim(0, 1.02)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return png(fig, "loss and accuracy per epoch")


def trend_chart(runs: list[str], series: dict[str, list[int]]) -> str:
    fig, ax = figure(8.0, 3.0)
    x = np.arange(len(runs))
    for name, values in series.items():
        ax.plot(x, values, "o-", label=name)
    ax.set_xticks(x, runs, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("objects")
    ax.legend(fontsize=8, ncol=3)
    return png(fig, "objects per scan")


# -------------------------------------------------------------------------------------------- page

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1b1b1b;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1.2em}dt{color:#555}dd{margin:0;word-break:break-all}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top;word-break:break-all}thead th{background:#f3f3f3}
caption{caption-side:bottom;color:#555;font-size:12px;padding-top:.3em}.note{color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}figure{margin:0;max-width:280px}
figcaption{font-size:11px;color:#333;word-break:break-all}img{max-width:100%}
nav a{margin-right:1em}footer{margin-top:3em;color:#777;font-size:12px}
"""


def page(title: str, run: URI, sections: list[Section], tail: str = "") -> str:
    """The whole HTML page; ``tail`` (markup the caller made safe: styles, data, scripts) ends its body."""
    nav = "".join(f'<a href="#s{i}">{esc(s.title)}</a>' for i, s in enumerate(sections))
    body = "".join(f'<section id="s{i}"><h2>{esc(s.title)}</h2>{"".join(s.parts)}</section>'
                   for i, s in enumerate(sections))
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><h1>{esc(title)}</h1><nav>{nav}</nav>{body}"
            f"<footer>melbatch {esc(__version__)} · report of {esc(run)} · made {made}</footer>{tail}</body></html>")
