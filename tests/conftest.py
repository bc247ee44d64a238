"""Shared fixtures: tiny worlds and workspaces built once per session, copied per test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per test process. Measured here: with 2 threads, bf16 MiniLM encoding inside a
# long pytest process (after numba, faiss and torch training have run in it) slowed down 10x or
# more, while 1 thread ran the mining tests in 70 s. Single-thread tests are also stable when the
# machine is shared. The product itself uses store.threads (default 2).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small simulated world (files only), built once."""
    from assay.data.simulate import SimulateConfig, simulate

    out = tmp_path_factory.mktemp("world")
    simulate(SimulateConfig(seed=7, n_products=3000, n_queries=300, label_queries=0.3), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_workspace_master(tiny_world, tmp_path_factory) -> Path:
    """A workspace with the tiny world ingested, built once; tests get a copy."""
    from assay.config import IngestConfig
    from assay.data import ingest
    from assay.store import Store

    ws = tmp_path_factory.mktemp("ws_master")
    with Store.open(ws) as store:
        ingest.run(IngestConfig(), store, path=tiny_world, progress=False)
    return ws


@pytest.fixture()
def tiny_workspace(tiny_workspace_master, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(tiny_workspace_master, ws, ignore=shutil.ignore_patterns("assay.lock"))
    return ws


MINING_FAST = dict(k=100, batch_queries=64)


def copy_ws(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("assay.lock"))
    return dst


@pytest.fixture(scope="session")
def mined_master(tiny_workspace_master, tmp_path_factory):
    """The tiny workspace after `assay mine` (k=100), built once: (workspace, mining summary)."""
    from assay.config import MiningConfig, ModelsConfig
    from assay.mining import run as mine
    from assay.store import Store

    ws = copy_ws(tiny_workspace_master, tmp_path_factory.mktemp("mined") / "ws")
    with Store.open(ws) as store:
        summary = mine(MiningConfig(**MINING_FAST), store, ModelsConfig(), progress=False)
    return ws, summary


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(log_path: Path, port: int | None = None, timeout_s: float = 120.0):
    """Start a real llama.cpp OpenAI-compatible server (llama-cpp-python) on loopback with the
    packaged SmolLM2 GGUF. Returns (process, base_url); stop it with stop_process()."""
    import subprocess
    import sys
    import time
    import urllib.request

    from assay.models import resolve

    port = port or free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", resolve("smollm2-135m").path, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"llama_cpp.server did not answer in {timeout_s:.0f} s:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.5)


def stop_process(proc, kill: bool = False) -> None:
    import subprocess

    if proc.poll() is not None:
        return
    proc.kill() if kill else proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
