"""Throughput of the classifier judges on CPU, with sentence-transformers' CrossEncoder as a peer.

    python benchmarks/bench_judges.py                          # 256 CE pairs, 32 LLM pairs, 2 threads
    python benchmarks/bench_judges.py --pairs 512 --max-length 128 --llm-pairs 64
    python benchmarks/bench_judges.py --no-llm                 # skip the ~16 s GGUF load
    python benchmarks/bench_judges.py --artifacts workspace/artifacts --judge ce-minilm

The pairs are human-labelled pairs of a small simulated world, rendered through the judges'
templates. Without ``--artifacts`` the judges get an untrained head (``from_base``): throughput
does not depend on the weights. The peer is ``sentence_transformers.CrossEncoder`` on the same
MiniLM base with a 5-label head. It is fed (query, the same product text) as a text pair, so it sees
the same tokens plus one separator. It runs in the same process on the same threads, and the
ratio is printed. Every row reports the mean of ``--repeats`` timed passes after one warm-up pass.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from assay.annotate.base import Pair
from assay.annotate.judges._classifier import render_inputs, tokenize
from assay.config import JudgeConfig
from assay.data.simulate import SimulateConfig, simulate


def world_pairs(n: int, seed: int) -> list[Pair]:
    out = Path(tempfile.mkdtemp(prefix="bench_judges_"))
    simulate(SimulateConfig(seed=seed, n_products=3000, n_queries=300, label_queries=150, pairs_per_label_query=6),
             out, progress=False)
    with open(out / "products.csv", newline="") as f:
        products = {r["item_id"]: r for r in csv.DictReader(f)}
    with open(out / "queries.csv", newline="") as f:
        queries = {r["query_id"]: r["text"] for r in csv.DictReader(f)}
    with open(out / "human_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pairs = []
    for r in rows:
        p = products[r["item_id"]]
        pairs.append(Pair(r["query_id"], r["item_id"], queries[r["query_id"]], p["title"], p["description"] or None,
                          p["brand"] or None, p["category"] or None, p["attributes"] or None))
    while len(pairs) < n:
        pairs = pairs + pairs
    return pairs[:n]


def timed(fn, repeats: int) -> float:
    """Seconds per call: one warm-up call, then the mean of ``repeats`` calls."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def mean_tokens(judge, pairs: list[Pair]) -> float:
    texts = render_inputs(judge.cfg.template_name, pairs)
    return float(np.mean([len(x) for x in tokenize(judge.tokenizer, texts, judge.cfg.max_length, judge.keep_tail)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=256, help="pairs for the cross-encoder and its peer")
    ap.add_argument("--llm-pairs", type=int, default=32, help="pairs for the LLM classifier")
    ap.add_argument("--max-length", type=int, default=96, help="cross-encoder input tokens")
    ap.add_argument("--llm-max-length", type=int, default=96, help="LLM-classifier input tokens")
    ap.add_argument("--batch-size", type=int, default=32, help="cross-encoder pairs per forward pass")
    ap.add_argument("--llm-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes after one warm-up")
    ap.add_argument("--no-llm", action="store_true", help="skip the LLM classifier")
    ap.add_argument("--no-peer", action="store_true", help="skip sentence-transformers' CrossEncoder")
    ap.add_argument("--ce-model", default="all-MiniLM-L6-v2")
    ap.add_argument("--llm-model", default="smollm2-135m")
    ap.add_argument("--artifacts", type=Path, default=None, help="use trained judges from this artifacts folder")
    ap.add_argument("--judge", default="ce-minilm", help="trained cross-encoder name (with --artifacts)")
    ap.add_argument("--llm-judge", default="smollm2-cls", help="trained LLM-classifier name (with --artifacts)")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from assay.annotate.judges.cross_encoder import CrossEncoderJudge

    pairs = world_pairs(max(args.pairs, args.llm_pairs), args.seed)
    ce_pairs, llm_pairs = pairs[: args.pairs], pairs[: args.llm_pairs]
    rows = []  # (judge, precision, seq, mean tokens, pairs/s)

    def judge_for(cls, cfg, name):
        if args.artifacts is not None:
            return cls.load(cfg.model_copy(update={"name": name}), args.artifacts)
        return cls.from_base(cfg)

    ce_cfg = JudgeConfig(name=args.judge, kind="cross_encoder", model=args.ce_model, max_length=args.max_length,
                         batch_size=args.batch_size)
    for prec in ("fp32", "bf16"):
        judge = judge_for(CrossEncoderJudge, ce_cfg.model_copy(update={"precision": prec}), args.judge)
        secs = timed(lambda: judge.predict(ce_pairs), args.repeats)
        rows.append((f"assay CrossEncoderJudge ({args.ce_model})", prec, args.max_length,
                     mean_tokens(judge, ce_pairs), len(ce_pairs) / secs))
        del judge

    peer_rate = None
    if not args.no_peer:
        from sentence_transformers import CrossEncoder

        from assay.models import resolve

        r = resolve(args.ce_model)
        peer = CrossEncoder(r.path, num_labels=5, max_length=args.max_length, device="cpu",
                            local_files_only=r.is_local)
        texts = render_inputs(ce_cfg.template_name, ce_pairs)
        inputs = [(p.query, t.split(" | ", 1)[1] if " | " in t else t) for p, t in zip(ce_pairs, texts)]
        secs = timed(lambda: peer.predict(inputs, batch_size=args.batch_size, apply_softmax=True,
                                          show_progress_bar=False), args.repeats)
        enc = peer.tokenizer([a for a, _ in inputs], [b for _, b in inputs], truncation=True,
                             max_length=args.max_length)["input_ids"]
        peer_rate = len(inputs) / secs
        rows.append(("sentence-transformers CrossEncoder (peer)", "fp32", args.max_length,
                     float(np.mean([len(x) for x in enc])), peer_rate))
        del peer

    load_s = None
    if not args.no_llm:
        from assay.annotate.judges import llm_classifier
        from assay.models import resolve

        t0 = time.perf_counter()
        llm_classifier.load_base(resolve(args.llm_model))
        load_s = time.perf_counter() - t0
        llm_cfg = JudgeConfig(name=args.llm_judge, kind="llm_classifier", model=args.llm_model,
                              max_length=args.llm_max_length, batch_size=args.llm_batch_size)
        for prec in ("fp32", "bf16"):
            judge = judge_for(llm_classifier.LLMClassifierJudge, llm_cfg.model_copy(update={"precision": prec}),
                              args.llm_judge)
            secs = timed(lambda: judge.predict(llm_pairs), args.repeats)
            rows.append((f"assay LLMClassifierJudge ({args.llm_model}, LoRA)", prec, args.llm_max_length,
                         mean_tokens(judge, llm_pairs), len(llm_pairs) / secs))
            del judge

    print(f"\nthreads={args.threads}  weights={'trained: ' + str(args.artifacts) if args.artifacts else 'untrained head'}"
          f"  torch {torch.__version__}  transformers {transformers.__version__}")
    head = f"{'judge':<52} {'precision':>9} {'max_len':>7} {'mean tok':>8} {'pairs/s':>9} {'vs peer':>8}"
    print(head)
    print("-" * len(head))
    for name, prec, ml, tok, rate in rows:
        ratio = f"{rate / peer_rate:.2f}x" if peer_rate and "CrossEncoder" in name else "-"
        print(f"{name:<52} {prec:>9} {ml:>7} {tok:>8.1f} {rate:>9.1f} {ratio:>8}")
    if load_s is not None:
        print(f"\nLLM base load ({args.llm_model}): {load_s:.1f}s (once per process)")


if __name__ == "__main__":
    main()
