"""Throughput of the prompted judge (SmolLM2-135M by default) through each CPU backend, as a table.

    python benchmarks/bench_prompted.py                    # 2 rounds of 8 pairs per row
    python benchmarks/bench_prompted.py --pairs 16 --rounds 3 --skip-server

Rows:
- local backend (llama-cpp-python in process), prefix reuse ``off`` (context reset before every
  prompt), ``kv`` (llama.cpp keeps the context, so the shared rubric is not evaluated again) and
  ``ram`` (``kv`` plus a LlamaRAMCache of past states);
- openai backend against ``python -m llama_cpp.server`` on loopback (started here, default
  settings: it keeps its context between requests) at concurrency 1 and 4, and at concurrency 1 with
  the shared prefix broken by a unique first line per prompt (``no prefix``).

Pairs come grouped by query (4 products per query), as the cascade sends them, and no pair is sent
twice (a RAM cache would otherwise replay exact repeats). Each row starts with one untimed warm-up
prompt; rows are interleaved round by round; pairs/s is the median over rounds. ``cpu s/pair`` is
the CPU time of the process doing the work (this one for local rows, the server for server rows),
which shared machines disturb less than wall time. Compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter

import numpy as np

from assay.annotate.backends import get_backend
from assay.annotate.base import FAILED, OK, OK_JSON, UNPARSED, Pair
from assay.annotate.judges.prompted import PromptedJudge
from assay.config import JudgeConfig
from assay.models import resolve

QUERIES = {
    "red coffee maker": ["Acme 12-cup programmable coffee maker, red", "Oak coffee table with shelf",
                         "Stainless steel coffee maker, black", "Reusable coffee filter, 4 pack"],
    "iphone 13 case": ["Clear silicone case for iPhone 13", "iPhone 13 screen protector, 2 pack",
                       "Leather case for Samsung Galaxy S21", "Cast iron skillet, 12 inch"],
    "running shoes men": ["Men's road running shoe, breathable mesh", "Women's trail running shoe",
                          "Men's hiking boots, waterproof", "Moisture-wicking running socks, 6 pairs"],
    "usb c cable 6ft": ["USB-C to USB-C cable, 6 ft, braided", "USB-C cable, 3 ft", "HDMI cable 6 ft",
                        "Garden hose 50 ft"],
}


BRANDS = ["Acme", "Zenith", "Nordwave", "Kestrel", "Bluefin", "Orchid", "Tamarind", "Quill", "Vesta", "Halden"]


def bench_pairs(n: int, offset: int = 0) -> list[Pair]:
    """n distinct pairs, grouped by query (4 per query). Beyond the first 16 the title starts with a
    brand, so a title never repeats the start of an earlier one (no artificial prefix hits)."""
    base = [(q, t) for q, ts in QUERIES.items() for t in ts]
    out = []
    for i in range(offset, offset + n):
        q, t = base[i % len(base)]
        k = i // len(base)
        title = f"{BRANDS[k % len(BRANDS)]}{'' if k < len(BRANDS) else k} {t}" if k else t
        out.append(Pair(f"q{i // 4}", f"i{i}", q, title, category="bench"))
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (pid None) or of another one (from /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NoncePrefix:
    """Wraps a backend and puts a unique first line on every prompt, so no two prompts share a prefix."""

    def __init__(self, backend):
        self.backend, self.name, self.model_id = backend, backend.name, backend.model_id

    def complete(self, prompts):
        return self.backend.complete([f"Request {uuid.uuid4().hex[:12]}.\n{p}" for p in prompts])

    def close(self):
        self.backend.close()


def run_row(judge: PromptedJudge, pairs: list[Pair], pid: int | None = None) -> dict:
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    out = judge.predict(pairs)
    secs, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
    return {"seconds": secs, "cpu": cpu, "latency": out.latency_ms, "tokens": out.tokens,
            "status": Counter(out.parse_status)}


def summarise(label: str, runs: list[dict], n: int) -> dict:
    lat = np.concatenate([r["latency"] for r in runs])
    st = sum((r["status"] for r in runs), Counter())
    return {"row": label, "pairs": n * len(runs), "pairs/s": float(np.median([n / r["seconds"] for r in runs])),
            "cpu s/pair": sum(r["cpu"] for r in runs) / (n * len(runs)), "p50 ms": float(np.median(lat)),
            "p90 ms": float(np.percentile(lat, 90)), "tokens": float(np.mean(np.concatenate([r["tokens"] for r in runs]))),
            "ok": st[OK], "json": st[OK_JSON], "unparsed": st[UNPARSED], "failed": st[FAILED]}


def start_server(model_path: str, n_ctx: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not answer within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per row and round (new pairs every time)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; pairs/s is the median over rounds")
    ap.add_argument("--model", default="smollm2-135m", help="GGUF alias or path")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--skip-server", action="store_true")
    args = ap.parse_args()

    rows = []
    proc = None
    try:
        judges: dict[str, tuple[PromptedJudge, int | None]] = {}
        if not args.skip_local:
            for mode in ("off", "kv", "ram"):
                cfg = JudgeConfig(name="bench", kind="prompted", model=args.model, backend="local", n_ctx=args.n_ctx)
                t0 = time.perf_counter()
                judges[f"local, prefix {mode}"] = (PromptedJudge(cfg, backend=get_backend(cfg, prefix_cache=mode)), None)
                print(f"local model loaded in {time.perf_counter() - t0:.1f}s", flush=True)
        if not args.skip_server:
            t0 = time.perf_counter()
            proc, url = start_server(resolve(args.model).path, args.n_ctx)
            print(f"llama_cpp.server answered after {time.perf_counter() - t0:.1f}s", flush=True)
            for conc, nonce in ((1, False), (4, False), (1, True)):
                cfg = JudgeConfig(name="bench", kind="prompted", model=args.model, backend="openai", base_url=url,
                                  concurrency=conc, timeout_s=300, batch_size=max(32, args.pairs))
                judge = PromptedJudge(cfg)
                if nonce:
                    judge.backend = NoncePrefix(judge.backend)
                judges[f"openai->llama.cpp server, c={conc}" + (", no prefix" if nonce else "")] = (judge, proc.pid)
        runs: dict[str, list[dict]] = {k: [] for k in judges}
        warm = bench_pairs(1, offset=10_000)
        for label, (judge, _) in judges.items():
            judge.predict(warm)  # untimed: first-call costs, the server's format negotiation
        for rnd in range(args.rounds):  # rows interleaved, so a change in the machine's load hits them all
            for k, (label, (judge, pid)) in enumerate(judges.items()):
                pairs = bench_pairs(args.pairs, offset=(rnd * len(judges) + k) * args.pairs)  # never seen before
                runs[label].append(run_row(judge, pairs, pid))
                print(f"round {rnd + 1}/{args.rounds} {label}: {runs[label][-1]['seconds']:.1f}s", flush=True)
        rows = [summarise(label, r, args.pairs) for label, r in runs.items()]
        for judge, _ in judges.values():
            judge.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    cols = ["pairs", "pairs/s", "cpu s/pair", "p50 ms", "p90 ms", "tokens", "ok", "json", "unparsed", "failed"]
    w = max(len(r["row"]) for r in rows)
    print(f"{'row':<{w}} " + " ".join(f"{c:>10}" for c in cols))
    for r in rows:
        cells = [f"{r[c]:>10.2f}" if isinstance(r[c], float) else f"{r[c]:>10}" for c in cols]
        print(f"{r['row']:<{w}} " + " ".join(cells))


if __name__ == "__main__":
    main()
