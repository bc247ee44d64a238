"""`assay label-request`: choose the mined pairs people should grade, and (simulated worlds) answer them.

Why: judges trained and calibrated on a seed set drawn like ``human_labels`` (ranker results, same-type,
substitute, complement and random items) meet a different distribution when they label mined candidates: more
grade 3 and 4, harder negatives. Labels on mined pairs teach the judges the pairs they will grade.

Reads ``candidates``, ``negatives``, ``human_labels``, ``label_requests`` and, when present, the newest ``labels``
and ``label_votes`` (the cascade's confidence and its judges' votes). Writes ``label_requests`` (one row per pair
ever requested, so no pair is requested twice) and the request file (csv, jsonl or parquet) with an empty
``grade`` and ``annotator`` column for people to fill; `assay ingest --labels FILE` loads the answers into
``human_labels`` with the split the request assigned.

Selection (config ``label_request``):
- pool: every mined pair (candidates and negatives) without a human label and not requested before;
- uncertainty: ``uncertainty_share`` of ``n`` goes to labeled pairs where the cascade's judges disagreed, then the
  lowest cascade confidence;
- strata: the rest is split over strata of channel agreement and best channel rank (``<n>ch/r<lo>-<hi>``, plus
  ``neg/<kind>`` for mined negatives) in proportion to their size with a floor of ``min_per_stratum``, drawn at
  random (seeded) within each stratum;
- at most ``max_per_query`` pairs per query; the split of a pair is its query's human split when it has one, else
  drawn by a hash of the query id from ``split_fractions``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.config import LabelRequestConfig
from assay.store import Store, utcnow

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "parquet")
FILE_COLUMNS = ["request_id", "query_id", "item_id", "split", "query", "title", "brand", "category", "description",
                "grade", "annotator"]

_POOL_SQL = """
WITH pool AS (
    SELECT query_id, item_id, n_channels,
           least(coalesce(rank_bm25, 2147483647), coalesce(rank_ann, 2147483647),
                 coalesce(rank_click, 2147483647)) AS best_rank, NULL::VARCHAR AS neg_kind
    FROM candidates
    UNION ALL
    SELECT n.query_id, n.item_id, 0, NULL, n.kind FROM negatives n
    WHERE NOT EXISTS (SELECT 1 FROM candidates c WHERE c.query_id = n.query_id AND c.item_id = n.item_id)
), newest AS (
    SELECT query_id, item_id, cascade_sha, confidence
    FROM labels WHERE status = 'ok'
    QUALIFY row_number() OVER (PARTITION BY query_id, item_id ORDER BY created_at DESC, cascade_sha) = 1
), votes AS (
    SELECT v.query_id, v.item_id, count(DISTINCT v.grade) > 1 AS disagree
    FROM label_votes v JOIN newest l USING (query_id, item_id, cascade_sha)
    WHERE v.grade >= 0 GROUP BY 1, 2
)
SELECT p.query_id, p.item_id, p.n_channels, p.best_rank, p.neg_kind, l.confidence,
       coalesce(v.disagree, false) AS disagree
FROM pool p LEFT JOIN newest l USING (query_id, item_id) LEFT JOIN votes v USING (query_id, item_id)
WHERE NOT EXISTS (SELECT 1 FROM human_labels h WHERE h.query_id = p.query_id AND h.item_id = p.item_id)
  AND NOT EXISTS (SELECT 1 FROM label_requests r WHERE r.query_id = p.query_id AND r.item_id = p.item_id)
ORDER BY p.query_id, p.item_id
"""


def strata(n_channels: np.ndarray, best_rank: np.ndarray, neg_kind: list, buckets: list[int]) -> np.ndarray:
    """The stratum name of each pool row: ``<n>ch/r<lo>-<hi>`` for candidates, ``neg/<kind>`` for negatives."""
    edges = [0] + list(buckets)
    names = [f"r{lo + 1}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"r{edges[-1] + 1}+"]
    rank = np.nan_to_num(np.asarray(best_rank, dtype=np.float64), nan=np.inf)  # negatives: no rank
    b = np.searchsorted(np.asarray(buckets, dtype=np.float64), rank, side="left")
    out = np.empty(len(n_channels), dtype=object)
    for k, (nc, bk, neg) in enumerate(zip(np.asarray(n_channels).tolist(), b.tolist(), neg_kind)):
        out[k] = f"neg/{neg}" if neg is not None else f"{nc}ch/{names[bk]}"
    return out


def allocate(sizes: dict[str, int], n: int, floor: int) -> dict[str, int]:
    """Pairs per stratum: proportional to size, at least ``min(floor, size)``, never above size, summing to
    ``min(n, total)``. Largest remainders settle the rounding; a stratum that runs out hands its share on."""
    total = sum(sizes.values())
    n = min(n, total)
    if n <= 0:
        return {k: 0 for k in sizes}
    alloc = {k: min(floor, v, n) for k, v in sizes.items()}
    while sum(alloc.values()) > n:  # floors alone exceed the budget: trim the largest
        k = max(alloc, key=lambda s: (alloc[s], s))
        alloc[k] -= 1
    left = n - sum(alloc.values())
    while left > 0:
        room = {k: sizes[k] - alloc[k] for k in sizes if sizes[k] > alloc[k]}
        mass = sum(sizes[k] for k in room)
        quota = {k: left * sizes[k] / mass for k in room}
        add = {k: min(room[k], int(np.floor(q))) for k, q in quota.items()}
        if sum(add.values()) == 0:  # hand out the remainders one by one, largest first
            for k in sorted(room, key=lambda s: (-(quota[s] - np.floor(quota[s])), s))[:left]:
                add[k] = 1
        for k, a in add.items():
            alloc[k] += a
        left = n - sum(alloc.values())
    return alloc


def _hash01(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64


def split_for(query_id: str, fractions: dict[str, float], seed: int) -> str:
    u = _hash01(f"{seed}:{query_id}")
    acc = 0.0
    for name in ("train", "calib", "eval"):
        acc += fractions.get(name, 0.0)
        if u < acc:
            return name
    return "eval"


def select(pool: pa.Table, cfg: LabelRequestConfig, n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Row indices of ``pool`` to request, each one's reason and stratum (see the module docstring)."""
    m = pool.num_rows
    qids = pool.column("query_id").to_pylist()
    st = strata(pool.column("n_channels").to_numpy(zero_copy_only=False),
                pool.column("best_rank").to_numpy(zero_copy_only=False),
                pool.column("neg_kind").to_pylist(), cfg.rank_buckets)
    conf = pool.column("confidence").to_numpy(zero_copy_only=False).astype(np.float64)
    disagree = pool.column("disagree").to_numpy(zero_copy_only=False).astype(bool)
    rng = np.random.default_rng(cfg.seed)
    chosen: list[int] = []
    reasons: list[str] = []
    per_query: dict[str, int] = {}
    taken = np.zeros(m, dtype=bool)

    def take(idx: int, reason: str) -> bool:
        q = qids[idx]
        if taken[idx] or per_query.get(q, 0) >= cfg.max_per_query:
            return False
        taken[idx] = True
        per_query[q] = per_query.get(q, 0) + 1
        chosen.append(idx)
        reasons.append(reason)
        return True

    labeled = ~np.isnan(conf)
    n_unc = int(round(n * cfg.uncertainty_share)) if labeled.any() else 0
    if n_unc:
        # judges disagreeing first, then the lowest confidence; random among equals
        cand = np.flatnonzero(labeled)
        order = cand[np.lexsort((rng.random(len(cand)), conf[cand], ~disagree[cand]))]
        got = 0
        for idx in order.tolist():
            if got >= n_unc:
                break
            got += take(idx, "uncertain")
    rest = n - len(chosen)
    free = ~taken
    sizes: dict[str, int] = {}
    for s in st[free].tolist():
        sizes[s] = sizes.get(s, 0) + 1
    alloc = allocate(sizes, rest, cfg.min_per_stratum)
    got_of = {s: 0 for s in sizes}
    for idx in rng.permutation(m).tolist():
        if taken[idx]:
            continue
        s = st[idx]
        if got_of[s] < alloc[s] and take(idx, "stratified"):
            got_of[s] += 1
    short = n - len(chosen)
    if short > 0:  # a per-query cap left a stratum short: fill from any stratum
        for idx in rng.permutation(m).tolist():
            if short <= 0:
                break
            if take(idx, "stratified"):
                short -= 1
    idx = np.asarray(chosen, dtype=np.int64)
    return idx, reasons, st[idx] if len(idx) else np.empty(0, dtype=object)


def run(cfg: LabelRequestConfig, store: Store, out: Path, *, n: int | None = None, fmt: str | None = None) -> dict:
    """Choose ``n`` (default ``cfg.n``) mined pairs, record them in ``label_requests`` and write the request file."""
    out = Path(out)
    fmt = fmt or (out.suffix.lstrip(".") or "csv")
    if fmt not in FORMATS:
        raise ValueError(f"unknown request format {fmt!r}; use one of {list(FORMATS)} (or a file ending in one)")
    n = n or cfg.n
    if store.count("candidates") == 0:
        raise ValueError("no mined candidates in this workspace; run `assay mine` first")
    with store.run("label-request", {"label_request": cfg.model_dump(mode="json"), "n": n, "out": str(out)}) as run_id:
        pool = store.query(_POOL_SQL)
        if pool.num_rows == 0:
            raise ValueError("every mined pair already has a human label or a request; nothing left to request")
        idx, reasons, st = select(pool, cfg, n)
        sel = pool.take(pa.array(idx))
        qids = sel.column("query_id").to_pylist()
        known = dict(store.exec("""
            SELECT query_id, any_value(split) FROM (
                SELECT query_id, split FROM human_labels WHERE split IS NOT NULL
                UNION ALL SELECT query_id, split FROM label_requests) GROUP BY 1"""))
        splits = [known.get(q) or split_for(q, cfg.split_fractions, cfg.seed) for q in qids]
        stamp = f"{utcnow():%Y%m%dT%H%M%S}"
        req = pa.table({
            "request_id": [f"req-{stamp}-{k:06d}" for k in range(len(qids))],
            "query_id": qids, "item_id": sel.column("item_id").to_pylist(),
            "stratum": [str(s) for s in st], "reason": reasons, "split": splits,
            "confidence": pc.cast(sel.column("confidence"), pa.float32()),
            "run_id": [run_id] * len(qids), "created_at": pa.array([utcnow()] * len(qids), pa.timestamp("us")),
        })
        with store.transaction():
            store.write("label_requests", req)
        store.con.register("_req", req)
        try:
            rows = store.query("""
                SELECT r.request_id, r.query_id, r.item_id, r.split, q.text AS query, p.title, p.brand, p.category,
                       p.description, NULL::TINYINT AS grade, NULL::VARCHAR AS annotator
                FROM _req r JOIN queries q USING (query_id) JOIN products p USING (item_id)
                ORDER BY r.query_id, r.item_id""")
        finally:
            store.con.unregister("_req")
        write_rows(rows.select(FILE_COLUMNS), out, fmt)
        summary = {"run_id": run_id, "requested": len(qids), "pool": pool.num_rows, "file": str(out), "format": fmt,
                   "queries": len(set(qids)), "by_reason": _counts(reasons), "by_stratum": _counts(st.tolist()),
                   "by_split": _counts(splits)}
        store.finish_run(run_id, summary)
    return summary


def write_rows(tbl: pa.Table, out: Path, fmt: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(tbl, tmp)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(tbl, tmp)
    else:
        import json

        with open(tmp, "w", encoding="utf-8") as fh:
            for row in tbl.to_pylist():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)


def read_rows(path: Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if suffix in (".jsonl", ".json"):
        import pyarrow.json as pajson

        return pajson.read_json(path)
    import pyarrow.csv as pacsv

    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))


def answer_simulated(store: Store, request: Path, out: Path) -> dict:
    """Grade a request file with the simulated world's noisy annotators (simulated worlds only).

    Each query goes to one annotator (chosen by a hash of the query id); the annotators have the accuracy, spread
    and near-miss rate of the world's ``simulate`` config. The answered file has the request's columns with
    ``grade`` and ``annotator`` filled, in the request's format."""
    from assay.data.judgments import load_oracle
    from assay.data.simulate.labels import annotator_accuracies, annotator_names, noisy_grades
    from assay.data.simulate.params import SimulateConfig
    from assay.data.simulate.rng import rng_for

    oracle = load_oracle(store)
    world = store.get_meta("world")
    if oracle is None or not world:
        raise ValueError("this workspace holds no simulated world (truth tables); simulated annotators can only "
                         "answer requests on a world made by `assay simulate`. Send the file to people instead.")
    cfg = SimulateConfig(**world["config"])
    tbl = read_rows(request)
    for col in ("query_id", "item_id"):
        if col not in tbl.column_names:
            raise ValueError(f"{request} has no {col!r} column; is it a file written by `assay label-request`?")
    qids = [str(x) for x in tbl.column("query_id").to_pylist()]
    iids = [str(x) for x in tbl.column("item_id").to_pylist()]
    truth = oracle.grade(np.asarray(qids, dtype=object), np.asarray(iids, dtype=object))
    ann = np.asarray([int(_hash01(f"{cfg.seed}:ann:{q}") * cfg.n_annotators) for q in qids], dtype=np.int64)
    digest = int(hashlib.sha256("\n".join(f"{q}\t{i}" for q, i in zip(qids, iids)).encode()).hexdigest()[:8], 16)
    grades = noisy_grades(truth, ann, annotator_accuracies(cfg), cfg.annotator_near_miss,
                          rng_for(cfg.seed, "answers", digest))
    names = annotator_names(ann, cfg)
    cols = {c: tbl.column(c) for c in tbl.column_names if c not in ("grade", "annotator")}
    cols["grade"] = pa.array(grades.astype(np.int8))
    cols["annotator"] = pa.array(names)
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower() or "csv"
    write_rows(pa.table(cols), out, fmt if fmt in FORMATS else "csv")
    return {"answered": len(qids), "file": str(out), "true_grades": _counts(truth.tolist()),
            "annotator_accuracy": round(float((grades == truth).mean()), 4) if len(qids) else None}


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))
