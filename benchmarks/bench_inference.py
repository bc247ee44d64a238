"""CPU inference backends: PyTorch fp32 beside ONNX Runtime fp32 and int8, all measured in one run.

    python benchmarks/bench_inference.py                    # 10k-product world, 2 threads
    python benchmarks/bench_inference.py --products 20000 --threads 2 --json out.json

What it measures, on ``--threads`` cores, for the packaged all-MiniLM-L6-v2:

- catalog encoding at batch 64 (item texts, 64 tokens): texts/s of sentence-transformers' own fp32 ``encode``
  (the peer), of assay's ``torch`` backend, and of the ``onnx`` and ``onnx-int8`` exports (assay.inference);
- one query at a time: p50/p99 ms of the same four;
- accuracy: NDCG@10 of the base encoder retrieving from the whole catalog for ``--queries`` simulated queries,
  graded by the world's truth (evaluation only; nothing here is tuned on it), with each backend, and the mean
  cosine to the fp32 vectors;
- a cross-encoder judge (the kind of the cascade, 5 grades; trained here for ``--ce-steps`` steps on the world's
  human train split): pairs/s at batch 64 of sentence-transformers' ``CrossEncoder.predict``
  of the same weights (the peer; it encodes the rendered text as the first segment of a pair) and of each backend,
  and accuracy on the world's held-out human labels (calib + eval).

Ratios are against the sentence-transformers peer, measured in the same process. Exports are built (and timed) in
a temporary artifacts folder. Each timing is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def latency(fn, queries: list[str]) -> tuple[float, float]:
    fn(queries[0])
    ms = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=10_000)
    ap.add_argument("--encode", type=int, default=2048, help="catalog texts in the throughput measurement")
    ap.add_argument("--queries", type=int, default=300, help="queries scored for NDCG@10 (and timed one at a time)")
    ap.add_argument("--pairs", type=int, default=1024, help="pairs in the cross-encoder throughput measurement")
    ap.add_argument("--ce-max-length", type=int, default=64)
    ap.add_argument("--ce-steps", type=int, default=120, help="training steps of the benchmark's judge")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sentence_transformers import CrossEncoder

    from assay.annotate.judges.cross_encoder import CrossEncoderJudge
    from assay.annotate.pairs import human_pairs
    from assay.config import IngestConfig, JudgeConfig, ModelsConfig
    from assay.data import ingest
    from assay.data.simulate import SimulateConfig, simulate
    from assay.encode import Encoder, open_encoder
    from assay.eval.metrics import ndcg_at_k
    from assay.eval.retrieval import judgments
    from assay.mining.run import load_catalog, load_queries
    from assay.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench_inference-"))
    simulate(SimulateConfig(seed=11, n_products=args.products, n_queries=max(1000, args.queries), label_queries=0.3),
             tmp / "world", progress=False)
    store = Store.open(tmp / "ws")
    ingest.run(IngestConfig(), store, path=tmp / "world", progress=False)
    catalog, qs = load_catalog(store), load_queries(store)
    items = catalog.texts
    rng = np.random.default_rng(0)
    sample = [items[i] for i in rng.choice(len(items), min(args.encode, len(items)), replace=False)]
    pick = rng.choice(len(qs.query_ids), min(args.queries, len(qs.query_ids)), replace=False)
    qids, qtexts = [qs.query_ids[i] for i in pick], [qs.texts[i] for i in pick]
    _, judged = judgments(store, qids, catalog.item_ids)
    art = tmp / "artifacts"
    rows: list[dict] = []

    # ------------------------------------------------------------------ encoder
    peer = Encoder("all-MiniLM-L6-v2", max_seq_length=64, batch_size=64)

    def st_encode(texts):
        return peer.model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)

    systems = {"sentence-transformers fp32 (peer)": (st_encode, None)}
    for b in ("torch", "onnx", "onnx-int8"):
        t0 = time.perf_counter()
        enc = open_encoder("all-MiniLM-L6-v2", ModelsConfig(backend=b, guard_sample=0), art, items,
                           max_seq_length=64, batch_size=64)
        systems[f"assay {b}"] = (enc.encode, round(time.perf_counter() - t0, 1) if b != "torch" else None)
    ref_items = None
    for name, (fn, export_s) in systems.items():
        secs, _ = best_of(lambda: fn(sample), args.repeat)
        p50, p99 = latency(lambda q: fn([q]), qtexts[:200])
        vecs = fn(items)
        ref_items = vecs if ref_items is None else ref_items
        qv = fn(qtexts)
        top = np.argsort(-(qv @ vecs.T), axis=1)[:, :10]
        ndcg = float(np.nanmean([ndcg_at_k(catalog.item_ids[t].tolist(), judged[q], 10) for q, t in zip(qids, top)]))
        cos = float((vecs * ref_items).sum(1).mean())
        rows.append({"part": "encoder", "system": name, "texts_per_s": round(len(sample) / secs, 1),
                     "query_p50_ms": round(p50, 2), "query_p99_ms": round(p99, 2), "ndcg@10": round(ndcg, 4),
                     "mean_cosine_to_fp32": round(cos, 4), "export_s": export_s})
        print(rows[-1], flush=True)

    # ------------------------------------------------------------------ cross-encoder
    cfg = JudgeConfig(name="bench-ce", kind="cross_encoder", model="all-MiniLM-L6-v2", max_length=args.ce_max_length,
                      batch_size=64, epochs=1.0, learning_rate=3e-4, train_batch_size=16,
                      max_train_pairs=16 * args.ce_steps)
    pairs_tr, g_tr = human_pairs(store, "train")
    held = [human_pairs(store, s) for s in ("calib", "eval")]
    pairs_ev, g_ev = held[0][0] + held[1][0], np.concatenate([held[0][1], held[1][1]])
    t0 = time.perf_counter()
    judge, _ = CrossEncoderJudge.fit(cfg, pairs_tr, g_tr, art, progress=False)
    print(f"trained the benchmark judge on {min(len(pairs_tr), cfg.max_train_pairs)} pairs in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    from assay.annotate.judges._classifier import render_inputs

    texts = render_inputs(cfg.template_name, pairs_ev)
    bench_texts = (texts * (args.pairs // max(1, len(texts)) + 1))[:args.pairs]
    ce_peer = CrossEncoder(str(CrossEncoderJudge.model_dir(cfg, art)), max_length=args.ce_max_length, device="cpu")

    def peer_predict(tx):
        return ce_peer.predict([[t, ""] for t in tx], batch_size=64, activation_fn=torch.nn.Softmax(-1),
                               convert_to_numpy=True)

    ce_rows = [("sentence-transformers CrossEncoder fp32 (peer)", peer_predict, None)]
    for b in ("torch", "onnx", "onnx-int8"):
        t0 = time.perf_counter()
        jd = CrossEncoderJudge.load(cfg, art)
        jd.use_backend(b, art)
        ce_rows.append((f"assay {b}", lambda tx, jd=jd: jd.predict_texts(tx),
                        round(time.perf_counter() - t0, 1) if b != "torch" else None))
    for name, fn, export_s in ce_rows:
        secs, _ = best_of(lambda: fn(bench_texts), args.repeat)
        acc = float((np.asarray(fn(texts)).argmax(1) == g_ev).mean())
        rows.append({"part": "cross-encoder", "system": name, "pairs_per_s": round(len(bench_texts) / secs, 1),
                     "accuracy": round(acc, 4), "export_s": export_s})
        print(rows[-1], flush=True)

    # ------------------------------------------------------------------ table
    enc_peer = rows[0]
    ce_peer_row = next(r for r in rows if r["part"] == "cross-encoder")
    print(f"\nall-MiniLM-L6-v2 on {args.threads} threads; catalog of {len(items)} simulated products, "
          f"{len(sample)} texts encoded at batch 64 (64 tokens), {len(qids)} queries (NDCG@10 against the world's truth)")
    print("| encoder | texts/s | x peer | query p50 ms | query p99 ms | NDCG@10 | delta | cosine to fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "encoder":
            print(f"| {r['system']} | {r['texts_per_s']} | {r['texts_per_s'] / enc_peer['texts_per_s']:.2f}x | "
                  f"{r['query_p50_ms']} | {r['query_p99_ms']} | {r['ndcg@10']:.4f} | "
                  f"{r['ndcg@10'] - enc_peer['ndcg@10']:+.4f} | {r['mean_cosine_to_fp32']:.4f} |")
    print(f"\ncross-encoder judge ({args.ce_max_length} tokens, 5 grades), {len(bench_texts)} pairs at batch 64; "
          f"accuracy on {len(texts)} held-out human labels")
    print("| cross-encoder | pairs/s | x peer | accuracy | delta |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "cross-encoder":
            print(f"| {r['system']} | {r['pairs_per_s']} | {r['pairs_per_s'] / ce_peer_row['pairs_per_s']:.2f}x | "
                  f"{r['accuracy']:.4f} | {r['accuracy'] - ce_peer_row['accuracy']:+.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    store.close()


if __name__ == "__main__":
    main()
