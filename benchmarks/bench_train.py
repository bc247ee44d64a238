"""Training throughput of `assay train` on CPU, with sentence-transformers' MNRL fit of the same model as a peer.

    python benchmarks/bench_train.py                 # 30 timed steps of batch 32, 2 threads
    python benchmarks/bench_train.py --steps 60 --batch 32 --threads 2

Data: (query, exact item, embarrassing item) triplets of a small simulated world (3,000 items, 300 queries), with
item text rendered by assay.text.item_text, so both sides see the same texts (items: ~34 tokens on average, up
to ~60; queries ~6).

- peer: ``SentenceTransformer.old_fit`` (sentence-transformers' plain training loop, without the HF Trainer
  around it) with ``MultipleNegativesRankingLoss`` on (anchor, positive, negative) triplets, batch ``--batch``,
  max_seq_length 64, AdamW lr 2e-5;
- assay: the training loop of `assay train` (``train_phase``: seeded groups of 1 positive + 1 negative, the
  listwise in-batch loss, AdamW lr 2e-5, gradient clipping), batch ``--batch`` queries, items at most 64 tokens,
  queries at most 32; once with the defaults (the lowest two layers frozen), then with one frozen layer, with
  all six layers training (``freeze_layers 0``), with nothing frozen (the token embeddings trained too), and with
  all layers training plus each batch's items as one padded block (``item_chunk 0``) or plus ``precision bf16``
  (bf16 autocast, which pays on CPUs with native bf16 instructions only), so the table shows where the
  difference comes from.

Every configuration runs in its own process (peak memory is that process's maximum resident set: the model,
the optimizer and the activations; the triplets are built once by the parent), after one
untimed warm-up step, on ``--threads`` threads. Examples/s counts training triplets (one query, its positive and
its negative) per second; the ratio column divides by the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def triplets(seed: int = 5) -> tuple[list[str], list[str], list[str]]:

    from assay.data.simulate import SimulateConfig, simulate
    from assay.data.simulate.truth import TruthOracle
    from assay.text import item_text

    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    simulate(SimulateConfig(seed=seed, n_products=3000, n_queries=300, label_queries=0.1), out, progress=False)
    import csv

    with open(out / "products.csv", newline="") as f:
        prods = list(csv.DictReader(f))
    with open(out / "queries.csv", newline="") as f:
        queries = list(csv.DictReader(f))
    oracle = TruthOracle.from_dir(out)
    ids = np.array([p["item_id"] for p in prods], dtype=object)
    text = {p["item_id"]: item_text(p["title"], p["brand"] or None, p["category"] or None, p["attributes"] or None)
            for p in prods}
    rng = np.random.default_rng(seed)
    qs, ps, ns = [], [], []
    for q in queries:
        g = oracle.grade(np.array([q["query_id"]] * len(ids), dtype=object), ids)
        pos, neg = ids[g == 4], ids[g == 0]
        if len(pos) and len(neg):
            for _ in range(4):
                qs.append(q["text"])
                ps.append(text[rng.choice(pos)])
                ns.append(text[rng.choice(neg)])
    return qs, ps, ns


def run_peer(data, steps: int, batch: int) -> dict:
    import torch
    from sentence_transformers import InputExample
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from torch.utils.data import DataLoader

    from assay.models import load_sentence_transformer

    model = load_sentence_transformer("all-MiniLM-L6-v2")
    model.max_seq_length = 64
    ex = [InputExample(texts=[q, p, n]) for q, p, n in zip(*data)]
    loss = MultipleNegativesRankingLoss(model)
    loader = DataLoader(ex, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.old_fit([(loader, loss)], epochs=1, steps_per_epoch=1, warmup_steps=0, show_progress_bar=False)
    t0 = time.perf_counter()
    model.old_fit([(loader, loss)], epochs=1, steps_per_epoch=steps, warmup_steps=max(1, steps // 10),
                  show_progress_bar=False)
    return {"seconds": time.perf_counter() - t0, "examples": steps * batch}


def run_assay(data, steps: int, batch: int, **over) -> dict:
    from assay.config import TrainConfig
    from assay.trainer.data import GroupSampler, GroupSpec, TrainData, ValPool
    from assay.trainer.loop import PhaseSpec, train_phase
    from assay.trainer.model import TwoTower

    qs, ps, ns = data
    uq = sorted(set(qs))
    items = sorted(set(ps) | set(ns))
    qi = {t: i for i, t in enumerate(uq)}
    ii = {t: i for i, t in enumerate(items)}
    n = len(qs)
    td = TrainData(
        query_ids=[str(i) for i in range(len(uq))], query_texts=uq, item_ids=[str(i) for i in range(len(items))],
        item_texts=items, ex_query=np.array([qi[q] for q in qs] * 2), ex_item=np.array([ii[p] for p in ps] + [ii[x] for x in ns]),
        ex_tier=np.array([2] * n + [3] * n, dtype=np.int8), ex_target=np.array([1.0] * n + [0.0] * n, dtype=np.float32),
        ex_weight=np.ones(2 * n, dtype=np.float32), ex_grade=np.array([4.0] * n + [0.0] * n),
        ex_split=np.array(["train"] * (2 * n), dtype=object), random_pool=np.arange(len(items)),
        val=ValPool(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)), examples_run_id="bench")
    cfg = TrainConfig(batch_queries=batch, group_size=2, eval_every=10**6, checkpoint_every=10**6,
                      item_max_length=64, query_max_length=32, **over)
    model = TwoTower.from_base("all-MiniLM-L6-v2", query_max_length=32, item_max_length=64)
    sampler = GroupSampler(td, GroupSpec((2,), (3,)), batch_queries=batch, group_size=2, seed=0, stage=1)
    with tempfile.TemporaryDirectory() as d:
        train_phase(model, td, PhaseSpec("warmup", 1, "mnr", 1, 2e-5, sampler), Path(d) / "w", cfg=cfg,
                    start_val=-1.0, progress=False)
        t0 = time.perf_counter()
        train_phase(model, td, PhaseSpec("bench", 1, "mnr", steps, 2e-5, sampler), Path(d) / "b", cfg=cfg,
                    start_val=-1.0, progress=False)
    return {"seconds": time.perf_counter() - t0, "examples": steps * batch}


CONFIGS = {
    "sentence-transformers MNRL (old_fit)": ("peer", {}),
    "assay train (defaults: freeze_layers 2)": ("assay", {}),
    "assay, freeze_layers 1": ("assay", {"freeze_layers": 1}),
    "assay, every layer trains": ("assay", {"freeze_layers": 0}),
    "assay, nothing frozen": ("assay", {"freeze_layers": 0, "freeze_word_embeddings": False}),
    "assay, every layer, one padded block": ("assay", {"freeze_layers": 0, "item_chunk": 0}),
    "assay, every layer, precision bf16": ("assay", {"freeze_layers": 0, "precision": "bf16"}),
}


def child(name: str, steps: int, batch: int, threads: int, data_file: str) -> None:
    import torch

    torch.set_num_threads(threads)
    data = tuple(json.loads(Path(data_file).read_text()))
    kind, over = CONFIGS[name]
    res = run_peer(data, steps, batch) if kind == "peer" else run_assay(data, steps, batch, **over)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.steps, a.batch, a.threads, a.data)
        return
    # the triplets are built once here, so a child's peak memory is its training alone
    data_file = Path(tempfile.mkdtemp(prefix="bench_train_")) / "triplets.json"
    data_file.write_text(json.dumps(triplets()))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rows = {}
    for name in CONFIGS:
        p = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(a.steps), "--batch",
                            str(a.batch), "--threads", str(a.threads), "--data", str(data_file)], env=env, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{name}: failed\n{p.stderr[-2000:]}")
            continue
        rows[name] = json.loads(line[-1][7:])
    peer = rows.get("sentence-transformers MNRL (old_fit)")
    print(f"\ntraining throughput, MiniLM-L6, batch {a.batch} triplets, {a.steps} timed steps, {a.threads} threads")
    print(f"{'configuration':40s} {'examples/s':>11s} {'vs peer':>8s} {'s/step':>7s} {'peak RSS MB':>12s}")
    for name, r in rows.items():
        rate = r["examples"] / r["seconds"]
        ratio = rate / (peer["examples"] / peer["seconds"]) if peer else float("nan")
        print(f"{name:40s} {rate:11.1f} {ratio:7.2f}x {r['seconds'] / a.steps:7.2f} {r['peak_rss_mb']:12.0f}")


if __name__ == "__main__":
    main()
