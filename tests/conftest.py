"""Shared fixtures: tiny worlds and workspaces built once per session, copied per test."""

from __future__ import annotations

import json
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


# assay's user cache (a GGUF model's converted weights, 517 MB): one folder for the session's processes (the xdist
# workers, started after the controller's configure, inherit it), not ~/.cache; made when pytest configures (not when
# this module is imported) and removed when the session ends, by the process that made it
_OWN_CACHE_DIR = None


def pytest_configure(config):
    global _OWN_CACHE_DIR
    if "ASSAY_CACHE_DIR" not in os.environ:
        import tempfile

        _OWN_CACHE_DIR = os.environ["ASSAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="assay-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE_DIR:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# --------------------------------------------------------------------------- scheduling on two workers
# `make test` runs pytest-xdist with --dist loadgroup --no-loadscope-reorder: each test is its own unit of work,
# except the files below, whose module fixtures are costly to build twice (or that start a local Ray, or whose tests
# would wait for each other: a second worker that needs a built_once master the first is still building idles until
# it is done, as test_eval.py's tests did for 58 s): they stay together on one worker. Units are sent longest first
# (seconds, setup + call, from `--durations` of a full run at 3b4d7be on 2026-12-07; a test not listed counts 1 s),
# so that both workers finish at about the same time instead of one running the last long file alone. The numbers
# only order the work; a stale one costs time, never a result. (Measured: a third worker on the 2 cores did not help,
# 1,112 s against 1,096 s for the same tree: the two workers keep both cores busy.)
ONE_WORKER_FILES = {"test_ray.py", "test_serving.py", "test_features_judge.py", "test_inference.py", "test_audit.py",
                    "test_label_quality.py", "test_judges.py", "test_eval.py"}
# files that build the same costly master share one worker (test_serving.py serves a copy of test_eval.py's eval_master)
SAME_WORKER = {"test_eval.py": "test_serving.py"}
MEASURED_SECONDS = {
    "test_curriculum_on_real_cascade_labels_tiers_pairs_by_their_true_relevance": 310,
    "test_main_job_runs_skips_when_current_and_reruns_what_changed": 225,
    "test_keyword_stuffing_is_resisted_by_training_on_stuffed_negatives": 85,
    "test_cross_encoder_saves_loads_and_predicts": 72, "test_baselines_share_the_step_budget": 55,
    "test_agreement_reports_seed_and_mined_distributions": 50, "test_kill_9_resumes_to_the_same_model": 46,
    "test_agreement_report": 46, "test_encoder_exports_agree_with_torch_and_are_cached_by_sha_and_backend": 43,
    "test_export_writes_a_manifest_bound_to_the_checkpoint": 42,
    "test_mixed_bce_baseline_and_best_checkpoint_span_curriculum_and_baselines": 37,
    "test_llm_classifier_lora_round_trip": 37, "test_driver_killed_mid_execute_rerun_skips_finished_shards": 37,
    "test_ray_grades_equal_local_and_commit_twice_changes_nothing": 35,
    "test_cross_encoder_runs_on_onnx_within_the_accuracy_guard": 29,
    "test_server_killed_mid_run_then_rerun_completes_without_duplicates": 27,
    "test_embedding_cache_skips_unchanged_items": 27,
    "test_likelihood_scoring_grades_relevant_pairs_above_irrelevant": 24,
    "test_training_reads_the_real_cascades_grades_and_confidences": 23,
    "test_curriculum_trains_selects_and_records": 23,
    "test_worker_killed_mid_shard_completes_without_loss_or_duplicates": 22,
    "test_torchrun_two_processes_gather_in_batch_negatives": 21,
    "test_poisoned_pair_fails_alone_and_the_next_plan_picks_it_up": 19,
    "test_export_carries_lineage_in_every_format": 19, "test_commit_refuses_foreign_miscounted_and_partial_shards": 19,
    "test_stage_without_gain_is_skipped_and_next_starts_from_previous_best": 17,
    "test_annotate_writes_labels_and_votes_and_is_idempotent": 17, "test_injected_titles_do_not_raise_grades": 16,
    "test_hostile_catalog_does_not_move_cascade_grades": 16, "test_openai_backend_through_llama_server": 15,
    "test_kill9_mid_batch_resumes_without_loss_or_duplicates": 15,
    "test_a_catalog_update_relabels_exactly_the_pairs_whose_texts_changed": 15,
    "test_the_server_under_a_bounded_load_answers_every_request": 14,
    "test_trained_judges_calibrators_lower_ece_on_pairs_they_did_not_see": 13,
    "test_two_tower_on_onnx_matches_torch": 12, "test_item_tower_encoding_on_ray_fills_the_checkpoint_vector_cache": 12,
    "test_local_prefix_cache_modes_give_the_same_answer": 11, "test_bad_input_names_the_missing_step": 11,
    "test_features_judge_trains_calibrates_and_settles_clear_negatives": 10,
    "test_cross_encoder_bf16_agrees_with_fp32": 9, "test_catalog_encoding_on_ray_fills_the_embedding_cache": 9,
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist (see above): keep ONE_WORKER_FILES on one worker each, and put the longest units first."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    seconds = {}

    def group(it) -> str:
        name = it.path.name
        return SAME_WORKER.get(name, name) if name in ONE_WORKER_FILES else ""

    for it in items:
        if group(it):
            it.add_marker(pytest.mark.xdist_group(group(it)))
            seconds[group(it)] = seconds.get(group(it), 0) + MEASURED_SECONDS.get(it.originalname, 1)
    order = {id(it): i for i, it in enumerate(items)}

    def unit(it):
        name = group(it)
        return -(seconds[name] if name else MEASURED_SECONDS.get(it.originalname, 1)), name, order[id(it)]

    items.sort(key=unit)


def built_once(tmp_path_factory, name: str, build):
    """``build(folder)`` run once per test session, also across pytest-xdist workers (`make test` runs two): the
    first worker that needs it builds it under a file lock in the session's shared temp root, the others wait for it
    and reuse the folder and the returned value (Paths, dicts and lists, kept as JSON). Without xdist it is a plain
    session build. What it builds is a master: tests copy it before they write."""
    worker, keep = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("ASSAY_TEST_SHARED")
    if not worker and not keep:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    # ASSAY_TEST_SHARED=<folder> keeps the masters between sessions while one works on a test (delete the folder
    # after changing code that builds them: nothing checks that they are current)
    root = Path(keep) if keep else tmp_path_factory.getbasetemp().parent / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            value = build(folder)
            done.write_text(json.dumps(value, default=lambda o: {"__path__": str(o)} if isinstance(o, Path) else
                                       o.item() if hasattr(o, "item") else str(o)))
            return value
    return json.loads(done.read_text(), object_hook=lambda d: Path(d["__path__"]) if set(d) == {"__path__"} else d)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small simulated world (files only), built once."""
    from assay.data.simulate import SimulateConfig, simulate

    def build(out: Path) -> Path:
        simulate(SimulateConfig(seed=7, n_products=3000, n_queries=300, label_queries=0.3), out, progress=False)
        return out

    return built_once(tmp_path_factory, "world", build)


@pytest.fixture(scope="session")
def tiny_workspace_master(tiny_world, tmp_path_factory) -> Path:
    """A workspace with the tiny world ingested, built once; tests get a copy."""
    from assay.config import IngestConfig
    from assay.data import ingest
    from assay.store import Store

    def build(ws: Path) -> Path:
        with Store.open(ws) as store:
            ingest.run(IngestConfig(), store, path=tiny_world, progress=False)
        return ws

    return built_once(tmp_path_factory, "ws_master", build)


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
    """The tiny workspace after `assay mine` (k=100), built once: (workspace, mining summary). It mines with the
    PyTorch encoder, so the candidates (and the labels, tiers and validation pools built on them downstream) stay
    the data those tests were written against; the default ONNX int8 path is exercised by test_mining's own runs,
    test_inference and the main job in test_pipeline."""
    from assay.config import MiningConfig, ModelsConfig
    from assay.mining import run as mine
    from assay.store import Store

    def build(folder: Path):
        ws = copy_ws(tiny_workspace_master, folder / "ws")
        with Store.open(ws) as store:
            summary = mine(MiningConfig(**MINING_FAST), store, ModelsConfig(backend="torch"), progress=False)
        return ws, summary

    return tuple(built_once(tmp_path_factory, "mined", build))


def kill9_script(module: str, func: str, nth: int, run: str) -> str:
    """A Python program for ``python -c`` that replaces ``module.func`` with a wrapper which SIGKILLs its own process
    on the ``nth`` call (before that call does its work), then runs ``run`` (code that may read ``sys.argv`` and
    use ``target``, the imported module). The kill -9 tests of mining and annotation use it."""
    import textwrap

    return textwrap.dedent(f"""
        import importlib, os, signal, sys
        target = importlib.import_module({module!r})
        orig = target.{func}
        calls = {{"n": 0}}
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == {nth}:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(*a, **k)
        target.{func} = wrapped
    """) + textwrap.dedent(run)


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
    # one thread, as every test process has (OMP_NUM_THREADS=1): llama.cpp's threads spin while they wait, so two
    # 2-thread models on the 2 cores took 68 s where two 1-thread models took 40 s
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", resolve("smollm2-135m").path, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
           "--n_threads_batch", "1"]
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


class LoopbackServer:
    """A real HTTP server on a free loopback port, serving from daemon threads: the tests of the OpenAI-compatible
    path subclass it and write ``answer``. Use it as a context manager (or call ``close``); ``url`` is its ``/v1``
    base. ``answer(method, path, headers, body)`` gets the request body's bytes and returns ``(status, reply)`` or
    ``(status, reply, extra headers)``, where a dict reply is sent as JSON and bytes are sent as they are."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, reply, *extra = outer.answer(self.command, self.path, self.headers, body)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra[0] if extra else {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, headers, body: bytes):
        raise NotImplementedError

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


@pytest.fixture(scope="session")
def labeled_master(mined_master, tmp_path_factory) -> Path:
    """The mined tiny workspace with every mined pair labeled, built once. The labels stand in for a cascade's:
    the world's true grade with 10% of the grades moved one step (seeded), written to ``labels`` with a
    one-hot-ish probability vector. Annotation itself is tested in test_annotate/test_cascade; the curriculum
    and trainer tests need labeled pairs without training judges first."""
    return built_once(tmp_path_factory, "labeled", lambda folder: _label_with_noisy_truth(
        copy_ws(mined_master[0], folder / "ws")))


def _label_with_noisy_truth(ws: Path) -> Path:
    import numpy as np
    import pyarrow as pa

    from assay.data.judgments import load_oracle
    from assay.store import Store
    from assay.text import stamp_text_sha_sql

    with Store.open(ws) as store:
        pairs = store.query("SELECT query_id, item_id FROM candidates UNION ALL SELECT query_id, item_id FROM negatives "
                            "ORDER BY 1, 2")
        q = np.array(pairs.column("query_id").to_pylist(), dtype=object)
        i = np.array(pairs.column("item_id").to_pylist(), dtype=object)
        truth = load_oracle(store).grade(q, i).astype(np.int64)
        rng = np.random.default_rng(0)
        noisy = np.where(rng.random(len(truth)) < 0.1, np.clip(truth + rng.choice([-1, 1], len(truth)), 0, 4), truth)
        probs = (np.eye(5, dtype=np.float32)[noisy] * 0.8 + 0.04).ravel()
        n = len(noisy)
        store.write("labels", pa.table({
            "query_id": q.tolist(), "item_id": i.tolist(), "cascade_sha": ["fixture"] * n,
            "grade": pa.array(noisy, pa.int8()), "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs), 5),
            "decided_by": ["fixture"] * n, "confidence": pa.array(np.full(n, 0.84, np.float32)), "status": ["ok"] * n}))
        store.exec(stamp_text_sha_sql("labels"))  # bound to the texts they "judged", as annotate binds its labels
    return ws


@pytest.fixture()
def labeled_workspace(labeled_master, tmp_path) -> Path:
    return copy_ws(labeled_master, tmp_path / "lws")


EVAL_MODELS = {"backend": "torch"}  # eval_master's models section (see there)


@pytest.fixture(scope="session")
def eval_master(labeled_master, tmp_path_factory) -> Path:
    """The labeled workspace after `assay curriculum` (a tenth of the queries held out for test) and a first
    evaluation of the base encoder, built once: test_eval.py's tests measure evaluation. It evaluates on PyTorch
    (``EVAL_MODELS``), the backend the workspace was mined on, so the base encoder reads the catalog vectors
    mining cached (same model, item length and backend: assay.dense.item_cache_key) and encodes nothing; the default
    int8 path (guard, export, first encoding of the catalog) is the main job's (test_pipeline.py), test_inference.py's
    and test_serving.py's export. test_serving.py serves a copy with the same setting, as `assay serve` serves a
    workspace after `assay run`: the page's base encoder column reads these vectors."""
    from assay.config import AssayConfig, CurriculumConfig
    from assay.curriculum import run as run_curriculum
    from assay.eval.retrieval import evaluate
    from assay.store import Store

    def build(folder: Path) -> Path:
        ws = copy_ws(labeled_master, folder / "ws")
        with Store.open(ws) as store:
            run_curriculum(CurriculumConfig(test_fraction=0.1), store)
            res = evaluate(store, {"base encoder": "base"}, split="test", progress=False,
                           backend_cfg=AssayConfig(models=EVAL_MODELS), bootstrap=0)
        assert res["systems"]["base encoder"]["item_vectors"]["encoded"] == 0, res["systems"]["base encoder"]
        return ws

    return built_once(tmp_path_factory, "eval", build)


# The cascade of the annotation tests: two real MiniLM cross-encoders with different budgets (a cheap one and a better
# one), trained on the tiny world's human train split, so the suite stays fast on 2 CPU cores. Both name fp32 ONNX:
# under `inference: auto` their int8 exports lost 0.0052 and 0.0077 of calib accuracy (limit 0.005) and fell back to
# fp32 ONNX anyway, after an int8 export and two passes over the calib pairs each (a judge under auto: test_judges.py).
ANNOTATE_JUDGES = [
    dict(name="ce-fast", kind="cross_encoder", model="all-MiniLM-L6-v2", max_length=48, batch_size=64, epochs=2,
         max_train_pairs=500, learning_rate=3e-4, inference="onnx"),
    dict(name="ce-full", kind="cross_encoder", model="all-MiniLM-L6-v2", max_length=64, batch_size=64, epochs=2,
         max_train_pairs=900, learning_rate=3e-4, inference="onnx"),
]


def annotate_cfg(**kw):
    from assay.config import AnnotateConfig, JudgeConfig

    return AnnotateConfig(judges=[JudgeConfig(**j) for j in ANNOTATE_JUDGES], **kw)


@pytest.fixture(scope="session")
def calibrated_master(mined_master, tmp_path_factory):
    """The mined tiny workspace with both judges trained (`assay teachers`) and calibrated (`assay calibrate`, on the
    human calib split), built once: (workspace, teachers summary, calibrate summary)."""
    from assay.annotate import fit, teachers
    from assay.store import Store

    def build(folder: Path):
        ws = copy_ws(mined_master[0], folder / "ws")
        with Store.open(ws) as store:
            tr = teachers.run(annotate_cfg(), store, progress=False)
            cal = fit.run(annotate_cfg(), store, progress=False)
        return ws, tr, cal

    return tuple(built_once(tmp_path_factory, "annot", build))


CASCADE_LABELED_QUERIES = 10  # about 1,700 mined pairs, about 45 s to label on a loaded 2-core machine (15: 59 s)


@pytest.fixture(scope="session")
def cascade_labeled_master(calibrated_master, tmp_path_factory) -> Path:
    """Labels written by the real calibrated cascade: the trained workspace cut to its first
    ``CASCADE_LABELED_QUERIES`` mined queries (their candidates and negatives; the other queries' mined pairs are
    dropped, so every remaining pair is labeled) and `assay annotate` (batches.run) run over all of them. Unlike
    ``labeled_master`` (truth plus noise with a constant confidence), these grades, probabilities and confidences
    are the cascade's own, mistakes included. Built once."""
    return built_once(tmp_path_factory, "cascade_labeled", lambda folder: _label_by_cascade(
        copy_ws(calibrated_master[0], folder / "ws")))


def _label_by_cascade(ws: Path) -> Path:
    from assay.annotate import batches
    from assay.store import Store

    with Store.open(ws) as store:
        keep = [q for (q,) in store.exec(f"SELECT DISTINCT query_id FROM candidates ORDER BY 1 "
                                         f"LIMIT {CASCADE_LABELED_QUERIES}")]
        for t in ("candidates", "negatives"):
            store.exec(f"DELETE FROM {t} WHERE query_id NOT IN (SELECT unnest(?::VARCHAR[]))", [keep])
        out = batches.run(annotate_cfg(batch_size=512), store, progress=False)
        assert out["failed"] == 0 and out["after"]["pending"] == 0, out
    return ws


@pytest.fixture()
def cascade_labeled_workspace(cascade_labeled_master, tmp_path) -> Path:
    return copy_ws(cascade_labeled_master, tmp_path / "cws")


def reingest_titles(store, item_ids: list[str], folder: Path, suffix: str = " waterproof") -> Path:
    """Re-ingest the products ``item_ids`` through `assay ingest` (a generic products file) with ``suffix`` appended
    to each title, as a catalog update would; returns the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from assay.config import IngestConfig
    from assay.data import ingest

    rows = store.query("SELECT item_id, title, description, brand, category, CAST(attributes AS VARCHAR) AS attributes,"
                       " popularity FROM products WHERE item_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY item_id",
                       [list(item_ids)])
    assert rows.num_rows == len(set(item_ids)), "unknown item ids"
    rows = rows.set_column(1, "title", pa.array([t + suffix for t in rows.column("title").to_pylist()]))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "products.parquet"
    pq.write_table(rows, path)
    rep = ingest.run(IngestConfig(), store, files={"products": path}, progress=False)
    assert rep["tables"]["products"]["replaced"] == rows.num_rows, rep
    return path
