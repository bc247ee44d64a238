"""Hardening (issue 27): secrets never recorded, logged or printed; doctor reports the checks it could not run;
exports check their optional dependencies before the work and leave no partial files; shipped configs run on
an ordinary CPU."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from assay.store import Store, redact, redact_text

from conftest import LoopbackServer

REPO = Path(__file__).resolve().parents[1]

# one distinct secret in each spot the issue names
USERINFO = "pw-userinfo-7f3a"
API_KEY_PARAM = "sk-param-91c0"
TOKEN_PARAM = "tok-query-5d2e"
CLIENT_KEY = "sk-client-bearer-44ab"  # the API key the client sends as "Authorization: Bearer ..."
UPSTREAM_BEARER = "upstream-bearer-8e1f"  # a bearer string only the server's error text carries
SECRETS = (USERINFO, API_KEY_PARAM, TOKEN_PARAM, CLIENT_KEY, UPSTREAM_BEARER)


class EchoingFailingServer(LoopbackServer):
    """A loopback HTTP server that answers every request 500 and echoes what a careless proxy would: the request's
    Authorization header, the base URL it was configured with (credentials and query included), and another
    bearer string."""

    def __init__(self):
        super().__init__()
        self.base_url = f"http://user:{USERINFO}@127.0.0.1:{self.port}/v1?api_key={API_KEY_PARAM}&token={TOKEN_PARAM}"

    def answer(self, method, path, headers, body):
        msg = (f"upstream failed for {self.base_url} (path {path}); request had Authorization: "
               f"{headers.get('Authorization')}; upstream said: Bearer {UPSTREAM_BEARER} rejected")
        return 500, {"error": {"message": msg}}


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_redact_text_removes_each_kind_of_secret_and_keeps_the_rest():
    cases = {
        f"https://alice:{USERINFO}@llm.example.com/v1": "https://***@llm.example.com/v1",
        f"http://h/v1?api_key={API_KEY_PARAM}&x=1": "http://h/v1?api_key=***&x=1",
        f"GET /v1?token={TOKEN_PARAM} HTTP/1.1": "GET /v1?token=*** HTTP/1.1",
        f"Error 500: {{'message': 'Authorization: Bearer {CLIENT_KEY}'}}": "Error 500: {'message': 'Authorization: Bearer ***'}",
        f"upstream said: bearer {UPSTREAM_BEARER}, retry": "upstream said: bearer ***, retry",
        f'{{"authorization": "Basic {USERINFO}"}}': '{"authorization": "Basic ***"}',
        "plain text = fine, max_tokens=48, 3 tokens": "plain text = fine, max_tokens=48, 3 tokens",
    }
    for raw, want in cases.items():
        assert redact_text(raw) == want, raw
    # nested structures: secret-named keys and every string inside
    red = redact({"judges": [{"base_url": f"http://u:{USERINFO}@h/v1", "api_key": CLIENT_KEY,
                              "api_key_env": "OPENAI_API_KEY"}], "error": f"Bearer {UPSTREAM_BEARER}"})
    assert not _leaks(json.dumps(red)) and red["judges"][0]["api_key_env"] == "OPENAI_API_KEY"


def test_secrets_from_a_failing_endpoint_reach_no_store_log_or_cli_output(tmp_path, monkeypatch, caplog, capsys):
    """A prompted judge on a real loopback server that fails with 500 and echoes the credentials: the failed
    pairs' error text, the logs (the library's records, and what the CLI's handler prints), the runs table (config,
    summary, a failed run's error), the database file, an export of what was stored and `assay config show` hold
    none of the secrets."""
    from typer.testing import CliRunner

    from assay import cli
    from assay.annotate.backends.openai import OpenAIBackend
    from assay.annotate.base import FAILED, Pair
    from assay.annotate.judges.prompted import PromptedJudge
    from assay.audit.export import write_batches
    from assay.config import JudgeConfig

    monkeypatch.setenv("ASSAY_TEST_LLM_KEY", CLIENT_KEY)
    caplog.set_level(logging.DEBUG)
    with EchoingFailingServer() as srv:
        cfg = JudgeConfig(name="remote", kind="prompted", model="fake", backend="openai", base_url=srv.base_url,
                          api_key_env="ASSAY_TEST_LLM_KEY", max_retries=1, timeout_s=10, max_tokens=8)
        backend = OpenAIBackend(cfg, backoff_s=0.01, max_backoff_s=0.02)
        out = PromptedJudge(cfg, backend=backend).predict([Pair("q1", "i1", "water bottle", "Steel bottle 1 l")])
    assert out.parse_status == [FAILED] and "500" in out.raw[0]
    assert backend.stats["requests"] == 2  # the server was reached (and retried): its answer is what is tested
    assert not _leaks(out.raw[0]), out.raw[0]
    assert "***" in out.raw[0]
    # assay's own records are redacted at the source (third-party records, such as httpx's request line, are
    # redacted by the CLI's handler: below)
    library_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("assay"))
    assert "prompt failed" in library_logs and not _leaks(library_logs), library_logs

    # the CLI's log handler: whatever a library logs (here, raw text with every secret) is printed redacted
    cli._setup_logging(quiet=False)
    try:
        logging.getLogger("assay.some.library").warning("calling %s with Authorization: Bearer %s; %s",
                                                         srv.base_url, CLIENT_KEY, f"bearer {UPSTREAM_BEARER}")
        logging.getLogger("assay.some.library").info("error: %s", out.raw[0])
    finally:
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    printed = capsys.readouterr()
    flat = "".join((printed.out + printed.err).split())  # rich may wrap a long line anywhere
    assert "callinghttp://***@127.0.0.1" in flat and not _leaks(flat), printed.err

    # the store: the run's config, its summary, and a failed run's error
    ws = tmp_path / "ws"
    judge_cfg = cfg.model_dump(mode="json")
    with Store.open(ws) as s:
        with s.run("annotate", {"annotate": {"judges": [judge_cfg]}}) as run_id:
            s.finish_run(run_id, {"failed": 1, "errors": list(out.raw), "endpoint": srv.base_url})
        with pytest.raises(RuntimeError):
            with s.run("annotate", {"annotate": {"judges": [judge_cfg]}}):
                raise RuntimeError(f"endpoint {srv.base_url} refused Authorization: Bearer {CLIENT_KEY}")
        stored = s.query("SELECT * FROM runs").to_pylist()
        assert len(stored) == 2 and any(r["status"] == "failed" for r in stored)
        # an export of what the store holds
        write_batches(iter([s.query("SELECT run_id, stage, config, summary FROM runs").to_batches()[0]]),
                      tmp_path / "exports" / "runs.jsonl", "jsonl")
    stored_text = json.dumps(stored, default=str)
    assert "127.0.0.1" in stored_text and "***" in stored_text and not _leaks(stored_text), stored_text
    db_bytes = (ws / "assay.duckdb").read_bytes()
    assert not [x for x in SECRETS if x.encode() in db_bytes]
    exported = (tmp_path / "exports" / "runs.jsonl").read_text()
    assert exported.count("\n") == 2 and not _leaks(exported)

    # `assay config show` with the endpoint in a config file, and `assay runs --json`
    conf = tmp_path / "remote.yaml"
    conf.write_text(yaml.safe_dump({"annotate": {"judges": [{k: v for k, v in judge_cfg.items() if v is not None}]}}))
    r = CliRunner().invoke(cli.app, ["config", "show", "-c", str(conf)])
    assert r.exit_code == 0, r.output
    assert "127.0.0.1" in r.output and "api_key_env: ASSAY_TEST_LLM_KEY" in r.output and not _leaks(r.output), \
        r.output
    r = CliRunner().invoke(cli.app, ["runs", "-w", str(ws), "--json", "-q"])
    assert r.exit_code == 0 and not _leaks(r.output)


def test_doctor_reports_a_check_that_failed_instead_of_ok(labeled_workspace, monkeypatch):
    """An SQL error inside a check is an 'error' finding that names it, never 'ok'."""
    from assay import doctor
    from assay.annotate import pairs

    ok = doctor.run(labeled_workspace)
    assert {f["check"]: f["status"] for f in ok["findings"]}["annotation"] in ("ok", "warn")

    monkeypatch.setattr(pairs, "work_sql", lambda tables: "SELECT query_id, item_id FROM no_such_table")
    res = doctor.run(labeled_workspace)
    ann = next(f for f in res["findings"] if f["check"] == "annotation")
    assert ann["status"] == "error" and "no_such_table" in ann["detail"], ann
    assert res["status"] == "error"


def _batches(n_batches: int, consumed: list, fail_after: int | None = None):
    for i in range(n_batches):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("the database went away mid-export")
        consumed.append(i)
        yield pa.RecordBatch.from_pylist([{"query_id": f"q{i}", "item_id": f"i{j}", "grade": j % 5}
                                          for j in range(100)])


def test_hf_export_without_datasets_fails_before_reading_a_row_and_leaves_nothing(tmp_path, monkeypatch):
    from assay.audit import export

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    consumed: list = []
    out = tmp_path / "out" / "hf"
    with pytest.raises(ValueError, match=r"pip install 'assay\[export\]'"):
        export.write_batches(_batches(5, consumed), out, "hf")
    assert consumed == []  # failed before the work
    assert not out.exists() and list(out.parent.glob("*")) == []


def test_hf_export_command_checks_datasets_before_it_starts(labeled_workspace, tmp_path, monkeypatch):
    from assay.audit import export
    from assay.config import ExportConfig

    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setattr(export, "rows", lambda *a, **k: pytest.fail("rows were read before the dependency check"))
    with Store.open(labeled_workspace) as s:
        with pytest.raises(ValueError, match="datasets"):
            export.run(ExportConfig(), s, tmp_path / "hf", fmt="hf", progress=False)
        assert s.scalar("SELECT count(*) FROM runs WHERE stage = 'export'") == 0
    assert list(tmp_path.glob("hf*")) == []


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_export_that_fails_midway_leaves_no_partial_file(tmp_path, fmt):
    from assay.audit import export

    consumed: list = []
    out = tmp_path / f"labels.{fmt}"
    with pytest.raises(RuntimeError, match="went away"):
        export.write_batches(_batches(5, consumed, fail_after=2), out, fmt)
    assert consumed == [0, 1]
    assert list(tmp_path.glob("*")) == []


def test_shipped_configs_run_on_this_cpu():
    """Every configs/*.yaml loads and passes the bf16 check on this CPU: `precision: auto` instead of bf16."""
    from assay.config import load_config
    from assay.encode import check_bf16

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path, [])
        check_bf16(cfg.train.precision, cfg.models.device, f"{path.name}: train.precision")
        check_bf16(cfg.mining.ann.precision, cfg.models.device, f"{path.name}: mining.ann.precision")
        for j in cfg.annotate.judges:
            check_bf16(j.precision, cfg.models.device, f"{path.name}: judges[{j.name}].precision")
    assert load_config(REPO / "configs/eval20k.yaml", []).train.precision == "auto"


def test_auto_precision_is_bf16_where_the_cpu_has_it_and_fp32_elsewhere(monkeypatch):
    import torch

    from assay.trainer import loop

    for native in (True, False):
        monkeypatch.setattr(loop, "native_cpu_bf16", lambda native=native: native)
        with loop._autocast("cpu", "auto"):
            y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
        assert y.dtype == (torch.bfloat16 if native else torch.float32)
    with loop._autocast("cpu", "fp32"):
        assert torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4)).dtype == torch.float32


def test_reports_are_written_redacted(tmp_path):
    from assay.reporting import write_report

    url = f"http://user:{USERINFO}@h:8000/v1?api_key={API_KEY_PARAM}&token={TOKEN_PARAM}"
    out = write_report(tmp_path / "rep", "agreement", {"judges": [{"name": "remote", "base_url": url}],
                                                       "errors": [f"500: Authorization: Bearer {CLIENT_KEY}"]},
                       [("failures", f"<p>{url} said bearer {UPSTREAM_BEARER}</p>")])
    text = (tmp_path / "rep" / "report.json").read_text() + out.read_text()
    assert "h:8000" in text and "remote" in text and not _leaks(text), text
