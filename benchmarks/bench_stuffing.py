"""Keyword stuffing against a workspace's trained judges: how many low-grade mined pairs a judge lifts when the
query's words are appended to the product title.

    python benchmarks/bench_stuffing.py -w workspace -c configs/demo.yaml --n 2000

Pairs: ``--n`` mined pairs (candidates and negatives, seeded) whose grade is 0 or 1 by the simulator's truth (a
simulated world; on real data pass ``--reference human`` to use human labels of mined pairs instead). For each
classifier judge of the config (and the calibrated cascade's first judge as it runs), it prints the share of pairs
whose grade rises when stuffed, the mean rise, and the share at grade 3 or above, clean and stuffed. Timing is not
the point here; the peer is the same judge on the clean titles, in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", type=Path, default=Path("workspace"))
    ap.add_argument("-c", "--config", type=Path, default=None)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--reference", choices=["truth", "human"], default="truth")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from assay.annotate.agreement import mined_sample
    from assay.annotate.fit import prepare_judges
    from assay.annotate.pairs import human_pairs
    from assay.annotate.stuffing import measure
    from assay.config import load_config
    from assay.data.judgments import load_oracle
    from assay.store import Store

    cfg = load_config(args.config)
    with Store.open(args.workspace, read_only=True) as store:
        if args.reference == "truth":
            oracle = load_oracle(store)
            if oracle is None:
                raise SystemExit("this workspace has no simulator truth; use --reference human")
            pairs = mined_sample(store, cfg.annotate.sources, 20 * args.n, seed=3)
            ref = oracle.grade(np.array([p.query_id for p in pairs], dtype=object),
                               np.array([p.item_id for p in pairs], dtype=object))
        else:
            pairs, ref = [], []
            for split in ("train", "calib", "eval"):
                try:
                    p, g = human_pairs(store, split, pool="mined")
                except ValueError:
                    continue
                pairs += p
                ref = np.concatenate([ref, g])
        low = np.flatnonzero(np.asarray(ref) <= 1)[:args.n]
        pairs, ref = [pairs[i] for i in low], np.asarray(ref)[low]
        judges = prepare_judges(cfg.annotate, store)
        rows = {}
        for jc, judge in zip(cfg.annotate.judges, judges):
            if jc.kind in ("cross_encoder", "llm_classifier"):
                rows[jc.name] = measure(judge, pairs, ref, progress=True)
    print(f"\n{len(pairs)} mined pairs with {args.reference} grade 0 or 1; the query appended to the title")
    print("judge | pairs | raised | mean raise | grade >= 3 clean | grade >= 3 stuffed")
    for name, r in rows.items():
        print(f"{name} | {r['pairs']} | {r['raised']:.1%} | {r['mean_raise']:+.2f} | {r['clean_at_3_plus']:.1%} | "
              f"{r['stuffed_at_3_plus']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
