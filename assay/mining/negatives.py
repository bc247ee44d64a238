"""Mined negatives: items that no channel retrieved for the query.

- ``token_sim``: TF-IDF cosine (word stems, sublinear tf, fitted on the item texts) between
  the query and the item within [``token_sim_min``, ``token_sim_max``] (default 0.2-0.6), and
  not among the query's candidates. The ``n_token_sim`` most similar inside the band are kept:
  they share words with the query, which makes them the hard lexical negatives of tier 4.
- ``random``: ``n_random`` items drawn uniformly from the catalog, excluding the query's
  candidates and token-similar negatives; the draw is seeded by (seed, query id), so a rerun
  draws the same items.
Both are written to ``negatives`` with the similarity used (TF-IDF cosine for both kinds).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def _seed(seed: int, query_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{query_id}".encode(), digest_size=8).digest(), "big")


class TfidfSpace:
    def __init__(self, item_texts: list[str], max_features: int | None = 500_000):
        from sklearn.feature_extraction.text import TfidfVectorizer

        from assay.mining.bm25 import make_tokenizer

        self.vec = TfidfVectorizer(tokenizer=make_tokenizer("stem"), lowercase=False, token_pattern=None,
                                   sublinear_tf=True, max_features=max_features, dtype=np.float32)
        self.items = self.vec.fit_transform(item_texts)
        self.items_t = self.items.T.tocsc()

    def similarity(self, queries: list[str]):
        """Sparse (n_queries, n_items) cosine similarities (rows are L2-normalised)."""
        return (self.vec.transform(queries) @ self.items_t).tocsr()


def mine_negatives(space: TfidfSpace, query_ids: list[str], query_texts: list[str], item_ids: np.ndarray,
                   exclude: list[np.ndarray], lo: float, hi: float, n_token_sim: int, n_random: int,
                   seed: int, run_id: str) -> pa.Table:
    """`exclude[i]`: catalog row indices retrieved by any channel for query i."""
    sims = space.similarity(query_texts)
    n_items = len(item_ids)
    out_q, out_i, out_kind, out_sim = [], [], [], []
    for r, qid in enumerate(query_ids):
        row = sims.getrow(r)
        cols, vals = row.indices, row.data
        band = (vals >= lo) & (vals <= hi)
        ex = exclude[r]
        cand = cols[band]
        cv = vals[band]
        if len(ex) and len(cand):
            keep = ~np.isin(cand, ex)
            cand, cv = cand[keep], cv[keep]
        order = np.lexsort((cand, -cv))[:n_token_sim]
        tok, tok_sim = cand[order], cv[order]
        out_q += [qid] * len(tok)
        out_i += item_ids[tok].tolist()
        out_kind += ["token_sim"] * len(tok)
        out_sim += tok_sim.tolist()
        if n_random:
            rng = np.random.default_rng(_seed(seed, qid))
            banned = np.union1d(ex, tok)
            avail = n_items - len(banned)
            want = min(n_random, avail)
            picked: np.ndarray = np.zeros(0, np.int64)
            while len(picked) < want:
                draw = rng.integers(0, n_items, size=2 * (want - len(picked)) + 8)
                draw = draw[~np.isin(draw, banned)]
                picked = np.concatenate([picked, draw])
                _, first = np.unique(picked, return_index=True)
                picked = picked[np.sort(first)]
            picked = picked[:want]
            out_q += [qid] * len(picked)
            out_i += item_ids[picked].tolist()
            out_kind += ["random"] * len(picked)
            out_sim += _lookup(cols, vals, picked).tolist()
    return pa.table({
        "query_id": pa.array(out_q, pa.string()), "item_id": pa.array(out_i, pa.string()),
        "kind": pa.array(out_kind, pa.string()), "similarity": pa.array(out_sim, pa.float32()),
        "run_id": pa.array([run_id] * len(out_q), pa.string()),
    })


def _lookup(cols: np.ndarray, vals: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Values of a sparse row at columns `want` (0 where absent)."""
    if not len(cols):
        return np.zeros(len(want), np.float32)
    srt = np.argsort(cols)
    pos = np.clip(np.searchsorted(cols[srt], want), 0, len(cols) - 1)
    hit = cols[srt][pos] == want
    return np.where(hit, vals[srt][pos], 0.0).astype(np.float32)
