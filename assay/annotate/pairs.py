"""Where the pairs a judge sees come from (SQL over the workspace).

- human splits: ``human_labels`` of one split, one row per (query, item) with the median
  grade over annotators (rounded half down) as the reference; the seed pool (pairs drawn by
  whoever built the seed set) and the mined pool (answers to `assay label-request`) apart or together;
- the work set: the union of ``candidates`` and ``negatives`` (``annotate.sources``).
Both join ``queries.text`` and the product fields the templates use.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from assay.annotate.base import Pair, pairs_from_arrow
from assay.store import Store

_FIELDS = "q.text AS query, p.title, p.description, p.brand, p.category, CAST(p.attributes AS VARCHAR) AS attributes"


# The reference grade of a pair several people graded: the median, rounded half down (SQL over human_labels.grade).
HUMAN_GRADE_SQL = "floor(median(grade) + 0.4)::TINYINT"

POOLS = ("all", "seed", "mined")
_POOL_WHERE = {
    "all": "",
    "seed": "AND NOT EXISTS (SELECT 1 FROM label_requests r WHERE r.query_id = h.query_id AND r.item_id = h.item_id)",
    "mined": "AND EXISTS (SELECT 1 FROM label_requests r WHERE r.query_id = h.query_id AND r.item_id = h.item_id)",
}


def human_pairs(store: Store, split: str, limit: int | None = None, pool: str = "all") -> tuple[list[Pair], np.ndarray]:
    """Human-labeled pairs of one split: ``pool`` all, seed (not requested by `assay label-request`) or mined
    (answers to label requests)."""
    if split not in ("train", "calib", "eval", "audit"):
        raise ValueError(f"split must be train, calib, eval or audit, got {split!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {list(POOLS)}, got {pool!r}")
    tbl = store.query(f"""
        SELECT h.query_id, h.item_id, {_FIELDS}, h.grade
        FROM (SELECT query_id, item_id, {HUMAN_GRADE_SQL} AS grade
              FROM human_labels h WHERE split = ? {_POOL_WHERE[pool]} GROUP BY 1, 2) h
        JOIN queries q USING (query_id) JOIN products p USING (item_id)
        ORDER BY h.query_id, h.item_id {f'LIMIT {int(limit)}' if limit else ''}""", [split])
    if tbl.num_rows == 0:
        what = "" if pool == "all" else f" on {pool} pairs"
        raise ValueError(f"no human labels{what} in the {split!r} split; ingest human labels first (assay ingest)")
    return pairs_from_arrow(tbl), tbl.column("grade").to_numpy(zero_copy_only=False).astype(np.int8)


def requested_pairs(store: Store) -> set[tuple[str, str]]:
    """Every (query_id, item_id) ever sent to people by `assay label-request` (the mined pool)."""
    return {(q, i) for q, i in store.exec("SELECT query_id, item_id FROM label_requests")}


def count_mined(store: Store, pairs: list[Pair]) -> int:
    """How many of ``pairs`` are answers to label requests (the rest are seed pairs)."""
    req = requested_pairs(store)
    return sum((p.query_id, p.item_id) in req for p in pairs)


def work_sql(sources: list[str]) -> str:
    parts = [f"SELECT query_id, item_id FROM {s}" for s in sources]
    return " UNION ".join(parts)


def pending_pairs(store: Store, sources: list[str], cascade_sha: str, limit: int | None = None) -> pa.Table:
    """Work pairs without an ``ok`` label for this cascade, in a stable order."""
    return store.query(f"""
        SELECT w.query_id, w.item_id, {_FIELDS}
        FROM ({work_sql(sources)}) w
        JOIN queries q USING (query_id) JOIN products p USING (item_id)
        WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.query_id = w.query_id AND l.item_id = w.item_id
                          AND l.cascade_sha = ? AND l.status = 'ok')
        ORDER BY w.query_id, w.item_id {f'LIMIT {int(limit)}' if limit else ''}""", [cascade_sha])


def count_work(store: Store, sources: list[str], cascade_sha: str) -> dict:
    total = store.scalar(f"SELECT count(*) FROM ({work_sql(sources)})")
    done = store.scalar("SELECT count(*) FROM labels WHERE cascade_sha = ? AND status = 'ok'", [cascade_sha])
    failed = store.scalar("SELECT count(*) FROM labels WHERE cascade_sha = ? AND status = 'failed'", [cascade_sha])
    return {"work": int(total), "labeled": int(done), "failed": int(failed), "pending": int(total) - int(done)}
