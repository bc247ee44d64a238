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
from assay.text import pair_text_sha_sql

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


TEXT_SHA = pair_text_sha_sql("q", "p")


def current_labels_sql(where: str = "") -> str:
    """A subquery of the ``labels`` rows whose texts are still the ones the workspace holds (``text_sha`` equal to
    the digest of the query and item texts now): what the curriculum, export, audit and agreement read. A label of a
    pair whose product or query text changed after it was written is stale and is left out. ``where`` filters
    ``labels`` (alias l) first, e.g. "l.status = 'ok'"."""
    return f"""(SELECT l.* FROM labels l JOIN queries q ON q.query_id = l.query_id
               JOIN products p ON p.item_id = l.item_id
               WHERE l.text_sha = {TEXT_SHA}{f' AND ({where})' if where else ''})"""


def count_stale(store: Store, cascade_sha: str | None = None) -> int:
    """``ok`` labels (of one cascade, or of any) whose query or item text changed after they were written."""
    where = "l.status = 'ok'" + (" AND l.cascade_sha = ?" if cascade_sha else "")
    return int(store.scalar(f"""SELECT count(*) FROM labels l JOIN queries q ON q.query_id = l.query_id
                                JOIN products p ON p.item_id = l.item_id
                                WHERE {where} AND l.text_sha IS DISTINCT FROM {TEXT_SHA}""",
                            [cascade_sha] if cascade_sha else []))


def pending_pairs(store: Store, sources: list[str], cascade_sha: str, limit: int | None = None,
                  skip: set[tuple[str, str]] | None = None) -> pa.Table:
    """Work pairs without an ``ok`` label for this cascade and these texts, in a stable order, with the texts'
    digest (``text_sha``) the new label will carry. A pair whose query or item text changed since its label was
    written is pending again. ``skip``: (query_id, item_id) pairs left out (failed too often in this job)."""
    skip_sql = ""
    if skip:
        store.con.register("_skip_pairs", pa.table({"query_id": [q for q, _ in skip], "item_id": [i for _, i in skip]}))
        skip_sql = "AND NOT EXISTS (SELECT 1 FROM _skip_pairs k WHERE k.query_id = w.query_id AND k.item_id = w.item_id)"
    try:
        return store.query(f"""
            SELECT w.query_id, w.item_id, {_FIELDS}, {TEXT_SHA} AS text_sha
            FROM ({work_sql(sources)}) w
            JOIN queries q USING (query_id) JOIN products p USING (item_id)
            WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.query_id = w.query_id AND l.item_id = w.item_id
                              AND l.cascade_sha = ? AND l.status = 'ok' AND l.text_sha = {TEXT_SHA}) {skip_sql}
            ORDER BY w.query_id, w.item_id {f'LIMIT {int(limit)}' if limit else ''}""", [cascade_sha])
    finally:
        if skip:
            store.con.unregister("_skip_pairs")


def failure_reasons(store: Store, cascade_sha: str, example_chars: int = 160) -> list[dict]:
    """Why this cascade's ``failed`` pairs failed: per judge and parse status of their votes, how many pairs, with
    one raw output or error text (redacted, shortened) as an example."""
    from assay.store import redact_text

    rows = store.exec("""SELECT v.judge, v.parse_status, count(*), any_value(v.raw)
                         FROM label_votes v JOIN labels l USING (query_id, item_id, cascade_sha)
                         WHERE l.cascade_sha = ? AND l.status = 'failed' AND v.grade IS NULL
                         GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2""", [cascade_sha])
    return [{"judge": j, "status": st, "pairs": int(n),
             "example": redact_text(str(raw))[:example_chars] if raw is not None else None}
            for j, st, n, raw in rows]


def count_work(store: Store, sources: list[str], cascade_sha: str) -> dict:
    """The work set against this cascade's labels: ``labeled`` (an ok label for the texts as they are now),
    ``stale`` (an ok label for texts that have since changed: pending again), ``failed`` and ``pending``."""
    row = store.exec(f"""
        SELECT count(*),
               count(*) FILTER (WHERE l.status = 'ok' AND l.text_sha = {TEXT_SHA}),
               count(*) FILTER (WHERE l.status = 'ok' AND l.text_sha IS DISTINCT FROM {TEXT_SHA}),
               count(*) FILTER (WHERE l.status = 'failed')
        FROM ({work_sql(sources)}) w
        JOIN queries q USING (query_id) JOIN products p USING (item_id)
        LEFT JOIN labels l ON l.query_id = w.query_id AND l.item_id = w.item_id AND l.cascade_sha = ?""",
                     [cascade_sha])[0]
    total, done, stale, failed = (int(x) for x in row)
    return {"work": total, "labeled": done, "stale": stale, "failed": failed, "pending": total - done}
