"""Ingest: WANDS, ESCI, generic files and simulated worlds into the workspace.

Reads files, writes ``products``, ``queries``, ``engagement``, ``human_labels`` (plus
``truth_items``, ``truth_queries`` and the ``world`` meta for simulated worlds) and ``rejects``.

Generic columns (rename any of them with ``ingest.columns`` or ``--map table.column=source``):

| table | columns (required in bold) |
|---|---|
| products | **item_id**, **title**, description, brand, category, attributes (JSON object), popularity |
| queries | **query_id**, **text**, frequency |
| engagement | **query_id**, **item_id**, impressions, clicks, add_to_carts, orders, position |
| human_labels | **query_id**, **item_id**, **grade** (0-4), annotator, split (train/calib/eval) |

Invariants:
- Nothing is dropped silently. A record that cannot be used goes to ``rejects`` with its file,
  1-based line (row number for Parquet) and reason: unreadable (encoding, field count, JSON),
  a missing id or title/text, a grade outside 0-4, a non-numeric count, attributes that are
  not a JSON object, clicks above impressions, or a label/engagement row whose query or item
  id is unknown to the workspace.
- Duplicate keys: within one ingest the LAST occurrence wins (files in the order given, lines
  in file order); each superseded record is put in ``rejects`` with the line that replaced it.
  Against rows already in the workspace, the new row replaces the old one (upsert) and the
  count is reported as ``replaced``.
- One ingest is one transaction: it lands whole or not at all.
- Input is streamed in chunks of ``ingest.chunk_rows`` records into DuckDB staging tables.
- ``queries.segment`` is recomputed for the whole table after every ingest (see SegmentConfig).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from assay.config import IngestConfig
from assay.data.readers import Chunk, raw_of, read_chunks
from assay.records import get_schema
from assay.store import Store

log = logging.getLogger(__name__)

WANDS_GRADES = {"exact": 4, "partial": 2, "irrelevant": 0}
ESCI_GRADES = {"e": 4, "s": 2, "c": 1, "i": 0}
SPLITS = ("train", "calib", "eval", "audit")  # audit: grades people gave to sampled labels (`assay audit`)
TARGETS = ("products", "queries", "engagement", "human_labels")


class RowError(ValueError):
    """A record that cannot be used; the message is the reject reason."""


# --------------------------------------------------------------------------- field parsers
def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    s = str(v).strip()
    return s or None


def _req(rec: dict, col: str, what: str) -> str:
    v = _text(rec.get(col))
    if v is None:
        raise RowError(f"missing {what} (column {col!r})")
    return v


def _int(v: Any, col: str, *, lo: int | None = 0) -> int | None:
    s = _text(v)
    if s is None:
        return None
    try:
        f = float(s)
    except ValueError:
        raise RowError(f"{col} {s!r} is not a number") from None
    if not math.isfinite(f) or f != int(f):
        raise RowError(f"{col} {s!r} is not a whole number")
    i = int(f)
    if lo is not None and i < lo:
        raise RowError(f"{col} {i} is negative")
    return i


def _float(v: Any, col: str) -> float | None:
    s = _text(v)
    if s is None:
        return None
    try:
        f = float(s)
    except ValueError:
        raise RowError(f"{col} {s!r} is not a number") from None
    if not math.isfinite(f):
        raise RowError(f"{col} {s!r} is not finite")
    return f


def _attributes(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False, default=str)
    s = _text(v)
    if s is None:
        return None
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise RowError(f"attributes is broken JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RowError(f"attributes must be a JSON object, got {type(obj).__name__}")
    return json.dumps(obj, ensure_ascii=False)


# --------------------------------------------------------------------------- row mappers
# A mapper turns one source record into one target row (a dict of target columns) or raises
# RowError. `m` is the target->source column map.
Mapper = Callable[[dict, dict], dict]


def map_product(rec: dict, m: dict) -> dict:
    return {
        "item_id": _req(rec, m["item_id"], "item id"),
        "title": _req(rec, m["title"], "title"),
        "description": _text(rec.get(m["description"])),
        "brand": _text(rec.get(m["brand"])),
        "category": _text(rec.get(m["category"])),
        "attributes": _attributes(rec.get(m["attributes"])),
        "popularity": _float(rec.get(m["popularity"]), "popularity"),
    }


def map_query(rec: dict, m: dict) -> dict:
    return {
        "query_id": _req(rec, m["query_id"], "query id"),
        "text": _req(rec, m["text"], "query text"),
        "frequency": _int(rec.get(m["frequency"]), "frequency"),
    }


def map_engagement(rec: dict, m: dict) -> dict:
    row = {
        "query_id": _req(rec, m["query_id"], "query id"),
        "item_id": _req(rec, m["item_id"], "item id"),
        "impressions": _int(rec.get(m["impressions"]), "impressions"),
        "clicks": _int(rec.get(m["clicks"]), "clicks"),
        "add_to_carts": _int(rec.get(m["add_to_carts"]), "add_to_carts"),
        "orders": _int(rec.get(m["orders"]), "orders"),
        "position": _float(rec.get(m["position"]), "position"),
    }
    if row["impressions"] is not None and row["clicks"] is not None and row["clicks"] > row["impressions"]:
        raise RowError(f"clicks {row['clicks']} > impressions {row['impressions']}")
    if row["position"] is not None and row["position"] <= 0:
        raise RowError(f"position {row['position']} must be >= 1")
    return row


def _grade(v: Any, col: str) -> int:
    g = _int(v, col, lo=None)
    if g is None:
        raise RowError(f"missing grade (column {col!r})")
    if not 0 <= g <= 4:
        raise RowError(f"grade {g} is outside the 0-4 scale")
    return g


def _split(v: Any) -> str | None:
    s = _text(v)
    if s is None:
        return None
    s = s.lower()
    s = {"test": "eval", "valid": "calib", "validation": "calib", "dev": "calib"}.get(s, s)
    if s not in SPLITS:
        raise RowError(f"split {v!r} is not one of {list(SPLITS)}")
    return s


def map_label(rec: dict, m: dict) -> dict:
    return {
        "query_id": _req(rec, m["query_id"], "query id"),
        "item_id": _req(rec, m["item_id"], "item id"),
        "grade": _grade(rec.get(m["grade"]), "grade"),
        "annotator": _text(rec.get(m["annotator"])) or "human",
        "split": _split(rec.get(m["split"])),
    }


GENERIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "products": ("item_id", "title", "description", "brand", "category", "attributes", "popularity"),
    "queries": ("query_id", "text", "frequency"),
    "engagement": ("query_id", "item_id", "impressions", "clicks", "add_to_carts", "orders", "position"),
    "human_labels": ("query_id", "item_id", "grade", "annotator", "split"),
}
MAPPERS: dict[str, Mapper] = {
    "products": map_product, "queries": map_query, "engagement": map_engagement, "human_labels": map_label,
}
ARROW_TYPES: dict[str, pa.DataType] = {
    "frequency": pa.int64(), "impressions": pa.int64(), "clicks": pa.int64(), "add_to_carts": pa.int64(),
    "orders": pa.int64(), "grade": pa.int8(), "popularity": pa.float64(), "position": pa.float64(),
}


# --------------------------------------------------------------------------- formats
@dataclass
class Source:
    """One input file for one target table. `mapper` maps source records to target rows."""

    target: str
    path: Path
    mapper: Mapper
    columns: dict[str, str]  # target -> source column
    delimiter: str | None = None
    explode: Callable[[dict], Iterator[dict]] | None = None  # optional: one record -> several


def generic_sources(files: dict[str, Path], cfg: IngestConfig, overrides: dict[str, dict[str, str]] | None = None) -> list[Source]:
    out = []
    for target in TARGETS:
        if target not in files:
            continue
        cols = {c: c for c in GENERIC_COLUMNS[target]}
        cols.update(cfg.columns.get(target, {}))
        cols.update((overrides or {}).get(target, {}))
        unknown = set(cols) - set(GENERIC_COLUMNS[target])
        if unknown:
            raise ValueError(f"column map for {target} names unknown target column(s) {sorted(unknown)}; "
                             f"targets are {list(GENERIC_COLUMNS[target])}")
        out.append(Source(target, files[target], MAPPERS[target], cols, cfg.delimiter))
    return out


def _wands_features(s: str | None) -> dict:
    attrs: dict[str, str] = {}
    for part in (s or "").split("|"):
        if ":" in part:
            k, v = part.split(":", 1)
            k, v = k.strip(), v.strip()
            if k and v:
                attrs[k] = v
    return attrs


def map_wands_product(rec: dict, m: dict) -> dict:
    attrs = _wands_features(rec.get("product_features"))
    if _text(rec.get("product_class")):
        attrs["product_class"] = rec["product_class"].strip()
    return {
        "item_id": _req(rec, "product_id", "item id"),
        "title": _req(rec, "product_name", "title"),
        "description": _text(rec.get("product_description")),
        "brand": None,
        "category": _text(rec.get("category hierarchy")) or _text(rec.get("product_class")),
        "attributes": json.dumps(attrs, ensure_ascii=False),
        "popularity": _float(rec.get("rating_count"), "rating_count"),
    }


def map_wands_query(rec: dict, m: dict) -> dict:
    return {"query_id": _req(rec, "query_id", "query id"), "text": _req(rec, "query", "query text"),
            "frequency": None}


def map_wands_label(rec: dict, m: dict) -> dict:
    label = _text(rec.get("label"))
    if label is None:
        raise RowError("missing label (column 'label')")
    grade = WANDS_GRADES.get(label.lower())
    if grade is None:
        raise RowError(f"WANDS label {label!r} is not Exact, Partial or Irrelevant")
    return {"query_id": _req(rec, "query_id", "query id"), "item_id": _req(rec, "product_id", "item id"),
            "grade": grade, "annotator": "wands", "split": None}


def wands_sources(d: Path) -> list[Source]:
    need = {"products": "product.csv", "queries": "query.csv", "human_labels": "label.csv"}
    missing = [f for f in need.values() if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(f"{d} is not a WANDS directory: missing {missing}")
    return [
        Source("products", d / "product.csv", map_wands_product, {}, "\t"),
        Source("queries", d / "query.csv", map_wands_query, {}, "\t"),
        Source("human_labels", d / "label.csv", map_wands_label, {}, "\t"),
    ]


def make_esci_product_mapper(locale: str | None) -> Mapper:
    def mapper(rec: dict, m: dict) -> dict:
        if locale and _text(rec.get("product_locale")) not in (None, locale):
            raise _Skip()
        desc = " ".join(x for x in (_text(rec.get("product_description")), _text(rec.get("product_bullet_point"))) if x)
        color = _text(rec.get("product_color"))
        return {
            "item_id": _req(rec, "product_id", "item id"),
            "title": _req(rec, "product_title", "title"),
            "description": desc or None,
            "brand": _text(rec.get("product_brand")),
            "category": None,
            "attributes": json.dumps({"color": color} if color else {}, ensure_ascii=False),
            "popularity": None,
        }
    return mapper


def make_esci_query_mapper(locale: str | None) -> Mapper:
    def mapper(rec: dict, m: dict) -> dict:
        if locale and _text(rec.get("product_locale")) not in (None, locale):
            raise _Skip()
        return {"query_id": _req(rec, "query_id", "query id"), "text": _req(rec, "query", "query text"),
                "frequency": None}
    return mapper


def make_esci_label_mapper(locale: str | None) -> Mapper:
    def mapper(rec: dict, m: dict) -> dict:
        if locale and _text(rec.get("product_locale")) not in (None, locale):
            raise _Skip()
        label = _text(rec.get("esci_label"))
        grade = ESCI_GRADES.get((label or "").lower())
        if grade is None:
            raise RowError(f"ESCI label {label!r} is not E, S, C or I")
        split = _text(rec.get("split"))
        return {"query_id": _req(rec, "query_id", "query id"), "item_id": _req(rec, "product_id", "item id"),
                "grade": grade, "annotator": "esci", "split": "eval" if split == "test" else None}
    return mapper


class _Skip(Exception):
    """A record deliberately outside the ingest's scope (another ESCI locale); counted, not rejected."""


def esci_sources(d: Path, cfg: IngestConfig) -> list[Source]:
    ex = sorted(d.glob("*examples*.parquet"))
    pr = sorted(d.glob("*products*.parquet"))
    if not ex or not pr:
        raise FileNotFoundError(f"{d} is not an ESCI directory: need *examples*.parquet and *products*.parquet")
    loc = cfg.esci_locale
    return [
        Source("products", pr[0], make_esci_product_mapper(loc), {}),
        Source("queries", ex[0], make_esci_query_mapper(loc), {}),
        Source("human_labels", ex[0], make_esci_label_mapper(loc), {}),
    ]


SIM_FILES = {"products": "products.csv", "queries": "queries.csv", "engagement": "engagement.csv",
             "human_labels": "human_labels.csv"}


def detect(d: Path) -> str:
    if (d / "world.json").exists():
        return "sim"
    if (d / "product.csv").exists() and (d / "label.csv").exists():
        return "wands"
    if list(d.glob("*examples*.parquet")):
        return "esci"
    if any((d / f).exists() for f in SIM_FILES.values()) or list(d.glob("products.*")):
        return "generic"
    raise ValueError(f"cannot tell the format of {d}: expected world.json (simulated world), WANDS "
                     "product.csv/query.csv/label.csv, ESCI parquet files, or generic products.* / queries.* files")


def generic_files_in(d: Path) -> dict[str, Path]:
    files = {}
    for target in TARGETS:
        for ext in ("csv", "tsv", "jsonl", "parquet"):
            p = d / f"{target}.{ext}"
            if p.exists():
                files[target] = p
                break
    return files


# --------------------------------------------------------------------------- the run
@dataclass
class TableReport:
    read: int = 0
    accepted: int = 0
    inserted: int = 0
    replaced: int = 0
    collapsed: int = 0
    skipped: int = 0
    rejected: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"read": self.read, "accepted": self.accepted, "inserted": self.inserted,
                "replaced": self.replaced,
                "duplicates_collapsed": self.collapsed, "skipped": self.skipped, "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected)}


def _reason_class(reason: str) -> str:
    """Group reasons for the summary (the full reason stays in rejects)."""
    for key in ("bad encoding", "expected", "broken JSON", "missing", "outside the 0-4", "unknown query",
                "unknown item", "duplicate", "not a number", "not a whole number", "attributes",
                "clicks", "label", "split", "negative", "malformed"):
        if key in reason:
            return {"expected": "wrong field count", "outside the 0-4": "grade outside 0-4"}.get(key, key)
    return reason


class _Stager:
    """Collects accepted rows of one target in a TEMP staging table with _file/_line/_ord columns."""

    def __init__(self, store: Store, target: str):
        self.store = store
        self.target = target
        self.name = f"stg_{target}"
        self.cols = list(GENERIC_COLUMNS[target])
        schema = get_schema(target)
        types = dict(schema.columns)
        coldefs = ", ".join(f"{c} {types[c].replace(' NOT NULL', '')}" for c in self.cols)
        store.exec(f"CREATE OR REPLACE TEMP TABLE {self.name} ({coldefs}, _file VARCHAR, _line BIGINT, _ord BIGINT)")
        self.ord = 0

    def add(self, rows: list[dict], file: str, lines: list[int]) -> None:
        if not rows:
            return
        arrays = {}
        for c in self.cols:
            arrays[c] = pa.array([r[c] for r in rows], type=ARROW_TYPES.get(c, pa.string()))
        arrays["_file"] = pa.array([file] * len(rows), pa.string())
        arrays["_line"] = pa.array(lines, pa.int64())
        arrays["_ord"] = pa.array(range(self.ord, self.ord + len(rows)), pa.int64())
        self.ord += len(rows)
        tbl = pa.table(arrays)
        self.store.con.register("_chunk", tbl)
        try:
            self.store.exec(f"INSERT INTO {self.name} SELECT * FROM _chunk")
        finally:
            self.store.con.unregister("_chunk")


def ingest_sources(cfg: IngestConfig, store: Store, sources: list[Source], *, run_id: str, source_name: str,
                   progress: bool = True) -> dict[str, TableReport]:
    """Ingest `sources` (in order) into the workspace inside one transaction."""
    reports: dict[str, TableReport] = {}
    reject_rows: list[dict] = []
    order = {t: i for i, t in enumerate(TARGETS)}
    sources = sorted(sources, key=lambda s: order[s.target])
    with store.transaction():
        stagers: dict[str, _Stager] = {}
        for src in sources:
            rep = reports.setdefault(src.target, TableReport())
            st = stagers.get(src.target) or stagers.setdefault(src.target, _Stager(store, src.target))
            bar = tqdm(desc=f"ingest {src.target} <- {src.path.name}", unit=" rows", disable=not progress)
            for chunk in read_chunks(src.path, cfg.chunk_rows, src.delimiter):
                _ingest_chunk(chunk, src, st, rep, reject_rows, run_id)
                bar.update(len(chunk))
            bar.close()
        for target, st in stagers.items():
            _finish_target(store, st, reports[target], reject_rows, run_id, source_name)
        if reject_rows:
            store.reject(pa.Table.from_pylist(reject_rows, schema=pa.schema([
                ("run_id", pa.string()), ("target", pa.string()), ("file", pa.string()), ("line", pa.int64()),
                ("reason", pa.string()), ("raw", pa.string())])))
        if "queries" in stagers:
            assign_segments(store, cfg.segments.head_share, cfg.segments.torso_share)
        if "human_labels" in stagers:
            assign_splits(store, cfg.split_fractions, cfg.split_seed)
    return reports


def _ingest_chunk(chunk: Chunk, src: Source, st: _Stager, rep: TableReport, rejects: list[dict], run_id: str) -> None:
    rep.read += len(chunk)
    for b in chunk.bad:
        rep.rejected[_reason_class(b.reason)] += 1
        rejects.append({"run_id": run_id, "target": src.target, "file": chunk.file, "line": b.line,
                        "reason": b.reason, "raw": b.raw})
    rows, lines = [], []
    for line, rec in zip(chunk.lines, chunk.records):
        try:
            rows.append(src.mapper(rec, src.columns))
            lines.append(line)
        except _Skip:
            rep.skipped += 1
        except RowError as e:
            reason = str(e)
            rep.rejected[_reason_class(reason)] += 1
            rejects.append({"run_id": run_id, "target": src.target, "file": chunk.file, "line": line,
                            "reason": reason, "raw": raw_of(rec)})
    st.add(rows, chunk.file, lines)


def _sql_reject(store: Store, st: _Stager, where: str, reason_sql: str, rep: TableReport,
                rejects: list[dict], run_id: str) -> None:
    """Move staged rows matching `where` to rejects with a reason computed in SQL."""
    rows = store.exec(
        f"SELECT _file, _line, {reason_sql} AS reason FROM {st.name} WHERE {where}")
    for file, line, reason in rows:
        rep.rejected[_reason_class(reason)] += 1
        rejects.append({"run_id": run_id, "target": st.target, "file": file, "line": line, "reason": reason,
                        "raw": None})
    if rows:
        store.exec(f"DELETE FROM {st.name} WHERE {where}")


def _finish_target(store: Store, st: _Stager, rep: TableReport, rejects: list[dict], run_id: str,
                   source_name: str) -> None:
    target, name = st.target, st.name
    key = get_schema(target).key
    keycols = ", ".join(key)
    # 1. duplicates within this ingest: the last occurrence wins. Identical repeats (every column
    #    equal, e.g. ESCI's one query row per example) are collapsed and counted; differing ones
    #    go to rejects naming the line that superseded them.
    allcols = ", ".join(st.cols)
    store.exec(f"""
        CREATE OR REPLACE TEMP TABLE _dups AS
        SELECT _ord, _file, _line, last_file, last_line, h = last_h AS identical FROM (
            SELECT _ord, _file, _line, hash({allcols}) AS h,
                   row_number() OVER w AS rn, first_value(hash({allcols})) OVER w AS last_h,
                   first_value(_file) OVER w AS last_file, first_value(_line) OVER w AS last_line
            FROM {name} WINDOW w AS (PARTITION BY {keycols} ORDER BY _ord DESC)
        ) WHERE rn > 1""")
    rep.collapsed = int(store.exec("SELECT count(*) FROM _dups WHERE identical")[0][0])
    store.exec(f"DELETE FROM {name} WHERE _ord IN (SELECT _ord FROM _dups WHERE identical)")
    _sql_reject(store, st, "_ord IN (SELECT _ord FROM _dups WHERE NOT identical)",
                f"'duplicate key (' || {_key_text(key)} || '); superseded by ' || "
                f"(SELECT last_file || ':' || last_line FROM _dups d WHERE d._ord = {name}._ord)",
                rep, rejects, run_id)
    # 2. references to unknown ids (products / queries already in the workspace or in this ingest)
    if "query_id" in st.cols and target != "queries":
        _sql_reject(store, st, f"query_id NOT IN (SELECT query_id FROM queries) AND query_id NOT IN "
                               f"(SELECT query_id FROM {_stg_or_empty(store, 'queries')})",
                    "'unknown query id ' || query_id", rep, rejects, run_id)
    if "item_id" in st.cols and target != "products":
        _sql_reject(store, st, f"item_id NOT IN (SELECT item_id FROM products) AND item_id NOT IN "
                               f"(SELECT item_id FROM {_stg_or_empty(store, 'products')})",
                    "'unknown item id ' || item_id", rep, rejects, run_id)
    # 3. upsert into the target table
    cond = " AND ".join(f"t.{k} IS NOT DISTINCT FROM s.{k}" for k in key)
    rep.replaced = int(store.exec(
        f"SELECT count(*) FROM {name} s WHERE EXISTS (SELECT 1 FROM {target} t WHERE {cond})")[0][0])
    store.exec(f"DELETE FROM {target} t USING {name} s WHERE {cond}")
    cols = ", ".join(st.cols)
    store.exec(
        f"INSERT INTO {target} ({cols}, source, run_id) SELECT {cols}, ?, ? FROM {name} ORDER BY _ord",
        [source_name, run_id])
    rep.accepted = int(store.exec(f"SELECT count(*) FROM {name}")[0][0])
    rep.inserted = rep.accepted - rep.replaced


def _stg_or_empty(store: Store, target: str) -> str:
    exists = store.exec(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND temporary", [f"stg_{target}"])[0][0]
    key = "query_id" if target == "queries" else "item_id"
    return f"stg_{target}" if exists else f"(SELECT NULL::VARCHAR AS {key} WHERE false)"


def _key_text(key: tuple[str, ...]) -> str:
    return " || ', ' || ".join(f"coalesce(CAST({k} AS VARCHAR), 'null')" for k in key)


def assign_segments(store: Store, head_share: float, torso_share: float) -> None:
    """head/torso/tail by cumulative traffic share (ties broken by query_id); 'unknown' without frequency."""
    store.exec(f"""
        UPDATE queries SET segment = s.segment FROM (
            SELECT query_id,
                   CASE WHEN frequency IS NULL OR total = 0 THEN 'unknown'
                        WHEN before < {head_share} * total THEN 'head'
                        WHEN before < {head_share + torso_share} * total THEN 'torso'
                        ELSE 'tail' END AS segment
            FROM (SELECT query_id, frequency,
                         coalesce(sum(frequency) OVER (ORDER BY frequency DESC NULLS LAST, query_id
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before,
                         sum(frequency) OVER () AS total
                  FROM queries)
        ) s WHERE queries.query_id = s.query_id""")


def _unit_hash(text: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def assign_splits(store: Store, fractions: tuple[float, float, float], seed: int) -> None:
    """Give labels without a split one by query: the query's existing split if it has one,
    else a deterministic hash of (seed, query_id) against the fractions."""
    rows = store.exec("""
        SELECT DISTINCT query_id FROM human_labels WHERE split IS NULL""")
    if not rows:
        return
    known = dict(store.exec("""
        SELECT query_id, any_value(split) FROM human_labels WHERE split IS NOT NULL AND split <> 'audit'
        GROUP BY query_id"""))
    a, b = fractions[0], fractions[0] + fractions[1]
    out = []
    for (qid,) in rows:
        if qid in known:
            out.append((qid, known[qid]))
            continue
        u = _unit_hash(qid, seed)
        out.append((qid, "train" if u < a else "calib" if u < b else "eval"))
    tbl = pa.table({"query_id": [q for q, _ in out], "split": [s for _, s in out]})
    store.con.register("_splits", tbl)
    try:
        store.exec("""UPDATE human_labels SET split = s.split FROM _splits s
                             WHERE human_labels.query_id = s.query_id AND human_labels.split IS NULL""")
    finally:
        store.con.unregister("_splits")


def load_world_truth(store: Store, d: Path, run_id: str) -> dict:
    """Load a simulated world's truth tables and manifest (truth/items.parquet, truth/queries.parquet,
    truth/taxonomy.json, world.json)."""
    manifest = json.loads((d / "world.json").read_text())
    taxonomy = json.loads((d / "truth" / "taxonomy.json").read_text())
    with store.transaction():
        n_items = store.import_parquet("truth_items", d / "truth" / "items.parquet", mode="replace")
        n_queries = store.import_parquet("truth_queries", d / "truth" / "queries.parquet", mode="replace")
        store.set_meta("world", manifest)
        store.set_meta("taxonomy", taxonomy)
    return {"truth_items": n_items, "truth_queries": n_queries}


FORMATS = ("auto", "sim", "wands", "esci", "generic")


def run(cfg: IngestConfig, store: Store, *, path: str | Path | None = None,
        files: dict[str, str | Path] | None = None, fmt: str = "auto",
        column_map: dict[str, dict[str, str]] | None = None, progress: bool = True) -> dict:
    """Ingest a directory (`path`, format detected or given) and/or explicit generic `files`
    ({target: file}). Records the run in ``runs`` and returns the summary."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}. Available: {list(FORMATS)}")
    if path is None and not files:
        raise ValueError("nothing to ingest: give a directory or at least one of --products/--queries/"
                         "--engagement/--labels")
    sources: list[Source] = []
    d = Path(path) if path is not None else None
    if d is not None:
        if not d.is_dir():
            raise NotADirectoryError(f"{d} is not a directory")
        fmt = detect(d) if fmt == "auto" else fmt
        if fmt in ("sim", "generic"):
            found = generic_files_in(d)
            if not found:
                raise FileNotFoundError(f"{d} holds no generic files ({', '.join(t + '.csv' for t in TARGETS)}, "
                                        ".tsv/.jsonl/.parquet)")
            sources += generic_sources(found, cfg, column_map)
        elif fmt == "wands":
            sources += wands_sources(d)
        elif fmt == "esci":
            sources += esci_sources(d, cfg)
    if files:
        unknown = set(files) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown target table(s) {sorted(unknown)}; targets are {list(TARGETS)}")
        sources += generic_sources({k: Path(v) for k, v in files.items()}, cfg, column_map)
    source_name = fmt if d is not None else "generic"
    with store.run("ingest", {"ingest": cfg.model_dump(mode="json"), "path": str(d) if d else None,
                              "files": {k: str(v) for k, v in (files or {}).items()}, "format": source_name}) as run_id:
        reports = ingest_sources(cfg, store, sources, run_id=run_id, source_name=source_name, progress=progress)
        summary: dict[str, Any] = {"run_id": run_id, "format": source_name,
                                   "tables": {t: r.as_dict() for t, r in reports.items()}}
        if fmt == "sim" and d is not None:
            summary["truth"] = load_world_truth(store, d, run_id)
        store.finish_run(run_id, summary)
    return summary
