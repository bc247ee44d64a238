"""Mining cost and quality at several catalog sizes, with peers measured in the same run.

    python benchmarks/bench_mining.py                      # 10k and 100k items
    python benchmarks/bench_mining.py --sizes 10000 --full # also 1M (BM25 and FAISS only, see below)

For each size it simulates a world and reports:
- BM25 (assay / bm25s): index build seconds and queries/s per tokenizer, with recall@k of grade>=3
  items by query kind, against rank-bm25 (the common pure-Python peer) on the same corpus and
  queries (rank-bm25 is timed on `--peer-queries` queries only: it is slow);
- ANN: MiniLM encode items/s (bf16), then FAISS exact (FlatIP, the peer) vs HNSW and IVF: build
  seconds, queries/s and recall@k of the approximate index against exact search, on the real
  embeddings. Encoding 1M texts takes about an hour on 2 cores, so at 1M the FAISS rows use the
  real embeddings of the largest encoded catalog tiled with small noise (stated in the table);
  recall there measures the index on that tiled set;
- click channel: queries/s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from assay.config import IngestConfig, MiningConfig, ModelsConfig
from assay.data import ingest
from assay.data.judgments import load_oracle
from assay.data.simulate import SimulateConfig, simulate
from assay.mining import ann as ann_mod
from assay.mining.bm25 import TOKENIZERS, BM25Index
from assay.mining.run import _click_searcher, _Lazy, load_catalog, load_queries
from assay.store import Store


def recall_by_kind(hits_idx: np.ndarray, item_ids: np.ndarray, qids: list[str], rel: dict, kind: dict) -> dict:
    out: dict[str, list[float]] = {}
    for r, q in enumerate(qids):
        if not rel.get(q):
            continue
        got = set(item_ids[hits_idx[r][hits_idx[r] >= 0]].tolist())
        v = len(got & rel[q]) / len(rel[q])
        out.setdefault("all", []).append(v)
        out.setdefault(kind.get(q, "?"), []).append(v)
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--full", action="store_true", help="add 1M items (BM25 + FAISS on tiled embeddings)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--peer-queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_mining_"))
    bm_rows, ann_rows, other = [], [], []
    last_vecs = None
    try:
        for n in args.sizes:
            world = root / f"w{n}"
            simulate(SimulateConfig(n_products=n, n_queries=args.queries), world, progress=False)
            ws = root / f"ws{n}"
            with Store.open(ws, threads=args.threads) as store:
                ingest.run(IngestConfig(), store, path=world, progress=False)
                cat, qs = load_catalog(store), load_queries(store)
                oracle = load_oracle(store)
                rel = {q: set(oracle.relevant(q, 3).tolist()) for q in qs.query_ids}
                kind = dict(store.exec("SELECT query_id, kind FROM truth_queries"))
                # ---- BM25: tokenizers, and rank-bm25 as the peer
                for tok in TOKENIZERS:
                    t0 = time.perf_counter()
                    idx = BM25Index.build(cat.texts, tok)
                    build = time.perf_counter() - t0
                    idx.search(qs.texts[:10], args.k, threads=args.threads)  # JIT warm-up
                    t0 = time.perf_counter()
                    hits = idx.search(qs.texts, args.k, threads=args.threads)
                    qps = len(qs.texts) / (time.perf_counter() - t0)
                    rk = recall_by_kind(hits.idx, cat.item_ids, qs.query_ids, rel, kind)
                    bm_rows.append((n, f"bm25s {tok} ({idx.backend})", build, qps, rk))
                from rank_bm25 import BM25Okapi

                from assay.mining.bm25 import make_tokenizer

                tk = make_tokenizer("stem")
                t0 = time.perf_counter()
                peer = BM25Okapi([tk(t) for t in cat.texts])
                build = time.perf_counter() - t0
                sub = qs.texts[:args.peer_queries]
                t0 = time.perf_counter()
                peer_idx = np.stack([np.argsort(-peer.get_scores(tk(q)))[:args.k] for q in sub])
                qps = len(sub) / (time.perf_counter() - t0)
                rk = recall_by_kind(peer_idx, cat.item_ids, qs.query_ids[:len(sub)], rel, kind)
                bm_rows.append((n, f"rank-bm25 stem ({len(sub)} queries)", build, qps, rk))
                # ---- ANN
                lz = _Lazy(MiningConfig(k=args.k), ModelsConfig(), store, cat, qs, progress=False)
                t0 = time.perf_counter()
                vecs = lz.item_vecs()
                enc = len(vecs) / (time.perf_counter() - t0)
                qv = lz.query_vecs()
                last_vecs = vecs
                ann_rows += bench_faiss(n, vecs, qv, args.k, f"real ({enc:.0f} texts/s encode)")
                rk = {}
                flat = ann_mod.build_index(vecs, "flat")
                rk = recall_by_kind(ann_mod.search(flat, qv, args.k).idx, cat.item_ids, qs.query_ids, rel, kind)
                bm_rows.append((n, "ANN MiniLM flat", 0.0, float("nan"), rk))
                # ---- click channel
                search = _click_searcher(lz)
                t0 = time.perf_counter()
                for lo in range(0, len(qs.query_ids), 256):
                    search(np.arange(lo, min(lo + 256, len(qs.query_ids))))
                other.append((n, "click channel", len(qs.query_ids) / (time.perf_counter() - t0)))
            shutil.rmtree(world, ignore_errors=True)
        if args.full and last_vecs is not None:
            n = 1_000_000
            reps = int(np.ceil(n / len(last_vecs)))
            rng = np.random.default_rng(0)
            big = np.concatenate([last_vecs + rng.normal(0, 0.02, last_vecs.shape).astype(np.float32)
                                  for _ in range(reps)])[:n]
            big /= np.linalg.norm(big, axis=1, keepdims=True)
            ann_rows += bench_faiss(n, big, big[rng.choice(n, 500, replace=False)], args.k,
                                    f"tiled from {len(last_vecs):,} real", kinds=("flat", "ivf", "hnsw"))
            # BM25 at 1M: the simulated catalog text
            world = root / "w1m"
            simulate(SimulateConfig(n_products=n, n_queries=args.queries), world, progress=False)
            with Store.open(root / "ws1m", threads=args.threads) as store:
                ingest.run(IngestConfig(), store, files={"products": world / "products.csv",
                                                         "queries": world / "queries.csv"}, progress=False)
                cat, qs = load_catalog(store), load_queries(store)
            for tok in ("stem", "stem+char3"):
                t0 = time.perf_counter()
                idx = BM25Index.build(cat.texts, tok)
                build = time.perf_counter() - t0
                idx.search(qs.texts[:10], args.k, threads=args.threads)
                t0 = time.perf_counter()
                idx.search(qs.texts, args.k, threads=args.threads)
                bm_rows.append((n, f"bm25s {tok} ({idx.backend})", build, len(qs.texts) / (time.perf_counter() - t0), {}))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    kinds = ["all", "canonical", "synonym", "typo", "shuffle", "descriptive", "brand"]
    print(f"\nBM25 / lexical channel (recall@{args.k} of grade>=3 items, by query kind)")
    print(f"{'items':>9} {'method':<34} {'build s':>8} {'q/s':>9} " + " ".join(f"{k[:8]:>8}" for k in kinds))
    for n, m, b, q, rk in bm_rows:
        print(f"{n:>9,} {m:<34} {b:>8.1f} {q:>9,.0f} " + " ".join(f"{rk.get(k, float('nan')):>8.3f}" for k in kinds))
    print(f"\nFAISS (peer: exact FlatIP); recall@{args.k} against exact search")
    print(f"{'items':>9} {'vectors':<30} {'index':<6} {'build s':>8} {'q/s':>9} {'vs exact q/s':>12} {'recall':>7}")
    for n, src, kind, b, q, ratio, r in ann_rows:
        print(f"{n:>9,} {src:<30} {kind:<6} {b:>8.1f} {q:>9,.0f} {ratio:>11.1f}x {r:>7.3f}")
    for n, m, q in other:
        print(f"{n:>9,} {m}: {q:,.0f} queries/s")


def bench_faiss(n: int, vecs: np.ndarray, qv: np.ndarray, k: int, src: str, kinds=("flat", "hnsw", "ivf")) -> list:
    rows = []
    exact_qps = None
    for kind in kinds:
        t0 = time.perf_counter()
        index = ann_mod.build_index(vecs, kind)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        ann_mod.search(index, qv, k)
        qps = len(qv) / (time.perf_counter() - t0)
        if kind == "flat":
            exact_qps = qps
            rec = 1.0
        else:
            rec = ann_mod.recall_vs_exact(index, vecs, qv[:200], k)
        rows.append((n, src, kind, build, qps, qps / exact_qps, rec))
    return rows


if __name__ == "__main__":
    main()
