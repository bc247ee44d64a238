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

Threshold fitting, two levels:

- :func:`fit_thresholds` (one judge, one precision level tau): for each grade c, the smallest
  threshold t such that, among calibration pairs whose top class is c with confidence >= t, the
  agreement with the human grade is at least tau; a grade where no threshold reaches tau (or
  with fewer than ``min_support`` pairs above it) gets ``NEVER`` (the judge never settles it).
- :func:`fit_cascade` (all judges): searches one tau per judge, replays the cascade on the
  calibration pairs for each combination, and keeps the cheapest one (expected judge-ms per
  pair, from each judge's measured cost and reach) whose agreement with the humans is at least
  ``target - tolerance``. The target defaults to the best single judge's calibrated accuracy, so
  the cascade gives up at most ``tolerance`` against its strongest judge while cheap judges settle
  what they are sure of. If no combination reaches it, the most accurate one is kept (and the
  shortfall is reported). Ties on cost go to the more accurate combination.
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
    has = counts > 0
    out[has] = mean[has]
    grade[has] = mean[has].argmax(axis=1)  # argmax takes the lowest grade among exact ties
    near = np.isclose(mean, mean.max(axis=1, keepdims=True), rtol=0, atol=1e-6).sum(axis=1) > 1
    for i in np.flatnonzero(has & near):  # ties: the latest judge's preference, then the lower grade
        m = mean[i]
        best = np.flatnonzero(np.isclose(m, m.max(), rtol=0, atol=1e-6))
        last = max(j for j in range(stack.shape[0]) if valid[j, i])
        pref = stack[last, i, best]
        best = best[np.isclose(pref, pref.max(), rtol=0, atol=1e-6)]
        grade[i] = best.min()
    return grade, out


@dataclass
class CascadeFit:
    thresholds: list[np.ndarray]
    taus: list[float]  # precision level per judge (0 = accepts everything, NEVER = accepts nothing)
    accuracy: float  # of the replayed cascade on the fitting pairs
    cost: float  # expected judge-ms per pair
    met_target: bool
    searched: int  # combinations replayed
    decisions: Decisions  # the chosen cascade replayed on the fitting pairs (reach, decided_by)


def agreement_score(pred: np.ndarray, human: np.ndarray, metric: str = "accuracy",
                    weight: np.ndarray | None = None) -> float:
    """``accuracy`` or ``balanced`` (the mean of accuracy and the mean recall over the grades present) of the
    graded pairs (``pred >= 0``). ``weight``: one sampling weight per pair (None: every pair counts once)."""
    ok = pred >= 0
    if not ok.any():
        return 0.0
    p, y = pred[ok], human[ok]
    w = np.ones(len(p)) if weight is None else np.asarray(weight, dtype=np.float64)[ok]
    hit = (p == y).astype(np.float64)
    acc = float((w * hit).sum() / w.sum())
    if metric == "accuracy":
        return acc
    if metric != "balanced":
        raise ValueError(f"agreement metric must be accuracy or balanced, got {metric!r}")
    rec = [float((w[y == g] * hit[y == g]).sum() / w[y == g].sum()) for g in range(5) if (y == g).any()]
    return 0.5 * acc + 0.5 * float(np.mean(rec))


def fit_cascade(calibrated: list[np.ndarray], human: np.ndarray, costs: list[float], target: float, *,
                tolerance: float, min_support: int, names: list[str] | None = None, grid: int = 16,
                max_combinations: int = 20000, metric: str = "accuracy", weight: np.ndarray | None = None) -> CascadeFit:
    """The cheapest per-judge precision levels whose replayed cascade reaches ``target - tolerance``.

    Agreement is :func:`agreement_score` with ``metric`` (``annotate.agreement_metric``); ``accuracy`` in
    :class:`CascadeFit` holds that score.

    ``tolerance`` and ``min_support`` come from the config (``annotate.agreement_tolerance``,
    ``annotate.min_support``); ``names`` label ``decisions.decided_by`` (default: judge indices).
    ``costs`` are each judge's measured ms per pair; a judge's expected cost is its cost times the
    share of pairs that reach it. Candidate levels per judge: ``grid`` evenly spaced precision levels
    from the judge's own accuracy to 1, plus 0 (accept everything it grades) and NEVER (pass everything on).
    The search is exhaustive up to ``max_combinations``, else coordinate descent from the
    all-NEVER start (every pair voted by every judge).

    ``weight`` (one per fitting pair, default 1) is a sampling weight: precision, agreement and each judge's reach
    are weighted means, so a sample that over-represents some pairs (an audit sample) is read as the population it
    was drawn from. ``min_support`` still counts pairs."""
    import itertools

    human = np.asarray(human)
    w = np.ones(len(human)) if weight is None else np.asarray(weight, dtype=np.float64)
    if w.shape != human.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weight must hold one non-negative sampling weight per fitting pair")
    names = names or [str(i) for i in range(len(calibrated))]
    levels = [_tau_levels(p, human, grid, w) for p in calibrated]
    cache: dict[tuple, tuple[float, float, list[np.ndarray]]] = {}
    th_cache: dict[tuple[int, float], np.ndarray] = {}

    def th_of(j: int, tau: float) -> np.ndarray:
        if (j, tau) not in th_cache:
            th_cache[(j, tau)] = (np.full(5, NEVER) if tau >= NEVER else
                                  fit_thresholds(calibrated[j], human, tau, min_support, w) if tau > 0 else np.zeros(5))
        return th_cache[(j, tau)]

    def evaluate(taus: tuple) -> tuple[float, float, list[np.ndarray]]:
        if taus not in cache:
            th = [th_of(j, t) for j, t in enumerate(taus)]
            d = route(calibrated, names, th)
            acc = agreement_score(d.grade, human, metric, w)
            cost = float(sum(c * (r * w).sum() / w.sum() for c, r in zip(costs, d.reached)))
            cache[taus] = (acc, cost, th)
        return cache[taus]

    goal = target - tolerance

    def better(a: tuple, b: tuple | None) -> bool:
        if b is None:
            return True
        (acc_a, cost_a, _), (acc_b, cost_b, _) = evaluate(a), evaluate(b)
        meet_a, meet_b = acc_a >= goal - 1e-12, acc_b >= goal - 1e-12
        if meet_a != meet_b:
            return meet_a
        if not meet_a:
            return acc_a > acc_b + 1e-12 or (abs(acc_a - acc_b) <= 1e-12 and cost_a < cost_b)
        return cost_a < cost_b - 1e-9 or (abs(cost_a - cost_b) <= 1e-9 and acc_a > acc_b)

    best = None
    if np.prod([len(lv) for lv in levels]) <= max_combinations:
        for taus in itertools.product(*levels):
            if better(taus, best):
                best = taus
    else:
        best = tuple(NEVER for _ in levels)
        for _ in range(4):
            changed = False
            for j, lv in enumerate(levels):
                for t in lv:
                    cand = best[:j] + (t,) + best[j + 1:]
                    if better(cand, best):
                        best, changed = cand, True
            if not changed:
                break
    acc, cost, th = evaluate(best)
    return CascadeFit(th, [float(t) for t in best], acc, cost, acc >= goal - 1e-12, len(cache),
                      route(calibrated, names, th))


def _tau_levels(p: np.ndarray, human: np.ndarray, grid: int, weight: np.ndarray) -> list[float]:
    """0, NEVER, and ``grid`` precision levels spread over the range one judge's accepted sets can reach."""
    ok = ~np.isnan(p).any(axis=1)
    if not ok.any():
        return [NEVER]
    acc = float(np.average(p[ok].argmax(axis=1) == human[ok], weights=weight[ok]))
    return sorted({0.0, NEVER, *np.round(np.linspace(acc, 1.0, grid), 4).tolist()})


def fit_thresholds(calibrated: np.ndarray, human: np.ndarray, target: float, min_support: int = 5,
                   weight: np.ndarray | None = None) -> np.ndarray:
    """Per-grade thresholds for one judge (see the module docstring); precision is weighted by ``weight``."""
    th = np.full(5, NEVER)
    ok = ~np.isnan(calibrated).any(axis=1)
    p, y = calibrated[ok], human[ok]
    w = np.ones(len(p)) if weight is None else np.asarray(weight, dtype=np.float64)[ok]
    top = p.argmax(axis=1)
    conf = p[np.arange(len(p)), top]
    for c in range(5):
        sel = top == c
        if sel.sum() < min_support:
            continue
        cs, correct, ws = conf[sel], (y[sel] == c), w[sel]
        order = np.argsort(-cs, kind="stable")
        cs, correct, ws = cs[order], correct[order], ws[order]
        prec = np.cumsum(ws * correct) / np.maximum(np.cumsum(ws), 1e-12)
        # the lowest confidence cut whose accepted set still meets the target precision
        good = np.flatnonzero((prec >= target) & (np.arange(1, len(cs) + 1) >= min_support))
        if len(good):
            k = good.max()
            # do not split ties: the threshold is the confidence of the k-th pair
            th[c] = float(cs[k])
    return th
