"""A bounded loopback load on `assay serve`: ``n`` POST /search requests from ``concurrency`` client threads.

Used by the reliability test (no request may fail) and by ``benchmarks/bench_api.py`` (latency percentiles and
throughput). Each request is a fresh HTTP connection (urllib), as independent clients would make.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def one(url: str, query: str, k: int, mode: str, timeout: float) -> tuple[int, float, str]:
    body = json.dumps({"query": query, "k": k, "mode": mode}).encode()
    req = urllib.request.Request(f"{url}/search", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status, err = r.status, ""
    except urllib.error.HTTPError as e:
        status, err = e.code, e.read().decode(errors="replace")[:200]
    except (OSError, urllib.error.URLError) as e:
        status, err = 0, f"{type(e).__name__}: {e}"[:200]
    return status, (time.perf_counter() - t0) * 1e3, err


def hammer(url: str, queries: list[str], n: int = 2000, concurrency: int = 16, k: int = 10, mode: str = "dense",
           timeout: float = 60.0) -> dict:
    """Send ``n`` requests (queries cycled) with ``concurrency`` threads; latency percentiles in ms, throughput,
    and every non-200 answer (status 0 = no answer)."""
    jobs = [queries[i % len(queries)] for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda q: one(url, q, k, mode, timeout), jobs))
    wall = time.perf_counter() - t0
    lat = np.array([r[1] for r in res])
    errors = [(q, s, e) for q, (s, _, e) in zip(jobs, res) if s != 200]
    return {"requests": n, "concurrency": concurrency, "mode": mode, "k": k, "errors": len(errors),
            "error_samples": errors[:5], "seconds": round(wall, 2), "qps": round(n / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2)}
