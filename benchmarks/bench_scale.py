"""Cost growth of the main job's stages with the catalog, and the Ray engine's overhead against the local one.

For each size (products; queries = products / 10, human seed labels on 30% of the queries) it builds a simulated
world and runs, timing each stage's wall time and sampling its peak resident memory (VmRSS of this process every
20 ms; Ray's workers are separate processes and are not in it):

  mine (per channel: bm25, ann, click setup + search, federate, negatives), teachers + calibrate (the two features
  judges of tests/test_ray.py), annotate with --engine local, the same pairs with --engine ray on a copy of the
  workspace (a local Ray of --ray-cpus CPUs started once), curriculum.

Then it fits each stage's growth exponent b in t = a * n^b by least squares on log-log over the sizes, and prints
Ray's overhead as the ratio ray / local of the annotate wall time, measured in the same run.

Then the binary baseline for --train-steps steps (steps/s at the default batch; a step's cost does not grow with
the catalog, its validation does) and export-index of an uncached checkpoint (every item encoded once, as mining's
ANN channel does, and the default index built).

    flock /tmp/assay-cpu.lock .venv/bin/python benchmarks/bench_scale.py --sizes 2000 5000 10000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Peak:
    """Peak VmRSS (MB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def fit_exponent(sizes: list[int], secs: list[float]) -> float | None:
    pts = [(math.log(n), math.log(s)) for n, s in zip(sizes, secs) if s and s > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def train_and_export(store, ckpt: Path, steps: int) -> dict:
    """The binary baseline for ``steps`` steps at the default batch (its wall time includes loading the examples
    and validating the base encoder and the last step on 20 validation queries), then ``export-index`` of a
    checkpoint whose vectors no cache holds yet: every item encoded by the item tower (int8 ONNX, after its guard)
    and the default index built."""
    from assay.config import AssayConfig, ModelsConfig, TrainConfig
    from assay.serving.index import export
    from assay.trainer import run as train
    from assay.trainer.run import _new_model

    d = TrainConfig().model_dump(mode="json")
    per = max(1, steps // len(d["stages"]))
    for st in d["stages"]:
        st["steps"] = per
    d.update(eval_every=per * len(d["stages"]), checkpoint_every=per * len(d["stages"]), val_max_queries=20)
    tcfg = TrainConfig(**d)
    out = {}
    with Peak() as p:
        train(tcfg, store, ModelsConfig(backend="torch"), baseline="binary", progress=False)
    out["train.binary"] = {"s": p.seconds, "mb": p.peak, "steps": per * len(d["stages"]),
                           "steps_per_s": per * len(d["stages"]) / p.seconds}
    _new_model(tcfg, ModelsConfig()).save(ckpt)  # the base towers as a checkpoint: no vector of it is cached
    with Peak() as p:
        e = export(AssayConfig(), store, checkpoint=str(ckpt), progress=False)
    out["export-index"] = {"s": p.seconds, "mb": p.peak}
    for k in ("encode", "build"):
        out[f"export-index.{k}"] = {"s": e[f"{k}_seconds"], "mb": None}
    out["export-index"]["kind"] = e["kind"]
    return out


def one_size(n: int, root: Path, ray_cpus: int, train_steps: int = 30) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_ray import acfg

    from assay.annotate import batches, fit, teachers
    from assay.config import CurriculumConfig, IngestConfig, MiningConfig, ModelsConfig
    from assay.curriculum import run as curriculum
    from assay.data import ingest
    from assay.data.simulate import SimulateConfig, simulate
    from assay.mining import run as mine
    from assay.scale import run as scale_run
    from assay.store import Store

    out: dict = {"items": n, "queries": n // 10}
    world, ws = root / f"world-{n}", root / f"ws-{n}"
    simulate(SimulateConfig(seed=7, n_products=n, n_queries=max(n // 10, 50), label_queries=0.3), world,
             progress=False)
    cfg = acfg(ray={"shard_pairs": 20_000, "batch_rows": 1024})
    with Store.open(ws) as store:
        ingest.run(IngestConfig(), store, path=world, progress=False)
        with Peak() as p:
            m = mine(MiningConfig(k=50), store, ModelsConfig(), progress=False)
        out["mine"] = {"s": p.seconds, "mb": p.peak}
        for k, v in m.get("timings", {}).items():
            if k.endswith("_s"):
                out[f"mine.{k[:-2]}"] = {"s": v, "mb": None}
        with Peak() as p:
            teachers.run(cfg, store, progress=False)
            fit.run(cfg, store, progress=False)
        out["teachers+calibrate"] = {"s": p.seconds, "mb": p.peak}
    ray_ws = root / f"ws-{n}-ray"
    shutil.copytree(ws, ray_ws, ignore=shutil.ignore_patterns("assay.lock"))
    with Store.open(ws) as store:
        with Peak() as p:
            a = batches.run(cfg, store, progress=False)
        out["annotate.local"] = {"s": p.seconds, "mb": p.peak, "pairs": a["annotated"]}
        for name, s in a.get("judge_seconds", {}).items():
            out[f"annotate.local.{name}"] = {"s": s, "mb": None}
        with Peak() as p:
            curriculum(CurriculumConfig(), store)
        out["curriculum"] = {"s": p.seconds, "mb": p.peak}
        out.update(train_and_export(store, root / f"ckpt-{n}", train_steps))
    with Store.open(ray_ws) as store:
        with Peak() as p:
            r = scale_run.run(cfg, store, progress=False)
        out["annotate.ray"] = {"s": p.seconds, "mb": p.peak, "pairs": r["annotated"]}
    out["ray_overhead"] = out["annotate.ray"]["s"] / out["annotate.local"]["s"]
    shutil.rmtree(ray_ws, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=30, help="steps of the timed binary baseline")
    ap.add_argument("--keep", type=Path, default=None, help="keep the worlds and workspaces here")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.ray_cpus, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sorted(args.sizes):  # printed as each size finishes, so a long run shows what it has
        results.append(one_size(n, root, args.ray_cpus, args.train_steps))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    stages = [k for k in results[0] if isinstance(results[0][k], dict)]
    sizes = [r["items"] for r in results]
    print(f"\nbench_scale: {', '.join(f'{n:,}' for n in sizes)} items (queries = items / 10); wall seconds "
          "(peak MB of this process)")
    print("| stage | " + " | ".join(f"{n:,} items" for n in sizes) + " | exponent |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for st in stages:
        cells = []
        for r in results:
            v = r.get(st)
            cells.append("-" if v is None else f"{v['s']:.1f}" + (f" ({v['mb']:.0f})" if v.get("mb") else ""))
        b = fit_exponent(sizes, [r.get(st, {}).get("s") for r in results])
        print(f"| {st} | " + " | ".join(cells) + f" | {'-' if b is None else f'{b:.2f}'} |")
    print("| train steps/s (binary, default batch) | " + " | ".join(f"{r['train.binary']['steps_per_s']:.2f}"
                                                                  for r in results) + " | |")
    print("| Ray overhead (annotate ray / local) | " + " | ".join(f"{r['ray_overhead']:.2f}x" for r in results)
          + " | |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
