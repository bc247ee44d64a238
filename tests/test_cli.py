"""The command line as a user runs it: simulate -> ingest -> summary, and the clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from assay.cli import app

runner = CliRunner()


def test_simulate_ingest_summary(tmp_path):
    ws = tmp_path / "ws"
    r = runner.invoke(app, ["simulate", "-w", str(ws), "-q", "--set", "simulate.n_products=800",
                            "--set", "simulate.n_queries=120"])
    assert r.exit_code == 0, r.output
    assert (ws / "world" / "world.json").exists()
    r = runner.invoke(app, ["ingest", str(ws / "world"), "-w", str(ws), "-q", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["format"] == "sim" and out["tables"]["products"]["accepted"] == 800
    r = runner.invoke(app, ["summary", "-w", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["tables"]["products"]["rows"] == 800
    assert set(s["tables"]["queries"]["segments"]) <= {"head", "torso", "tail"}
    assert s["tables"]["queries"]["segments"]["tail"] > 0
    assert s["tables"]["engagement"]["rows"] > 0 and s["tables"]["human_labels"]["rows"] > 0
    r = runner.invoke(app, ["summary", "-w", str(ws)])
    assert "head" in r.output and "human_labels" in r.output
    r = runner.invoke(app, ["runs", "-w", str(ws), "--json"])
    assert [x["stage"] for x in json.loads(r.output)] == ["ingest", "simulate"]


def test_config_errors_name_the_key_and_allowed_values(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mining:\n  kk: 3\n")
    r = runner.invoke(app, ["config", "show", "-c", str(cfg)])
    assert r.exit_code == 2
    assert "unknown key 'mining.kk'" in r.output and "'k'" in r.output
    r = runner.invoke(app, ["config", "show", "--set", "mining.ann.index=kd-tree"])
    assert r.exit_code == 2 and "'auto', 'flat', 'hnsw' or 'ivf'" in r.output
    r = runner.invoke(app, ["config", "show", "--set", "mining.k=200"])
    assert r.exit_code == 0 and "k: 200" in r.output


def test_rejects_command_lists_bad_rows(tmp_path):
    f = tmp_path / "products.csv"
    f.write_text("item_id,title\na,Lamp\nb,\n")
    assert runner.invoke(app, ["ingest", "--products", str(f), "-w", str(tmp_path / "ws"), "-q"]).exit_code == 0
    r = runner.invoke(app, ["rejects", "-w", str(tmp_path / "ws"), "--json"])
    rows = json.loads(r.output)
    assert [(x["line"], x["reason"]) for x in rows] == [(3, "missing title (column 'title')")]


def test_second_writer_from_the_cli_gets_a_clear_error(tmp_path):
    ws = tmp_path / "ws"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from assay.store import Store
        s = Store.open({str(ws)!r}); print("ready", flush=True); time.sleep(20)""")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        f = tmp_path / "q.csv"
        f.write_text("query_id,text\n1,sofa\n")
        r = runner.invoke(app, ["ingest", "--queries", str(f), "-w", str(ws), "-q"])
        assert r.exit_code == 2
        assert f"is locked by pid {holder.pid}" in r.output
    finally:
        holder.kill()
        holder.wait()


def test_ingest_without_input_is_a_clear_error(tmp_path):
    r = runner.invoke(app, ["ingest", "-w", str(tmp_path / "ws")])
    assert r.exit_code == 2 and "nothing to ingest" in r.output


def test_annotate_commands_explain_what_to_run_first(tiny_workspace):
    ws = str(tiny_workspace)
    r = runner.invoke(app, ["calibrate", "-w", ws, "-q"])
    assert r.exit_code == 2 and "assay teachers train" in r.output
    r = runner.invoke(app, ["annotate", "-w", ws, "-q", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    est = json.loads(r.output)
    assert est["work"] == 0 and est["calibrated"] is False  # nothing mined yet: no work, and it says so
    r = runner.invoke(app, ["teachers", "train", "-w", ws, "-q", "--judge", "nope"])
    assert r.exit_code == 2 and "Unknown judge 'nope'" in r.output


def test_label_request_answer_ingest_from_the_cli(mined_master, tmp_path):
    from conftest import copy_ws

    ws = str(copy_ws(mined_master[0], tmp_path / "ws"))
    r = runner.invoke(app, ["label-request", "-w", str(tmp_path / "empty"), "-q", "--out", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "assay mine" in r.output  # nothing mined: says what to run first
    req, ans = str(tmp_path / "req.jsonl"), str(tmp_path / "ans.jsonl")
    r = runner.invoke(app, ["label-request", "-w", ws, "-q", "--n", "120", "--out", req, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["requested"] == 120
    r = runner.invoke(app, ["label-answer", req, "--out", ans, "-w", ws, "-q"])
    assert r.exit_code == 0 and "answered 120 pairs" in r.output, r.output
    r = runner.invoke(app, ["ingest", "--labels", ans, "-w", ws, "-q", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["tables"]["human_labels"]["accepted"] == 120
    r = runner.invoke(app, ["label-request", "-w", ws, "-q", "--out", str(tmp_path / "r.xlsx")])
    assert r.exit_code == 2 and "csv" in r.output  # an unknown format names the ones there are
