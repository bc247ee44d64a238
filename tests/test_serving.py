"""export-index and search: a real FAISS index over the tiny catalog, bound to a real MiniLM two-tower checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from assay import dense
from assay.config import AssayConfig, ServeConfig
from assay.serving import index as serving
from assay.serving.index import Served
from assay.store import Store
from assay.trainer.model import TwoTower

from conftest import EVAL_MODELS, copy_ws

pytestmark = pytest.mark.slow


SERVE_MODELS = {"backend": "onnx"}


@pytest.fixture(scope="module")
def exported(eval_master, tmp_path_factory):
    """A base-model checkpoint exported (flat and HNSW) from a copy of the workspace `assay evaluate` has seen
    (conftest.eval_master): (workspace, checkpoint, flat summary, hnsw summary). Exported on fp32 ONNX by name
    (``SERVE_MODELS``): the served query tower runs on an ONNX export, as by default, without the int8 accuracy guard,
    which took 26 s of this fixture's 67 s (the guard before export-index is the main job's, test_pipeline.py)."""
    root = tmp_path_factory.mktemp("serve")
    ws = copy_ws(eval_master, root / "ws")
    ckpt = root / "ckpt"
    TwoTower.from_base("all-MiniLM-L6-v2").save(ckpt)
    cfg = AssayConfig(models=SERVE_MODELS, serve=ServeConfig(recall_sample=50))
    with Store.open(ws) as s:
        with pytest.raises(ValueError, match="assay train"):
            serving.export(cfg, s, progress=False)  # no trained checkpoint and none named
        flat = serving.export(cfg, s, checkpoint=str(ckpt), progress=False)
        hnsw = serving.export(AssayConfig(models=SERVE_MODELS, serve=ServeConfig(index="hnsw", recall_sample=50,
                                                                                 ef_search=64)), s,
                              checkpoint=str(ckpt), progress=False)
    return ws, ckpt, flat, hnsw


def test_export_writes_a_manifest_bound_to_the_checkpoint(exported):
    ws, ckpt, flat, hnsw = exported
    man = json.loads((ws / "artifacts/index" / flat["index_id"] / "manifest.json").read_text())
    assert man["checkpoint_sha"] == json.loads((ckpt / "twotower.json").read_text())["sha"]
    assert man["kind"] == "flat" and man["recall@100"] == 1.0 and man["recall_queries"] == 50
    assert man["backend"] == hnsw["backend"] == SERVE_MODELS["backend"]  # the query tower runs where the items ran
    assert man["n_items"] == 3000 and man["dim"] == 384 and man["text_template"].startswith("item-text/")
    assert hnsw["kind"] == "hnsw" and hnsw["factory"] == "HNSW32" and 0.9 <= hnsw["recall@100"] <= 1.0
    assert hnsw["encode_seconds"] < flat["encode_seconds"]  # the item vectors came from the cache
    with Store.open(ws, read_only=True) as s:
        assert {r[0] for r in s.exec("SELECT kind FROM indexes")} == {"flat", "hnsw"}


def test_search_dense_and_hybrid_and_bad_input(exported):
    ws, _, flat, _ = exported
    with Store.open(ws, read_only=True) as s:
        served = Served(AssayConfig(), s, flat["index_id"])
        text = s.exec("SELECT text FROM queries ORDER BY query_id LIMIT 1")[0][0]
        hits = served.search(text, k=20)
        assert len(hits) == 20 and all(h.title and h.source == "dense" for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len({h.item_id for h in hits}) == 20
        hyb = served.search(text, k=20, mode="hybrid")
        assert len(hyb) == 20 and len({h.item_id for h in hyb}) == 20
        assert {h.source for h in hyb} <= {"dense", "bm25", "both"} and any(h.source != "dense" for h in hyb)
        for q, k, mode, msg in [("  ", 10, "dense", "empty"), ("x" * 600, 10, "dense", "characters"),
                                (text, 0, "dense", "between 1 and 1000"), (text, 1001, "dense", "between 1 and 1000"),
                                (text, 10, "sparse", "unknown mode")]:
            with pytest.raises(ValueError, match=msg):
                served.search(q, k, mode)
        # a misspelled query is searched as its correction against the catalog's words (assay/spell.py) ...
        assert served.correct("velvte sofaa") == "velvet sofa"
        clean = [h.item_id for h in served.search("velvet sofa", k=20)]
        assert [h.item_id for h in served.search("velvte sofaa", k=20)] == clean
        # ... and as typed when spell.enabled is false: the encoder then sees other word pieces
        raw = Served(AssayConfig(spell={"enabled": False}), s, flat["index_id"])
        assert raw.correct("velvte sofaa") == "velvte sofaa"
        assert [h.item_id for h in raw.search("velvte sofaa", k=20)] != clean


def _changed_copy(exported, tmp_path):
    """A copy of the workspace whose indexes point at a checkpoint that was trained further (another sha)."""
    ws, ckpt, _, _ = exported
    ws2 = copy_ws(ws, tmp_path / "ws")
    moved = tmp_path / "ckpt"
    model = TwoTower.load(ckpt)
    with torch.no_grad():
        next(model.item_tower.parameters()).add_(0.01)
    model.save(moved)
    with Store.open(ws2) as s:
        for (index_id,) in s.exec("SELECT index_id FROM indexes"):
            mf_file = ws2 / "artifacts/index" / index_id / "manifest.json"
            mf = json.loads(mf_file.read_text())
            mf["checkpoint_path"] = str(moved)
            mf_file.write_text(json.dumps(mf))
        s.exec("UPDATE indexes SET path = replace(path, ?, ?)", [str(ws), str(ws2)])
    return ws2


def test_search_refuses_an_index_whose_checkpoint_changed(exported, tmp_path):
    ws2 = _changed_copy(exported, tmp_path)
    with Store.open(ws2, read_only=True) as s:
        with pytest.raises(ValueError, match="assay export-index"):
            Served(AssayConfig(), s, exported[2]["index_id"])


def test_multi_head_search_rescoring_matches_exact_soft_dot():
    import faiss

    from assay.trainer.model import soft_dot

    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    q = rng.normal(size=(3, 2, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    index = faiss.IndexFlatIP(16)
    index.add(items)
    scores, rows = dense.search_index(index, q, 500, beta=10.0)  # every item is a candidate: exact
    want = soft_dot(torch.from_numpy(q), torch.from_numpy(items), 10.0).numpy()
    for r in range(3):
        assert rows[r][0] == int(np.argmax(want[r]))
        np.testing.assert_allclose(scores[r], np.sort(want[r])[::-1], rtol=1e-5, atol=1e-5)


def test_search_from_the_cli(exported, tmp_path):
    from typer.testing import CliRunner

    from assay.cli import app

    ws = str(copy_ws(exported[0], tmp_path / "ws"))
    runner = CliRunner()
    r = runner.invoke(app, ["search", "velvet sofa", "-w", ws, "-k", "5", "--json", "-q"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)  # progress bars of the model load go to stderr
    assert len(rows) == 5 and all(set(h) == {"item_id", "title", "score", "source"} for h in rows)
    r = runner.invoke(app, ["search", "velvet sofa", "-w", ws, "-k", "0", "-q"])
    assert r.exit_code == 2 and "between 1 and 1000" in r.output


def _http(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict | str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def _start_server(ws, log_path, port):
    import subprocess
    import sys
    import time

    # the page's base encoder on the backend the workspace was mined and evaluated on (conftest.eval_master): it
    # reads the catalog vectors cached there; the served index runs on the backend of its export (SERVE_MODELS)
    cmd = [sys.executable, "-m", "assay.cli", "serve", "-w", str(ws), "-q", "--port", str(port),
           "-s", f"models.backend={EVAL_MODELS['backend']}"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc
        try:
            if _http(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"assay serve did not answer: {log_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """`assay serve` on loopback over a copy of the exported workspace: (base url, workspace)."""
    from conftest import free_port, stop_process

    root = tmp_path_factory.mktemp("server")
    ws = copy_ws(exported[0], root / "ws")
    port = free_port()
    proc = _start_server(ws, root / "serve.log", port)
    try:
        assert proc.poll() is None, (root / "serve.log").read_text()[-2000:]
        yield f"http://127.0.0.1:{port}", ws
    finally:
        stop_process(proc)


def _graded_query(ws) -> str:
    """A query people graded, so the page and /compare show their grades."""
    with Store.open(ws, read_only=True) as s:
        return s.exec("""SELECT q.text FROM human_labels h JOIN queries q USING (query_id)
                         WHERE h.grade >= 3 GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1""")[0][0]


def test_the_real_server_answers_and_rejects_bad_requests(server):
    base, ws = server
    status, health = _http(f"{base}/health")
    assert status == 200 and health["status"] == "ok" and health["n_items"] == 3000
    assert health["modes"] == {"dense": True, "hybrid": True}  # BM25 is ready before the first hybrid request
    status, man = _http(f"{base}/manifest")
    assert status == 200 and man["checkpoint_sha"] == health["checkpoint_sha"]
    status, res = _http(f"{base}/search", {"query": "velvet sofa", "k": 7, "mode": "hybrid"})
    assert status == 200 and len(res["hits"]) == 7 and res["took_ms"] > 0
    status, fixed = _http(f"{base}/search", {"query": "velvte sofa", "k": 7, "mode": "hybrid"})
    assert status == 200 and fixed["searched"] == "velvet sofa" and fixed["hits"] == res["hits"]
    assert all(h["title"] and h["source"] in ("dense", "bm25", "both") for h in res["hits"])
    for body, reason in [({"query": "   "}, "empty"), ({"query": "x" * 513}, "512"),
                         ({"query": "sofa", "k": 0}, "greater than or equal to 1"),
                         ({"query": "sofa", "k": 1001}, "less than or equal to 1000"),
                         ({"query": "sofa", "mode": "sparse"}, "unknown mode"), ({"k": 3}, "query")]:
        status, err = _http(f"{base}/search", body)
        assert status == 422 and reason in json.dumps(err), (body, err)
    status, page = _http(f"{base}/")
    assert status == 200 and "assay search" in page and 'id="q"' in page
    text = _graded_query(ws)
    from urllib.parse import quote

    cache, exports = ws / "artifacts" / "embeddings", ws / "artifacts" / "onnx"
    before = sorted(p.relative_to(cache) for p in cache.rglob("*")), sorted(p.name for p in exports.iterdir())
    status, cmp = _http(f"{base}/compare?k=10&q={quote(text)}")
    assert status == 200 and [s["name"] for s in cmp["systems"]] == ["BM25", "base encoder", "trained model"]
    assert all(len(s["hits"]) == 10 for s in cmp["systems"]) and cmp["graded"]
    assert any(h["grade"] is not None for s in cmp["systems"] for h in s["hits"])
    # the base encoder column reads the catalog vectors `assay evaluate` read (mining's: conftest.eval_master), on the
    # backend evaluate ran: the first comparison exports and encodes nothing (it once ran the base encoder on another
    # backend than evaluate's, a cache key of its own, and encoded the whole catalog: a new cache folder here)
    assert (sorted(p.relative_to(cache) for p in cache.rglob("*")), sorted(p.name for p in exports.iterdir())) == before
    status, err = _http(f"{base}/compare?q=%20")
    assert status == 422 and "empty" in json.dumps(err)


def test_the_server_under_a_bounded_load_answers_every_request(server):
    """2,000 requests from 16 concurrent clients on loopback, dense and hybrid: no errors (latency: bench_api.py)."""
    from assay.serving.load import hammer

    base, ws = server
    with Store.open(ws, read_only=True) as s:
        queries = [r[0] for r in s.exec("SELECT text FROM queries ORDER BY query_id LIMIT 200")]
    dense = hammer(base, queries, n=1500, concurrency=16)
    hybrid = hammer(base, queries, n=500, concurrency=16, mode="hybrid", k=20)
    assert dense["errors"] == 0 and hybrid["errors"] == 0, (dense["error_samples"], hybrid["error_samples"])
    assert dense["p50_ms"] > 0 and dense["requests"] + hybrid["requests"] == 2000


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (`make test` installs Debian's package)")
def test_the_search_page_in_headless_chromium(server, tmp_path):
    """The page as people use it: a real browser loads /?q=..., its script calls /compare and draws three columns."""
    import re
    import subprocess
    from html import unescape
    from urllib.parse import quote

    base, ws = server
    text = _graded_query(ws)
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000", "--dump-dom",
                          f"{base}/?q={quote(text)}"], capture_output=True, text=True, timeout=180)
    dom = out.stdout
    shown = re.search(r'<div id="cols" data-query="([^"]*)"', dom)
    assert shown and unescape(shown.group(1)) == text, dom[-3000:]
    columns = re.findall(r'<div class="col" data-system="([^"]+)">(.*?)</ol></div>', dom, flags=re.S)
    assert [name for name, _ in columns] == ["BM25", "base encoder", "trained model"], dom[-3000:]
    for name, body in columns:
        hits = re.findall(r"<li>(.*?)</li>", body, flags=re.S)
        assert len(hits) == 10, (name, body[:500])
        assert all('class="title">' in h and not h.split('class="title">')[1].startswith("<") for h in hits)
    assert re.search(r'class="meta g[34]">[0-9.]+ \w+ grade [34]<', dom), "no graded hit shown"


def test_the_server_refuses_to_start_on_a_manifest_that_does_not_match(exported, tmp_path):
    from conftest import free_port

    ws2 = _changed_copy(exported, tmp_path)
    proc = _start_server(ws2, tmp_path / "serve.log", free_port())
    assert proc.wait(timeout=60) == 2
    assert "assay export-index" in (tmp_path / "serve.log").read_text()


def test_best_validated_checkpoint_compares_one_training_folder(tmp_path):
    """`serve.checkpoint: best`: the best validation NDCG@10 among the kept checkpoints of the newest training
    folder (curriculum stages and baselines); a skipped stage and another folder's scores do not count."""
    from assay.trainer.run import _record_checkpoint

    def rec(s, key, name, stage, val, kept=True):
        family = "curriculum" if name.startswith("stage") else name
        _record_checkpoint(s, {"checkpoint": str(tmp_path / key / name / "best"), "name": name, "family": family,
                               "stage": stage, "sha": name, "best_val": val, "improved": kept, "best_step": 25},
                           "train-test")

    with Store.open(tmp_path / "ws") as s:
        with pytest.raises(ValueError, match="assay train"):
            dense.best_validated_checkpoint(s)
        rec(s, "old", "baseline-binary", 0, 0.99)  # another training config: other validation pools
        rec(s, "new", "stage1", 1, 0.86)
        rec(s, "new", "stage2", 2, 0.90, kept=False)  # a skipped stage is not served
        rec(s, "new", "baseline-graded", 0, 0.88)
        rec(s, "new", "stage3", 3, 0.87)
        path, ckpt_id, val = dense.best_validated_checkpoint(s)
        assert (ckpt_id, val) == ("new/baseline-graded", 0.88)
        assert path == str(tmp_path / "new" / "baseline-graded" / "best")
        rec(s, "new", "stage3", 3, 0.885)  # a retrained stage 3 validates higher
        assert dense.best_validated_checkpoint(s)[1] == "new/stage3"


def _get(url: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict | str]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def test_exposure_warning_only_off_loopback(monkeypatch):
    from assay.serving.app import exposure_warning, is_loopback

    cfg = AssayConfig()
    monkeypatch.delenv(cfg.serve.api_token_env, raising=False)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and exposure_warning(cfg, host) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20", "search.example.com"):
        assert not is_loopback(host)
        assert "without a token" in exposure_warning(cfg, host) and "ASSAY_API_TOKEN" in exposure_warning(cfg, host)
    monkeypatch.setenv(cfg.serve.api_token_env, "tok-unit")
    w = exposure_warning(cfg, "0.0.0.0")
    assert "requires the bearer token" in w and "tok-unit" not in w


def test_the_server_requires_its_bearer_token_and_shows_workspace_relative_paths(exported, tmp_path):
    """`assay serve --host 0.0.0.0` with $ASSAY_API_TOKEN set: a warning at start, /health open, every other
    endpoint 401 without the token or with a wrong one, 200 with it; /manifest holds no absolute path."""
    import os
    import subprocess
    import sys
    import time

    from conftest import free_port, stop_process

    token = "tok-serve-3b9d71"
    ws = copy_ws(exported[0], tmp_path / "ws")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "assay.cli", "serve", "-w", str(ws), "-q", "--host", "0.0.0.0",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "ASSAY_API_TOKEN": token, "COLUMNS": "400"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            try:
                if _get(f"{base}/health")[0] == 200:  # no token needed
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.5)
        for path in ("/manifest", "/", "/compare?q=sofa", "/docs", "/openapi.json"):
            for sent in (None, "wrong-token"):
                status, body = _get(base + path, sent)
                assert status == 401 and "bearer token" in json.dumps(body), (path, sent, status, body)
        assert _get(f"{base}/search", None, {"query": "velvet sofa", "k": 3})[0] == 401
        status, res = _get(f"{base}/search", token, {"query": "velvet sofa", "k": 3})
        assert status == 200 and len(res["hits"]) == 3
        status, man = _get(f"{base}/manifest", token)
        assert status == 200 and man["index_id"] == exported[3]["index_id"]  # the newest export: hnsw
        assert not os.path.isabs(man["checkpoint_path"]) and man["checkpoint_path"].endswith("/ckpt"), man
        text = json.dumps(man)
        assert str(tmp_path) not in text and str(exported[1]) not in text and str(ws) not in text
    finally:
        stop_process(proc)
    out = " ".join(log_path.read_text().split())
    assert "reachable from other machines" in out and "ASSAY_API_TOKEN" in out, out[-2000:]
    assert token not in out


def test_search_reads_no_table_per_hit_for_first_seen_queries(exported):
    """A query the process has not answered before must not cost a store query per hit (titles were looked up
    one SQL scan of `products` per item not returned before: 80 ms of a first-seen query at 20k items, k=100;
    latency: benchmarks/bench_api.py). Titles still match the products table, in dense and hybrid mode."""
    with Store.open(exported[0], read_only=True) as s:
        served = Served(AssayConfig(), s, exported[2]["index_id"])
        queries = [r[0] for r in s.exec("SELECT text FROM queries ORDER BY query_id LIMIT 12")]
        calls = []
        real_exec, real_query = s.exec, s.query
        s.exec = lambda *a, **k: (calls.append(a[0]), real_exec(*a, **k))[1]
        s.query = lambda *a, **k: (calls.append(a[0]), real_query(*a, **k))[1]
        try:
            dense = [served.search(q, 100) for q in queries[:8]]
            hybrid = [served.search(q, 50, "hybrid") for q in queries[8:]]
        finally:
            s.exec, s.query = real_exec, real_query
        bm25_build = [c for c in calls if "products" not in c]  # the hybrid's BM25 index is built on first use
        assert [c for c in calls if "products" in c] == [], calls[:3]
        assert len(bm25_build) <= 3
        titles = dict(s.exec("SELECT item_id, title FROM products"))
    hits = [h for res in dense + hybrid for h in res]
    assert len(hits) == 8 * 100 + 4 * 50
    assert all(h.title == titles[h.item_id] for h in hits)
