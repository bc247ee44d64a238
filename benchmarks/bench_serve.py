"""Serving latency: query text -> top-1000 through the query tower and a FAISS index, HNSW beside exact search.

    python benchmarks/bench_serve.py                         # 100k and 1M items
    python benchmarks/bench_serve.py --sizes 100000 --queries 300

It measures the path `assay serve` and `assay search` take for one request (`TwoTower.encode_queries` of one query,
then `assay.dense.search_index`), one request at a time, on ``--threads`` cores:

- query encoding alone, p50/p99, beside sentence-transformers' own ``encode`` of the same model (the peer), for
  first-seen queries (texts never encoded before) and for the same queries repeated;
- per index kind (Flat = exact search, the peer; HNSW with the serving defaults ``serve.hnsw_factory``,
  ``ef_construction``, ``ef_search``): build seconds, search p50/p99 for top-1000 and for top-100, the end-to-end
  p50/p99 (encode + top-1000) and queries/s of one client, and recall@100 against exact search;
- HNSW's speed-up over Flat on top-1000 search, measured in the same run.

Item vectors: encoding 1M texts takes about two hours on 2 cores, so the catalog of ``--real`` simulated products
is encoded with the item tower of the base model and tiled with small Gaussian noise (sigma 0.02, renormalised) up
to each size; the table says so. Queries are the simulated world's query texts, encoded for real. The HNSW search
depth is max(ef_search, k) in FAISS, so a top-1000 request searches at depth 1000 whatever ``ef_search`` says;
``--ef`` lists the depths whose top-100 recall and latency are also reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def pct(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def timed(fn, items) -> tuple[list[float], list]:
    ms, out = [], []
    for x in items:
        t0 = time.perf_counter()
        out.append(fn(x))
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--real", type=int, default=10_000, help="simulated products encoded for real")
    ap.add_argument("--queries", type=int, default=500, help="single-query requests timed per index")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    import faiss
    import torch
    from sentence_transformers import SentenceTransformer

    from assay import models
    from assay.config import ModelsConfig, ServeConfig
    from assay.data.simulate import SimulateConfig, simulate
    from assay.dense import search_index
    from assay.serving.index import build
    from assay.text import item_text
    from assay.trainer.loop import encode_by_length
    from assay.trainer.model import TwoTower

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sc = ServeConfig()
    base = ModelsConfig().embedder
    world = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    simulate(SimulateConfig(n_products=args.real, n_queries=max(args.queries, 200)), world, progress=False)
    with open(world / "products.csv", newline="") as f:
        texts = [item_text(r["title"], r["brand"], r["category"], r["attributes"]) for r in csv.DictReader(f)]
    with open(world / "queries.csv", newline="") as f:
        queries = [r["text"] for r in csv.DictReader(f)][:args.queries]

    model = TwoTower.from_base(base).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        real = encode_by_length(model.encode_items, texts, 128).float().numpy()
    enc_rate = len(texts) / (time.perf_counter() - t0)

    # ---- query encoding alone: the served path beside sentence-transformers' encode (the peer)
    peer = models.load_sentence_transformer(base, device="cpu")
    peer.max_seq_length = model.query_max_length
    with torch.inference_mode():
        for q in queries[:20]:  # warm-up
            model.encode_queries([q])
            peer.encode([q])
        # first-seen: none of these texts was encoded before (a real query log is mostly these); then repeated
        enc_ms, qv = timed(lambda q: model.encode_queries([q]).float().numpy(), queries)
        again_ms, _ = timed(lambda q: model.encode_queries([q]).float().numpy(), queries)
        peer_ms, _ = timed(lambda q: peer.encode([q], normalize_embeddings=True), queries)
    qv = np.concatenate(qv)
    enc50, enc99 = pct(enc_ms)
    peer50, peer99 = pct(peer_ms)
    print(f"\nitem tower: {enc_rate:.0f} texts/s on {len(texts):,} real items ({args.threads} threads)")
    print(f"query encode, one first-seen query: assay p50 {enc50:.2f} ms p99 {enc99:.2f} ms | sentence-transformers "
          f"encode p50 {peer50:.2f} ms p99 {peer99:.2f} ms | ratio {peer50 / enc50:.2f}x")
    print(f"query encode, the same queries repeated: assay p50 {pct(again_ms)[0]:.2f} ms p99 {pct(again_ms)[1]:.2f} ms")

    rows = []
    rng = np.random.default_rng(0)
    for n in args.sizes:
        reps = int(np.ceil(n / len(real)))
        vecs = np.concatenate([real + rng.normal(0, 0.02, real.shape).astype(np.float32)
                               for _ in range(reps)])[:n] if n > len(real) else real[:n].copy()
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        source = f"tiled from {len(real):,} real" if n > len(real) else "real"
        exact_top = None
        flat_search50 = None
        for kind, factory in (("flat", "Flat"), ("hnsw", sc.hnsw_factory)):
            t0 = time.perf_counter()
            index = build(vecs, factory, sc)
            build_s = time.perf_counter() - t0
            one = [qv[i:i + 1] for i in range(len(qv))]
            search_index(index, one[0], args.k)  # warm-up
            s1000, _ = timed(lambda q: search_index(index, q, args.k), one)
            s100, got = timed(lambda q: search_index(index, q, 100)[1][0], one)
            if kind == "flat":
                exact_top = got
                flat_search50 = pct(s1000)[0]
            recall = float(np.mean([len(np.intersect1d(g, e)) / len(e) for g, e in zip(got, exact_top)]))
            e2e = [a + b for a, b in zip(enc_ms, s1000)]
            row = {"items": n, "vectors": source, "index": f"{kind} ({factory}"
                   + (f", efC {sc.ef_construction}, ef {index.hnsw.efSearch}" if kind == "hnsw" else "") + ")",
                   "build_s": round(build_s, 2), "search1000_p50_ms": round(pct(s1000)[0], 2),
                   "search1000_p99_ms": round(pct(s1000)[1], 2), "search100_p50_ms": round(pct(s100)[0], 2),
                   "search100_p99_ms": round(pct(s100)[1], 2), "e2e_p50_ms": round(pct(e2e)[0], 2),
                   "e2e_p99_ms": round(pct(e2e)[1], 2), "qps_one_client": round(1e3 / float(np.mean(e2e)), 1),
                   "recall@100": round(recall, 4), "speedup_vs_flat": round(flat_search50 / pct(s1000)[0], 1)}
            rows.append(row)
            if kind == "hnsw":
                for ef in args.ef:
                    index.hnsw.efSearch = ef
                    ms, got = timed(lambda q: search_index(index, q, 100)[1][0], one)
                    r = float(np.mean([len(np.intersect1d(g, e)) / len(e) for g, e in zip(got, exact_top)]))
                    rows.append({"items": n, "vectors": source, "index": f"hnsw ef {ef}, top-100 only",
                                 "search100_p50_ms": round(pct(ms)[0], 2), "search100_p99_ms": round(pct(ms)[1], 2),
                                 "recall@100": round(r, 4)})
            del index
        del vecs

    cols = ["items", "vectors", "index", "build_s", "search1000_p50_ms", "search1000_p99_ms", "search100_p50_ms",
            "search100_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "qps_one_client", "recall@100", "speedup_vs_flat"]
    print(f"\n{len(queries)} single-query requests per index, top-{args.k}; e2e = query encode (first-seen) + "
          f"top-{args.k} search")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if args.json:
        args.json.write_text(json.dumps({"encode": {"p50_ms": enc50, "p99_ms": enc99, "peer_p50_ms": peer50,
                                                    "peer_p99_ms": peer99, "items_per_s": enc_rate},
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
