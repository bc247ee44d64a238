"""The search API over loopback: `assay serve` on a workspace, first-seen queries, repeated ones, and a bounded load.

    python benchmarks/bench_api.py -w /tmp/ws20k --build-items 20000     # builds the workspace when it has no index
    python benchmarks/bench_api.py -w workspace --requests 5000 --concurrency 32

``--build-items N`` (only when the workspace has no index yet): simulates a world of N products and 3,000 queries,
ingests it and exports a FAISS index of the base model's two-tower (``serve.index: auto``, so flat up to 200k
items). Serving cost does not depend on training, so an untrained checkpoint is as good as a trained one here.

The server runs in its own process (`assay serve` on a free loopback port, as users start it); the clients are
threads here, one fresh HTTP connection per request. It reports:

- **first-seen** queries: query texts the server has not answered before, one at a time, each sent once (a real
  query log is mostly these): client-side and server-side (``took_ms``) p50/p99;
- **repeated**: the same queries sent again, one at a time;
- the bounded load: N requests from C concurrent clients, dense and hybrid: p50/p90/p99/max, throughput, errors;
- as the peer measured in the same run, first-seen queries answered in-process one at a time (no HTTP), so the
  table shows what HTTP adds.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def build(ws: Path, n_items: int, seed: int = 21) -> None:
    """Simulate, ingest and export an index of the base model into ``ws`` (see the module docstring)."""
    from assay.config import AssayConfig, IngestConfig, ServeConfig
    from assay.data import ingest
    from assay.data.simulate import SimulateConfig, simulate
    from assay.serving import index as serving
    from assay.store import Store
    from assay.trainer.model import TwoTower

    world = ws.parent / f"{ws.name}-world"
    simulate(SimulateConfig(seed=seed, n_products=n_items, n_queries=3000), world, progress=False)
    ckpt = ws.parent / f"{ws.name}-base-checkpoint"
    TwoTower.from_base("all-MiniLM-L6-v2").save(ckpt)
    with Store.open(ws) as s:
        ingest.run(IngestConfig(), s, path=world, progress=False)
        serving.export(AssayConfig(serve=ServeConfig(recall_sample=50)), s, checkpoint=str(ckpt), progress=False)


def post(url: str, query: str, k: int, mode: str = "dense") -> tuple[float, float]:
    """(client ms, server took_ms) of one POST /search."""
    body = json.dumps({"query": query, "k": k, "mode": mode}).encode()
    req = urllib.request.Request(f"{url}/search", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        took = json.loads(r.read())["took_ms"]
    return (time.perf_counter() - t0) * 1e3, float(took)


def pcts(ms: list[float]) -> str:
    return f"{np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", type=Path, default=Path("workspace"))
    ap.add_argument("--build-items", type=int, default=None, help="build the workspace with this many items first")
    ap.add_argument("--first-seen", type=int, default=400, help="distinct never-sent queries timed one at a time")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args()

    from assay.config import AssayConfig
    from assay.serving.index import Served
    from assay.serving.load import hammer
    from assay.store import Store

    if args.build_items and not (args.workspace / "artifacts" / "index").exists():
        t0 = time.perf_counter()
        build(args.workspace, args.build_items)
        print(f"built {args.workspace} ({args.build_items:,} items) in {time.perf_counter() - t0:.0f} s")
    with Store.open(args.workspace, read_only=True) as s:
        queries = [r[0] for r in s.exec("SELECT DISTINCT text FROM queries ORDER BY hash(text)")]
        n_items = s.scalar("SELECT n_items FROM indexes ORDER BY rowid DESC LIMIT 1")
    warm, fresh = queries[:50], queries[50:50 + args.first_seen]
    peer_fresh = queries[50 + args.first_seen:50 + 2 * args.first_seen] or fresh
    with Store.open(args.workspace, read_only=True) as s:  # the peer: in-process, its own first-seen queries
        served = Served(AssayConfig(), s)
        for q in warm:
            served.search(q, args.k)
        peer = []
        for q in peer_fresh:
            t0 = time.perf_counter()
            served.search(q, args.k)
            peer.append((time.perf_counter() - t0) * 1e3)
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
        for q in warm:
            post(url, q, args.k)
        first = [post(url, q, args.k) for q in fresh]
        again = [post(url, q, args.k) for q in fresh]
        rows = [hammer(url, queries, n=args.requests, concurrency=args.concurrency, k=args.k, mode=m)
                for m in ("dense", "hybrid")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n{n_items:,} items, k={args.k}, one request at a time (p50 / p99 ms):")
    print("| queries | n | client (HTTP) | server took_ms |\n|---|---|---|---|")
    print(f"| first-seen | {len(first)} | {pcts([c for c, _ in first])} | {pcts([t for _, t in first])} |")
    print(f"| repeated | {len(again)} | {pcts([c for c, _ in again])} | {pcts([t for _, t in again])} |")
    print(f"| first-seen in-process (peer, no HTTP) | {len(peer)} | {pcts(peer)} | |")
    print(f"\nbounded load ({args.requests} requests, {args.concurrency} clients, queries cycled):")
    cols = ["mode", "requests", "concurrency", "errors", "qps", "p50_ms", "p90_ms", "p99_ms", "max_ms"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
