"""`assay run`: the whole main job on a tiny simulated world, then again with nothing to do, then with one
section changed (only the steps that read it, and those after them, run again)."""

from __future__ import annotations

import pytest

from assay import pipeline
from assay.config import AssayConfig
from assay.store import Store
from assay.text import digest

pytestmark = pytest.mark.slow


def tiny_config(**serve) -> AssayConfig:
    return AssayConfig.model_validate({
        "store": {"threads": 1},
        "simulate": {"n_products": 1500, "n_queries": 150, "label_queries": 0.4, "seed": 5},
        "mining": {"k": 30, "batch_queries": 64, "negatives": {"n_token_sim": 5, "n_random": 5}},
        "annotate": {"agreement_sample": 200, "judges": [
            {"name": "features", "kind": "features", "model": "all-MiniLM-L6-v2", "max_length": 64},
            {"name": "ce", "kind": "cross_encoder", "model": "all-MiniLM-L6-v2", "max_length": 32, "epochs": 1,
             "max_train_pairs": 300, "learning_rate": 3e-4}]},
        "label_request": {"n": 150},
        "curriculum": {"val_fraction": 0.2, "test_fraction": 0.2},
        "train": {"batch_queries": 8, "group_size": 2, "eval_every": 2, "checkpoint_every": 2, "val_max_queries": 20,
                  "val_pool_per_query": 10, "random_pool": 500, "baseline_steps": 4,
                  "stages": [{"pos_tiers": [1], "neg_tiers": [5], "loss": "bce", "steps": 4, "learning_rate": 1e-4},
                             {"pos_tiers": [1, 2], "neg_tiers": [3, 4], "loss": "mnr", "steps": 4,
                              "learning_rate": 1e-4}]},
        "pipeline": {"label_requests": 150, "baselines": ["click"]},
        "serve": {"recall_sample": 20, **serve},
    })


def test_a_step_is_stale_only_when_the_config_it_reads_changed():
    """Changing which baselines train leaves the label requests (and the judges after them) current; changing
    how many labels to request does not."""
    cfg = tiny_config()
    done = {p["step"]: {"key": p["key"]} for p in pipeline.plan(cfg, {})}
    assert all(p["status"] == "current" for p in pipeline.plan(cfg, done))

    def stale(**pipe):
        c = tiny_config()
        c.pipeline = c.pipeline.model_copy(update=pipe)
        return [p["step"] for p in pipeline.plan(c, done) if p["status"] == "run"]

    assert stale(baselines=["binary"]) == ["baselines", "export-index", "evaluate"]
    assert stale(label_requests=100) == pipeline.STEP_NAMES[pipeline.STEP_NAMES.index("label-request"):]
    # keys recorded when label-request and baselines read the whole pipeline section stay current
    old, prev = {}, "start"
    for name, sections, _, _ in pipeline.STEPS:
        sections = pipeline._LEGACY_SECTIONS.get(name, sections)
        prev = old.setdefault(name, {"key": digest([name, pipeline._sections(cfg, *sections), prev])})["key"]
    assert old["label-request"] != done["label-request"]
    assert all(p["status"] == "current" for p in pipeline.plan(cfg, old))


def test_main_job_runs_skips_when_current_and_reruns_what_changed(tmp_path):
    ws = tmp_path / "ws"
    first = pipeline.run(tiny_config(), ws, progress=False)
    assert [r["step"] for r in first["steps"]] == pipeline.STEP_NAMES
    assert all(r["status"] == "ran" for r in first["steps"]), first["steps"]
    ev = first["evaluate"]
    assert ev["judgments"] == "truth" and {"bm25", "base encoder", "baseline-click"} <= set(ev["systems"])
    ctx = ev["context"]  # the report also shows the training data, the cascade and the training curves
    assert ctx["tiers"] and ctx["cascade"]["coverage"] == 1.0 and set(ctx["cascade"]["decided_by"]) <= {
        "features", "ce", "vote"} and ctx["cascade"]["agreement"]["accuracy"] is not None
    assert [r["model"] for r in ctx["training"]["ablation"]][:2] == ["base encoder", "stage 1"]
    assert "baseline-click" in ctx["training"]["curves"]
    with Store.open(ws, read_only=True) as s:
        assert s.count("label_requests") == 150 and s.count("labels") > 0 and s.count("examples") > 0
        pending = s.scalar("""SELECT count(*) FROM (SELECT query_id, item_id FROM candidates UNION
                              SELECT query_id, item_id FROM negatives) w WHERE NOT EXISTS (SELECT 1 FROM labels l
                              WHERE l.query_id = w.query_id AND l.item_id = w.item_id)""")
        assert pending == 0  # the main job labels every mined pair
    second = pipeline.run(tiny_config(), ws, progress=False)
    assert all(r["status"] == "skipped (current)" for r in second["steps"]), second["steps"]
    assert second["evaluate"]["systems"] == ev["systems"]  # the newest evaluation is reported again
    third = pipeline.run(tiny_config(recall_sample=10), ws, progress=False)
    ran = [r["step"] for r in third["steps"] if r["status"] == "ran"]
    assert ran == ["export-index", "evaluate"], third["steps"]
    with pytest.raises(ValueError, match="unknown step"):
        pipeline.run(tiny_config(), ws, force=["nope"], progress=False)
