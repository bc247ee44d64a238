"""`assay evaluate`: held-out queries, whole-catalog retrieval, truth or label judgments, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from assay.cli import app
from assay.encode import cache_key
from assay.models import model_sha, resolve
from assay.store import Store

from conftest import EVAL_MODELS


@pytest.fixture()
def curriculum_ws(eval_master, tmp_path) -> Path:
    from conftest import copy_ws

    return copy_ws(eval_master, tmp_path / "ews")


def test_evaluate_bm25_and_base_encoder_on_held_out_queries_with_truth(curriculum_ws):
    from assay.config import AssayConfig
    from assay.eval.retrieval import evaluate

    with Store.open(curriculum_ws) as store:
        test_q = {q for (q,) in store.exec("SELECT DISTINCT query_id FROM examples WHERE split = 'test'")}
        train_q = {q for (q,) in store.exec("SELECT DISTINCT query_id FROM examples WHERE split = 'train'")}
        res = evaluate(store, {"bm25": "bm25", "base encoder": "base"}, split="test", progress=False,
                       backend_cfg=AssayConfig(models=EVAL_MODELS))
    assert res["judgments"] == "truth" and res["queries"] == len(test_q) and not test_q & train_q
    assert sum(res["segments"].values()) == len(test_q)
    for name in ("bm25", "base encoder"):
        r = res["systems"][name]["all"]
        assert 0 < r["ndcg@10"] <= 1 and 0 <= r["embarrassing@10"] <= 1
        assert r["judged@10"] == pytest.approx(1.0)  # truth grades every catalog item
        assert r["recall@10"] <= r["recall@50"] <= r["recall@100"]
    # two different retrievers do not score identically
    assert res["systems"]["bm25"]["all"]["ndcg@10"] != res["systems"]["base encoder"]["all"]["ndcg@10"]
    assert res["spell"] == {"enabled": False, "corrected_queries": 0}
    # with no curriculum model, the base encoder is the reference; the paired differences are the per-query ones
    assert res["reference"] == "base encoder" and set(res["comparisons"]) == {"bm25"}
    cmp = res["comparisons"]["bm25"]
    assert set(cmp) == {"all"} | {s for s, n in res["segments"].items() if n >= 2}
    pq = res["per_query"]
    assert len(pq["query_id"]) == len(test_q) and len(pq["bm25|ndcg@10"]) == len(test_q)
    for m in ("ndcg@10", "embarrassing@10", "recall@100"):
        c = cmp["all"][m]
        d = np.array(pq[f"base encoder|{m}"], dtype=float) - np.array(pq[f"bm25|{m}"], dtype=float)
        assert c["queries"] == (~np.isnan(d)).sum() and c["delta"] == pytest.approx(np.nanmean(d), abs=1e-5)
        assert c["lo"] <= c["delta"] <= c["hi"]
    assert cmp["all"]["ndcg@10"]["delta"] == pytest.approx(
        res["systems"]["base encoder"]["all"]["ndcg@10"] - res["systems"]["bm25"]["all"]["ndcg@10"], abs=2e-4)
    # the base encoder's catalog vectors are the ones `assay mine` cached (the same model, item length and backend):
    # all read, none encoded, and no other cache written (the master's first evaluation read them too)
    mined_key = cache_key(model_sha(resolve("all-MiniLM-L6-v2")), 64, "fp32", EVAL_MODELS["backend"])
    assert res["systems"]["base encoder"]["item_vectors"] == {"cached": 3000, "encoded": 0, "key": mined_key}
    assert {p.name for p in (curriculum_ws / "artifacts" / "embeddings").iterdir()} == {mined_key}
    with Store.open(curriculum_ws) as store, pytest.raises(ValueError, match="'curriculum' is not an evaluated"):
        evaluate(store, {"bm25": "bm25"}, split="test", progress=False, reference="curriculum")


def test_evaluate_searches_with_the_corrected_query_text(curriculum_ws):
    """With the speller every system gets the corrected text: the count is the test queries it changes, and a
    speller that changes nothing (no word is long enough to correct) leaves every metric as it was."""
    from assay.config import AssayConfig, SpellConfig
    from assay.eval.retrieval import eval_queries, evaluate
    from assay.spell import for_workspace

    with Store.open(curriculum_ws) as store:
        sp = for_workspace(AssayConfig(), store)
        texts = eval_queries(store, "test")[1]
        res = evaluate(store, {"bm25": "bm25"}, split="test", progress=False, spell=AssayConfig().spell)
        same = evaluate(store, {"bm25": "bm25"}, split="test", progress=False, spell=SpellConfig(min_length=1000))
        plain = evaluate(store, {"bm25": "bm25"}, split="test", progress=False)
    assert res["spell"] == {"enabled": True, "corrected_queries": sum(sp.correct(t) != t for t in texts)}
    assert same["spell"]["corrected_queries"] == 0
    assert same["systems"]["bm25"]["all"]["ndcg@10"] == plain["systems"]["bm25"]["all"]["ndcg@10"]


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
                                 "--set", "train.base_model=all-MiniLM-L6-v2",
                                 "--set", f"models.backend={EVAL_MODELS['backend']}"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(s["systems"]) == {"bm25", "base encoder", "hybrid"}  # no trained checkpoint yet
    rep = Path(s["report"])
    assert rep.exists() and (rep.parent / "ndcg10.png").stat().st_size > 1000
    # what the models were built from: examples per tier and split, the cascade's coverage of the mined pairs
    ctx = s["context"]
    with Store.open(curriculum_ws, read_only=True) as store:
        n_ex = store.count("examples")
        mined = store.scalar("SELECT count(*) FROM (SELECT query_id, item_id FROM candidates UNION "
                             "SELECT query_id, item_id FROM negatives)")
    assert sum(sum(v.values()) for v in ctx["tiers"].values()) == n_ex and set(ctx["tiers"]) <= {
        "easy_pos", "hard_pos", "hard_neg", "token_sim_neg", "random_neg"}
    assert ctx["cascade"]["mined_pairs"] == mined and ctx["cascade"]["coverage"] == 1.0
    assert ctx["cascade"]["decided_by"] == {"fixture": mined} and "training" not in ctx  # nothing trained yet
    html = rep.read_text()
    assert "Training examples per tier and split" in html and "The cascade" in html
    assert s["reference"] == "base encoder" and "paired bootstrap" in html
    rows = Path(s["per_query"]).read_text().splitlines()
    assert rows[0] == "query_id,segment,system,ndcg@10,embarrassing@10,recall@100"
    assert len(rows) == 1 + 3 * s["queries"]  # every val query for bm25, the base encoder and hybrid
    with Store.open(curriculum_ws, read_only=True) as store:
        assert store.scalar("SELECT status FROM runs WHERE stage = 'evaluate'") == "ok"
    r = CliRunner().invoke(app, ["evaluate", "-w", str(tiny_workspace), "-q"])
    assert r.exit_code != 0 and "assay curriculum" in " ".join(r.output.split())


def test_qrels_files_trec_and_csv_and_bad_lines(tmp_path):
    from assay.eval.retrieval import read_qrels, rrf

    trec = tmp_path / "q.txt"
    trec.write_text("q1 0 p1 4\nq1 0 p2 0\n\nq2 0 p9 2\n")
    assert read_qrels(trec) == {"q1": {"p1": 4, "p2": 0}, "q2": {"p9": 2}}
    csv = tmp_path / "q.csv"
    csv.write_text("item_id,query_id,grade\np1,q1,3\n")
    assert read_qrels(csv) == {"q1": {"p1": 3}}
    bad = tmp_path / "bad.txt"
    bad.write_text("q1 0 p1 4\nq1 0 p2 7\n")
    with pytest.raises(ValueError, match="bad.txt:2: grade 7"):
        read_qrels(bad)
    bad.write_text("q1 p1\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_qrels(bad)
    assert rrf(["a", "b", "c"], ["b", "d"], 3) == ["b", "a", "d"]  # b is in both lists


def test_hybrid_and_qrels_in_the_evaluation(curriculum_ws, tmp_path):
    from assay.config import AssayConfig
    from assay.eval.run import run as evaluate_run

    with Store.open(curriculum_ws) as store:
        q = store.exec("SELECT DISTINCT query_id FROM examples WHERE split = 'test' ORDER BY 1 LIMIT 1")[0][0]
        item = store.exec("SELECT item_id FROM labels WHERE query_id = ? ORDER BY grade DESC LIMIT 1", [q])[0][0]
        qrels = tmp_path / "qrels.txt"
        qrels.write_text(f"{q} 0 {item} 4\n")
        res = evaluate_run(AssayConfig(models=EVAL_MODELS), store, qrels=str(qrels), progress=False)
    assert res["judgments"] == "qrels (qrels.txt)" and res["systems"]["hybrid"]["of"] == ["bm25", "base encoder"]
    folder = Path(res["report"]).parent
    assert json.loads((folder / "metrics.json").read_text())["systems"].keys() == res["systems"].keys()
    # one dense system: its backend is reported and there is nothing to warn about
    assert list(res["backends"]) == ["base encoder"] and res["backend_note"] is None
    assert res["backends"]["base encoder"] == EVAL_MODELS["backend"]
    assert "Encoder backend of each dense system" in (folder / "report.html").read_text()


def test_a_comparison_across_encoder_backends_is_flagged(capsys):
    """`models.backend: auto` lets the int8 guard choose per model; when the dense systems end up on different
    backends the evaluation says so, names which ran where, and how to compare them on one."""
    from assay import cli
    from assay.eval.retrieval import mixed_backends

    assert mixed_backends({}) is None
    assert mixed_backends({"curriculum": "onnx-int8", "base encoder": "onnx-int8"}) is None
    note = mixed_backends({"curriculum": "onnx-int8", "baseline-binary": "onnx", "base encoder": "onnx-int8"})
    assert "onnx-int8: curriculum, base encoder; onnx: baseline-binary" in note
    assert note.endswith("-s models.backend=onnx")
    assert mixed_backends({"a": "torch", "b": "onnx-int8"}).endswith("-s models.backend=torch")
    row = {"all": {"ndcg@10": 0.9, "embarrassing@10": 0.03, "recall@100": 0.8}}
    res = {"segments": {}, "queries": 5, "split": "test", "judgments": "truth", "report": "r.html",
           "per_query": "pq.csv", "systems": {"curriculum": row, "baseline-binary": row}, "backend_note": note}
    cli._render_evaluation(res)
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: the dense systems were searched on different encoder backends" in out
    cli._render_evaluation({**res, "backend_note": None})
    assert "warning" not in capsys.readouterr().out


def test_cli_prints_the_comparison_with_the_reference_named(capsys):
    from assay import cli
    from assay.eval.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    c = {"ndcg@10": paired_bootstrap(a, b), "embarrassing@10": paired_bootstrap(b, a),
         "recall@100": paired_bootstrap(a, a)}
    cli._render_comparisons({"reference": "curriculum", "confidence": 0.9, "comparisons": {"bm25": {"all": c}}})
    out = capsys.readouterr().out
    assert "curriculum minus each system" in out and "90%" in out and "bm25" in out
    assert f"{c['ndcg@10']['delta']:+.3f} [{c['ndcg@10']['lo']:+.3f},{c['ndcg@10']['hi']:+.3f}] " \
           f"{c['ndcg@10']['p_above_0']:.2f}" in out
    assert f"{c['embarrassing@10']['p_below_0']:.2f}" in out  # lower is better for the embarrassing rate
    cli._render_comparisons({"comparisons": {}})
    assert capsys.readouterr().out == ""


def test_the_report_names_the_system_serving_would_answer_with(tmp_path):
    """`serve.checkpoint` unset serves the curriculum, `best` the best-validated system, a path of no evaluated
    system becomes its own row, ``served``."""
    from assay.config import AssayConfig
    from assay.eval.run import default_systems, served_line, served_system
    from assay.trainer.run import _record_checkpoint

    def rec(s, name, stage, val):
        path = tmp_path / "train" / name / "best"
        path.mkdir(parents=True)
        _record_checkpoint(s, {"checkpoint": str(path), "name": name, "family": "curriculum" if stage else name,
                               "stage": stage, "sha": name, "best_val": val, "improved": True, "best_step": 25},
                           "train-test")

    with Store.open(tmp_path / "ws") as s:
        assert served_system(AssayConfig(), s, default_systems(s)) is None  # nothing trained yet
        rec(s, "stage1", 1, 0.86)
        rec(s, "stage2", 2, 0.87)
        rec(s, "baseline-graded", 0, 0.88)
        systems = default_systems(s)
        assert set(systems) == {"bm25", "base encoder", "curriculum", "baseline-graded"}
        got = served_system(AssayConfig(serve={"checkpoint": None}), s, systems)
        assert got["system"] == "curriculum" and got["path"] == str(tmp_path / "train" / "stage2" / "best")
        assert "unset" in served_line(got) and "serves curriculum" in served_line(got)
        assert served_system(AssayConfig(serve={"checkpoint": "best"}), s, systems)["system"] == "baseline-graded"
        assert served_system(AssayConfig(), s, systems)["system"] == "baseline-graded"  # best is the default
        elsewhere = tmp_path / "elsewhere"
        got = served_system(AssayConfig(serve={"checkpoint": str(elsewhere)}), s, systems)
        assert got["system"] == "served" and systems["served"] == str(elsewhere)


def test_cli_prints_what_serving_answers_with(capsys):
    from assay import cli

    row = {"all": {"ndcg@10": 0.9, "embarrassing@10": 0.03, "recall@100": 0.8}}
    res = {"segments": {}, "queries": 5, "split": "test", "judgments": "truth", "report": "r.html",
           "per_query": "pq.csv", "systems": {"curriculum": row, "baseline-graded": row},
           "served": {"serve.checkpoint": "best", "path": "/x/baseline-graded/best", "system": "baseline-graded"}}
    cli._render_evaluation(res)
    out = " ".join(capsys.readouterr().out.split())
    assert "serve.checkpoint best: `assay export-index` serves baseline-graded (/x/baseline-graded/best)" in out
    cli._render_evaluation({**res, "served": None})
    assert "serves" not in capsys.readouterr().out
