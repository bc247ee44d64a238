"""Ranking metrics: hand-checked arithmetic, NaN conventions, and the vectorised re-rank NDCG."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from assay.eval.metrics import (
    aggregate,
    dcg_gain,
    embarrassing_rate_at_k,
    judged_at_k,
    mean_rerank_ndcg,
    ndcg_at_k,
    paired_bootstrap,
    query_metrics,
    recall_at_k,
    rerank_ndcg,
)

L2 = math.log2
RANKED = ["a", "b", "c"]
JUDGED = {"a": 0, "b": 4, "c": 3, "d": 4}


def test_dcg_gain_is_exponential():
    assert [dcg_gain(g) for g in range(5)] == [0.0, 1.0, 3.0, 7.0, 15.0]
    np.testing.assert_allclose(dcg_gain(np.array([0, 2, 4])), [0.0, 3.0, 15.0])


def test_ndcg_hand_checked():
    # ranks: a (grade 0) @1, b (4) @2, c (3) @3
    dcg = 0 / L2(2) + 15 / L2(3) + 7 / L2(4)
    # ideal from judged grades 4, 4, 3, 0 -> best three: 4, 4, 3
    ideal = 15 / L2(2) + 15 / L2(3) + 7 / L2(4)
    assert ndcg_at_k(RANKED, JUDGED, k=10) == pytest.approx(dcg / ideal, abs=1e-12)
    assert ndcg_at_k(RANKED, JUDGED, k=10) == pytest.approx(12.9640 / 27.9640, abs=1e-4)  # = 0.4636
    # k=2 truncates both the ranking and the ideal
    assert ndcg_at_k(RANKED, JUDGED, k=2) == pytest.approx((15 / L2(3)) / (15 + 15 / L2(3)), abs=1e-12)
    # k=1: top item is embarrassing
    assert ndcg_at_k(RANKED, JUDGED, k=1) == 0.0


def test_ndcg_unjudged_counts_zero_and_perfect_is_one():
    # unjudged "x" at rank 1 pushes b, c down
    dcg = 15 / L2(3) + 7 / L2(4)
    ideal = 15 + 15 / L2(3) + 7 / L2(4)
    assert ndcg_at_k(["x", "b", "c"], JUDGED, k=10) == pytest.approx(dcg / ideal, abs=1e-12)
    assert ndcg_at_k(["b", "d", "c", "a"], JUDGED) == pytest.approx(1.0)
    # ties in the ideal: d and b interchangeable
    assert ndcg_at_k(["d", "b", "c"], JUDGED) == pytest.approx(1.0)
    # a repeated id counts once (cannot exceed 1 by repeating the best item)
    assert ndcg_at_k(["b", "b", "d"], JUDGED, k=3) == pytest.approx((15 + 15 / L2(4)) / (15 + 15 / L2(3) + 7 / 2))


def test_ndcg_nan_when_ideal_is_zero():
    assert math.isnan(ndcg_at_k(["a", "b"], {"a": 0, "b": 0}))
    assert math.isnan(ndcg_at_k(["a"], {}))
    # a single grade-1 item makes the ideal positive
    assert ndcg_at_k(["z", "a"], {"a": 1}) == pytest.approx((1 / L2(3)) / 1.0)


def test_recall():
    # relevant (>= 3): b, c, d
    assert recall_at_k(RANKED, JUDGED, 10) == pytest.approx(2 / 3)
    assert recall_at_k(RANKED, JUDGED, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, JUDGED, 1) == 0.0
    # min_grade=4: b, d relevant
    assert recall_at_k(RANKED, JUDGED, 10, min_grade=4) == pytest.approx(1 / 2)
    # grade 2 (substitute) is not relevant by default
    assert math.isnan(recall_at_k(["a"], {"a": 2, "b": 1}, 10))
    assert recall_at_k(["a"], {"a": 2, "b": 1}, 10, min_grade=2) == 1.0


def test_embarrassing_rate_counts_only_judged():
    # top 10 of [a, x, b, y]: judged a (0), b (4) -> 1/2; x, y unjudged and ignored
    assert embarrassing_rate_at_k(["a", "x", "b", "y"], JUDGED) == pytest.approx(0.5)
    assert embarrassing_rate_at_k(RANKED, JUDGED) == pytest.approx(1 / 3)
    assert embarrassing_rate_at_k(["b", "a"], JUDGED, k=1) == 0.0
    assert math.isnan(embarrassing_rate_at_k(["x", "y"], JUDGED))
    assert math.isnan(embarrassing_rate_at_k([], JUDGED))


def test_judged_at_k():
    assert judged_at_k(["a", "x", "b", "y"], JUDGED) == pytest.approx(2 / 4)  # denominator min(10, 4)
    ranked = ["a"] + [f"u{i}" for i in range(20)]
    assert judged_at_k(ranked, JUDGED, k=10) == pytest.approx(1 / 10)
    assert judged_at_k(RANKED, JUDGED) == 1.0
    assert math.isnan(judged_at_k([], JUDGED))


def test_query_metrics_keys_and_values():
    m = query_metrics(RANKED, JUDGED)
    assert list(m) == ["ndcg@10", "recall@10", "recall@50", "recall@100", "embarrassing@10", "judged@10"]
    assert m["ndcg@10"] == pytest.approx(ndcg_at_k(RANKED, JUDGED))
    assert m["recall@100"] == pytest.approx(2 / 3)
    assert m["embarrassing@10"] == pytest.approx(1 / 3)
    assert m["judged@10"] == 1.0
    assert list(query_metrics(RANKED, JUDGED, ks=(5,))) == ["ndcg@10", "recall@5", "embarrassing@10", "judged@10"]


def test_bad_k_raises():
    with pytest.raises(ValueError):
        ndcg_at_k(RANKED, JUDGED, k=0)
    with pytest.raises(ValueError):
        mean_rerank_ndcg(np.zeros(2), np.zeros(2), np.zeros(2, dtype=int), k=0)


def test_aggregate_nanmean_with_segments():
    nan = float("nan")
    rows = [
        {"query_id": "q1", "ndcg@10": 1.0, "recall@10": nan},
        {"query_id": "q2", "ndcg@10": 0.5, "recall@10": 1.0},
        {"query_id": "q3", "ndcg@10": nan, "recall@10": 0.0},
        {"query_id": "q4", "ndcg@10": 0.123456, "recall@10": nan},
    ]
    out = aggregate(rows, ["head", "tail", "tail", "torso"])
    assert list(out) == ["all", "head", "tail", "torso"]
    a = out["all"]
    assert a["queries"] == 4
    assert a["ndcg@10"] == round((1.0 + 0.5 + 0.123456) / 3, 4) == 0.5412
    assert a["recall@10"] == 0.5
    assert a["n"] == {"ndcg@10": 3, "recall@10": 2}
    assert "query_id" not in a
    assert out["head"]["queries"] == 1 and out["head"]["ndcg@10"] == 1.0
    assert math.isnan(out["head"]["recall@10"]) and out["head"]["n"]["recall@10"] == 0
    assert out["tail"] == {"queries": 2, "ndcg@10": 0.5, "recall@10": 0.5, "n": {"ndcg@10": 1, "recall@10": 2}}
    assert out["torso"]["ndcg@10"] == 0.1235

    assert list(aggregate(rows)) == ["all"]
    with pytest.raises(ValueError):
        aggregate(rows, ["head"])


def test_aggregate_from_query_metrics():
    per_query = [
        query_metrics(RANKED, JUDGED),
        query_metrics(["x"], {"a": 0}),  # ndcg, recall, embarrassing undefined; judged@10 = 0
    ]
    out = aggregate(per_query)["all"]
    assert out["queries"] == 2
    assert out["ndcg@10"] == round(ndcg_at_k(RANKED, JUDGED), 4)
    assert out["judged@10"] == 0.5
    assert out["n"]["ndcg@10"] == 1 and out["n"]["judged@10"] == 2


def test_rerank_ndcg_perfect_reversed_and_ties():
    grades = np.array([4, 3, 2, 1, 0])
    assert rerank_ndcg(np.array([5.0, 4, 3, 2, 1]), grades) == pytest.approx(1.0)
    rev = rerank_ndcg(np.array([1.0, 2, 3, 4, 5]), grades)
    assert rev < 1.0
    # reversed: order 0,1,2,3,4 grades -> gains 0,1,3,7,15
    dcg = 0 / L2(2) + 1 / L2(3) + 3 / L2(4) + 7 / L2(5) + 15 / L2(6)
    ideal = 15 / L2(2) + 7 / L2(3) + 3 / L2(4) + 1 / L2(5)
    assert rev == pytest.approx(dcg / ideal, abs=1e-12)
    # all scores tied: original order kept (stable) -> perfect here, and k truncates
    assert rerank_ndcg(np.zeros(5), grades) == pytest.approx(1.0)
    assert rerank_ndcg(np.zeros(2), np.array([0, 4]), k=1) == 0.0
    # agrees with the dict-based ndcg_at_k
    ids = list("abcd")
    g = np.array([JUDGED[i] for i in ids])
    s = np.array([3.0, 2.0, 1.0, 0.0])  # ranks a, b, c, d
    assert rerank_ndcg(s, g, k=3) == pytest.approx(ndcg_at_k(["a", "b", "c", "d"], JUDGED, k=3))
    assert math.isnan(rerank_ndcg(np.array([1.0, 2.0]), np.array([0, 0])))


def _loop_reference(scores, grades, qidx, k):
    per = np.array([rerank_ndcg(scores[qidx == q], grades[qidx == q], k) for q in np.unique(qidx)])
    ok = ~np.isnan(per)
    return (float(per[ok].mean()) if ok.any() else float("nan")), per


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_mean_rerank_ndcg_matches_loop(seed, k):
    rng = np.random.default_rng(seed)
    n_q = 40
    sizes = rng.integers(1, 25, size=n_q)
    qids = np.repeat(rng.permutation(1000)[:n_q] * 3, sizes)  # sparse, non-contiguous ids
    perm = rng.permutation(qids.size)  # queries interleaved in the flat arrays
    qidx = qids[perm]
    grades = rng.integers(0, 5, size=qidx.size)
    grades[qidx == qidx[0]] = 0  # at least one query with ideal 0 -> NaN
    scores = rng.integers(0, 4, size=qidx.size).astype(np.float32)  # many ties
    mean, per = mean_rerank_ndcg(scores, grades, qidx, k=k)
    ref_mean, ref_per = _loop_reference(scores.astype(np.float64), grades, qidx, k)
    assert per.shape == (n_q,)
    np.testing.assert_allclose(per, ref_per, rtol=0, atol=1e-12, equal_nan=True)
    assert np.isnan(per).sum() >= 1
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert 0.0 < mean < 1.0


def test_mean_rerank_ndcg_tie_break_by_original_index():
    # one query, all tied: rows in original order [0, 4] -> first item (grade 0) ranked first
    mean, per = mean_rerank_ndcg(np.zeros(2), np.array([0, 4]), np.array([7, 7]), k=1)
    assert mean == 0.0 and per.tolist() == [0.0]
    mean, per = mean_rerank_ndcg(np.zeros(2), np.array([4, 0]), np.array([7, 7]), k=1)
    assert mean == 1.0


def test_mean_rerank_ndcg_edge_cases():
    mean, per = mean_rerank_ndcg(np.array([]), np.array([]), np.array([], dtype=int))
    assert math.isnan(mean) and per.size == 0
    mean, per = mean_rerank_ndcg(np.ones(3), np.zeros(3), np.array([0, 1, 1]))
    assert math.isnan(mean) and np.isnan(per).all()
    with pytest.raises(ValueError):
        mean_rerank_ndcg(np.ones(3), np.zeros(2), np.zeros(3, dtype=int))
    # dense ids 0..Q-1: per-query array indexed by id
    mean, per = mean_rerank_ndcg(
        np.array([1.0, 0.0, 0.0, 1.0]), np.array([4, 0, 4, 0]), np.array([1, 1, 0, 0]), k=1
    )
    assert per.tolist() == [0.0, 1.0] and mean == 0.5


def test_mean_rerank_ndcg_is_fast():
    rng = np.random.default_rng(0)
    n = 100_000
    qidx = rng.integers(0, 5_000, size=n)
    grades = rng.integers(0, 5, size=n)
    scores = rng.standard_normal(n).astype(np.float32)
    mean_rerank_ndcg(scores[:1000], grades[:1000], qidx[:1000])  # warm-up
    t0 = time.perf_counter()
    mean, per = mean_rerank_ndcg(scores, grades, qidx)
    elapsed = time.perf_counter() - t0
    assert per.shape == (5_000,) and 0.0 < mean < 1.0
    assert elapsed < 1.0, f"mean_rerank_ndcg took {elapsed:.3f}s for 100k pairs"


def test_paired_bootstrap_interval_and_probabilities():
    rng = np.random.default_rng(3)
    b = rng.random(300)
    # a is b plus 0.05 on every query: the difference is exact, the interval collapses onto it
    r = paired_bootstrap(b + 0.05, b, n_boot=500)
    assert r["queries"] == 300 and r["delta"] == pytest.approx(0.05) and r["lo"] == pytest.approx(0.05)
    assert r["hi"] == pytest.approx(0.05) and r["p_above_0"] == 1.0 and r["p_below_0"] == 0.0
    # noise around a small shift: the interval holds the observed mean and widens with the noise
    noisy = b + 0.01 + rng.normal(0, 0.2, 300)
    r = paired_bootstrap(noisy, b, n_boot=2000, confidence=0.9)
    d = noisy - b
    assert r["delta"] == pytest.approx(d.mean(), abs=1e-5) and r["lo"] < r["delta"] < r["hi"]
    se = d.std(ddof=1) / np.sqrt(300)  # the normal-theory 90% half-width is 1.645 standard errors
    assert (r["hi"] - r["lo"]) / 2 == pytest.approx(1.645 * se, rel=0.15)
    assert 0 < r["p_above_0"] < 1 and r["p_above_0"] + r["p_below_0"] == pytest.approx(1.0)
    # seeded, symmetric, and a query undefined in either system (NaN) is left out of the pairs
    assert paired_bootstrap(noisy, b, n_boot=2000, confidence=0.9) == r
    flip = paired_bootstrap(b, noisy, n_boot=2000, confidence=0.9)
    assert flip["delta"] == pytest.approx(-r["delta"]) and flip["p_below_0"] == r["p_above_0"]
    a2, b2 = noisy.copy(), b.copy()
    a2[:10], b2[10:15] = np.nan, np.nan
    assert paired_bootstrap(a2, b2, n_boot=100)["queries"] == 285
    assert math.isnan(paired_bootstrap([np.nan], [1.0])["delta"])
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap([1.0, 2.0], [1.0])
