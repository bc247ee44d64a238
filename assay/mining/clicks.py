"""The click/engagement channel: items engaged for the query and for similar queries, ranked by a
position-debiased engagement score.

Scoring (documented defaults in ClickConfig):
1. Position prior. The log gives, per shown position p (rounded, capped at ``max_position``),
   the average click-through rate ``ctr[p] = sum(clicks at p) / sum(impressions at p)``.
2. Expected clicks of a (query, item) row: ``impressions * ctr[position]``.
3. COEC, clicks over expected clicks, smoothed towards 1 with strength ``alpha``:
   ``coec(q, i) = (clicks + alpha) / (expected + alpha)``. A score above 1 means the item drew
   more clicks than an average item shown at the same positions, so an item clicked only
   because it sat at rank 1 is not favoured over a better item at rank 8.
   Only rows with at least ``min_clicks`` clicks are engaged.
4. Similar queries. For each query, up to ``n_neighbors`` other queries whose similarity is at
   least ``min_similarity`` lend their engaged items. Similarity is the larger of the lexical
   similarity (TF-IDF cosine over character 3-5-grams of the query text) and the embedding
   cosine (the mining encoder). A lent item scores ``neighbor_weight * sim * coec(n, i)``.
5. An item's channel score is the maximum over the query itself and its neighbours; the top
   ``k`` by score (ties: more clicks first) are the channel's hits.
Tail queries with no engagement of their own therefore still get candidates through their
neighbours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from assay.mining.bm25 import Hits

log = logging.getLogger(__name__)


@dataclass
class EngagementIndex:
    """Engaged (query, item, coec, clicks) rows grouped by query (CSR over the query order)."""

    offsets: np.ndarray  # (n_queries + 1,) into the row arrays
    item_idx: np.ndarray  # catalog row index
    coec: np.ndarray
    clicks: np.ndarray
    ctr_by_position: np.ndarray


def position_ctr(position: np.ndarray, impressions: np.ndarray, clicks: np.ndarray, max_position: int) -> np.ndarray:
    """ctr[p] for p = 0..max_position (index 0 is the overall CTR, used when position is unknown)."""
    pos = np.where(np.isnan(position), 0, np.clip(np.rint(position), 1, max_position)).astype(np.int64)
    imp = np.bincount(pos, weights=impressions, minlength=max_position + 1)
    clk = np.bincount(pos, weights=clicks, minlength=max_position + 1)
    overall = clk.sum() / max(imp.sum(), 1.0)
    ctr = np.where(imp > 0, clk / np.maximum(imp, 1e-9), overall)
    ctr[0] = overall
    # positions never shown get the CTR of the nearest shown position below them
    for p in range(2, max_position + 1):
        if imp[p] == 0:
            ctr[p] = ctr[p - 1]
    return np.maximum(ctr, 1e-6)


def build_engagement_index(eng: pa.Table, query_pos: dict[str, int], item_pos: dict[str, int],
                           alpha: float, min_clicks: int, max_position: int) -> EngagementIndex:
    """`eng` has query_id, item_id, impressions, clicks, position (one row per position shown)."""
    nq = len(query_pos)
    if eng.num_rows == 0:
        return EngagementIndex(np.zeros(nq + 1, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0),
                               np.ones(max_position + 1))
    q = np.array([query_pos.get(x, -1) for x in eng.column("query_id").to_pylist()], dtype=np.int64)
    it = np.array([item_pos.get(x, -1) for x in eng.column("item_id").to_pylist()], dtype=np.int64)
    imp = np.nan_to_num(eng.column("impressions").to_numpy(zero_copy_only=False).astype(np.float64))
    clk = np.nan_to_num(eng.column("clicks").to_numpy(zero_copy_only=False).astype(np.float64))
    pos = eng.column("position").to_numpy(zero_copy_only=False).astype(np.float64)
    ctr = position_ctr(pos, imp, clk, max_position)
    p = np.where(np.isnan(pos), 0, np.clip(np.rint(pos), 1, max_position)).astype(np.int64)
    expected = imp * ctr[p]
    ok = (q >= 0) & (it >= 0)
    q, it, clk, expected = q[ok], it[ok], clk[ok], expected[ok]
    # aggregate rows of the same (query, item) over positions
    key = q * (len(item_pos) + 1) + it
    uniq, inv = np.unique(key, return_inverse=True)
    clk_s = np.bincount(inv, weights=clk)
    exp_s = np.bincount(inv, weights=expected)
    qk = uniq // (len(item_pos) + 1)
    ik = uniq % (len(item_pos) + 1)
    keep = clk_s >= min_clicks
    qk, ik, clk_s, exp_s = qk[keep], ik[keep], clk_s[keep], exp_s[keep]
    coec = (clk_s + alpha) / (exp_s + alpha)
    order = np.lexsort((ik, qk))
    qk, ik, clk_s, coec = qk[order], ik[order], clk_s[order], coec[order]
    offsets = np.searchsorted(qk, np.arange(nq + 1))
    return EngagementIndex(offsets, ik, coec, clk_s, ctr)


def _rows(ix: EngagementIndex, qi: int) -> slice:
    return slice(ix.offsets[qi], ix.offsets[qi + 1])


class QueryNeighbours:
    """Top similar queries by max(lexical TF-IDF char-gram cosine, embedding cosine)."""

    def __init__(self, texts: list[str], embeddings: np.ndarray | None, has_engagement: np.ndarray,
                 n_neighbors: int, min_similarity: float, use_lexical: bool = True):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.n = n_neighbors
        self.min_sim = min_similarity
        self.emb = embeddings
        self.donor = np.flatnonzero(has_engagement)  # only queries with engagement can lend items
        self.lex = None
        if use_lexical and len(self.donor):
            vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=1)
            m = vec.fit_transform(texts)
            self.lex = m
            self.lex_donor_t = m[self.donor].T.tocsc()
        if embeddings is not None and len(self.donor):
            self.emb_donor = embeddings[self.donor]

    def neighbours(self, qidx: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query row index: (neighbour query indices, similarities), best first, self excluded."""
        if not len(self.donor) or self.n == 0:
            return [(np.zeros(0, np.int64), np.zeros(0))] * len(qidx)
        sims = np.zeros((len(qidx), len(self.donor)), dtype=np.float32)
        if self.lex is not None:
            sims = np.maximum(sims, (self.lex[qidx] @ self.lex_donor_t).toarray().astype(np.float32))
        if self.emb is not None:
            sims = np.maximum(sims, self.emb[qidx] @ self.emb_donor.T)
        out = []
        for row, qi in enumerate(qidx):
            s = sims[row]
            s[self.donor == qi] = -1.0
            k = min(self.n, len(s))
            top = np.argpartition(-s, k - 1)[:k]
            top = top[np.argsort(-s[top])]
            top = top[s[top] >= self.min_sim]
            out.append((self.donor[top], s[top].astype(np.float64)))
        return out


def search(ix: EngagementIndex, nb: QueryNeighbours, qidx: np.ndarray, k: int, neighbor_weight: float) -> Hits:
    out_idx = np.full((len(qidx), k), -1, dtype=np.int64)
    out_sc = np.zeros((len(qidx), k), dtype=np.float32)
    neigh = nb.neighbours(qidx)
    for row, qi in enumerate(qidx):
        parts_i, parts_s, parts_c = [], [], []
        sl = _rows(ix, qi)
        parts_i.append(ix.item_idx[sl])
        parts_s.append(ix.coec[sl])
        parts_c.append(ix.clicks[sl])
        for nqi, sim in zip(*neigh[row]):
            nsl = _rows(ix, nqi)
            parts_i.append(ix.item_idx[nsl])
            parts_s.append(ix.coec[nsl] * sim * neighbor_weight)
            parts_c.append(ix.clicks[nsl] * sim * neighbor_weight)
        items = np.concatenate(parts_i)
        if not len(items):
            continue
        scores = np.concatenate(parts_s)
        clicks = np.concatenate(parts_c)
        # best score per item; order by score desc, then clicks desc, then item for determinism
        order = np.lexsort((items, -clicks, -scores))
        items, scores = items[order], scores[order]
        _, first = np.unique(items, return_index=True)
        first = np.sort(first)[:k]
        out_idx[row, :len(first)] = items[first]
        out_sc[row, :len(first)] = scores[first]
    return Hits(out_idx, out_sc)
