"""`assay evaluate`: held-out queries, whole-catalog retrieval, truth or label judgments, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from assay.cli import app
from assay.config import CurriculumConfig
from assay.store import Store


@pytest.fixture()
def curriculum_ws(labeled_workspace) -> Path:
    from assay.curriculum import run as run_curriculum

    with Store.open(labeled_workspace) as store:
        run_curriculum(CurriculumConfig(test_fraction=0.1), store)
    return labeled_workspace


def test_evaluate_bm25_and_base_encoder_on_held_out_queries_with_truth(curriculum_ws):
    from assay.eval.retrieval import evaluate

    with Store.open(curriculum_ws) as store:
        test_q = {q for (q,) in store.exec("SELECT DISTINCT query_id FROM examples WHERE split = 'test'")}
        train_q = {q for (q,) in store.exec("SELECT DISTINCT query_id FROM examples WHERE split = 'train'")}
        res = evaluate(store, {"bm25": "bm25", "base encoder": "base"}, split="test", progress=False)
    assert res["judgments"] == "truth" and res["queries"] == len(test_q) and not test_q & train_q
    assert sum(res["segments"].values()) == len(test_q)
    for name in ("bm25", "base encoder"):
        r = res["systems"][name]["all"]
        assert 0 < r["ndcg@10"] <= 1 and 0 <= r["embarrassing@10"] <= 1
        assert r["judged@10"] == pytest.approx(1.0)  # truth grades every catalog item
        assert r["recall@10"] <= r["recall@50"] <= r["recall@100"]
    # two different retrievers do not score identically
    assert res["systems"]["bm25"]["all"]["ndcg@10"] != res["systems"]["base encoder"]["all"]["ndcg@10"]


def test_without_truth_only_labeled_pairs_are_judged(curriculum_ws):
    from assay.eval.retrieval import judgments

    with Store.open(curriculum_ws) as store:
        store.exec("DELETE FROM truth_items")
        qids = [q for (q,) in store.exec("SELECT DISTINCT query_id FROM examples WHERE split = 'test' LIMIT 3")]
        items = np.array([i for (i,) in store.exec("SELECT item_id FROM products")], dtype=object)
        source, judged = judgments(store, qids, items)
        q0 = qids[0]
        labeled = dict(store.exec("SELECT item_id, grade FROM labels WHERE query_id = ?", [q0]))
    assert source == "labels"
    assert judged[q0] == {i: int(g) for i, g in labeled.items()}


def test_evaluate_command_writes_report_and_rejects_missing_split(curriculum_ws, tiny_workspace):
    r = CliRunner().invoke(app, ["evaluate", "-w", str(curriculum_ws), "--json", "-q", "--split", "val",
                                 "--set", "train.base_model=all-MiniLM-L6-v2"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(s["systems"]) == {"bm25", "base encoder"}  # no trained checkpoint yet
    rep = Path(s["report"])
    assert rep.exists() and (rep.parent / "ndcg10.png").stat().st_size > 1000
    with Store.open(curriculum_ws, read_only=True) as store:
        assert store.scalar("SELECT status FROM runs WHERE stage = 'evaluate'") == "ok"
    r = CliRunner().invoke(app, ["evaluate", "-w", str(tiny_workspace), "-q"])
    assert r.exit_code != 0 and "assay curriculum" in " ".join(r.output.split())
