"""Graded training targets (Walmart "Unified Supervision"; docs/architecture.md "Five tiers, three stages").

    target = clip(mu * rel + lam * eng * 1[grade >= 3] + nu * prior, 0, 1)

- ``rel`` is grade / 4, or (``relevance: expected``) the calibrated expected grade sum_g g * p_g over 4, kept
  within ``expected_band`` grades of the decided grade;
- ``eng`` is log-compressed engagement, ``log1p(signal)``, divided by its maximum over the query's pairs (so in
  [0, 1] per query); it counts only on items graded 3 or 4: engagement never lifts an irrelevant item;
- ``prior`` is mining's retrieval prior in [0, 1] (0 for mined negatives).

:class:`assay.config.TargetConfig` refuses weights with ``lam + nu`` at or above the gap between two grades, so
engagement and the prior order items within a grade and never across grades.
"""

from __future__ import annotations

import numpy as np

from assay.config import TargetConfig
from assay.records import RELEVANT_MIN_GRADE


def engagement_signal(clicks: np.ndarray, add_to_carts: np.ndarray, orders: np.ndarray, kind: str) -> np.ndarray:
    clicks, atc, orders = (np.nan_to_num(np.asarray(a, dtype=float)) for a in (clicks, add_to_carts, orders))
    if kind == "clicks":
        return clicks
    if kind == "orders":
        return orders
    if kind == "weighted":
        return clicks + 3 * atc + 5 * orders
    raise KeyError(f"Unknown engagement signal {kind!r}. Available: ['clicks', 'orders', 'weighted']")


def normalise_per_query(signal: np.ndarray, query_idx: np.ndarray) -> np.ndarray:
    """log1p(signal) / max over the query's pairs; 0 for a query without engagement."""
    x = np.log1p(np.maximum(np.nan_to_num(np.asarray(signal, dtype=float)), 0))
    n_q = int(query_idx.max()) + 1 if len(query_idx) else 0
    qmax = np.zeros(n_q)
    np.maximum.at(qmax, query_idx, x)
    den = qmax[query_idx]
    return np.divide(x, den, out=np.zeros_like(x), where=den > 0)


def relevance(grade: np.ndarray, probs: np.ndarray | None, cfg: TargetConfig) -> np.ndarray:
    g = np.asarray(grade, dtype=float)
    if cfg.relevance == "grade" or probs is None:
        return g / 4
    p = np.asarray(probs, dtype=float)
    ok = np.isfinite(p).all(axis=1) & (p.sum(axis=1) > 0)
    expected = np.where(ok, (np.nan_to_num(p) * np.arange(5)).sum(axis=1) / np.where(ok, p.sum(axis=1), 1), g)
    return np.clip(expected, g - cfg.expected_band, g + cfg.expected_band) / 4


def graded_targets(grade: np.ndarray, engagement: np.ndarray, prior: np.ndarray, cfg: TargetConfig,
                   probs: np.ndarray | None = None) -> np.ndarray:
    """Targets in [0, 1] (float32). ``engagement`` is already normalised per query (:func:`normalise_per_query`)."""
    g = np.asarray(grade)
    if len(g) and (g.min() < 0 or g.max() > 4):
        raise ValueError("grades must be 0-4; pairs without a label have no target (run `assay annotate`)")
    rel = relevance(g, probs, cfg)
    eng = np.clip(np.nan_to_num(np.asarray(engagement, dtype=float)), 0, 1) * (g >= RELEVANT_MIN_GRADE)
    prior = np.clip(np.nan_to_num(np.asarray(prior, dtype=float)), 0, 1)
    return np.clip(cfg.mu * rel + cfg.lam * eng + cfg.nu * prior, 0, 1).astype(np.float32)
