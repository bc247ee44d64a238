"""The features judge's cosine: read from mining's embedding cache (assay) against encoding every pair on fp32
PyTorch (the peer: what the judge did before 2026-12-07, and what ``inference: torch`` still does when mining ran on
int8 ONNX), measured in the same run on the same workspace.

    python benchmarks/bench_features.py                        # 3,000 products, 300 queries, one thread
    python benchmarks/bench_features.py --products 10000 --queries 1000

One run, in a temporary folder: simulates a world, ingests it and mines it on the default backend (int8 ONNX on a
CPU, behind its accuracy guard), then trains the default features judge twice, once per cosine backend, and has each
grade every mined pair (what `assay annotate` asks of it). Prints seconds per phase, the peer / assay ratio, how many
texts missed the embedding cache (the training pairs' and the graded pairs' queries and items; the stuffed training
copies, whose titles are new texts either way, are not counted), and how often the two judges give the same grade.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

FEATURES = dict(kind="features", model="all-MiniLM-L6-v2", max_length=64, batch_size=128, class_weight="sqrt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from assay.annotate import teachers
    from assay.annotate.base import pairs_from_arrow
    from assay.annotate.fit import prepare_judges
    from assay.config import AnnotateConfig, IngestConfig, JudgeConfig, MiningConfig, ModelsConfig
    from assay.data import ingest
    from assay.data.simulate import SimulateConfig, simulate
    from assay.mining import run as mine
    from assay.store import Store

    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    simulate(SimulateConfig(seed=args.seed, n_products=args.products, n_queries=args.queries, label_queries=0.3),
             root / "world", progress=False)
    rows, grades = {}, {}
    with Store.open(root / "ws") as store:
        ingest.run(IngestConfig(), store, path=root / "world", progress=False)
        t = time.perf_counter()
        mined = mine(MiningConfig(k=50), store, ModelsConfig(), progress=False)
        mine_s = time.perf_counter() - t
        pairs = pairs_from_arrow(store.query(
            """SELECT w.query_id, w.item_id, q.text AS query, p.title, p.description, p.brand, p.category,
                      CAST(p.attributes AS VARCHAR) AS attributes
               FROM (SELECT query_id, item_id FROM candidates UNION SELECT query_id, item_id FROM negatives) w
               JOIN queries q USING (query_id) JOIN products p USING (item_id) ORDER BY 1, 2"""))
        for name, inference in (("peer", "torch"), ("assay", "auto")):
            cfg = AnnotateConfig(judges=[JudgeConfig(name=f"features-{name}", inference=inference, **FEATURES)])
            t = time.perf_counter()
            tr = teachers.run(cfg, store, progress=False)["judges"][f"features-{name}"]
            train_s = time.perf_counter() - t
            judge = prepare_judges(cfg, store)[0]
            t = time.perf_counter()
            grades[name] = judge.predict(pairs).grade
            predict_s = time.perf_counter() - t
            rows[name] = {"backend": tr["encoder_backend"], "train_s": round(train_s, 2),
                          "grade_mined_pairs_s": round(predict_s, 2), "train_texts": tr["cosine_cache"],
                          "grade_texts": judge.cosine_cache}
    peer, ours = rows["peer"], rows["assay"]
    total = {k: r["train_s"] + r["grade_mined_pairs_s"] for k, r in rows.items()}
    out = {"world": {"products": args.products, "queries": args.queries, "mined_pairs": len(pairs),
                     "mining_backend": mined["encoder"]["backend"], "mine_s": round(mine_s, 1)},
           "threads": args.threads, "rows": rows, "ratio_peer_over_assay": round(total["peer"] / total["assay"], 2),
           "same_grade_share": round(float(np.mean(grades["peer"] == grades["assay"])), 4)}
    print(f"{len(pairs):,} mined pairs of {args.products:,} products; mining encoded on {out['world']['mining_backend']} "
          f"in {mine_s:.1f} s; {args.threads} thread(s)")
    print(f"{'cosine from':30} {'train s':>8} {'grade s':>8} {'total s':>8} {'cache misses':>14}")
    for label, k in (("fp32 PyTorch (peer)", "peer"), ("mining's cache (assay)", "assay")):
        r = rows[k]
        enc = r["train_texts"]["encoded"] + r["grade_texts"]["encoded"]
        print(f"{label:30} {r['train_s']:8.2f} {r['grade_mined_pairs_s']:8.2f} {total[k]:8.2f} {enc:14,}")
    print(f"peer / assay: {out['ratio_peer_over_assay']}x; the same grade on {out['same_grade_share']:.1%} of the "
          "mined pairs (the two judges learned from cosines of different encoders)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
