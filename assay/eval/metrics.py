"""Ranking metrics on judged (query, item) pairs.

All functions are pure: they take a retriever's ranking and the graded judgements for one query (or flat
arrays for many queries) and return numbers; nothing is read or written.

Grades use the 0-4 scale: 4 exact, 3 close, 2 substitute, 1 complement, 0 embarrassing. An item is
*relevant* when its grade is >= 3 (``min_grade``), and *embarrassing* when its grade is 0.

Inputs for one query
    ``ranked``  a sequence of item ids in rank order (the retriever's top-k, best first).
    ``judged``  a dict ``item_id -> grade`` (int 0-4) with the judgements available for that query.

Metrics are computed on judged pairs only. An unjudged retrieved item is neither relevant nor
embarrassing: it adds no gain to DCG, does not count towards recall, and is left out of the embarrassing
rate's denominator. Because unjudged items silently score zero, ``judged@10`` reports the share of the top
10 that is judged; read the other metrics next to it (a low judged@10 means the numbers are a lower bound
for NDCG/recall and a small-sample estimate for the embarrassing rate).

If an id appears more than once in ``ranked``, only its first position counts; later repeats occupy a
slot but are treated like unjudged items (no gain, not relevant, not embarrassing, not judged).

Metrics
    ``ndcg@k``          DCG over the top k with exponential graded gain ``2**grade - 1`` and discount
                        ``1 / log2(rank + 1)`` (rank 1-based), divided by the ideal DCG: the DCG of the best
                        k judged grades for the query in descending order. In [0, 1]. When the ideal DCG is
                        0 (no judged item with grade > 0) the value is NaN.
    ``recall@k``        |relevant judged items in the top k| / |relevant judged items|. NaN when the query
                        has no relevant judged item.
    ``embarrassing@k``  share of grade-0 items among the *judged* items in the top k. NaN when none of the
                        top k is judged.
    ``judged@k``        share of the top ``min(k, len(ranked))`` positions holding a judged item. NaN for an
                        empty ranking.

NaN means "undefined for this query": :func:`aggregate` skips NaN values (nanmean) and reports, per metric,
``n`` = how many queries had it defined, next to ``queries`` = how many queries there were.

Re-ranking a judged pool (:func:`rerank_ndcg`, :func:`mean_rerank_ndcg`): the model scores every judged
item of a query, items are ordered by score descending (ties keep the original order), and NDCG@k is
computed with the same gain and discount against the ideal ordering of the same pool. This is the
validation metric used for checkpoint selection.

Comparing two systems on the same queries (:func:`paired_bootstrap`): the mean per-query difference of a
metric, with a percentile confidence interval from resampling queries with replacement (both systems keep
their own value for each drawn query), and the share of resamples in which the difference is above 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import islice
from numbers import Real
from typing import Any

import numpy as np

__all__ = [
    "RELEVANT_GRADE",
    "dcg_gain",
    "ndcg_at_k",
    "recall_at_k",
    "embarrassing_rate_at_k",
    "judged_at_k",
    "query_metrics",
    "aggregate",
    "rerank_ndcg",
    "mean_rerank_ndcg",
    "paired_bootstrap",
]

RELEVANT_GRADE = 3
"""Grades at or above this count as relevant (3 close, 4 exact)."""

NAN = float("nan")


def dcg_gain(grade):
    """Exponential graded gain ``2**grade - 1``.

    Grade 0 gains 0, 1 -> 1, 2 -> 3, 3 -> 7, 4 -> 15: each grade step roughly doubles the value, so an
    exact match is worth about twice a close one. Accepts a scalar (returns float) or an array (returns a
    float array).
    """
    if isinstance(grade, np.ndarray):
        return np.exp2(grade.astype(np.float64)) - 1.0
    return float(2.0 ** float(grade) - 1.0)


def _discounts(n: int) -> np.ndarray:
    """``1 / log2(rank + 1)`` for ranks 1..n."""
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


def _check_k(k: int) -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _top_k(ranked: Sequence[Hashable], k: int) -> list[Hashable | None]:
    """The first k ranked ids, with repeats of an earlier id replaced by None (an unjudged slot)."""
    seen: set = set()
    out: list[Hashable | None] = []
    for item in islice(ranked, _check_k(k)):
        if item in seen:
            out.append(None)
        else:
            seen.add(item)
            out.append(item)
    return out


def _grade(judged: Mapping[Hashable, int], item: Hashable | None) -> int | None:
    if item is None:
        return None
    g = judged.get(item)
    return None if g is None else int(g)


def _ideal_dcg(grades: np.ndarray, k: int) -> float:
    """DCG of the best k grades in descending order."""
    if grades.size == 0:
        return 0.0
    best = -np.sort(-grades.astype(np.float64))[:k]
    return float(np.dot(dcg_gain(best), _discounts(best.size)))


def ndcg_at_k(ranked: Sequence[Hashable], judged: Mapping[Hashable, int], k: int = 10) -> float:
    """NDCG@k of one ranking against graded judgements (gain ``2**g - 1``, discount ``1/log2(rank+1)``).

    Unjudged ranked items contribute 0. The ideal DCG uses the best k judged grades of the query.
    Returns a float in [0, 1], or NaN when the ideal DCG is 0 (no judged item with grade > 0); such a
    query is skipped by :func:`aggregate`.
    """
    k = _check_k(k)
    ideal = _ideal_dcg(np.fromiter((int(g) for g in judged.values()), dtype=np.float64, count=len(judged)), k)
    if ideal <= 0.0:
        return NAN
    top = _top_k(ranked, k)
    gains = np.array([0.0 if (g := _grade(judged, it)) is None else dcg_gain(g) for it in top], dtype=np.float64)
    dcg = float(np.dot(gains, _discounts(gains.size))) if gains.size else 0.0
    return min(dcg / ideal, 1.0)


def recall_at_k(
    ranked: Sequence[Hashable], judged: Mapping[Hashable, int], k: int, min_grade: int = RELEVANT_GRADE
) -> float:
    """|relevant items in the top k| / |relevant judged items|, relevant meaning grade >= ``min_grade``.

    NaN when the query has no relevant judged item.
    """
    relevant = {item for item, g in judged.items() if int(g) >= min_grade}
    if not relevant:
        return NAN
    hits = sum(1 for it in _top_k(ranked, k) if it is not None and it in relevant)
    return hits / len(relevant)


def embarrassing_rate_at_k(ranked: Sequence[Hashable], judged: Mapping[Hashable, int], k: int = 10) -> float:
    """Share of grade-0 items among the judged items in the top k (unjudged items are left out).

    NaN when none of the top k is judged.
    """
    grades = [g for it in _top_k(ranked, k) if (g := _grade(judged, it)) is not None]
    if not grades:
        return NAN
    return sum(1 for g in grades if g == 0) / len(grades)


def judged_at_k(ranked: Sequence[Hashable], judged: Mapping[Hashable, int], k: int = 10) -> float:
    """Share of the top ``min(k, len(ranked))`` positions that hold a judged item. NaN for an empty ranking."""
    top = _top_k(ranked, k)
    if not top:
        return NAN
    return sum(1 for it in top if it is not None and it in judged) / len(top)


def query_metrics(
    ranked: Sequence[Hashable], judged: Mapping[Hashable, int], ks: Sequence[int] = (10, 50, 100)
) -> dict[str, float]:
    """All per-query metrics: ``ndcg@10``, ``recall@k`` for each k in ``ks``, ``embarrassing@10``,
    ``judged@10``. Values may be NaN (see the module docstring)."""
    ranked = list(ranked)
    out: dict[str, float] = {"ndcg@10": ndcg_at_k(ranked, judged, 10)}
    for k in ks:
        out[f"recall@{int(k)}"] = recall_at_k(ranked, judged, int(k))
    out["embarrassing@10"] = embarrassing_rate_at_k(ranked, judged, 10)
    out["judged@10"] = judged_at_k(ranked, judged, 10)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (Real, np.number)) and not isinstance(v, (bool, np.bool_))


def _summarise(rows: list[Mapping[str, Any]], metrics: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"queries": len(rows)}
    counts: dict[str, int] = {}
    for m in metrics:
        vals = np.array(
            [float(r[m]) if _is_number(r.get(m)) else NAN for r in rows], dtype=np.float64
        )
        ok = ~np.isnan(vals)
        n = int(ok.sum())
        counts[m] = n
        out[m] = round(float(vals[ok].mean()), 4) if n else NAN
    out["n"] = counts
    return out


def aggregate(per_query: list[Mapping[str, Any]], segments: Sequence[str | None] | None = None) -> dict[str, dict]:
    """Mean of each metric over queries, ignoring NaN (nanmean), overall and per segment.

    ``per_query`` holds one dict of metrics per query (e.g. from :func:`query_metrics`); non-numeric values
    (such as a query id) are ignored and a missing metric counts as NaN. ``segments``, when given, names
    the segment of each query (same length, e.g. "head", "torso", "tail"; None = no segment).

    Returns ``{"all": summary, <segment>: summary, ...}`` (segments in first-seen order), where a summary is
    ``{"queries": count, <metric>: mean rounded to 4 decimals (NaN when no query defines it), ...,
    "n": {<metric>: queries where it is defined}}``.
    """
    rows = list(per_query)
    metrics: list[str] = []
    for r in rows:
        for key, v in r.items():
            if key not in metrics and _is_number(v):
                metrics.append(key)
    result: dict[str, dict] = {"all": _summarise(rows, metrics)}
    if segments is not None:
        segments = list(segments)
        if len(segments) != len(rows):
            raise ValueError(f"segments has {len(segments)} entries for {len(rows)} queries")
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for r, s in zip(rows, segments):
            if s is not None:
                groups.setdefault(str(s), []).append(r)
        if "all" in groups:
            raise ValueError('"all" is reserved and cannot be a segment name')
        for s, seg_rows in groups.items():
            result[s] = _summarise(seg_rows, metrics)
    return result


def _as_1d(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def rerank_ndcg(scores: np.ndarray, grades: np.ndarray, k: int = 10) -> float:
    """NDCG@k when a model re-ranks one query's judged pool.

    ``scores`` (n,) are model scores and ``grades`` (n,) the judged grades of the same items. Items are
    ranked by score descending, ties broken by original index (stable); gain ``2**g - 1``, discount
    ``1/log2(rank+1)``, ideal = the same pool sorted by grade. NaN if the ideal DCG is 0.
    """
    k = _check_k(k)
    scores = _as_1d("scores", scores).astype(np.float64)
    grades = _as_1d("grades", grades).astype(np.float64)
    if scores.shape != grades.shape:
        raise ValueError(f"scores {scores.shape} and grades {grades.shape} differ in shape")
    ideal = _ideal_dcg(grades, k)
    if ideal <= 0.0:
        return NAN
    order = np.argsort(-scores, kind="stable")[:k]
    dcg = float(np.dot(dcg_gain(grades[order]), _discounts(order.size)))
    return dcg / ideal


def _grouped_dcg(sorted_gains: np.ndarray, group: np.ndarray, starts: np.ndarray, n_groups: int, k: int) -> np.ndarray:
    """Per-group DCG@k of gains already sorted within contiguous groups (``group`` = group id per row)."""
    rank0 = np.arange(group.size) - starts[group]
    keep = rank0 < k
    weights = sorted_gains[keep] / np.log2(rank0[keep] + 2.0)
    return np.bincount(group[keep], weights=weights, minlength=n_groups)


def mean_rerank_ndcg(
    scores: np.ndarray, grades: np.ndarray, query_index: np.ndarray, k: int = 10
) -> tuple[float, np.ndarray]:
    """Vectorised :func:`rerank_ndcg` over many queries given as flat arrays.

    ``scores``, ``grades`` and ``query_index`` are (n,) arrays; rows with the same ``query_index`` form one
    query's pool. Within a query, items are ranked by score descending with ties broken by original index.

    Returns ``(mean, per_query)``: ``per_query`` holds NDCG@k for each distinct query id in ascending id
    order (aligned with ``np.unique(query_index)``; for ids 0..Q-1 it is indexed by id), NaN where the
    ideal DCG is 0; ``mean`` is the mean over queries with a defined NDCG (NaN if none).
    """
    k = _check_k(k)
    scores = _as_1d("scores", scores).astype(np.float64)
    grades = _as_1d("grades", grades).astype(np.float64)
    query_index = _as_1d("query_index", query_index)
    if not (scores.shape == grades.shape == query_index.shape):
        raise ValueError(
            f"scores {scores.shape}, grades {grades.shape} and query_index {query_index.shape} differ in shape"
        )
    if scores.size == 0:
        return NAN, np.empty(0, dtype=np.float64)

    # Dense group ids 0..G-1 in ascending query id order; counts per group.
    _, group, counts = np.unique(query_index, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    n_groups = counts.size
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    gains = dcg_gain(grades)
    idx = np.arange(scores.size)

    # Model order: by group, then score descending, then original index (np.lexsort: last key is primary).
    order = np.lexsort((idx, -scores, group))
    dcg = _grouped_dcg(gains[order], group[order], starts, n_groups, k)
    # Ideal order: by group, then grade descending.
    ideal_order = np.lexsort((-grades, group))
    ideal = _grouped_dcg(gains[ideal_order], group[ideal_order], starts, n_groups, k)

    per_query = np.full(n_groups, np.nan)
    ok = ideal > 0.0
    per_query[ok] = dcg[ok] / ideal[ok]
    mean = float(per_query[ok].mean()) if ok.any() else NAN
    return mean, per_query


def paired_bootstrap(a, b, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Paired bootstrap of ``mean(a - b)`` over queries.

    ``a`` and ``b`` hold one system's and another's per-query values of one metric for the same queries in the
    same order; a query where either is NaN is left out. Queries are drawn with replacement ``n_boot`` times.
    Returns ``{"queries", "delta", "lo", "hi", "p_above_0", "p_below_0"}``: the observed mean difference, the
    ``confidence`` percentile interval of the resampled means, and the shares of resamples whose mean
    difference is above and below 0 (one-sided bootstrap probabilities that ``a`` is higher, or lower). With no
    shared query every number is NaN. Seeded: the same inputs give the same interval.
    """
    a = _as_1d("a", np.asarray(a, dtype=np.float64))
    b = _as_1d("b", np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"a {a.shape} and b {b.shape} must hold the same queries")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    if d.size == 0:
        return {"queries": 0, "delta": NAN, "lo": NAN, "hi": NAN, "p_above_0": NAN, "p_below_0": NAN}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for lo in range(0, n_boot, 256):  # blocks of resamples keep memory flat for large query sets
        n = min(256, n_boot - lo)
        means[lo:lo + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    return {"queries": int(d.size), "delta": round(float(d.mean()), 5),
            "lo": round(float(np.quantile(means, tail)), 5), "hi": round(float(np.quantile(means, 1 - tail)), 5),
            "p_above_0": round(float((means > 0).mean()), 4), "p_below_0": round(float((means < 0).mean()), 4)}
