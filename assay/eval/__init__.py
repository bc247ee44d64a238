"""Evaluation: ranking metrics on judged pairs and retrieval over the whole catalog for held-out queries."""

from assay.eval.metrics import aggregate, mean_rerank_ndcg, ndcg_at_k, query_metrics
from assay.eval.run import run

__all__ = ["run", "aggregate", "mean_rerank_ndcg", "ndcg_at_k", "query_metrics"]
