"""The channel report of `assay mine`, computed from ``candidates`` (and judgments when present).

- per channel: hits and queries served;
- pairwise overlap: for channels A and B, ``|A and B| / min(|A|, |B|)`` summed over queries,
  and the Jaccard index (Walmart reports 13-15% pairwise overlap of top-500);
- candidates per query (mean, median, p90, min, max);
- with judgments (simulated truth, else human labels): recall of grade >= 3 items per channel
  and for the union, overall, by query kind (simulated worlds) and by query segment;
- click coverage: queries with click candidates, among those with and without own engagement.
"""

from __future__ import annotations

import itertools

import numpy as np

from assay.data.judgments import relevant_sets
from assay.store import Store


def channel_report(store: Store, channels: list[str], k: int) -> dict:
    rep: dict = {"channels": {}, "overlap": {}}
    nq_total = store.count("queries")
    for c in channels:
        n, nq = store.exec(f"SELECT count(*), count(DISTINCT query_id) FROM candidates WHERE rank_{c} IS NOT NULL")[0]
        rep["channels"][c] = {"hits": n, "queries": nq, "hits_per_query": round(n / max(nq, 1), 1)}
    for a, b in itertools.combinations(channels, 2):
        both, na, nb = store.exec(f"""SELECT count(*) FILTER (rank_{a} IS NOT NULL AND rank_{b} IS NOT NULL),
                                            count(*) FILTER (rank_{a} IS NOT NULL), count(*) FILTER (rank_{b} IS NOT NULL)
                                     FROM candidates""")[0]
        rep["overlap"][f"{a}&{b}"] = {"overlap": round(both / max(min(na, nb), 1), 4),
                                      "jaccard": round(both / max(na + nb - both, 1), 4)}
    per_q = np.array([r[0] for r in store.exec("SELECT count(*) FROM candidates GROUP BY query_id")] or [0])
    rep["candidates_per_query"] = {"mean": round(float(per_q.mean()), 1), "p50": float(np.median(per_q)),
                                   "p90": float(np.percentile(per_q, 90)), "min": int(per_q.min()),
                                   "max": int(per_q.max()), "queries": int(len(per_q)), "of_queries": nq_total}
    rep["n_channels"] = {int(n): c for n, c in store.exec(
        "SELECT n_channels, count(*) FROM candidates GROUP BY 1 ORDER BY 1")}
    if "click" in channels:
        rows = store.exec("""
            SELECT q.segment, e.query_id IS NOT NULL AS engaged, count(*) AS queries,
                   count(*) FILTER (c.query_id IS NOT NULL) AS with_click
            FROM queries q
            LEFT JOIN (SELECT DISTINCT query_id FROM engagement WHERE clicks > 0) e USING (query_id)
            LEFT JOIN (SELECT DISTINCT query_id FROM candidates WHERE rank_click IS NOT NULL) c USING (query_id)
            GROUP BY 1, 2 ORDER BY 1, 2""")
        rep["click_coverage"] = [{"segment": s, "own_engagement": bool(e), "queries": n, "with_click_candidates": w}
                                 for s, e, n, w in rows]
    rep["recall"] = _recall(store, channels)
    return rep


def _recall(store: Store, channels: list[str]) -> dict | None:
    qrows = store.exec("SELECT query_id, segment FROM queries ORDER BY query_id")
    qids = [q for q, _ in qrows]
    segment = dict(qrows)
    source, rel = relevant_sets(store, qids, 3)
    rel = {q: s for q, s in rel.items() if s}
    if not rel:
        return None
    kind = dict(store.exec("SELECT query_id, kind FROM truth_queries")) if source == "truth" else {}
    cand = store.query("SELECT query_id, item_id, " + ", ".join(f"rank_{c}" for c in channels) + " FROM candidates")
    got: dict[str, dict[str, set[str]]] = {c: {} for c in channels + ["union"]}
    q_arr = cand.column("query_id").to_pylist()
    i_arr = cand.column("item_id").to_pylist()
    for c in channels:
        mask = cand.column(f"rank_{c}").is_valid().to_numpy(zero_copy_only=False)
        for q, i, m in zip(q_arr, i_arr, mask):
            if m:
                got[c].setdefault(q, set()).add(i)
    for q, i in zip(q_arr, i_arr):
        got["union"].setdefault(q, set()).add(i)

    def block(qs: list[str]) -> dict:
        out = {"queries": len(qs), "relevant": int(sum(len(rel[q]) for q in qs))}
        for c in channels + ["union"]:
            found = sum(len(rel[q] & got[c].get(q, set())) for q in qs)
            macro = np.mean([len(rel[q] & got[c].get(q, set())) / len(rel[q]) for q in qs]) if qs else 0.0
            out[c] = {"micro": round(found / max(out["relevant"], 1), 4), "macro": round(float(macro), 4)}
        if "ann" in channels and "bm25" in channels:
            # relevant items that ANN found and BM25 missed (what the semantic channel adds)
            out["ann_not_bm25"] = int(sum(len((rel[q] & got["ann"].get(q, set())) - got["bm25"].get(q, set()))
                                          for q in qs))
        return out

    judged = [q for q in qids if q in rel]
    res = {"source": source, "min_grade": 3, "all": block(judged)}
    if kind:
        res["by_kind"] = {k: block([q for q in judged if kind.get(q) == k])
                          for k in sorted({kind.get(q) for q in judged if kind.get(q)})}
    res["by_segment"] = {s: block([q for q in judged if segment.get(q) == s])
                         for s in ("head", "torso", "tail", "unknown") if any(segment.get(q) == s for q in judged)}
    return res
