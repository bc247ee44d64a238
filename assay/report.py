"""Workspace summary: row counts and the facts a user checks first, from SQL over the store."""

from __future__ import annotations

from assay.annotate.pairs import count_stale
from assay.records import ALL_TABLES
from assay.store import Store


def _one(store: Store, sql: str) -> tuple:
    return store.exec(sql)[0]


def _dist(store: Store, sql: str) -> str:
    rows = store.exec(sql)
    return ", ".join(f"{k}: {v:,}" for k, v in rows)


def workspace_summary(store: Store) -> dict:
    tables: dict[str, dict] = {}
    for name in ALL_TABLES:
        n = store.count(name)
        tables[name] = {"rows": n}
    t = tables
    if t["products"]["rows"]:
        brands, cats = _one(store, "SELECT count(DISTINCT brand), count(DISTINCT category) FROM products")
        t["products"]["details"] = f"{brands:,} brands, {cats:,} categories"
    if t["queries"]["rows"]:
        t["queries"]["segments"] = dict(store.exec(
            "SELECT segment, count(*) FROM queries GROUP BY segment ORDER BY segment"))
        t["queries"]["details"] = _dist(store, """
            SELECT segment, count(*) FROM queries GROUP BY segment
            ORDER BY array_position(['head', 'torso', 'tail', 'unknown'], segment)""")
    if t["engagement"]["rows"]:
        imp, clk, atc, ords, nq = _one(store, """SELECT sum(impressions), sum(clicks), sum(add_to_carts), sum(orders),
                                                  count(DISTINCT query_id) FROM engagement""")
        ctr = (clk or 0) / imp if imp else 0.0
        t["engagement"].update(impressions=imp, clicks=clk, queries=nq)
        t["engagement"]["details"] = (f"{nq:,} queries, {imp or 0:,} impressions, {clk or 0:,} clicks (CTR {ctr:.3f}), "
                                      f"{atc or 0:,} add-to-carts, {ords or 0:,} orders")
    if t["human_labels"]["rows"]:
        t["human_labels"]["splits"] = dict(store.exec(
            "SELECT split, count(*) FROM human_labels GROUP BY split"))
        t["human_labels"]["grades"] = {int(k): v for k, v in store.exec(
            "SELECT grade, count(*) FROM human_labels GROUP BY grade ORDER BY grade")}
        t["human_labels"]["details"] = (
            _dist(store, "SELECT split, count(*) FROM human_labels GROUP BY split "
                         "ORDER BY array_position(['train', 'calib', 'eval'], split)")
            + " | grades " + _dist(store, "SELECT grade, count(*) FROM human_labels GROUP BY grade ORDER BY grade DESC"))
    if t["rejects"]["rows"]:
        t["rejects"]["details"] = _dist(store, "SELECT target, count(*) FROM rejects GROUP BY target ORDER BY 2 DESC")
    if t["runs"]["rows"]:
        t["runs"]["details"] = _dist(store, "SELECT stage || '/' || status, count(*) FROM runs GROUP BY 1 ORDER BY 1")
    if t["candidates"]["rows"]:
        nq, avg = _one(store, "SELECT count(DISTINCT query_id), count(*) / count(DISTINCT query_id) FROM candidates")
        t["candidates"]["details"] = f"{nq:,} queries, {avg:,.0f} candidates per query"
        from assay.mining.run import stale_inputs

        changed = stale_inputs(store)
        if changed:
            t["candidates"]["stale_inputs"] = changed
            t["candidates"]["details"] += f" (stale: {', '.join(changed)} changed since mining; `assay mine`)"
    if t["labels"]["rows"]:
        t["labels"]["details"] = _dist(store, "SELECT coalesce(decided_by, status), count(*) FROM labels GROUP BY 1 ORDER BY 2 DESC")
        t["labels"]["stale"] = count_stale(store)
        if t["labels"]["stale"]:
            t["labels"]["details"] += (f" | {t['labels']['stale']:,} stale (texts changed since labeled; "
                                       "`assay annotate` relabels them)")
    if t["examples"]["rows"]:
        t["examples"]["details"] = (_dist(store, """SELECT ['easy_pos', 'hard_pos', 'hard_neg', 'token_sim_neg',
                                                          'random_neg'][tier], count(*) FROM examples GROUP BY tier
                                                   ORDER BY tier""")
                                    + " | " + _dist(store, "SELECT split, count(*) FROM examples GROUP BY 1 ORDER BY 1"))
    if t["checkpoints"]["rows"]:
        t["checkpoints"]["details"] = _dist(store, """SELECT name || CASE WHEN kept THEN '' ELSE ' (skipped)' END,
                                                      count(*) FROM checkpoints GROUP BY 1 ORDER BY 1""")
    # hide internal bookkeeping tables that are empty
    shown = {k: v for k, v in tables.items() if v["rows"] or k in ("products", "queries", "engagement", "human_labels", "rejects", "runs")}
    return {"workspace": str(store.root), "schema_version": store.schema_version(), "tables": shown}
