"""The five difficulty tiers, as pure vectorised rules over mined pairs (docs/architecture.md, "Five tiers").

Input: one row per mined pair (a candidate or a mined negative) as numpy arrays; output: a tier per pair, 0 when
the pair is in no tier. Rules, with every threshold from :class:`assay.config.TierConfig`:

| tier | name | rule |
|---|---|---|
| 1 | easy_pos | a candidate retrieved by every active channel of its query, grade >= easy_pos_grade (4) |
| 2 | hard_pos | grade >= hard_pos_grade (3), in BM25's top hard_pos_lexical_top (50), not retrieved by ANN |
| 1-2 | (both) | a cascade label also needs P(grade >= 3) >= min_pos_prob (0.5) from its calibrated probabilities |
| 3 | hard_neg | grade <= hard_neg_grade (1), retrieved by 1 to hard_neg_max_channels (1) channels, within the top hard_neg_top (100) of one |
| 4 | token_sim_neg | a mined token-similar negative, grade <= token_sim_neg_grade (1) |
| 5 | random_neg | a mined random negative, grade <= random_neg_grade (1) |

A channel is *active* for a query when it retrieved at least one candidate for it. A pair without a grade (not yet
labeled) is in no tier. The first matching rule wins (tiers 1-3 apply to candidates, 4-5 to negatives, so they
cannot overlap except easy_pos / hard_pos, where easy_pos wins).

Per-query caps (:func:`cap_per_query`) and the train / val / test split (:func:`split_of`) are deterministic
hashes of (seed, query_id[, item_id]), so a rerun writes the same examples whatever the row order.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from assay.config import TierConfig

TIER_NAMES = {1: "easy_pos", 2: "hard_pos", 3: "hard_neg", 4: "token_sim_neg", 5: "random_neg"}
POSITIVE_TIERS = (1, 2)
NEGATIVE_TIERS = (3, 4, 5)
# the curriculum stage each tier belongs to by default (examples.stage); stage 3 also anchors on tiers 1-2
TIER_STAGE = {1: 1, 5: 1, 2: 2, 3: 2, 4: 3}
SOURCES = ("candidate", "token_sim", "random")


class PairColumns(NamedTuple):
    """Mined pairs, columnar. Ranks are float with NaN where the channel did not retrieve the item."""

    source: np.ndarray      # str: candidate | token_sim | random
    rank_bm25: np.ndarray   # float, NaN = not retrieved
    rank_ann: np.ndarray
    rank_click: np.ndarray
    n_active: np.ndarray    # int: channels active for the pair's query
    grade: np.ndarray       # int, -1 = not labeled
    p_relevant: np.ndarray | None = None  # float: calibrated P(grade >= 3) of a cascade label; NaN = human / unknown


def assign_tiers(p: PairColumns, cfg: TierConfig) -> np.ndarray:
    """Tier (1-5) of every pair, 0 for none. Pure; see the module docstring for the rules."""
    g = np.asarray(p.grade)
    labeled = g >= 0
    ranks = np.stack([p.rank_bm25, p.rank_ann, p.rank_click]).astype(float)
    hit = ~np.isnan(ranks)
    n_channels = hit.sum(axis=0)
    cand = (p.source == "candidate") & (n_channels > 0)
    # a positive the cascade itself thinks more likely irrelevant than relevant is no example
    sure = np.ones(len(g), dtype=bool) if p.p_relevant is None else \
        ~(np.asarray(p.p_relevant, dtype=float) < cfg.min_pos_prob)
    easy = cand & labeled & sure & (n_channels >= np.maximum(p.n_active, 1)) & (g >= cfg.easy_pos_grade)
    with np.errstate(invalid="ignore"):
        in_bm25_top = hit[0] & (ranks[0] <= cfg.hard_pos_lexical_top)
        best_rank = np.where(hit, ranks, np.inf).min(axis=0)
    hard_pos = cand & labeled & sure & (g >= cfg.hard_pos_grade) & in_bm25_top & ~hit[1]
    hard_neg = (cand & labeled & (g <= cfg.hard_neg_grade) & (n_channels <= cfg.hard_neg_max_channels)
                & (best_rank <= cfg.hard_neg_top))
    tok = (p.source == "token_sim") & labeled & (g <= cfg.token_sim_neg_grade)
    rnd = (p.source == "random") & labeled & (g <= cfg.random_neg_grade)
    tier = np.zeros(len(g), dtype=np.int8)
    for t, m in ((5, rnd), (4, tok), (3, hard_neg), (2, hard_pos), (1, easy)):  # later wins: easy_pos first
        tier[m] = t
    return tier


def _unit_hash(keys: list[str], seed: int) -> np.ndarray:
    """A uniform [0, 1) number per key, stable across runs and platforms."""
    salt = str(seed).encode() + b"\x00"
    return np.array([int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") / 2.0**64
                     for k in keys], dtype=np.float64)


def split_of(query_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """'test' for the first test_fraction of the hash range, then 'val', else 'train'."""
    u = _unit_hash(query_ids, seed)
    return np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))


def _rank_within(groups: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """0-based rank of each row inside its group, by ascending prio."""
    order = np.lexsort((prio, groups))
    g = groups[order]
    start = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order)) - np.repeat(start, np.diff(np.r_[start, len(order)]))
    return ranks


def cap_per_query(query_idx: np.ndarray, keys: list[str], tier: np.ndarray, max_pos: int, max_neg: int,
                  seed: int) -> np.ndarray:
    """Boolean keep-mask: per query, at most max_pos pairs of tiers 1-2 and max_neg of tiers 3-5. The cap is
    shared out round-robin across the tiers (a query with 200 hard negatives and 10 token-similar ones keeps all
    10 token-similar ones), and inside a tier pairs are chosen by a seeded hash of (query_id, item_id), so the
    choice does not depend on row order. Pairs in no tier are dropped."""
    keep = np.zeros(len(tier), dtype=bool)
    prio = _unit_hash(keys, seed + 1)
    for tiers, cap in ((POSITIVE_TIERS, max_pos), (NEGATIVE_TIERS, max_neg)):
        idx = np.flatnonzero(np.isin(tier, tiers))
        if not len(idx):
            continue
        q, t = query_idx[idx].astype(np.int64), tier[idx].astype(np.int64)
        in_tier = _rank_within(q * 8 + t, prio[idx])
        # round-robin: the r-th pick of every tier comes before the (r+1)-th of any
        slot = _rank_within(q, in_tier * 8 + t)
        keep[idx[slot < cap]] = True
    return keep
