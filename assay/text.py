"""The one item-text template, shared by BM25 mining, ANN mining, training, indexing and serving.

Following Walmart 2412.04637, item text is the title plus attributes, with category, brand and
color as prefixes::

    category: Furniture > Sofa | brand: Acme | color: blue | Acme Velvet 3-Seat Sofa | material: velvet; size: large

Changing this template changes every embedding: `TEXT_TEMPLATE_VERSION` is part of every
cache key and index manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

TEXT_TEMPLATE_VERSION = "item-text/1"
PREFIX_ATTRS = ("color",)
ITEM_TEXT_COLUMNS = ["item_id", "title", "brand", "category", "attributes"]


def _attrs(raw: str | None) -> dict:
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def item_text(title: str, brand: str | None, category: str | None, attributes: str | dict | None) -> str:
    attrs = attributes if isinstance(attributes, dict) else _attrs(attributes)
    parts = []
    if category:
        parts.append(f"category: {category}")
    if brand:
        parts.append(f"brand: {brand}")
    for a in PREFIX_ATTRS:
        v = attrs.get(a)
        if v not in (None, ""):
            parts.append(f"{a}: {v}")
    parts.append(title)
    rest = [f"{k}: {v}" for k, v in attrs.items() if k not in PREFIX_ATTRS and v not in (None, "")]
    if rest:
        parts.append("; ".join(rest))
    return " | ".join(parts)


def item_texts(table: pa.Table) -> list[str]:
    """Item texts for an Arrow table with ITEM_TEXT_COLUMNS (item_id optional)."""
    cols = {c: table.column(c).to_pylist() for c in ("title", "brand", "category", "attributes")}
    return [item_text(t, b, c, a) for t, b, c, a in zip(cols["title"], cols["brand"], cols["category"], cols["attributes"])]


def text_shas(texts: Iterable[str]) -> np.ndarray:
    """16-byte blake2b digests of texts, as a fixed-width bytes array (cache keys)."""
    return np.array([hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts], dtype="S16")


def file_sha256(path) -> str:
    """The sha256 of a file's bytes (hex), read in blocks: what manifests record to refuse a changed file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def digest(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# The fields a judge reads for one (query, item) pair: exactly what assay.annotate.base.Pair carries to every
# template and to the features judge. Every prompts/ template renders all of them.
PAIR_TEXT_FIELDS = ("{q}.text", "{p}.title", "{p}.description", "{p}.brand", "{p}.category",
                    "CAST({p}.attributes AS VARCHAR)")


def pair_text_sha_sql(q: str = "q", p: str = "p") -> str:
    """DuckDB SQL for the digest of the texts the judges read for a pair: the query's text (table alias ``q``) and
    the product's title, description, brand, category and attributes (alias ``p``). A label records it
    (``labels.text_sha``); a label whose digest differs from the one computed now judged text that has since
    changed, so the pair is annotated again and nothing downstream reads the old grade. NULL and '' differ."""
    parts = [f"coalesce({f.format(q=q, p=p)}, chr(30))" for f in PAIR_TEXT_FIELDS]
    return f"md5(concat_ws(chr(31), {', '.join(parts)}))"


def stamp_text_sha_sql(table: str) -> str:
    """An UPDATE that sets ``table.text_sha`` (labels, label_votes) to the digest of the texts the workspace holds
    now: the v9 migration binds labels written before text digests existed to the texts of that moment."""
    return (f"UPDATE {table} AS l SET text_sha = {pair_text_sha_sql()} FROM queries AS q, products AS p "
            "WHERE q.query_id = l.query_id AND p.item_id = l.item_id")

