"""The search API under a bounded loopback load: `assay serve` on a workspace, N requests from C concurrent clients.

    python benchmarks/bench_api.py -w workspace                      # 2,000 requests, 16 clients, dense and hybrid
    python benchmarks/bench_api.py -w workspace --requests 5000 --concurrency 32

The workspace needs an exported index (`assay export-index`, or `make demo`). The server runs in its own process
(`assay serve` on a free loopback port, as users start it); the clients are threads here, one fresh HTTP
connection per request. It prints p50/p90/p99/max latency, throughput and errors per mode, and, as the peer
measured in the same run, the same queries answered in-process one at a time (no HTTP, no concurrency), so the
table shows what HTTP and queueing add.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", type=Path, default=Path("workspace"))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()

    from assay.config import AssayConfig
    from assay.serving.index import Served
    from assay.serving.load import hammer
    from assay.store import Store

    with Store.open(args.workspace, read_only=True) as s:
        queries = [r[0] for r in s.exec("SELECT text FROM queries ORDER BY hash(query_id) LIMIT 500")]
        served = Served(AssayConfig(), s)
        for q in queries[:20]:
            served.search(q, args.k)
        ms = []
        for q in queries[:300]:
            t0 = time.perf_counter()
            served.search(q, args.k)
            ms.append((time.perf_counter() - t0) * 1e3)
        del served
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "assay.cli", "serve", "-w", str(args.workspace), "-q",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        hammer(url, queries[:50], n=50, concurrency=4)  # warm-up
        rows = [hammer(url, queries, n=args.requests, concurrency=args.concurrency, k=args.k, mode=m)
                for m in ("dense", "hybrid")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\nin-process, one query at a time (peer): p50 {np.percentile(ms, 50):.2f} ms, "
          f"p99 {np.percentile(ms, 99):.2f} ms, {1e3 / np.mean(ms):.0f} queries/s")
    cols = ["mode", "requests", "concurrency", "errors", "qps", "p50_ms", "p90_ms", "p99_ms", "max_ms"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
