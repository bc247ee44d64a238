"""Pairs per second of the calibrated cascade against each of its judges alone, same pairs, same run.

    python benchmarks/bench_cascade.py --workspace workspace --config configs/demo.yaml --pairs 500

Needs a workspace where `assay teachers train` and `assay calibrate` have run (`make demo` makes
one). The cascade is timed through the real annotate path (routing, votes, DuckDB writes) on a
copy of the workspace, so the original is not modified.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from assay.annotate import batches
from assay.annotate.base import pairs_from_arrow
from assay.annotate.fit import prepare_judges
from assay.annotate.pairs import pending_pairs
from assay.annotate.runtime import cascade_sha
from assay.config import load_config
from assay.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--pairs", type=int, default=500)
    args = ap.parse_args()
    cfg = load_config(args.config).annotate
    tmp = Path(tempfile.mkdtemp(prefix="bench_cascade_"))
    try:
        ws = tmp / "ws"
        shutil.copytree(args.workspace, ws, ignore=shutil.ignore_patterns("assay.lock"))
        with Store.open(ws) as store:
            judges = prepare_judges(cfg, store)
            sha = cascade_sha(cfg, store.artifacts)
            pairs = pairs_from_arrow(pending_pairs(store, cfg.sources, sha, args.pairs))
            rows = []
            for j, judge in zip(cfg.judges, judges):
                t0 = time.perf_counter()
                judge.predict(pairs)
                secs = time.perf_counter() - t0
                rows.append((f"{j.name} alone ({j.kind})", len(pairs) / secs, secs))
            out = batches.run(cfg.model_copy(update={"max_pairs": args.pairs}), store, progress=False, judges=judges)
            rows.append(("cascade (annotate, incl. writes)", out["pairs_per_second"], out["seconds"]))
        print(f"\n{len(pairs)} pairs; cascade decided: {out['decided_share']}")
        print(f"{'what':<40} {'pairs/s':>9} {'seconds':>8} {'vs last judge':>14}")
        last = rows[-2][1]
        for name, pps, secs in rows:
            print(f"{name:<40} {pps:>9.1f} {secs:>8.1f} {pps / last:>13.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
