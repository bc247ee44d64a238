"""Engagement log from a production-like ranker under a position-biased click model.

Ranker: BM25 (bm25s, stemmed, English stopwords) over ``title + brand + category``; the top
``ranker.candidate_depth`` candidates are re-scored as ``bm25 / max_bm25(query) + popularity_weight *
popularity_percentile``. Each query has ``ranker.variants`` ranking variants (independent Gaussian score noise), and
its sessions (= its frequency) are split among them by a multinomial draw. Each variant shows its top
``shown_depth`` items (candidates with zero BM25 score are never shown, so some typo queries show nothing).

Click model (per shown slot, binomial over the variant's sessions):
``P(click) = rank ** -position_decay * attract``, with
``attract = 1 - (1 - attract_by_grade[g]) * (1 - popularity_attract * pop_pct ** 2)`` where ``g`` is the TRUE grade,
so popular-but-irrelevant items still collect clicks. Add-to-carts ~ Binomial(clicks, cart_by_grade[g]) and
orders ~ Binomial(add_to_carts, order_by_grade[g]).

Output rows: one per shown (query, item): impressions (sessions in which it was shown), clicks, add_to_carts,
orders, and position = impression-weighted mean 1-based rank. Invariants: orders <= add_to_carts <= clicks <=
impressions; everything is numpy (no per-session loops).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from .params import SimulateConfig
from .rng import rng_for

log = logging.getLogger(__name__)


class Ranked(NamedTuple):
    docs: np.ndarray  # [n_q, K] item indices of BM25 candidates (-1 = none)
    bm25: np.ndarray  # [n_q, K] float32 scores (0 = no match)


class Engagement(NamedTuple):
    q: np.ndarray  # query index
    item: np.ndarray  # item index
    impressions: np.ndarray
    clicks: np.ndarray
    add_to_carts: np.ndarray
    orders: np.ndarray
    position: np.ndarray  # float, 1-based
    top: np.ndarray  # [n_q, shown_depth] item indices of variant 0 (-1 = empty), for label sampling


def bm25_candidates(docs: list[str], queries: list[str], cfg: SimulateConfig, progress: bool) -> Ranked:
    """BM25 top-``candidate_depth`` for every query over ``docs``."""
    try:
        import bm25s
        import Stemmer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the simulated ranker needs bm25s and PyStemmer ({e}); "
                          "install them with `pip install bm25s PyStemmer`") from e

    backend = cfg.ranker.backend
    if backend == "auto":
        backend = "numba" if len(docs) * len(queries) >= cfg.ranker.numba_min_work else "numpy"
    if backend == "numba":
        try:
            import numba  # noqa: F401
        except ImportError:
            log.warning("numba is not installed; bm25s falls back to the numpy backend")
            backend = "numpy"
    stemmer = Stemmer.Stemmer("english")
    corpus = bm25s.tokenize(docs, stopwords="en", stemmer=stemmer, show_progress=False)
    retriever = bm25s.BM25(backend=backend)
    retriever.index(corpus, show_progress=False)
    q_tok = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
    vocab = retriever.vocab_dict
    q_tok = [[w for w in q if w and w in vocab] for q in q_tok]
    has = np.array([len(q) > 0 for q in q_tok])  # a query with no known token retrieves nothing
    k = min(cfg.ranker.candidate_depth, len(docs))
    d = np.full((len(queries), k), -1, dtype=np.int64)
    s = np.zeros((len(queries), k), dtype=np.float32)
    if has.any():
        res = retriever.retrieve([q for q, h in zip(q_tok, has) if h], k=k, show_progress=progress, n_threads=0)
        d[has] = np.asarray(res.documents, dtype=np.int64)
        s[has] = np.asarray(res.scores, dtype=np.float32)
    d[s <= 0] = -1
    s[s <= 0] = 0
    return Ranked(d, s)


QUERY_CHUNK = 4096  # fixed engagement chunk (part of the determinism contract)


def simulate_engagement(ranked: Ranked, grades: np.ndarray, pop_pct: np.ndarray, frequency: np.ndarray,
                        cfg: SimulateConfig, progress: bool = False) -> Engagement:
    """``grades``: [n_q, K] true grades of the candidates (any value where docs == -1). Works in fixed chunks of
    queries so memory stays bounded."""
    from tqdm.auto import tqdm

    parts = []
    n_q = len(frequency)
    for c, lo in enumerate(tqdm(range(0, n_q, QUERY_CHUNK), desc="engagement", disable=not progress)):
        hi = min(lo + QUERY_CHUNK, n_q)
        e = _chunk(Ranked(ranked.docs[lo:hi], ranked.bm25[lo:hi]), grades[lo:hi], pop_pct, frequency[lo:hi],
                   cfg, rng_for(cfg.seed, "engagement", c))
        parts.append(e._replace(q=e.q + lo))
    return Engagement(*(np.concatenate([getattr(p, f) for p in parts]) for f in Engagement._fields))


def _chunk(ranked: Ranked, grades: np.ndarray, pop_pct: np.ndarray, frequency: np.ndarray,
           cfg: SimulateConfig, rng: np.random.Generator) -> Engagement:
    rk, cm = cfg.ranker, cfg.click_model
    docs, bm = ranked
    n_q, K = docs.shape
    stride = len(pop_pct) + 1
    valid = docs >= 0
    pp = np.where(valid, pop_pct[np.maximum(docs, 0)], 0.0)
    mx = np.maximum(bm.max(axis=1, keepdims=True), 1e-9)
    base = bm / mx + rk.popularity_weight * pp
    V, N = rk.variants, min(cfg.shown_depth, K)
    score = base[:, None, :] + rng.normal(0.0, rk.noise, size=(n_q, V, K)).astype(np.float32)
    score[:, 0, :] = base  # variant 0 = the noiseless production ranking
    score[~np.broadcast_to(valid[:, None, :], score.shape)] = -np.inf
    top = np.argsort(-score, axis=2, kind="stable")[:, :, :N]  # [n_q, V, N] candidate slots
    del score
    shape = top.shape
    shown = np.take_along_axis(np.broadcast_to(valid[:, None, :], (n_q, V, K)), top, axis=2)
    sessions = rng.multinomial(frequency, np.full(V, 1.0 / V))  # [n_q, V]
    imp = np.where(shown, sessions[:, :, None], 0)
    g = np.take_along_axis(np.broadcast_to(grades[:, None, :], (n_q, V, K)), top, axis=2).clip(0, 4)
    p_pop = np.take_along_axis(np.broadcast_to(pp[:, None, :], (n_q, V, K)), top, axis=2)
    a_grade = np.asarray(cm.attract_by_grade)[g]
    attract = 1 - (1 - a_grade) * (1 - cm.popularity_attract * p_pop ** 2)
    exam = (np.arange(1, N + 1, dtype=float) ** -cm.position_decay)[None, None, :]
    clicks = rng.binomial(imp, np.clip(exam * attract, 0, 1))
    item = np.take_along_axis(np.broadcast_to(docs[:, None, :], (n_q, V, K)), top, axis=2)
    qidx = np.broadcast_to(np.arange(n_q)[:, None, None], shape)
    pos = np.broadcast_to(np.arange(1, N + 1)[None, None, :], shape)
    m = shown & (imp > 0)
    key = qidx[m].astype(np.int64) * stride + item[m]
    uk, inv = np.unique(key, return_inverse=True)
    n_rows = len(uk)
    impressions = np.bincount(inv, weights=imp[m], minlength=n_rows).astype(np.int64)
    clk = np.bincount(inv, weights=clicks[m], minlength=n_rows).astype(np.int64)
    position = np.bincount(inv, weights=(imp * pos)[m], minlength=n_rows) / np.maximum(impressions, 1)
    row_g = np.zeros(n_rows, np.int64)
    row_g[inv] = g[m]
    atc = rng.binomial(clk, np.asarray(cm.cart_by_grade)[row_g])
    orders = rng.binomial(atc, np.asarray(cm.order_by_grade)[row_g])
    q_row = uk // stride
    i_row = uk % stride
    o = np.lexsort((i_row, position, q_row))  # by query, then mean position
    slot0 = top[:, 0, :]
    top0 = np.where(np.take_along_axis(valid, slot0, axis=1), np.take_along_axis(docs, slot0, axis=1), -1)
    return Engagement(q_row[o], i_row[o], impressions[o], clk[o], atc[o], orders[o], np.round(position[o], 3), top0)
