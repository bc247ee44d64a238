"""HTML reports with PNG charts, shared by every stage that reports (agreement, mining, eval).

A report is a folder: ``report.json`` (the numbers), ``report.html`` (tables and images) and
the PNG files it shows. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(matrix: np.ndarray, path: Path, title: str) -> Path:
    """Rows: human grade; columns: predicted grade; cells: counts, shaded by row share."""
    plt = _mpl()
    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=110)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=8)
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("human grade")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_png(labels: list[str], values: list[float], path: Path, title: str, ylabel: str) -> Path:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    ax.bar(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def table_html(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(folder: Path, title: str, data: dict, sections: list[tuple[str, str]]) -> Path:
    """sections: (heading, html body) pairs; images are referenced by file name in the folder. Both files go
    through assay.store.redact / redact_text: a report never shows a credential (a judge's base_url, an error)."""
    from assay.store import redact, redact_text

    folder.mkdir(parents=True, exist_ok=True)
    data = redact(data)
    sections = [(redact_text(h), redact_text(b)) for h, b in sections]
    (folder / "report.json").write_text(json.dumps(data, indent=1, default=str))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}img{margin:4px;border:1px solid #eee}")
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
             f"<body><h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    out = folder / "report.html"
    out.write_text("".join(parts))
    return out


def img(name: str) -> str:
    return f"<img src='{html.escape(name)}'>"
