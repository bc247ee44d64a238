"""Time the world simulator at several catalog sizes and print a table (seconds, items/s, per-stage seconds).

    python benchmarks/bench_simulate.py                 # 10k and 100k products
    python benchmarks/bench_simulate.py --full          # also 1M
    python benchmarks/bench_simulate.py --sizes 5000 50000 --queries-per-product 0.02

Queries scale with the catalog (``--queries-per-product``, at least ``--min-queries``); sessions are the default
100 per query. Worlds are written to a temporary directory (or ``--out``) and deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from assay.data.simulate import SimulateConfig, simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="catalog sizes to time")
    ap.add_argument("--full", action="store_true", help="also time 1,000,000 products")
    ap.add_argument("--queries-per-product", type=float, default=0.02, help="n_queries = this * n_products")
    ap.add_argument("--min-queries", type=int, default=2000, help="lower bound on n_queries")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", type=Path, default=None, help="directory for the worlds (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated worlds")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    args = ap.parse_args()

    sizes = list(args.sizes) + ([1_000_000] if args.full and 1_000_000 not in args.sizes else [])
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_simulate_"))
    rows = []
    for n in sizes:
        nq = max(args.min_queries, int(n * args.queries_per_product))
        cfg = SimulateConfig(n_products=n, n_queries=nq, seed=args.seed)
        out = root / f"world_{n}"
        t0 = time.perf_counter()
        summary = simulate(cfg, out, progress=args.progress)
        secs = time.perf_counter() - t0
        rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        rows.append((n, nq, secs, n / secs, summary["seconds"], rss_gb, size_mb, summary["engagement_rows"]))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        print(f"done {n:,} products in {secs:.1f}s", flush=True)

    stages = list(rows[0][4])
    head = f"{'products':>10} {'queries':>8} {'seconds':>8} {'items/s':>9} " + " ".join(f"{s:>10}" for s in stages)
    head += f" {'peak RSS GB':>11} {'disk MB':>8} {'eng rows':>9}"
    print(head)
    for n, nq, secs, ips, st, rss, mb, er in rows:
        print(f"{n:>10,} {nq:>8,} {secs:>8.1f} {ips:>9,.0f} " + " ".join(f"{st[s]:>10.2f}" for s in stages)
              + f" {rss:>11.2f} {mb:>8.0f} {er:>9,}")
    for (n0, _, s0, *_), (n1, _, s1, *_) in zip(rows, rows[1:]):
        print(f"{n0:,} -> {n1:,}: {n1 / n0:.0f}x products, {s1 / s0:.1f}x time")
    if not args.keep and args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
