"""Keyword stuffing across the whole cascade: judges trained once, titles edited, the changed pairs relabeled by the
same judges, attacked minus untouched.

    flock /tmp/assay-cpu.lock python benchmarks/bench_stuffing.py --json benchmarks/results/stuffing.json

One run, in a temporary folder (``--keep DIR`` keeps it):

1. simulates a small world (``--products``, ``--queries``; seeded), ingests it, mines it (k=50, 10 token-similar and 10
   random negatives per query, as configs/demo.yaml), asks ``--requests`` label requests of the simulated annotators;
2. trains every judge once on the human train split: the features judge without the defence (``stuffed_negatives:
   0``, no stuffing features, the old judge), with only the stuffing features, with only the stuffed copies, with
   both, and the demo's 32-token cross-encoder ``ce-fast`` with ``stuffed_negatives`` 0 and 0.5; calibrates two
   cascades like the demo's (features then ce-fast), undefended and defended, on the calib split;
3. grades the chosen pairs, then edits titles and re-ingests the edited products and mines again, so the mining
   signals (BM25 and ANN ranks and scores) see the edit; the same judges and calibrators grade the same pairs again:
   - attacked: for ``--attack-queries`` head queries, up to ``--per-query`` of their mined pairs whose true grade is
     0 or 1, each item's title with that query's words appended;
   - control: as many other mined pairs of true grade 0-1 whose item's title got a harmless edit (its own brand,
     else its category's last word, appended);
4. prints, per judge alone (its calibrated top grade) and per cascade: the share of attacked pairs whose grade rose,
   the same share on control pairs, their difference (the attack effect), and the share at grade 3 or above before
   and after. Timing is not the point; the peer of every number is the control edit in the same run.

The numbers are from one world and one training run per judge (on the shared 2-core machine a run takes about
10 minutes); see docs/labels.md, section 6.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

FEATURES = dict(kind="features", model="all-MiniLM-L6-v2", max_length=64, batch_size=128, class_weight="sqrt")
CE = dict(kind="cross_encoder", model="all-MiniLM-L6-v2", max_length=32, batch_size=64, epochs=1, class_weight="sqrt")
JUDGES = {
    "features": {**FEATURES, "stuffed_negatives": 0.0, "stuffing_features": False},
    "features+signals": {**FEATURES, "stuffed_negatives": 0.0, "stuffing_features": True},
    "features+copies": {**FEATURES, "stuffed_negatives": 0.5, "stuffing_features": False},
    "features+both": {**FEATURES, "stuffed_negatives": 0.5, "stuffing_features": True},
    "ce-fast": {**CE, "stuffed_negatives": 0.0},
    "ce-fast+copies": {**CE, "stuffed_negatives": 0.5},
}
CASCADES = {"undefended": ["features", "ce-fast"], "defended": ["features+both", "ce-fast+copies"],
            "features defended only": ["features+both", "ce-fast"],
            # one-judge "cascades" calibrate the variants no cascade above holds (their rows are the judge's own)
            "features+signals": ["features+signals"], "features+copies": ["features+copies"]}

_PAIRS_SQL = """SELECT k.query_id, k.item_id, q.text AS query, p.title, p.description, p.brand, p.category,
                       CAST(p.attributes AS VARCHAR) AS attributes
                FROM _keys k JOIN queries q USING (query_id) JOIN products p USING (item_id) ORDER BY k.ord"""


def _pairs(store, keys: list[tuple[str, str]]):
    from assay.annotate.base import pairs_from_arrow

    tbl = pa.table({"ord": np.arange(len(keys)), "query_id": [k[0] for k in keys], "item_id": [k[1] for k in keys]})
    store.con.register("_keys", tbl)
    try:
        return pairs_from_arrow(store.query(_PAIRS_SQL))
    finally:
        store.con.unregister("_keys")


def _choose(store, n_queries: int, per_query: int, seed: int):
    """Attacked (query, item) pairs of head queries and control pairs of other queries, items disjoint, all of true
    grade 0-1 and mined."""
    from assay.data.judgments import load_oracle

    mined = store.query("""SELECT m.query_id, m.item_id, q.segment, q.text, p.brand, p.category FROM
                           (SELECT query_id, item_id FROM candidates UNION SELECT query_id, item_id FROM negatives) m
                           JOIN queries q USING (query_id) JOIN products p USING (item_id) ORDER BY 1, 2""").to_pylist()
    oracle = load_oracle(store)
    truth = oracle.grade(np.array([r["query_id"] for r in mined], dtype=object),
                         np.array([r["item_id"] for r in mined], dtype=object))
    low = [r for r, g in zip(mined, truth) if g <= 1]
    rng = np.random.default_rng(seed)
    rng.shuffle(low)
    by_q: dict[str, list[dict]] = {}
    for r in low:
        by_q.setdefault(r["query_id"], []).append(r)
    heads = sorted({r["query_id"] for r in low if r["segment"] == "head"}) or sorted(by_q)
    heads = [heads[i] for i in rng.permutation(len(heads))[:n_queries]]
    used: set[str] = set()
    attacked = []
    for q in heads:
        took = 0
        for r in by_q[q]:
            if took < per_query and r["item_id"] not in used:
                used.add(r["item_id"])
                attacked.append(r)
                took += 1
    control = []
    hset = set(heads)
    for r in low:
        if len(control) >= len(attacked):
            break
        if r["query_id"] not in hset and r["item_id"] not in used:
            used.add(r["item_id"])
            control.append(r)
    return attacked, control


def _edit_products(store, attacked: list[dict], control: list[dict], out: Path) -> Path:
    """A products file holding the edited rows only (attacked: title + query; control: title + brand or category
    word), for re-ingest."""
    edits = {r["item_id"]: f" {r['text']}" for r in attacked}
    for r in control:
        word = r["brand"] or (r["category"] or "item").split()[-1]
        edits[r["item_id"]] = f" {word}"
    store.con.register("_edits", pa.table({"item_id": list(edits), "suffix": list(edits.values())}))
    try:
        store.exec(f"""COPY (SELECT p.item_id, p.title || e.suffix AS title, p.description, p.brand, p.category,
                                    CAST(p.attributes AS VARCHAR) AS attributes, p.popularity
                             FROM products p JOIN _edits e USING (item_id) ORDER BY 1)
                       TO '{out}' (HEADER, DELIMITER ',')""")
    finally:
        store.con.unregister("_edits")
    return out


def _grades(cascades, judges, names, pairs) -> tuple[dict, dict]:
    """Per judge alone (calibrated top grade) and per cascade: grades of ``pairs``."""
    from assay.annotate.cascade import route

    probs = {n: judges[n].predict(pairs).probs for n in names}
    alone, routed = {}, {}
    for cname, casc in cascades.items():
        cal = [casc.calibrate(k, probs[n]) for k, n in enumerate(casc.names)]
        routed[cname] = route(cal, casc.names, casc.thresholds).grade.astype(np.int64)
        for k, n in enumerate(casc.names):
            alone.setdefault(n, np.nan_to_num(cal[k], nan=-1).argmax(axis=1))
    return alone, routed


def _effect(before_a, after_a, before_c, after_c) -> dict:
    up_a, up_c = float((after_a > before_a).mean()), float((after_c > before_c).mean())
    return {"attacked_raised": round(up_a, 4), "control_raised": round(up_c, 4), "effect": round(up_a - up_c, 4),
            "attacked_3plus_before": round(float((before_a >= 3).mean()), 4),
            "attacked_3plus_after": round(float((after_a >= 3).mean()), 4),
            "control_3plus_after": round(float((after_c >= 3).mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--requests", type=int, default=1000, help="label requests answered by simulated annotators")
    ap.add_argument("--attack-queries", type=int, default=30)
    ap.add_argument("--per-query", type=int, default=15)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", type=Path, default=None, help="build the workspace here and keep it")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from assay.annotate import fit, requests, teachers
    from assay.annotate.runtime import load_cascade
    from assay.config import AnnotateConfig, IngestConfig, JudgeConfig, LabelRequestConfig, MiningConfig, ModelsConfig
    from assay.data import ingest
    from assay.data.simulate import SimulateConfig, simulate
    from assay.mining import run as mine
    from assay.store import Store

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-stuffing-"))
    root.mkdir(parents=True, exist_ok=True)
    world, ws = root / "world", root / "ws"
    t0 = time.perf_counter()
    timings = {}
    mcfg = MiningConfig(k=50, negatives={"n_token_sim": 10, "n_random": 10})
    models = ModelsConfig()
    simulate(SimulateConfig(seed=args.seed, n_products=args.products, n_queries=args.queries, label_queries=0.3),
             world, progress=False)
    with Store.open(ws) as store:
        ingest.run(IngestConfig(), store, path=world, progress=False)
        mine(mcfg, store, models, progress=False)
        requests.run(LabelRequestConfig(n=args.requests), store, root / "req.csv")
        requests.answer_simulated(store, root / "req.csv", root / "ans.csv")
        ingest.run(IngestConfig(), store, files={"human_labels": root / "ans.csv"}, progress=False)
        timings["world_s"] = round(time.perf_counter() - t0, 1)

        jcfgs = {n: JudgeConfig(name=n.replace("+", "_"), **c) for n, c in JUDGES.items()}
        t1 = time.perf_counter()
        tr = teachers.run(AnnotateConfig(judges=list(jcfgs.values())), store, progress=False)
        timings["train_s"] = round(time.perf_counter() - t1, 1)
        cascades, judges, calib = {}, {}, {}
        for cname, names in CASCADES.items():
            acfg = AnnotateConfig(judges=[jcfgs[n] for n in names])
            loaded = [judges.get(n) for n in names]
            if any(j is None for j in loaded):
                loaded = fit.prepare_judges(acfg, store)
            for n, j in zip(names, loaded):
                judges.setdefault(n, j)
            summary = fit.run(acfg, store, progress=False, judges=loaded)
            casc = load_cascade(acfg, store.artifacts, judges=loaded)
            casc.names = names  # bench names (config names replace '+')
            cascades[cname] = casc
            calib[cname] = {"accuracy_on_calib": summary["cascade_accuracy_on_calib"],
                            "decided_by": summary["decided_by"],
                            "judges": {n: summary["judges"][jcfgs[n].name]["accuracy"] for n in names}}
        names = list(judges)
        attacked, control = _choose(store, args.attack_queries, args.per_query, args.seed)
        keys_a = [(r["query_id"], r["item_id"]) for r in attacked]
        keys_c = [(r["query_id"], r["item_id"]) for r in control]
        before_a = _grades(cascades, judges, names, _pairs(store, keys_a))
        before_c = _grades(cascades, judges, names, _pairs(store, keys_c))

        t2 = time.perf_counter()
        ingest.run(IngestConfig(), store, files={"products": _edit_products(store, attacked, control,
                                                                            root / "edited_products.csv")},
                   progress=False)
        mine(mcfg, store, models, progress=False)
        timings["edit_and_mine_s"] = round(time.perf_counter() - t2, 1)
        pa_, pc_ = _pairs(store, keys_a), _pairs(store, keys_c)
        assert all(p.title.endswith(r["text"]) for p, r in zip(pa_, attacked)), "the edit did not reach products"
        after_a = _grades(cascades, judges, names, pa_)
        after_c = _grades(cascades, judges, names, pc_)

    rows = {}
    for n in names:
        rows[n] = _effect(before_a[0][n], after_a[0][n], before_c[0][n], after_c[0][n])
    for c in cascades:
        if len(CASCADES[c]) == 1:
            continue
        rows[f"cascade {c}"] = _effect(before_a[1][c], after_a[1][c], before_c[1][c], after_c[1][c])
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    out = {"world": {"products": args.products, "queries": args.queries, "requests": args.requests,
                     "seed": args.seed, "train_pairs": tr["train_pairs"]},
           "attacked_pairs": len(attacked), "attack_queries": len({k[0] for k in keys_a}), "control_pairs": len(control),
           "calibration": calib, "train": {n: {k: v for k, v in tr["judges"][jcfgs[n].name].items()
                                               if k in ("n_train", "n_stuffed", "iterations", "seconds")}
                                           for n in names},
           "rows": rows, "timings": timings, "machine": "shared 2-core CPU"}
    print(f"\n{len(attacked)} attacked pairs ({out['attack_queries']} head queries, true grade 0-1, query appended "
          f"to the title) and {len(control)} control pairs (harmless title edit); re-ingested, re-mined, relabeled "
          "by the same judges and calibrators")
    print("judge / cascade | calib accuracy | attacked raised | control raised | effect | attacked >= 3 before -> after")
    acc = {n: a for c in calib.values() for n, a in c["judges"].items()}
    for name, r in rows.items():
        a = acc.get(name, calib.get(name.removeprefix("cascade "), {}).get("accuracy_on_calib"))
        print(f"{name} | {a if a is not None else '-'} | {r['attacked_raised']:.1%} | {r['control_raised']:.1%} | "
              f"{r['effect']:+.1%} | {r['attacked_3plus_before']:.1%} -> {r['attacked_3plus_after']:.1%}")
    print(f"timings: {timings}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
