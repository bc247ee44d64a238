"""The search API over loopback: `assay serve` on a workspace, first-seen queries, repeated ones, and a bounded load.

    python benchmarks/bench_api.py -w /tmp/ws20k --build-items 20000     # builds the workspace when it has no index
    python benchmarks/bench_api.py -w workspace --requests 5000 --concurrency 32

``--build-items N`` (only when the workspace has no index yet): simulates a world of N products and 3,000 queries,
ingests it and exports a FAISS index of the base model's two-tower (``serve.index: auto``, so flat up to 200k
items, HNSW above). Serving cost does not depend on training, so an untrained checkpoint is as good as a trained
one here. ``--real M`` (with ``--build-items N > M``): encoding 1M items takes about two hours on 2 cores, so only
the first M items are encoded for real; every other item's vector is a real one tiled with small Gaussian noise
(sigma 0.02, renormalised, as `bench_serve.py` does), written into the checkpoint's vector cache under that item's
own text, so `export-index` reads all N as cache hits and builds the index as it would. The report says so.

The server runs in its own process (`assay serve` on a free loopback port, as users start it); the clients are
threads here, one fresh HTTP connection per request. It reports:

- **first-seen** queries: query texts the server has not answered before, one at a time, each sent once (a real
  query log is mostly these): client-side and server-side (``took_ms``) p50/p99;
- **repeated**: the same queries sent again, one at a time;
- the bounded load: N requests from C concurrent clients, dense and hybrid: p50/p90/p99/max, throughput, errors;
- as the peer measured in the same run, first-seen queries answered in-process one at a time (no HTTP), so the
  table shows what HTTP adds;
- on an HNSW index, ``--ef-search`` values swept in-process: first-seen latency and recall@k against exact search
  over the index's own vectors (exact search is the peer for recall).
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


def build(ws: Path, n_items: int, real: int | None = None, seed: int = 21) -> None:
    """Simulate, ingest and export an index of the base model into ``ws`` (see the module docstring)."""
    from assay.config import AssayConfig, IngestConfig, ServeConfig
    from assay.data import ingest
    from assay.data.simulate import SimulateConfig, simulate
    from assay.serving import index as serving
    from assay.store import Store
    from assay.trainer.model import TwoTower

    world = ws.parent / f"{ws.name}-world"
    simulate(SimulateConfig(seed=seed, n_products=n_items, n_queries=3000), world, progress=True)
    ckpt = ws.parent / f"{ws.name}-base-checkpoint"
    TwoTower.from_base("all-MiniLM-L6-v2").save(ckpt)
    cfg = AssayConfig(serve=ServeConfig(recall_sample=50))
    with Store.open(ws) as s:
        ingest.run(IngestConfig(), s, path=world, progress=True)
        if real and real < n_items:
            tile_vectors(cfg, s, ckpt, real)
        serving.export(cfg, s, checkpoint=str(ckpt), progress=True)


def tile_vectors(cfg, store, ckpt: Path, real: int, sigma: float = 0.02) -> None:
    """Encode the first ``real`` catalog items for real and fill the checkpoint's vector cache for the others with
    those vectors tiled and jittered (``--real``)."""
    from assay.dense import item_cache_key, item_vectors, open_backend
    from assay.encode import EmbeddingCache
    from assay.mining.run import load_catalog
    from assay.text import text_shas
    from assay.trainer.model import TwoTower

    catalog = load_catalog(store)
    model = TwoTower.load(ckpt)
    open_backend(model, cfg, store, catalog.texts)  # the backend export-index will use: part of the cache key
    vecs = item_vectors(model, catalog.texts[:real], store.artifacts, cfg.serve.encode_chunk, True)
    rng = np.random.default_rng(0)
    cache = EmbeddingCache(store.artifacts, item_cache_key(model))
    shas = text_shas(catalog.texts)
    for lo in range(real, len(shas), 100_000):
        hi = min(lo + 100_000, len(shas))
        v = vecs[rng.integers(0, real, hi - lo)] + rng.normal(0, sigma, (hi - lo, vecs.shape[1])).astype(np.float32)
        cache.add(shas[lo:hi], v / np.linalg.norm(v, axis=1, keepdims=True))


def ef_sweep(ws: Path, queries: list[str], k: int, efs: list[int]) -> list[dict]:
    """In-process, one first-seen query at a time, for each HNSW ``ef_search``: latency p50/p99 and recall@k against
    exact search over the index's own vectors (the same queries for every value; each value loads its own server
    object, so a query is first-seen for every row)."""
    import faiss

    from assay.config import AssayConfig, ServeConfig
    from assay.dense import exact_search
    from assay.serving.index import Served
    from assay.store import Store

    rows = []
    with Store.open(ws, read_only=True) as s:
        first = Served(AssayConfig(serve=ServeConfig(ef_search=efs[0])), s)
        storage = faiss.downcast_index(first.index.storage) if hasattr(first.index, "storage") else first.index
        vecs = storage.reconstruct_n(0, storage.ntotal)
        qv = np.concatenate([first.model.encode_queries([q]).float().cpu().numpy() for q in queries])
        _, want = exact_search(vecs, qv, k, first.model.beta)
        del vecs, first
        for ef in efs:
            served = Served(AssayConfig(serve=ServeConfig(ef_search=ef)), s)
            ms, hits = [], 0
            for q, w in zip(queries, want):
                t0 = time.perf_counter()
                _, got = served.dense([q], k)
                ms.append((time.perf_counter() - t0) * 1e3)
                hits += len(np.intersect1d(w[w >= 0], got[0][got[0] >= 0]))
            rows.append({"ef_search": ef, "queries": len(queries), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                         "p99_ms": round(float(np.percentile(ms, 99)), 2),
                         f"recall@{k}": round(hits / float((want >= 0).sum()), 4)})
            del served
    return rows


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
    ap.add_argument("--real", type=int, default=None, help="with --build-items: items encoded for real, the rest "
                                                           "tiled from them with noise")
    ap.add_argument("--first-seen", type=int, default=400, help="distinct never-sent queries timed one at a time")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--ef-search", type=int, nargs="*", default=[64, 128, 256, 512],
                    help="HNSW index only: ef_search values swept in-process for latency and recall@k vs exact")
    args = ap.parse_args()

    from assay.config import AssayConfig
    from assay.serving.index import Served
    from assay.serving.load import hammer
    from assay.store import Store

    if args.build_items and not (args.workspace / "artifacts" / "index").exists():
        t0 = time.perf_counter()
        build(args.workspace, args.build_items, args.real)
        print(f"built {args.workspace} ({args.build_items:,} items"
              + (f", {args.real:,} encoded for real, the rest tiled with noise" if args.real else "")
              + f") in {time.perf_counter() - t0:.0f} s")
    with Store.open(args.workspace, read_only=True) as s:
        queries = [r[0] for r in s.exec("SELECT DISTINCT text FROM queries ORDER BY hash(text)")]
        n_items, kind = s.exec("SELECT n_items, kind FROM indexes ORDER BY rowid DESC LIMIT 1")[0]
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
    print(f"\n{n_items:,} items ({kind} index), k={args.k}, one request at a time (p50 / p99 ms):")
    print("| queries | n | client (HTTP) | server took_ms |\n|---|---|---|---|")
    print(f"| first-seen | {len(first)} | {pcts([c for c, _ in first])} | {pcts([t for _, t in first])} |")
    print(f"| repeated | {len(again)} | {pcts([c for c, _ in again])} | {pcts([t for _, t in again])} |")
    print(f"| first-seen in-process (peer, no HTTP) | {len(peer)} | {pcts(peer)} | |")
    print(f"\nbounded load ({args.requests} requests, {args.concurrency} clients, queries cycled):")
    cols = ["mode", "requests", "concurrency", "errors", "qps", "p50_ms", "p90_ms", "p99_ms", "max_ms"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if kind == "hnsw" and args.ef_search:
        sweep = ef_sweep(args.workspace, peer_fresh, args.k, args.ef_search)
        print(f"\nHNSW ef_search, in-process, one first-seen query at a time (dense search only; the served default "
              f"is serve.ef_search={AssayConfig().serve.ef_search}):")
        print(f"| ef_search | queries | p50 ms | p99 ms | recall@{args.k} vs exact |\n|---|---|---|---|---|")
        for r in sweep:
            print(f"| {r['ef_search']} | {r['queries']} | {r['p50_ms']} | {r['p99_ms']} | {r[f'recall@{args.k}']} |")


if __name__ == "__main__":
    main()
