"""`assay annotate` through a real llama.cpp server on loopback, killed mid-run and restarted.

The cascade is one prompted judge (SmolLM2-135M through the OpenAI-compatible backend). Its
calibrator is fitted on synthetic outputs here because calibrating a prompted 135M model on a
real calib split takes minutes; the test is about batches: failed pairs are recorded, and a
rerun completes them with no duplicates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from assay.annotate import batches
from assay.annotate.calibrate import IsotonicCalibrator
from assay.annotate.runtime import calibrator_file
from assay.config import AnnotateConfig, JudgeConfig
from assay.store import Store

from conftest import LoopbackServer, copy_ws, free_port, start_llama_server, stop_process

pytestmark = pytest.mark.slow


def test_server_killed_mid_run_then_rerun_completes_without_duplicates(mined_master, tmp_path, monkeypatch):
    ws = copy_ws(mined_master[0], tmp_path / "ws")
    port = free_port()
    log = tmp_path / "server.log"
    proc, url = start_llama_server(log, port)
    cfg = AnnotateConfig(
        judges=[JudgeConfig(name="smol-prompt", kind="prompted", model="smollm2-135m", backend="openai", base_url=url,
                            concurrency=3, timeout_s=60, max_retries=1, api_key_env="ASSAY_TEST_NO_KEY")],
        thresholds={"smol-prompt": [0.0] * 5}, batch_size=3, max_pairs=9, sources=["negatives"])
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    p = np.full((400, 5), 0.1)
    p[np.arange(400), y] = 0.6
    IsotonicCalibrator().fit(p, y).save(calibrator_file(ws / "artifacts", "smol-prompt"))

    orig = batches.annotate_batch
    seen = {"n": 0}

    def kill_after_first_batch(*a, **k):
        seen["n"] += 1
        if seen["n"] == 2:
            stop_process(proc, kill=True)  # the server dies before the second batch's calls
        return orig(*a, **k)

    monkeypatch.setattr(batches, "annotate_batch", kill_after_first_batch)
    try:
        with Store.open(ws) as s:
            first = batches.run(cfg, s, progress=False)
            assert first["annotated"] == 9 and first["failed"] == 6
            st = dict(s.exec("SELECT status, count(*) FROM labels GROUP BY 1"))
            assert st == {"ok": 3, "failed": 6}
            failed_votes = s.query("SELECT parse_status, raw FROM label_votes l JOIN labels USING "
                                   "(query_id, item_id, cascade_sha) WHERE labels.status = 'failed'").to_pylist()
            assert len(failed_votes) == 6 and all(v["parse_status"] == "failed" and v["raw"] for v in failed_votes)
            failed_pairs = set(s.exec("SELECT query_id, item_id FROM labels WHERE status = 'failed'"))

            monkeypatch.setattr(batches, "annotate_batch", orig)
            proc2, _ = start_llama_server(log, port)
            try:
                second = batches.run(cfg.model_copy(update={"max_pairs": 6}), s, progress=False)
            finally:
                stop_process(proc2)
            assert second["before"]["failed"] == 6 and second["failed"] == 0
            assert set(s.exec("SELECT query_id, item_id FROM labels WHERE status = 'ok'")) >= failed_pairs
            assert s.count("labels") == 9 and s.count("labels", "status = 'ok'") == 9
            assert s.scalar("SELECT count(*) FROM (SELECT query_id, item_id, judge FROM label_votes "
                            "GROUP BY ALL HAVING count(*) > 1)") == 0
            ok_votes = s.query("SELECT parse_status, raw, tokens FROM label_votes").to_pylist()
            assert all(v["raw"] for v in ok_votes)
            assert sum(v["parse_status"] in ("ok", "json") for v in ok_votes) >= 6
    finally:
        stop_process(proc)


class _GradingServer(LoopbackServer):
    """A real OpenAI-compatible HTTP server on loopback that grades every prompt 3, except prompts naming a
    poisoned product, which it answers with text no parser can read (as a model that ignores its instructions
    does). It counts the requests per poisoned title; ``healed`` makes it answer those properly too."""

    def __init__(self, poison: str):
        self.poison, self.healed, self.poisoned_calls, self.calls = poison, False, {}, 0
        super().__init__()

    def answer(self, method, path, headers, body):
        if method == "GET":
            return 200, {"object": "list", "data": [{"id": "grader", "object": "model"}]}
        req = json.loads(body)
        prompt = " ".join(m["content"] for m in req["messages"] if isinstance(m.get("content"), str))
        self.calls += 1
        bad = self.poison in prompt and not self.healed
        if self.poison in prompt:
            self.poisoned_calls[prompt] = self.poisoned_calls.get(prompt, 0) + 1  # one prompt per pair
        text = "I would rather talk about the weather." if bad else '{"grade": 3}'
        return 200, {"id": "c", "object": "chat.completion", "created": 0, "model": "grader",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


@pytest.mark.timeout(300)
def test_the_main_job_bounds_retries_of_pairs_that_always_fail(mined_master, tmp_path):
    """`assay run`'s annotate step used to repeat launches while anything was pending, so a pair an endpoint never
    answers usably was retried forever. Now each failing pair gets annotate.max_attempts tries, the step stops
    with an error that says how many failed and why, the pairs stay `failed`, and `assay annotate` retries them."""
    from assay import pipeline
    from assay.config import AssayConfig

    ws = copy_ws(mined_master[0], tmp_path / "ws")
    server = _GradingServer(poison="zzpoison")
    try:
        with Store.open(ws) as s:
            keep = [q for (q,) in s.exec("SELECT DISTINCT query_id FROM negatives ORDER BY 1 LIMIT 2")]
            s.exec("DELETE FROM negatives WHERE query_id NOT IN (SELECT unnest(?::VARCHAR[]))", [keep])
            items = [i for (i,) in s.exec("SELECT item_id FROM negatives ORDER BY hash(item_id) LIMIT 5")]
            s.exec("UPDATE products SET title = 'zzpoison ' || item_id || ' ' || title "
                   "WHERE item_id IN (SELECT unnest(?::VARCHAR[]))", [items])
            poisoned = s.scalar("SELECT count(*) FROM negatives WHERE item_id IN (SELECT unnest(?::VARCHAR[]))",
                                [items])
            work = s.count("negatives")
        cfg = AssayConfig.model_validate({"annotate": {
            "judges": [{"name": "grader", "kind": "prompted", "model": "grader", "backend": "openai",
                        "base_url": server.url, "api_key_env": "ASSAY_TEST_NO_KEY", "max_retries": 0,
                        "concurrency": 4}],
            "thresholds": {"grader": [0.0] * 5}, "sources": ["negatives"], "batch_size": 8, "max_pairs": 16,
            "max_attempts": 3}})
        rng = np.random.default_rng(0)
        y = rng.integers(0, 5, 400)
        p = np.full((400, 5), 0.1)
        p[np.arange(400), y] = 0.6
        IsotonicCalibrator().fit(p, y).save(calibrator_file(ws / "artifacts", "grader"))
        with Store.open(ws) as s:
            with pytest.raises(pipeline.AnnotationIncomplete, match=rf"{poisoned} of {work} mined pairs failed after 3 "
                                                                    r"tries each .*grader unparsed"):
                pipeline._annotate(cfg, s, False)
            assert dict(s.exec("SELECT status, count(*) FROM labels GROUP BY 1")) == {"ok": work - poisoned,
                                                                                     "failed": poisoned}
        assert sorted(server.poisoned_calls.values()) == [3] * poisoned  # each poisoned pair, three tries
        assert server.calls == work - poisoned + 3 * poisoned
        server.healed = True  # the cause is fixed: `assay annotate` picks the failed pairs up again
        with Store.open(ws) as s:
            again = batches.run(cfg.annotate, s, progress=False)
            assert again["annotated"] == poisoned and again["after"]["failed"] == 0 and again["after"]["pending"] == 0
    finally:
        server.close()
