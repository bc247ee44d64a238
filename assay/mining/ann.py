"""The ANN channel: item embeddings (cached) searched with FAISS by inner product on unit vectors.

Index choice (``mining.ann.index``):
- ``flat``: exact search (IndexFlatIP). Batched queries make it a matrix product, which is
  fast up to a few hundred thousand items.
- ``hnsw``: IndexHNSWFlat (M = ``hnsw_m``, efSearch = ``ef_search``) for large catalogs.
- ``ivf``: IndexIVFFlat with ``nlist`` = 4*sqrt(n) lists, ``nprobe`` probed.
- ``auto`` (default): flat up to ``exact_max_items`` items, HNSW above.
Approximate indexes report their recall@k against exact search on a sample of queries
(`recall_vs_exact`), measured on the real embeddings.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from assay.mining.bm25 import Hits

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")


def choose_kind(kind: str, n_items: int, exact_max_items: int) -> str:
    if kind not in INDEX_KINDS:
        raise KeyError(f"Unknown ANN index {kind!r}. Available: {list(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n_items <= exact_max_items else "hnsw"


def build_index(vecs: np.ndarray, kind: str, hnsw_m: int = 32, ef_construction: int = 80,
                ef_search: int = 128, nprobe: int = 16, seed: int = 0):
    import faiss

    n, dim = vecs.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        quant = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = vecs[rng.choice(n, size=min(n, nlist * 64), replace=False)]
        index.train(train)
        index.nprobe = nprobe
    else:
        raise KeyError(f"Unknown ANN index {kind!r}. Available: {list(INDEX_KINDS[1:])}")
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return index


def save_index(index, path: Path) -> None:
    import faiss

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)


def load_index(path: Path, ef_search: int = 128, nprobe: int = 16):
    import faiss

    index = faiss.read_index(str(path))
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef_search
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return index


def search(index, qvecs: np.ndarray, k: int) -> Hits:
    k_eff = min(k, index.ntotal)
    scores, idx = index.search(np.ascontiguousarray(qvecs, dtype=np.float32), k_eff)
    out_idx = np.full((len(qvecs), k), -1, dtype=np.int64)
    out_sc = np.zeros((len(qvecs), k), dtype=np.float32)
    out_idx[:, :k_eff] = idx
    out_sc[:, :k_eff] = scores
    out_sc[out_idx < 0] = 0
    return Hits(out_idx, out_sc)


def recall_vs_exact(index, item_vecs: np.ndarray, qvecs: np.ndarray, k: int) -> float:
    """recall@k of `index` against exact inner-product search, on the given queries."""
    import faiss

    exact = faiss.IndexFlatIP(item_vecs.shape[1])
    exact.add(np.ascontiguousarray(item_vecs, dtype=np.float32))
    k = min(k, len(item_vecs))
    _, truth = exact.search(qvecs, k)
    _, got = index.search(qvecs, k)
    hits = sum(len(np.intersect1d(t[t >= 0], g[g >= 0])) for t, g in zip(truth, got))
    return hits / float(truth.size)
