"""Federation: merge the channels' hits into one row per (query, item).

Reads ``channel_hits`` of one mining run, writes ``candidates``:
- ``rank_<channel>`` / ``score_<channel>``: null when that channel did not retrieve the item;
- ``n_channels``: the number of non-null ranks (1..3);
- ``prior`` in [0, 1]: a retrieval prior from the ranks and agreement (``mining.prior``).

Priors (registry ``PRIORS``; add a function to add one):
- ``rrf`` (default): reciprocal-rank fusion ``sum_c 1 / (rrf_k + rank_c)`` divided by the
  largest value of the same query, so each query's best-fused item has prior 1.
- ``rrf_global``: the same sum divided by its largest possible value, ``C / (rrf_k + 1)`` for C
  enabled channels, so priors are comparable across queries (a query whose channels disagree
  has lower priors everywhere).
Both grow with agreement: an item found by more channels collects more reciprocal ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assay.store import Store

CHANNELS = ("bm25", "ann", "click")

PriorFn = Callable[[np.ndarray, np.ndarray, int, float], np.ndarray]


def _rrf_sum(ranks: np.ndarray, rrf_k: float) -> np.ndarray:
    """ranks: (n, C) float with nan for 'not retrieved'."""
    return np.nansum(1.0 / (rrf_k + ranks), axis=1)


def prior_rrf(ranks: np.ndarray, query_codes: np.ndarray, n_channels_total: int, rrf_k: float) -> np.ndarray:
    s = _rrf_sum(ranks, rrf_k)
    qmax = np.zeros(query_codes.max() + 1 if len(query_codes) else 0)
    np.maximum.at(qmax, query_codes, s)
    return s / np.maximum(qmax[query_codes], 1e-12)


def prior_rrf_global(ranks: np.ndarray, query_codes: np.ndarray, n_channels_total: int, rrf_k: float) -> np.ndarray:
    return _rrf_sum(ranks, rrf_k) / (n_channels_total / (rrf_k + 1.0))


PRIORS: dict[str, PriorFn] = {"rrf": prior_rrf, "rrf_global": prior_rrf_global}


def get_prior(name: str) -> PriorFn:
    try:
        return PRIORS[name]
    except KeyError:
        raise KeyError(f"Unknown prior {name!r}. Available: {sorted(PRIORS)}") from None


def federate(store: Store, run_key: str, run_id: str, channels: list[str], prior: str, rrf_k: float) -> int:
    """Replace ``candidates`` with the federation of the run's channel hits. Returns rows written."""
    fn = get_prior(prior)
    sel = ", ".join(
        f"max(CASE WHEN channel = '{c}' THEN rank END) AS rank_{c}, "
        f"max(CASE WHEN channel = '{c}' THEN score END) AS score_{c}" for c in CHANNELS)
    tbl = store.query(f"""
        SELECT query_id, item_id, {sel}, count(*)::TINYINT AS n_channels
        FROM channel_hits WHERE run_key = ? GROUP BY query_id, item_id ORDER BY query_id, item_id""", [run_key])
    if tbl.num_rows == 0:
        with store.transaction():
            store.exec("DELETE FROM candidates")
        return 0
    ranks = np.stack([tbl.column(f"rank_{c}").to_numpy(zero_copy_only=False).astype(np.float64)
                      for c in CHANNELS], axis=1)
    codes = pc.dictionary_encode(tbl.column("query_id")).combine_chunks().indices.to_numpy()
    p = np.clip(fn(ranks, codes, len(channels), rrf_k), 0.0, 1.0).astype(np.float32)
    tbl = tbl.append_column("prior", pa.array(p, pa.float32()))
    tbl = tbl.append_column("run_id", pa.array([run_id] * tbl.num_rows, pa.string()))
    store.write("candidates", tbl, mode="replace")
    return tbl.num_rows
