"""Cascade routing: pure functions over calibrated probabilities (no I/O, no models).

Routing, for judges in order (cheapest first):
1. A judge accepts a pair when its calibrated top-class probability reaches that class's
   threshold: ``p[top] >= thresholds[judge][top]``. A pair the judge could not grade (NaN
   probabilities: unparsed output or a failed call) is never accepted by it.
2. Otherwise the pair goes to the next judge.
3. A pair no judge accepted gets a calibrated vote: the mean of the calibrated probability
   vectors of every judge that graded it; the grade is the vote's argmax. Tie-break, in order:
   the grade ranked higher by the latest (most expensive) judge that graded the pair, then the
   lower grade (a conservative label). A pair no judge could grade is ``failed``.

Threshold fitting (:func:`fit_thresholds`): for each judge and each grade c, the smallest
threshold t such that, among calibration pairs whose top class is c with confidence >= t, the
agreement with the human grade is at least ``target``; a grade where no threshold reaches the
target (or with fewer than ``min_support`` pairs above it) gets ``NEVER`` (the judge never
settles that grade). The target defaults to the last judge's own calibration accuracy, so the
cascade aims to lose nothing against its strongest judge while cheap judges settle what they
are sure of.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEVER = 1.01  # a threshold no probability reaches
VOTE = "vote"


@dataclass
class Decisions:
    grade: np.ndarray  # (n,) int8, -1 = failed
    probs: np.ndarray  # (n, 5) float32 (NaN when failed)
    decided_by: np.ndarray  # (n,) object: judge name, "vote", or None when failed
    confidence: np.ndarray  # (n,) float32
    reached: np.ndarray  # (n_judges, n) bool: which judges saw each pair


def route(calibrated: list[np.ndarray], names: list[str], thresholds: list[np.ndarray]) -> Decisions:
    """Route pairs through judges given every judge's calibrated probabilities for every pair.

    In a live run a judge only computes the pairs that reach it; for reports, pass every
    judge's outputs and read `reached` to know what the cascade would have run."""
    n = len(calibrated[0]) if calibrated else 0
    grade = np.full(n, -1, dtype=np.int8)
    probs = np.full((n, 5), np.nan, dtype=np.float32)
    conf = np.full(n, np.nan, dtype=np.float32)
    by = np.full(n, None, dtype=object)
    reached = np.zeros((len(calibrated), n), dtype=bool)
    open_ = np.ones(n, dtype=bool)
    for j, (p, name, th) in enumerate(zip(calibrated, names, thresholds)):
        reached[j] = open_
        acc = accept_mask(p, th) & open_
        top = np.nan_to_num(p, nan=-1).argmax(axis=1)
        grade[acc] = top[acc]
        probs[acc] = p[acc]
        conf[acc] = p[acc, top[acc]]
        by[acc] = name
        open_ &= ~acc
    if open_.any():
        idx = np.flatnonzero(open_)
        v_grade, v_probs = vote([p[idx] for p in calibrated])
        ok = v_grade >= 0
        grade[idx] = v_grade
        probs[idx] = v_probs
        conf[idx[ok]] = v_probs[ok, v_grade[ok]]
        by[idx[ok]] = VOTE
    return Decisions(grade, probs, by, conf, reached)


def accept_mask(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(p).any(axis=1)
    top = np.nan_to_num(p, nan=-1).argmax(axis=1)
    mask = np.zeros(len(p), dtype=bool)
    mask[ok] = p[ok, top[ok]] >= np.asarray(thresholds)[top[ok]]
    return mask


def vote(calibrated: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the calibrated vectors that exist per pair; tie-break documented above."""
    stack = np.stack(calibrated)  # (J, n, 5)
    valid = ~np.isnan(stack).any(axis=2)  # (J, n)
    counts = valid.sum(axis=0)
    summed = np.where(valid[..., None], stack, 0.0).sum(axis=0)
    mean = summed / np.maximum(counts, 1)[:, None]
    n = stack.shape[1]
    grade = np.full(n, -1, dtype=np.int8)
    out = np.full((n, 5), np.nan, dtype=np.float32)
    for i in np.flatnonzero(counts > 0):
        m = mean[i]
        best = np.flatnonzero(np.isclose(m, m.max(), rtol=0, atol=1e-6))
        if len(best) > 1:
            last = max(j for j in range(stack.shape[0]) if valid[j, i])
            pref = stack[last, i, best]
            best = best[np.isclose(pref, pref.max(), rtol=0, atol=1e-6)]
        grade[i] = best.min()
        out[i] = m
    return grade, out


def fit_thresholds(calibrated: np.ndarray, human: np.ndarray, target: float, min_support: int = 5) -> np.ndarray:
    """Per-grade thresholds for one judge (see the module docstring)."""
    th = np.full(5, NEVER)
    ok = ~np.isnan(calibrated).any(axis=1)
    p, y = calibrated[ok], human[ok]
    top = p.argmax(axis=1)
    conf = p[np.arange(len(p)), top]
    for c in range(5):
        sel = top == c
        if sel.sum() < min_support:
            continue
        cs, correct = conf[sel], (y[sel] == c)
        order = np.argsort(-cs)
        cs, correct = cs[order], correct[order]
        prec = np.cumsum(correct) / np.arange(1, len(cs) + 1)
        # the lowest confidence cut whose accepted set still meets the target precision
        good = np.flatnonzero((prec >= target) & (np.arange(1, len(cs) + 1) >= min_support))
        if len(good):
            k = good.max()
            # do not split ties: the threshold is the confidence of the k-th pair
            th[c] = float(cs[k])
    return th
