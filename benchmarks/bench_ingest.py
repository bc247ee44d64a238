"""Time simulate + ingest at several catalog sizes, against DuckDB's own CSV reader as the peer.

    python benchmarks/bench_ingest.py                 # 10k and 100k products
    python benchmarks/bench_ingest.py --full          # also 1M products

The peer loads the same products.csv with DuckDB `read_csv` straight into a table (no
validation, no rejects, no line numbers): the ratio says what assay's row-level validation,
line tracking and duplicate handling cost on top of a raw load.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import duckdb

from assay.config import IngestConfig
from assay.data import ingest
from assay.data.simulate import SimulateConfig, simulate
from assay.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--full", action="store_true", help="also 1,000,000 products")
    ap.add_argument("--queries-per-product", type=float, default=0.02)
    ap.add_argument("--min-queries", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sizes = list(args.sizes) + ([1_000_000] if args.full and 1_000_000 not in args.sizes else [])
    root = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    rows = []
    try:
        for n in sizes:
            nq = max(args.min_queries, int(n * args.queries_per_product))
            world = root / f"world_{n}"
            t0 = time.perf_counter()
            simulate(SimulateConfig(n_products=n, n_queries=nq), world, progress=False)
            t_sim = time.perf_counter() - t0

            ws = root / f"ws_{n}"
            t0 = time.perf_counter()
            with Store.open(ws, threads=args.threads) as store:
                s = ingest.run(IngestConfig(), store, path=world, progress=False)
            t_ing = time.perf_counter() - t0
            t_prod = None
            # products alone, to compare with the peer on the same file
            ws2 = root / f"ws2_{n}"
            t0 = time.perf_counter()
            with Store.open(ws2, threads=args.threads) as store:
                ingest.run(IngestConfig(), store, files={"products": world / "products.csv"}, progress=False)
            t_prod = time.perf_counter() - t0

            con = duckdb.connect(str(root / f"peer_{n}.duckdb"))
            con.execute(f"SET threads = {args.threads}")
            t0 = time.perf_counter()
            con.execute(f"CREATE TABLE p AS SELECT * FROM read_csv('{world / 'products.csv'}', header=true)")
            t_peer = time.perf_counter() - t0
            con.close()
            total_rows = sum(t["read"] for t in s["tables"].values())
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            rows.append((n, t_sim, t_ing, total_rows, t_prod, t_peer, rss))
            print(f"done {n:,}", flush=True)
            for p in (world, ws, ws2):
                shutil.rmtree(p, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'products':>10} {'simulate s':>10} {'ingest s':>9} {'rows':>11} {'rows/s':>9} "
          f"{'products s':>10} {'duckdb s':>9} {'assay/duckdb':>12} {'peak GB':>8}")
    for n, ts, ti, r, tp, tpeer, rss in rows:
        print(f"{n:>10,} {ts:>10.1f} {ti:>9.1f} {r:>11,} {r / ti:>9,.0f} {tp:>10.1f} {tpeer:>9.2f} "
              f"{tp / tpeer:>11.1f}x {rss:>8.2f}")
    for a, b in zip(rows, rows[1:]):
        print(f"{a[0]:,} -> {b[0]:,} products: simulate {b[1] / a[1]:.1f}x, ingest {b[2] / a[2]:.1f}x time")


if __name__ == "__main__":
    main()
