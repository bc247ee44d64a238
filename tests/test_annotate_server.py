"""`assay annotate` through a real llama.cpp server on loopback, killed mid-run and restarted.

The cascade is one prompted judge (SmolLM2-135M through the OpenAI-compatible backend). Its
calibrator is fitted on synthetic outputs here because calibrating a prompted 135M model on a
real calib split takes minutes; the test is about batches: failed pairs are recorded, and a
rerun completes them with no duplicates.
"""

from __future__ import annotations

import numpy as np
import pytest

from assay.annotate import batches
from assay.annotate.calibrate import IsotonicCalibrator
from assay.annotate.runtime import calibrator_file
from assay.config import AnnotateConfig, JudgeConfig
from assay.store import Store

from conftest import copy_ws, free_port, start_llama_server, stop_process

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
