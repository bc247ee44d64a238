"""Cold-start costs that every process used to pay, each beside its peer measured in the same run.

    python benchmarks/bench_coldstart.py                 # every row, one thread
    python benchmarks/bench_coldstart.py --json out.json

- int8 export: ONNX Runtime's ``quantize_dynamic`` (the peer; per-channel scales in a Python loop) against assay's
  ``inference._quantize`` (every channel at once) on the packaged MiniLM's fp32 ONNX export; the two files must be
  byte-identical.
- BM25's first search in a fresh process (a 3,000-document catalog, 200 queries): bm25s's own numba kernel
  (the peer; compiled in every process) against assay's ``BM25Index.search`` (the same kernel from numba's on-disk
  cache, filled by an earlier process of this run). Both in new Python processes; index build included.
- The LLM classifier's base (SmolLM2-135M) in a fresh process: transformers reading the GGUF (the peer) against
  assay's ``load_base``, twice: in the first process on a machine (an empty ``$ASSAY_CACHE_DIR``: it converts the
  GGUF, parsing the file once where transformers parses it four times, and writes the converted copy), and in a
  later process (it reads that copy).

Each row prints seconds and the peer / assay ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BM25_SNIPPET = """
import time, numpy as np
t0 = time.perf_counter()
from assay.mining.bm25 import BM25Index
rng = np.random.default_rng(0)
words = ["red", "sofa", "leather", "chair", "oak", "table", "lamp", "velvet", "rug", "desk", "bed", "blue"]
docs = [" ".join(rng.choice(words, 6)) + f" model{i % 50}" for i in range(3000)]
queries = [" ".join(rng.choice(words, 2)) for _ in range(200)]
index = BM25Index.build(docs, backend="numba")
if {peer}:
    index.retriever.retrieve([index.tokenize(q) for q in queries], k=50, show_progress=False, n_threads=1)
else:
    index.search(queries, 50, threads=1)
print(time.perf_counter() - t0)
"""

LLM_SNIPPET = """
import time, torch
from assay.models import resolve
resolved = resolve("smollm2-135m")
t0 = time.perf_counter()
if {peer}:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    src = dict(pretrained_model_name_or_path=resolved.local_dir, gguf_file=resolved.gguf_file, local_files_only=True)
    AutoTokenizer.from_pretrained(**src)
    AutoModelForSequenceClassification.from_pretrained(**src, num_labels=5, dtype=torch.float32)
else:
    from assay.annotate.judges.llm_classifier import load_base
    load_base(resolved)
print(time.perf_counter() - t0)
"""


def fresh(snippet: str, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def quantization(tmp: Path) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from assay import inference
    from assay.models import load_sentence_transformer

    m = load_sentence_transformer("all-MiniLM-L6-v2")
    src = tmp / "fp32.onnx"
    inference._export(m, m.tokenizer, "sentence_embedding", 64, src)
    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(tmp / "peer.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    peer = time.perf_counter() - t0
    t0 = time.perf_counter()
    inference._quantize(src, tmp / "assay.onnx")
    ours = time.perf_counter() - t0
    return row(peer, ours, identical=(tmp / "peer.onnx").read_bytes() == (tmp / "assay.onnx").read_bytes())


def row(peer: float, ours: float, **extra) -> dict:
    return {"peer_s": round(peer, 2), "assay_s": round(ours, 2), "ratio": round(peer / ours, 1), **extra}


def fresh_pair(snippet: str, env: dict) -> dict:
    """The peer in a new process, then assay twice in new processes: the first fills assay's on-disk cache, as the
    first process on a machine does; the second is the one measured."""
    peer = fresh(snippet.replace("{peer}", "True"), env)
    fresh(snippet.replace("{peer}", "False"), env)
    return row(peer, fresh(snippet.replace("{peer}", "False"), env))


def llm_base(env: dict) -> dict:
    """The peer in a new process; assay's first process on a machine (empty cache: it converts the GGUF and writes
    the copy), then a later one (reads the copy)."""
    peer = fresh(LLM_SNIPPET.replace("{peer}", "True"), env)
    first = fresh(LLM_SNIPPET.replace("{peer}", "False"), env)
    return {"SmolLM2 classifier base, first process (converts)": row(peer, first),
            "SmolLM2 classifier base load, new process": row(peer, fresh(LLM_SNIPPET.replace("{peer}", "False"), env))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "ASSAY_CACHE_DIR": str(tmp / "cache"),
               "NUMBA_CACHE_DIR": str(tmp / "numba")}
        os.environ.update(OMP_NUM_THREADS="1")
        rows = {"int8 export (MiniLM tower)": quantization(tmp),
                "BM25 build + first search, new process": fresh_pair(BM25_SNIPPET, env),  # numba's cache
                **llm_base(env)}  # the GGUF converted once, then its copy
    print(f"{'what':50} {'peer s':>8} {'assay s':>8} {'peer/assay':>10}")
    for k, r in rows.items():
        extra = "" if "identical" not in r else f"  byte-identical: {r['identical']}"
        print(f"{k:50} {r['peer_s']:8.2f} {r['assay_s']:8.2f} {r['ratio']:9.1f}x{extra}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
