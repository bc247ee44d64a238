from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from assay.store import SCHEMA_VERSION, Store, WorkspaceLocked, WorkspaceMissing


def _products(n: int, start: int = 0, title: str = "t") -> pa.Table:
    return pa.table({"item_id": [f"p{i}" for i in range(start, start + n)],
                     "title": [f"{title} {i}" for i in range(start, start + n)]})


def test_new_workspace_is_migrated_and_reopen_applies_nothing(tmp_path):
    with Store.open(tmp_path / "ws") as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert (tmp_path / "ws" / "artifacts").is_dir()
    with Store.open(tmp_path / "ws") as s:
        assert s.migrate() == []
        assert s.schema_version() == SCHEMA_VERSION


def test_write_modes_and_schema_check(tmp_path):
    with Store.open(tmp_path) as s:
        s.write("products", _products(3))
        s.write("products", pa.table({"item_id": ["p1"], "title": ["new"]}), mode="upsert")
        assert s.count("products") == 3
        assert s.query("SELECT title FROM products WHERE item_id = 'p1'").column(0).to_pylist() == ["new"]
        s.write("products", _products(2, start=10), mode="replace")
        assert s.count("products") == 2
        with pytest.raises(ValueError, match="has no column"):
            s.write("products", pa.table({"item_id": ["x"], "titel": ["oops"]}))
        with pytest.raises(KeyError, match="Unknown table 'nope'. Available"):
            s.write("nope", _products(1))


def test_parquet_round_trip_and_batches(tmp_path):
    with Store.open(tmp_path / "a") as s:
        s.write("products", _products(25_000))
        out = s.export_parquet("products", tmp_path / "p.parquet")
        batches = list(s.iter_batches("SELECT * FROM products ORDER BY item_id", batch_size=10_000))
        assert sum(b.num_rows for b in batches) == 25_000 and len(batches) >= 3
    with Store.open(tmp_path / "b") as s:
        assert s.import_parquet("products", out) == 25_000
        assert s.count("products") == 25_000


def test_failed_transaction_rolls_back(tmp_path):
    with Store.open(tmp_path) as s:
        s.write("products", _products(5))
        with pytest.raises(RuntimeError):
            with s.transaction():
                s.write("products", _products(5, start=100))
                raise RuntimeError("boom")
        assert s.count("products") == 5


def test_read_only_open_of_missing_workspace_is_clear(tmp_path):
    with pytest.raises(WorkspaceMissing, match="no workspace at"):
        Store.open(tmp_path / "nothing", read_only=True)


HOLDER = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    from assay.store import Store
    s = Store.open(sys.argv[1])
    s.write("products", pa.table({"item_id": ["a", "b"], "title": ["first", "second"]}))
    print("ready", flush=True)
    time.sleep(float(sys.argv[2]))
    s.close()
""")


def test_second_writer_gets_clear_error_and_first_writer_data_is_intact(tmp_path):
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(WorkspaceLocked, match=rf"locked by pid {proc.pid}"):
            Store.open(ws)
        with pytest.raises(WorkspaceLocked, match=rf"locked by pid {proc.pid}"):
            Store.open(ws, read_only=True)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    with Store.open(ws, read_only=True) as s:
        assert sorted(s.query("SELECT title FROM products").column(0).to_pylist()) == ["first", "second"]
    with Store.open(ws) as s:  # the lock is free again
        assert s.count("products") == 2


CRASHER = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    from assay.store import Store
    s = Store.open(sys.argv[1])
    with s.transaction():
        s.write("products", pa.table({"item_id": [f"x{i}" for i in range(300000)],
                                      "title": ["doomed"] * 300000}))
        s.con.execute("DELETE FROM products WHERE item_id LIKE 'p%'")
        print("mid-write", flush=True)
        time.sleep(60)
""")


def test_crash_mid_write_leaves_previous_state_readable(tmp_path):
    ws = tmp_path / "ws"
    with Store.open(ws) as s:
        s.write("products", _products(1000))
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(ws)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "mid-write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with Store.open(ws) as s:  # a dead writer's lock is released by the kernel
        assert s.count("products") == 1000
        assert s.count("products", "title = 'doomed'") == 0


def test_runs_are_recorded_with_lineage(tmp_path):
    with Store.open(tmp_path) as s:
        with s.run("unit", {"k": 1}) as run_id:
            pass
        with pytest.raises(ValueError):
            with s.run("unit", {"k": 2}):
                raise ValueError("bad")
        rows = s.query("SELECT run_id, status, config, code_version, ended_at FROM runs ORDER BY started_at").to_pylist()
    assert rows[0]["run_id"] == run_id and rows[0]["status"] == "ok" and rows[0]["ended_at"] is not None
    assert rows[1]["status"] == "failed"
    assert rows[0]["code_version"].startswith("0.")
