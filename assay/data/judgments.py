"""Which relevance judgments a workspace has, for reports and evaluation.

- A simulated world (``truth_items`` filled): the :class:`TruthOracle` grades any pair.
- Otherwise human labels: only labeled pairs are judged (majority grade per pair).
"""

from __future__ import annotations

from assay.store import Store


def load_oracle(store: Store):
    """The simulated world's TruthOracle, or None for real data."""
    if store.count("truth_items") == 0:
        return None
    from assay.data.simulate.truth import TruthOracle

    taxonomy = store.get_meta("taxonomy")
    if taxonomy is None:
        return None
    items = store.query("SELECT * FROM truth_items")
    queries = store.query("SELECT * FROM truth_queries")
    return TruthOracle(taxonomy, items, queries)


def relevant_sets(store: Store, query_ids: list[str], min_grade: int = 3) -> tuple[str, dict[str, set[str]]]:
    """(source, {query_id: relevant item ids}) from the oracle, else from human labels."""
    oracle = load_oracle(store)
    if oracle is not None:
        known = set(oracle.query_ids.tolist())
        return "truth", {q: set(oracle.relevant(q, min_grade).tolist()) for q in query_ids if q in known}
    rows = store.exec("""
        SELECT query_id, item_id FROM human_labels GROUP BY query_id, item_id
        HAVING median(grade) >= ?""", [min_grade])
    out: dict[str, set[str]] = {}
    wanted = set(query_ids)
    for q, i in rows:
        if q in wanted:
            out.setdefault(q, set()).add(i)
    return ("human_labels" if rows else "none"), out

