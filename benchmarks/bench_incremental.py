"""An incremental `assay run`: a catalog and query log that change after the first full run.

    python benchmarks/bench_incremental.py -c configs/eval20k.yaml --workspace /tmp/ws-inc --json out.json

1. The first full run: `assay run -c CONFIG` on a fresh workspace (or, with ``--reuse``, a workspace that already
   finished one; its step times are read from its pipeline record), timed.
2. The change, as a catalog and query log change from one day to the next, through `assay ingest` of generic files:
   - ``--edit`` (5%) of the catalog's items get an edited title (a marketing suffix appended);
   - ``--new-items`` (2%) new items: copies of existing items (their attributes, brand and category, so the
     simulated world's truth grades them like their originals) under new ids, with a suffix in the title;
   - ``--new-queries`` (2%) new queries: existing queries' texts with a word added ("new", "best", ...), their truth
     copied from the query they came from; new queries have no engagement yet (first-seen queries).
   The simulated world's truth tables get rows for the new items and queries, so the evaluation can grade them.
3. `assay run -c CONFIG` again, timed: the steps that ran and why.
4. What was relabeled: every label written by the second run's annotation, against the pairs the change touched
   (mined pairs that are new, or whose item or query text changed); they should be equal. And what nothing
   re-derived: stale labels left on mined pairs (should be 0), mining done on an older catalog (should be none).

Timing is one run each on whatever machine runs it (say if it is shared); the ratio second/first is the point.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assay import pipeline  # noqa: E402
from assay.annotate.pairs import count_stale, count_work  # noqa: E402
from assay.config import IngestConfig, load_config  # noqa: E402
from assay.data import ingest  # noqa: E402
from assay.mining.run import stale_inputs  # noqa: E402
from assay.store import Store  # noqa: E402

WORDS = ("new", "best", "cheap", "modern", "premium", "small", "large")


def change(ws: Path, folder: Path, edit: float, new_items: float, new_queries: float, seed: int) -> dict:
    """Edit titles, add items and queries (generic files through `assay ingest`); returns what changed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with Store.open(ws) as s:
        prods = s.query("SELECT item_id, title, description, brand, category, CAST(attributes AS VARCHAR) AS attributes,"
                        " popularity FROM products ORDER BY item_id")
        n = prods.num_rows
        ids = np.array(prods.column("item_id").to_pylist(), dtype=object)
        edit_idx = rng.choice(n, size=int(round(edit * n)), replace=False)
        new_idx = rng.choice(n, size=int(round(new_items * n)), replace=False)
        titles = prods.column("title").to_pylist()
        edited = prods.take(pa.array(edit_idx)).set_column(
            1, "title", pa.array([titles[i] + " (2027 model)" for i in edit_idx]))
        new_ids = [f"x{k + 1:07d}" for k in range(len(new_idx))]
        added = prods.take(pa.array(new_idx)).set_column(0, "item_id", pa.array(new_ids)).set_column(
            1, "title", pa.array([titles[i] + " - new arrival" for i in new_idx]))
        pq.write_table(pa.concat_tables([edited, added]), folder / "products.parquet")

        qs = s.query("SELECT query_id, text, frequency FROM queries ORDER BY query_id")
        qn = qs.num_rows
        q_idx = rng.choice(qn, size=int(round(new_queries * qn)), replace=False)
        texts = qs.column("text").to_pylist()
        have = set(texts)
        new_q, new_t, src = [], [], []
        for k, i in enumerate(q_idx):
            for w in rng.permutation(WORDS):
                t = f"{w} {texts[i]}"
                if t not in have:
                    have.add(t)
                    new_q.append(f"y{k + 1:06d}")
                    new_t.append(t)
                    src.append(qs.column("query_id")[int(i)].as_py())
                    break
        pq.write_table(pa.table({"query_id": new_q, "text": new_t, "frequency": pa.array([1] * len(new_q), pa.int64())}),
                       folder / "queries.parquet")
        rep = ingest.run(IngestConfig(), s, files={"products": folder / "products.parquet",
                                                   "queries": folder / "queries.parquet"}, progress=False)
        # the simulated world grows with them: truth rows copied from the originals
        if s.count("truth_items"):
            src_items = ids[new_idx].tolist()
            s.con.register("_new_items", pa.table({"item_id": new_ids, "src": src_items}))
            s.exec("INSERT INTO truth_items SELECT n.item_id, t.* EXCLUDE (item_id) FROM _new_items n "
                   "JOIN truth_items t ON t.item_id = n.src")
            s.con.register("_new_queries", pa.table({"query_id": new_q, "text": new_t, "src": src}))
            s.exec("INSERT INTO truth_queries SELECT n.query_id, n.text, t.* EXCLUDE (query_id, text) "
                   "FROM _new_queries n JOIN truth_queries t ON t.query_id = n.src")
    return {"edited_items": int(len(edit_idx)), "new_items": len(new_ids), "new_queries": len(new_q),
            "edited_ids": ids[edit_idx].tolist(), "new_item_ids": new_ids, "new_query_ids": new_q,
            "ingest": {t: {k: v for k, v in r.items() if k in ("accepted", "inserted", "replaced", "rejected")}
                       for t, r in rep["tables"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="configs/eval20k.yaml")
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--reuse", action="store_true", help="the workspace already finished a full run")
    ap.add_argument("--edit", type=float, default=0.05)
    ap.add_argument("--new-items", type=float, default=0.02)
    ap.add_argument("--new-queries", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--set", "-s", action="append", default=[], help="config override section.key=value")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.set)
    ws = Path(args.workspace)
    out: dict = {"config": args.config, "overrides": args.set}

    if args.reuse:
        with Store.open(ws, read_only=True) as s:
            rec = s.get_meta(pipeline.META_KEY) or {}
        first = {"steps": [{"step": k, "status": "ran", "seconds": v.get("seconds", 0.0)} for k, v in rec.items()]}
        first_s = sum(v.get("seconds", 0.0) for v in rec.values())
    else:
        t0 = time.perf_counter()
        first = pipeline.run(cfg, ws, progress=False)
        first_s = time.perf_counter() - t0
    out["first"] = {"seconds": round(first_s, 1), "steps": first["steps"]}

    with Store.open(ws, read_only=True) as s:
        sha = s.scalar("SELECT cascade_sha FROM labels GROUP BY 1 ORDER BY max(created_at) DESC LIMIT 1")
        before = {(q, i): t for q, i, t in s.exec("SELECT query_id, item_id, text_sha FROM labels "
                                                  "WHERE cascade_sha = ? AND status = 'ok'", [sha])}
        t_start = s.scalar("SELECT now()::TIMESTAMP")
    ch = change(ws, ws / "update", args.edit, args.new_items, args.new_queries, args.seed)
    out["change"] = {k: v for k, v in ch.items() if not k.endswith("_ids")}

    t0 = time.perf_counter()
    second = pipeline.run(cfg, ws, progress=False)
    second_s = time.perf_counter() - t0
    out["second"] = {"seconds": round(second_s, 1), "steps": second["steps"]}

    with Store.open(ws, read_only=True) as s:
        runs = [r for (r,) in s.exec("SELECT run_id FROM runs WHERE stage = 'annotate' AND started_at >= ?",
                                     [t_start])]
        relabeled = set(s.exec("SELECT query_id, item_id FROM labels WHERE run_id IN (SELECT unnest(?::VARCHAR[]))",
                               [runs]))
        work = set(s.exec("SELECT query_id, item_id FROM candidates UNION SELECT query_id, item_id FROM negatives"))
        edited, new_items, new_queries = set(ch["edited_ids"]), set(ch["new_item_ids"]), set(ch["new_query_ids"])
        touched = {k for k in work if k not in before or k[1] in edited}
        kinds = {
            "pairs of new queries": sum(k[0] in new_queries for k in touched),
            "pairs of new items": sum(k[1] in new_items for k in touched),
            "pairs of edited items": sum(k[1] in edited for k in touched),
            "other pairs new to mining": sum(k[0] not in new_queries and k[1] not in new_items | edited
                                             for k in touched)}
        w = count_work(s, ["candidates", "negatives"], sha)
        cascades = [c for (c,) in s.exec("SELECT DISTINCT cascade_sha FROM labels")]
        out["result"] = {
            "work_pairs": len(work), "touched": len(touched), "touched_by_kind": kinds,
            "relabeled": len(relabeled), "relabeled_equals_touched": relabeled == touched,
            "relabeled_not_touched": len(relabeled - touched), "touched_not_relabeled": len(touched - relabeled),
            "stale_labels_on_mined_pairs": w["stale"], "pending_after": w["pending"],
            "stale_labels_anywhere": count_stale(s, sha), "mining_stale_inputs": stale_inputs(s),
            "cascades": len(cascades), "second_over_first": round(second_s / max(first_s, 1e-9), 3)}

    print(f"first full run: {first_s:.0f} s; incremental run: {second_s:.0f} s "
          f"({out['result']['second_over_first']:.2f}x)")
    print("| step | first (s) | second (s) | why it ran again |")
    print("|---|---|---|---|")
    sec = {r["step"]: r for r in second["steps"]}
    for r in first["steps"]:
        r2 = sec.get(r["step"], {})
        print(f"| {r['step']} | {r['seconds']:.1f} | {r2.get('seconds', 0.0):.1f} | "
              f"{r2.get('why', r2.get('status', ''))} |")
    print(json.dumps({k: v for k, v in out["result"].items()}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
