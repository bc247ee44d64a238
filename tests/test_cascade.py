"""Cascade routing, voting and threshold fitting (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from assay.annotate.cascade import NEVER, VOTE, agreement_score, fit_cascade, fit_thresholds, route, vote

NAN = [np.nan] * 5


def P(*rows):
    return np.array(rows, dtype=np.float32)


def test_cheap_judge_settles_confident_pairs_and_escalates_the_rest():
    cheap = P([0.95, 0.05, 0, 0, 0], [0.1, 0.1, 0.6, 0.1, 0.1], [0, 0, 0, 0.2, 0.8])
    strong = P([0.9, 0.1, 0, 0, 0], [0, 0, 0.1, 0.85, 0.05], [0, 0, 0, 0.1, 0.9])
    th = [np.array([0.9, 0.9, 0.9, 0.9, 0.75]), np.full(5, 0.8)]
    d = route([cheap, strong], ["ce", "llm"], th)
    assert d.grade.tolist() == [0, 3, 4]
    assert d.decided_by.tolist() == ["ce", "llm", "ce"]
    assert d.reached.tolist() == [[True, True, True], [False, True, False]]
    assert np.isclose(d.confidence[1], 0.85)


def test_unaccepted_pairs_get_a_calibrated_vote_and_failed_pairs_are_marked():
    a = P([0.5, 0.5, 0, 0, 0], NAN, NAN)
    b = P([0.3, 0.7, 0, 0, 0], [0, 0, 0.6, 0.4, 0], NAN)
    d = route([a, b], ["a", "b"], [np.full(5, NEVER), np.full(5, NEVER)])
    assert d.decided_by.tolist() == [VOTE, VOTE, None]
    assert d.grade.tolist() == [1, 2, -1]  # mean of the judges that graded; the failed pair stays failed
    assert np.allclose(d.probs[0], [0.4, 0.6, 0, 0, 0])


def test_vote_tie_break_prefers_the_latest_judge_then_the_lower_grade():
    a = P([0, 0, 0, 0.6, 0.4])
    b = P([0, 0, 0, 0.4, 0.6])  # mean is a 0.5/0.5 tie between 3 and 4; b (latest) prefers 4
    g, _ = vote([a, b])
    assert g.tolist() == [4]
    c = P([0, 0, 0.5, 0.5, 0])  # the latest judge itself is tied: the lower grade wins
    g, _ = vote([c])
    assert g.tolist() == [2]


def test_fit_thresholds_reaches_target_precision_and_never_when_impossible():
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 5, n)
    conf = rng.uniform(0.2, 1.0, n)
    correct = rng.uniform(size=n) < conf  # a calibrated judge: right with probability conf
    top = np.where(correct, y, (y + 1) % 5)
    probs = np.full((n, 5), 0.0)
    probs[np.arange(n), top] = conf
    rest = (1 - conf) / 4
    probs += rest[:, None] * (probs == 0)
    th = fit_thresholds(probs.astype(np.float32), y, target=0.9)
    for c in range(5):
        assert th[c] < NEVER
        sel = (top == c) & (conf >= th[c])
        assert (y[sel] == c).mean() >= 0.9
        assert sel.sum() > 50  # it still settles a good share
    # a judge that is right only half the time never reaches 0.95
    th2 = fit_thresholds(P(*([[0.9, 0.1, 0, 0, 0]] * 40)), np.array([0, 1] * 20), target=0.95)
    assert th2[0] == NEVER


def test_sampling_weights_change_precision_and_agreement_by_hand():
    probs = P(*[[c, 1 - c, 0, 0, 0] for c in (0.9, 0.8, 0.7, 0.6)])
    y = np.array([0, 1, 0, 0])
    # unweighted precision down the ranking: 1, 1/2, 2/3, 3/4 -> the lowest cut reaching 0.7 accepts all four
    assert fit_thresholds(probs, y, target=0.7, min_support=1)[0] == pytest.approx(0.6)
    # the wrong pair stands for ten: 1, 1/11, 2/12, 3/13 -> only the first pair is accepted
    assert fit_thresholds(probs, y, target=0.7, min_support=1, weight=np.array([1, 10, 1, 1.0]))[0] == \
        pytest.approx(0.9)
    pred, human = np.array([0, 1, 2]), np.array([0, 0, 2])
    assert agreement_score(pred, human) == pytest.approx(2 / 3)
    assert agreement_score(pred, human, weight=np.array([1, 2, 1.0])) == pytest.approx(0.5)


def calibrated_judge(rng, y, lo, hi):
    """Probabilities of a calibrated judge whose confidence is uniform on [lo, hi]: right with probability conf."""
    n = len(y)
    conf = rng.uniform(lo, hi, n)
    top = np.where(rng.uniform(size=n) < conf, y, (y + rng.integers(1, 5, n)) % 5)
    probs = np.repeat(((1 - conf) / 4)[:, None], 5, axis=1)
    probs[np.arange(n), top] = conf
    return probs.astype(np.float32)


def test_fit_cascade_lets_the_cheap_judge_settle_what_it_is_sure_of():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 3000)
    cheap = calibrated_judge(rng, y, 0.3, 1.0)  # about 0.65 accurate, often very sure
    strong = calibrated_judge(rng, y, 0.6, 0.9)  # about 0.75 accurate
    fit = fit_cascade([cheap, strong], y, costs=[1.0, 10.0], target=0.75, tolerance=0.005, min_support=5)
    assert fit.met_target and fit.accuracy >= 0.745
    d = route([cheap, strong], ["cheap", "strong"], fit.thresholds)
    assert np.isclose((d.grade == y).mean(), fit.accuracy)
    np.testing.assert_array_equal(fit.decisions.grade, d.grade)  # the fit returns the cascade it chose, replayed
    np.testing.assert_array_equal(fit.decisions.reached, d.reached)
    assert (d.decided_by == "cheap").mean() > 0.2  # the cheap judge settles a real share...
    assert fit.cost < 10.0 * 0.85  # ...so the cascade costs clearly less than the strong judge on everything
    assert np.isclose(fit.cost, 1.0 + 10.0 * d.reached[1].mean())
    # the same search by coordinate descent (the path for many judges) also meets the target
    fit_cd = fit_cascade([cheap, strong], y, costs=[1.0, 10.0], target=0.75, max_combinations=1, tolerance=0.01,
                         min_support=5)
    assert fit_cd.met_target and fit_cd.cost <= 10.0
    # free expensive judge: nothing to save, it can take every pair
    free = fit_cascade([cheap, strong], y, costs=[1.0, 0.0], target=0.75, tolerance=0.01, min_support=5)
    assert free.met_target


def test_fit_cascade_keeps_the_most_accurate_combination_when_the_target_is_out_of_reach():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 1000)
    a, b = calibrated_judge(rng, y, 0.3, 0.6), calibrated_judge(rng, y, 0.4, 0.7)
    fit = fit_cascade([a, b], y, costs=[1.0, 2.0], target=0.99, tolerance=0.01, min_support=5)
    assert not fit.met_target
    accs = []
    for ta in (0.0, NEVER):
        for tb in (0.0, NEVER):
            th = [np.full(5, ta), np.full(5, tb)]
            d = route([a, b], ["a", "b"], th)
            accs.append((d.grade == y).mean())
    assert fit.accuracy >= max(accs) - 1e-9


def test_fitted_cascade_keeps_the_best_judges_accuracy_on_held_out_pairs():
    """The cascade is fitted on calibration pairs to stay within ``tolerance`` of its best judge; on held-out pairs
    from the same judges (20,000, never seen by the fit) it must still be there, up to the sampling error of a
    3,000-pair calibration set (two standard errors of its accuracy estimate). A cascade that lets the cheap judge
    settle everything costs a tenth of the strong judge (so a check like ``0 < compute ratio < 2`` accepts it) but
    is ten points less accurate, and fails this bound."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 3000)
    cheap, strong = calibrated_judge(rng, y, 0.3, 1.0), calibrated_judge(rng, y, 0.6, 0.9)
    tol = 0.01
    target = max((cheap.argmax(1) == y).mean(), (strong.argmax(1) == y).mean())  # "None": the best judge on calib
    fit = fit_cascade([cheap, strong], y, costs=[1.0, 10.0], target=target, tolerance=tol, min_support=5)
    assert fit.met_target and fit.cost < 10.0
    y2 = rng.integers(0, 5, 20000)
    held = [calibrated_judge(rng, y2, 0.3, 1.0), calibrated_judge(rng, y2, 0.6, 0.9)]
    best = max((p.argmax(1) == y2).mean() for p in held)
    allowance = 2 * np.sqrt(target * (1 - target) / len(y))

    def held_out_accuracy(thresholds):
        return (route(held, ["cheap", "strong"], thresholds).grade == y2).mean()

    assert held_out_accuracy(fit.thresholds) >= best - tol - allowance
    cheap_only = [np.zeros(5), np.full(5, NEVER)]  # every pair settled by the cheap judge: cost 1 of 10
    assert held_out_accuracy(cheap_only) < best - tol - allowance
