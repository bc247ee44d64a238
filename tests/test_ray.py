"""The Ray engine (assay.scale) on one local Ray shared by the module: plan -> execute -> commit, its faults, and
identical grades with the local engine. The cascade is two features judges (one without the encoder, one with the
MiniLM cosine read from the embedding cache), trained on the tiny world: deterministic, and fast on 2 CPU cores."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from assay.annotate import batches, fit, teachers
from assay.config import AnnotateConfig, JudgeConfig, RayConfig
from assay.store import Store

from conftest import copy_ws

ray = pytest.importorskip("ray", reason="the Ray engine's tests need the ray extra: pip install 'assay[ray]'")

pytestmark = pytest.mark.slow

JUDGES = [
    dict(name="feat-lite", kind="features", model="none", trees=40),
    dict(name="feat", kind="features", model="all-MiniLM-L6-v2", max_length=64, batch_size=128, trees=80,
         class_weight="sqrt"),
]

# two actors of half a CPU leave the local Ray's second CPU to the Parquet reader (2 CPUs in all)
RAY_JUDGES = {"feat-lite": {"num_cpus": 0.5}, "feat": {"num_cpus": 0.5}}


def acfg(**kw) -> AnnotateConfig:
    ray_kw = kw.pop("ray", {})
    return AnnotateConfig(judges=[JudgeConfig(**j) for j in JUDGES],
                          ray=RayConfig(**{"shard_pairs": 150, "batch_rows": 64, "judges": RAY_JUDGES, **ray_kw}), **kw)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPUs, a small object store, no dashboard."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_master(mined_master, tmp_path_factory):
    ws = copy_ws(mined_master[0], tmp_path_factory.mktemp("ray") / "ws")
    with Store.open(ws) as store:
        teachers.run(acfg(), store, progress=False)
        fit.run(acfg(), store, progress=False)
    return ws


@pytest.fixture()
def ws(ray_master, tmp_path):
    return copy_ws(ray_master, tmp_path / "ws")


def _scale_run(ws, cfg, **kw):
    from assay.scale import run as scale_run

    with Store.open(ws) as s:
        return scale_run.run(cfg, s, progress=False, **kw)


def _labels(ws) -> list[dict]:
    with Store.open(ws, read_only=True) as s:
        return s.query("SELECT query_id, item_id, grade, decided_by, status, probs FROM labels "
                       "ORDER BY query_id, item_id").to_pylist()


def _pending_keys(ws, cfg) -> set:
    from assay.annotate.pairs import pending_pairs
    from assay.annotate.runtime import cascade_sha

    with Store.open(ws, read_only=True) as s:
        t = pending_pairs(s, cfg.sources, cascade_sha(cfg, s.artifacts), cfg.max_pairs)
    return set(zip(t.column("query_id").to_pylist(), t.column("item_id").to_pylist()))


def _assert_exactly(ws, keys: set) -> None:
    got = [(r["query_id"], r["item_id"]) for r in _labels(ws)]
    assert len(got) == len(set(got)), "a pair labeled twice"
    assert set(got) == keys


def test_ray_grades_equal_local_and_commit_twice_changes_nothing(local_ray, ws, tmp_path):
    other = copy_ws(ws, tmp_path / "local_ws")
    cfg = acfg(max_pairs=400)
    with Store.open(other) as s:  # the local engine reads the mining signals in four windows of 128 pairs
        local = batches.run(cfg.model_copy(update={"batch_size": 64, "signal_window": 100}), s, progress=False)
    out = _scale_run(ws, cfg)
    assert out["engine"] == "ray" and out["annotated"] == local["annotated"] == 400
    assert out["execute"]["shards"] == 3 and out["commit"]["committed"] == ["00000", "00001", "00002"]
    a, b = _labels(other), _labels(ws)
    assert [(r["query_id"], r["item_id"], r["grade"], r["decided_by"], r["status"]) for r in a] == \
           [(r["query_id"], r["item_id"], r["grade"], r["decided_by"], r["status"]) for r in b]
    for x, y in zip(a, b):
        assert x["probs"] == pytest.approx(y["probs"], abs=1e-6)
    assert out["decided_by"] == local["decided_by"]
    with Store.open(ws, read_only=True) as s, Store.open(other, read_only=True) as t:
        votes_sql = "SELECT query_id, item_id, judge, grade, model, prompt_sha FROM label_votes ORDER BY 1, 2, 3"
        assert s.query(votes_sql).to_pylist() == t.query(votes_sql).to_pylist()
        assert s.scalar("SELECT count(*) FROM work_shards WHERE state = 'committed'") == 3
    # commit again: nothing changes
    from assay.scale.commit import commit

    with Store.open(ws) as s:
        again = commit(cfg, s, out["plan"], run_id="again")
        assert again["already"] == 3 and again["committed"] == [] and s.count("labels") == 400
    assert _labels(ws) == b
    # a rerun plans nothing: every pair of the cap is labeled (the next 400 pending ones are a new plan)
    assert _pending_keys(ws, acfg()) and len(_pending_keys(ws, acfg())) == len(_pending_keys(other, acfg()))


def test_worker_killed_mid_shard_completes_without_loss_or_duplicates(local_ray, ws, tmp_path):
    cfg = acfg(max_pairs=300)
    keys = _pending_keys(ws, cfg)
    marker = tmp_path / "killed"
    out = _scale_run(ws, cfg, fault={"kill_once": str(marker), "judge": 1})
    assert marker.exists(), "the hook did not kill a worker"
    assert out["annotated"] == 300 and not out["commit"]["refused"]
    _assert_exactly(ws, keys)


def test_driver_killed_mid_execute_rerun_skips_finished_shards(local_ray, ws):
    from assay.scale.execute import Interrupted, finished
    from assay.scale.plan import read_manifest

    cfg = acfg(max_pairs=450)
    keys = _pending_keys(ws, cfg)
    with pytest.raises(Interrupted):
        _scale_run(ws, cfg, stop_after_shards=1)
    with Store.open(ws, read_only=True) as s:
        assert s.count("labels") == 0  # nothing committed: the driver died before commit
        plan_id = s.scalar("SELECT DISTINCT plan_id FROM work_shards")
        root = s.artifacts / "scale" / plan_id
    plan = read_manifest(root)
    left = [sh for sh in plan["shards"] if not finished(root, sh["shard_id"])]
    assert 1 <= len(plan["shards"]) - len(left) < 3
    from assay import doctor

    shards = next(f for f in doctor.run(ws)["findings"] if f["check"] == "shards")
    assert shards["status"] == "warn" and shards["count"] == 3
    assert f"{3 - len(left)} finished but not committed" in shards["detail"]
    assert "assay annotate --engine ray" in shards["fix"]
    again = _scale_run(ws, cfg)
    assert again["plan"] == str(root)  # the open plan was resumed
    assert again["execute"]["skipped"] == len(plan["shards"]) - len(left)
    # the first judge sees every pair of the shards it runs: only the unfinished shards were judged again
    assert again["judge_calls"]["feat-lite"] == sum(sh["rows"] for sh in left) < 450
    _assert_exactly(ws, keys)


def test_poisoned_pair_fails_alone_and_the_next_plan_picks_it_up(local_ray, ws):
    cfg = acfg(max_pairs=200)
    keys = sorted(_pending_keys(ws, cfg))
    bad = keys[17]
    out = _scale_run(ws, cfg, fault={"poison": [bad]})  # every judge raises on it
    assert out["failed"] == 1 and out["annotated"] == 200
    rows = {(r["query_id"], r["item_id"]): r for r in _labels(ws)}
    assert rows[bad]["status"] == "failed" and rows[bad]["grade"] is None
    assert sum(r["status"] == "ok" for r in rows.values()) == 199
    with Store.open(ws, read_only=True) as s:
        votes = s.exec("SELECT raw, parse_status FROM label_votes WHERE query_id = ? AND item_id = ?", list(bad))
    assert len(votes) == 2
    assert all(status == "failed" and "longer than the model's context" in raw for raw, status in votes)
    # the failed pair is pending again: the next plan (a new one: every shard of this one is committed) holds it
    from assay.scale.plan import plan

    with Store.open(ws) as s:
        nxt = plan(acfg(max_pairs=1), s, run_id="next")
    shard = pq.read_table(nxt / "shards" / "00000.parquet")
    assert str(nxt) != out["plan"] and list(zip(shard["query_id"].to_pylist(), shard["item_id"].to_pylist())) == [bad]


def _rewrite(out_dir, fn) -> None:
    """Rewrite a finished shard's output through ``fn`` (table -> table), as a worker of another cascade or a bug
    would have, with a _SUCCESS that matches the new file."""
    from assay.scale.plan import file_sha256

    success = json.loads((out_dir / "_SUCCESS.json").read_text())
    f = out_dir / success["file"]
    tbl = fn(pq.read_table(f))
    os.unlink(f)
    pq.write_table(tbl, f)
    success["sha256"] = file_sha256(f)
    (out_dir / "_SUCCESS.json").write_text(json.dumps(success))


def test_commit_refuses_foreign_miscounted_and_partial_shards(local_ray, ws):
    import pyarrow as pa

    from assay.scale.cluster import connect
    from assay.scale.commit import commit
    from assay.scale.execute import execute, shard_out
    from assay.scale.plan import plan

    cfg = acfg(max_pairs=600)
    connect(cfg.ray)
    with Store.open(ws) as s:
        plan_dir = plan(cfg, s, run_id="test")
    ex = execute(plan_dir, cfg.ray)
    assert ex["done"] == 4
    o = [shard_out(plan_dir, f"{k:05d}") for k in range(4)]
    _rewrite(o[0], lambda t: t.set_column(t.column_names.index("cascade_sha"), "cascade_sha",
                                          pa.array(["another-cascade"] * t.num_rows)))
    _rewrite(o[1], lambda t: t.slice(1))
    (o[2] / "_SUCCESS.json").unlink()  # a partial shard: its attempt file exists, _SUCCESS does not
    success = json.loads((o[3] / "_SUCCESS.json").read_text())
    (o[3] / "_SUCCESS.json").write_text(json.dumps({**success, "plan_id": "plan-of-elsewhere"}))
    with Store.open(ws) as s:
        c = commit(cfg, s, plan_dir, run_id="test")
        assert c["committed"] == [] and s.count("labels") == 0
        assert set(c["refused"]) == {"00000", "00001", "00003"} and c["unfinished"] == ["00002"]
        assert "another-cascade" in c["refused"]["00000"]
        assert "149 distinct pairs, the plan has 150" in c["refused"]["00001"]
        assert "plan-of-elsewhere" in c["refused"]["00003"]
        notes = dict(s.exec("SELECT shard_id, note FROM work_shards WHERE note IS NOT NULL"))
        assert set(notes) == {"00000", "00001", "00003"}
        assert s.scalar("SELECT count(*) FROM work_shards WHERE state = 'committed'") == 0


def test_bad_address_fails_fast_and_writes_nothing(ws):
    import time

    from assay.scale.cluster import RayUnavailable, probe

    t0 = time.perf_counter()
    with pytest.raises(RayUnavailable, match="did not answer within 2 s"):
        probe("127.0.0.1:9", 2.0)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(RayUnavailable, match="not host:port"):
        probe("nonsense", 1.0)
    with pytest.raises(RayUnavailable, match="did not answer"):
        _scale_run(ws, acfg(ray={"connect_timeout_s": 1.0}), address="127.0.0.1:9")
    with Store.open(ws, read_only=True) as s:
        assert s.count("work_shards") == 0 and s.count("labels") == 0 and s.count("runs", "stage = 'annotate'") == 0


def test_no_ray_installed_names_the_extra(monkeypatch):
    import sys

    from assay.scale.cluster import RayUnavailable, require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailable, match=r"assay\[ray\]"):
        require_ray()


def zero_tail_text() -> str:
    """A text whose 16-byte digest ends in a zero byte (numpy's bytes scalars drop it: a 15-byte key once broke the
    Ray encoders on a real 3,000-item catalog)."""
    import numpy as np

    from assay.text import text_shas

    return next(t for t in (f"ray test item {i} oak shelf" for i in range(100_000))
                if np.ascontiguousarray(text_shas([t])).tobytes()[-1] == 0)


def test_catalog_encoding_on_ray_fills_the_embedding_cache(local_ray, tmp_path):
    import numpy as np

    from assay.encode import Encoder, encode_cached
    from assay.scale.encode import warm_cache

    texts = [f"ray test item {i} walnut side table with drawer" for i in range(39)] + [zero_tail_text(), "ray test "
                                                                                       "item 0 walnut side table with drawer"]
    enc = Encoder("all-MiniLM-L6-v2", max_seq_length=64, batch_size=16)
    st = warm_cache(enc, "all-MiniLM-L6-v2", texts, tmp_path, num_cpus=0.5, batch_rows=16)
    assert st["texts"] == 41 and st["cached"] == 0 and st["encoded"] == 40  # each distinct text once
    vecs, again = encode_cached(enc, texts, tmp_path)
    assert again["encoded"] == 0 and again["cached"] == 41  # mining and export-index read Ray's vectors as hits
    assert np.allclose(vecs, enc.encode(texts), atol=1e-5)
    assert warm_cache(enc, "all-MiniLM-L6-v2", texts, tmp_path)["encoded"] == 0


def test_item_tower_encoding_on_ray_fills_the_checkpoint_vector_cache(local_ray, tmp_path, monkeypatch):
    """`export-index` with serve.engine ray: Ray actors load the checkpoint and write its item vectors into the cache
    that assay.dense.item_vectors (export-index, evaluate) reads; those then encode nothing."""
    import numpy as np

    from assay import dense
    from assay.scale.encode import warm_item_vectors
    from assay.trainer.model import TwoTower

    TwoTower.from_base("all-MiniLM-L6-v2", projection_dim=32, query_max_length=16, item_max_length=32).save(
        tmp_path / "ck")
    model = TwoTower.load(tmp_path / "ck")
    texts = [f"ray item {i} | oak bookcase with {i % 5 + 2} shelves" for i in range(29)] + [zero_tail_text(), "ray "
                                                                                "item 0 | oak bookcase with 2 shelves"]
    st = warm_item_vectors(model, tmp_path / "ck", texts, tmp_path / "art", num_cpus=0.5, batch_rows=8)
    assert st["texts"] == 31 and st["cached"] == 0 and st["encoded"] == 30
    want = dense.encode_items(model, texts)

    def no_encoding(*a, **k):
        raise AssertionError("item_vectors encoded what Ray had cached")

    monkeypatch.setattr(dense, "encode_items", no_encoding)
    vecs = dense.item_vectors(model, texts, tmp_path / "art", chunk=64, progress=False)
    assert np.allclose(vecs, want, atol=1e-5)
    assert warm_item_vectors(model, tmp_path / "ck", texts, tmp_path / "art")["encoded"] == 0
