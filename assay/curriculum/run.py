"""`assay curriculum`: mined pairs + their labels -> the ``examples`` table.

Reads ``candidates`` (channel ranks, prior), ``negatives`` (token_sim / random), ``labels`` (the newest ``ok``
cascade label per pair, whatever cascade wrote it, among the labels whose texts are unchanged: a stale label
is skipped and counted), ``human_labels`` (the median grade replaces the cascade's on
the same pair when ``human_labels_override``), ``engagement`` and ``queries`` (segment). Writes ``examples``
(replaced as a whole, in one transaction, stamped with the run_id): one row per (query, item) that falls in a
tier, with its tier, default stage, graded target, weight (the label's confidence; 1 for a human grade), grade
and the query's train / val / test split.

Invariants:
- a pair without a label is not an example; the summary counts them and names `assay annotate`;
- a failure (no labels, no candidates) raises before anything is written, so the workspace is unchanged;
- the same inputs and config give the same examples (hash-based caps and splits, no RNG state).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from assay.annotate.pairs import count_stale, current_labels_sql
from assay.config import CurriculumConfig
from assay.curriculum.targets import engagement_signal, graded_targets, normalise_per_query
from assay.curriculum.tiers import (NEGATIVE_TIERS, POSITIVE_TIERS, TIER_NAMES, TIER_STAGE, PairColumns,
                                    assign_tiers, cap_per_query, split_of)
from assay.store import Store

log = logging.getLogger(__name__)

# what fills each tier, for the warning when one comes out empty
TIER_NEEDS = {
    1: "grade-4 candidates retrieved by every active channel (mining.channels; more labels)",
    2: "grade>=3 candidates in BM25's top-N that ANN missed (mining.channels must include bm25 and ann)",
    3: "grade<=1 candidates retrieved by one channel (label more candidates with `assay annotate`)",
    4: "token-similar negatives (mining.negatives.n_token_sim > 0 and annotate.sources including negatives)",
    5: "random negatives (mining.negatives.n_random > 0 and annotate.sources including negatives)",
}

_PAIRS_SQL = f"""
WITH lab AS (
    SELECT query_id, item_id, grade, probs, confidence FROM {current_labels_sql("l.status = 'ok'")}
    QUALIFY row_number() OVER (PARTITION BY query_id, item_id ORDER BY created_at DESC, cascade_sha) = 1),
hum AS (SELECT query_id, item_id, floor(median(grade) + 0.4)::TINYINT AS grade FROM human_labels GROUP BY 1, 2),
eng AS (SELECT query_id, item_id, sum(clicks) AS clicks, sum(add_to_carts) AS atc, sum(orders) AS orders
        FROM engagement GROUP BY 1, 2),
act AS (SELECT query_id, (count(rank_bm25) > 0)::INT + (count(rank_ann) > 0)::INT + (count(rank_click) > 0)::INT
               AS n_active FROM candidates GROUP BY 1),
pairs AS (
    SELECT query_id, item_id, 'candidate' AS source, rank_bm25, rank_ann, rank_click, prior FROM candidates
    UNION ALL
    SELECT query_id, item_id, kind, NULL, NULL, NULL, 0.0 FROM negatives)
SELECT p.query_id, p.item_id, p.source, p.rank_bm25::DOUBLE AS rank_bm25, p.rank_ann::DOUBLE AS rank_ann,
       p.rank_click::DOUBLE AS rank_click, p.prior::DOUBLE AS prior, coalesce(a.n_active, 0) AS n_active,
       lab.grade AS cascade_grade, lab.probs, lab.confidence, hum.grade AS human_grade,
       coalesce(eng.clicks, 0) AS clicks, coalesce(eng.atc, 0) AS atc, coalesce(eng.orders, 0) AS orders,
       coalesce(q.segment, 'unknown') AS segment
FROM pairs p
LEFT JOIN act a USING (query_id)
LEFT JOIN lab USING (query_id, item_id)
LEFT JOIN hum USING (query_id, item_id)
LEFT JOIN eng USING (query_id, item_id)
LEFT JOIN queries q USING (query_id)
ORDER BY p.query_id, p.item_id
"""


def labeled_pairs_sql() -> str:
    """Every mined pair with its grade: the human median where humans graded it, else the newest cascade label
    (NULL when neither exists). Validation of `assay train` reads this; it never reads the simulator's truth."""
    return f"SELECT query_id, item_id, source, coalesce(human_grade, cascade_grade) AS grade FROM ({_PAIRS_SQL.replace('ORDER BY p.query_id, p.item_id', '')})"


def _col(tbl: pa.Table, name: str, dtype=float) -> np.ndarray:
    """A numeric column as numpy; nulls become NaN (float)."""
    return np.asarray(tbl.column(name).to_numpy(zero_copy_only=False), dtype=dtype)


def _probs(col, n: int) -> np.ndarray:
    """The labels' 5 grade probabilities as an (n, 5) float array, NaN rows where a pair has none."""
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if pa.types.is_fixed_size_list(arr.type) and arr.type.list_size == 5:
        vals = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=float)[arr.offset * 5:(arr.offset + n) * 5]
        out = vals.reshape(n, 5).copy()
        out[np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)] = np.nan
        return out
    return np.array([p if p is not None else [np.nan] * 5 for p in arr.to_pylist()], dtype=float).reshape(n, 5)


def build_examples(tbl: pa.Table, cfg: CurriculumConfig) -> tuple[pa.Table, dict]:
    """Pure: the joined pair table (see _PAIRS_SQL) -> (examples rows without run_id, counts)."""
    n = tbl.num_rows
    qids = tbl.column("query_id").to_pylist()
    iids = tbl.column("item_id").to_pylist()
    source = np.array(tbl.column("source").to_pylist(), dtype=object)
    cascade = _col(tbl, "cascade_grade", float)
    human = _col(tbl, "human_grade", float)
    use_human = ~np.isnan(human) & (cfg.human_labels_override | np.isnan(cascade))
    grade = np.where(use_human, human, cascade)
    labeled = ~np.isnan(grade)
    grade_i = np.where(labeled, grade, -1).astype(np.int64)
    uq, qidx = np.unique(np.array(qids, dtype=object), return_inverse=True)
    cascade_probs = _probs(tbl.column("probs"), n)
    p_rel = np.where(use_human, np.nan, cascade_probs[:, 3] + cascade_probs[:, 4])
    pairs = PairColumns(source, _col(tbl, "rank_bm25"), _col(tbl, "rank_ann"), _col(tbl, "rank_click"),
                        _col(tbl, "n_active", np.int64), grade_i)
    tier = assign_tiers(pairs._replace(p_relevant=p_rel), cfg.tiers)
    # positives left out because the cascade was unsure they are relevant: the tiers without that rule, less these
    unsure_pos = np.isin(assign_tiers(pairs, cfg.tiers), POSITIVE_TIERS) & ~np.isin(tier, POSITIVE_TIERS)
    keys = [f"{q}\x1f{i}" for q, i in zip(qids, iids)]
    keep = cap_per_query(qidx, keys, tier, cfg.max_pos_per_query, cfg.max_neg_per_query, cfg.seed)
    # engagement is normalised over all of a query's mined pairs, not only the kept ones
    eng = normalise_per_query(engagement_signal(_col(tbl, "clicks"), _col(tbl, "atc"), _col(tbl, "orders"),
                                                cfg.targets.engagement), qidx)
    probs = None
    if cfg.targets.relevance == "expected":
        probs = np.where(use_human[:, None], np.nan, cascade_probs)
    k = np.flatnonzero(keep)
    target = graded_targets(grade_i[k], eng[k], _col(tbl, "prior")[k], cfg.targets,
                            probs=None if probs is None else probs[k])
    conf = _col(tbl, "confidence")
    weight = np.where(use_human, 1.0, np.nan_to_num(conf, nan=1.0))[k]
    split_q = split_of(uq.tolist(), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    split = split_q[qidx[k]]
    tiers_k = tier[k]
    rows = pa.table({
        "query_id": pa.array([qids[i] for i in k], pa.string()),
        "item_id": pa.array([iids[i] for i in k], pa.string()),
        "tier": pa.array(tiers_k, pa.int8()),
        "stage": pa.array([TIER_STAGE[int(t)] for t in tiers_k], pa.int8()),
        "target": pa.array(target, pa.float32()),
        "weight": pa.array(weight.astype(np.float32), pa.float32()),
        "split": pa.array(split.tolist(), pa.string()),
        "grade": pa.array(grade_i[k].astype(np.int8), pa.int8()),
        "grade_source": pa.array(np.where(use_human[k], "human", "cascade").tolist(), pa.string()),
    })
    segment = np.array(tbl.column("segment").to_pylist(), dtype=object)[k]
    counts = {
        "pairs": n, "labeled": int(labeled.sum()), "unlabeled": int((~labeled).sum()),
        "human_graded": int(use_human.sum()), "in_no_tier": int((labeled & (tier == 0)).sum()),
        "unsure_positives": int(unsure_pos.sum()),
        "capped": int(((tier > 0) & ~keep).sum()), "examples": int(len(k)),
        "queries": {s: int(len(np.unique(qidx[k][split == s]))) for s in ("train", "val", "test")},
        "by_tier": {TIER_NAMES[t]: int((tiers_k == t).sum()) for t in TIER_NAMES},
        "by_grade": {int(g): int((grade_i[k] == g).sum()) for g in range(5)},
        "by_segment": {str(s): {TIER_NAMES[t]: int(((segment == s) & (tiers_k == t)).sum()) for t in TIER_NAMES}
                       for s in sorted(set(segment.tolist()))},
        "by_split": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "target_mean_by_tier": {TIER_NAMES[t]: round(float(target[tiers_k == t].mean()), 4)
                                for t in TIER_NAMES if (tiers_k == t).any()},
    }
    return rows, counts


def run(cfg: CurriculumConfig, store: Store) -> dict:
    if store.count("candidates") == 0 and store.count("negatives") == 0:
        raise ValueError("the workspace has no mined pairs; run `assay mine` (then `assay annotate`) first")
    if store.count("labels", "status = 'ok'") == 0 and store.count("human_labels") == 0:
        raise ValueError("no labels: the curriculum needs graded pairs; run `assay annotate` first")
    with store.run("curriculum", {"curriculum": cfg.model_dump(mode="json")}) as run_id:
        tbl = store.query(_PAIRS_SQL)
        rows, counts = build_examples(tbl, cfg)
        if rows.num_rows == 0:
            raise ValueError("no pair falls in any tier: label more mined pairs with `assay annotate` "
                             f"({counts['unlabeled']:,} of {counts['pairs']:,} pairs have no label yet)")
        warnings = []
        counts["stale_labels_skipped"] = count_stale(store)
        if counts["stale_labels_skipped"]:
            warnings.append(f"{counts['stale_labels_skipped']:,} labels judged texts that have changed since (a "
                            "re-ingested catalog or query file) and were skipped; `assay annotate` relabels them")
        if counts["unlabeled"]:
            warnings.append(f"{counts['unlabeled']:,} of {counts['pairs']:,} mined pairs have no label yet and are "
                            "not examples; `assay annotate` labels them")
        for t, name in TIER_NAMES.items():
            if counts["by_tier"][name] == 0:
                warnings.append(f"tier {t} ({name}) is empty; it needs {TIER_NEEDS[t]}")
        for s in ("train", "val"):
            if counts["queries"][s] == 0:
                warnings.append(f"no {s} queries with examples; adjust curriculum.val_fraction / test_fraction")
        for w in warnings:
            log.warning(w)
        rows = rows.append_column("run_id", pa.array([run_id] * rows.num_rows, pa.string()))
        with store.transaction():
            store.write("examples", rows, mode="replace")
            store.set_meta("curriculum_split", {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
                                                "seed": cfg.seed})
        summary = {"run_id": run_id, **counts, "warnings": warnings,
                   "positive_tiers": [TIER_NAMES[t] for t in POSITIVE_TIERS],
                   "negative_tiers": [TIER_NAMES[t] for t in NEGATIVE_TIERS]}
        store.finish_run(run_id, summary)
    return summary
