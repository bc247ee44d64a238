"""export-index and search: a real FAISS index over the tiny catalog, bound to a real MiniLM two-tower checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from assay.config import AssayConfig, ServeConfig
from assay.serving import index as serving
from assay.serving.index import Served
from assay.store import Store
from assay.trainer.model import TwoTower

from conftest import copy_ws

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(mined_master, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ws = copy_ws(mined_master[0], root / "ws")
    ckpt = root / "ckpt"
    TwoTower.from_base("all-MiniLM-L6-v2").save(ckpt)
    cfg = AssayConfig(serve=ServeConfig(recall_sample=50))
    with Store.open(ws) as s:
        with pytest.raises(ValueError, match="assay train"):
            serving.export(cfg, s, progress=False)  # no trained checkpoint and none named
        flat = serving.export(cfg, s, checkpoint=str(ckpt), progress=False)
        hnsw = serving.export(AssayConfig(serve=ServeConfig(index="hnsw", recall_sample=50, ef_search=64)), s,
                              checkpoint=str(ckpt), progress=False)
    return ws, ckpt, flat, hnsw


def test_export_writes_a_manifest_bound_to_the_checkpoint(exported):
    ws, ckpt, flat, hnsw = exported
    man = json.loads((ws / "artifacts/index" / flat["index_id"] / "manifest.json").read_text())
    assert man["checkpoint_sha"] == json.loads((ckpt / "twotower.json").read_text())["sha"]
    assert man["kind"] == "flat" and man["recall@100"] == 1.0 and man["recall_queries"] == 50
    assert man["n_items"] == 3000 and man["dim"] == 384 and man["text_template"].startswith("item-text/")
    assert hnsw["kind"] == "hnsw" and hnsw["factory"] == "HNSW32" and 0.9 <= hnsw["recall@100"] <= 1.0
    assert hnsw["encode_seconds"] < flat["encode_seconds"]  # the item vectors came from the cache
    with Store.open(ws, read_only=True) as s:
        assert {r[0] for r in s.exec("SELECT kind FROM indexes")} == {"flat", "hnsw"}


def test_search_dense_and_hybrid_and_bad_input(exported):
    ws, _, flat, _ = exported
    with Store.open(ws, read_only=True) as s:
        served = Served(AssayConfig(), s, flat["index_id"])
        text = s.exec("SELECT text FROM queries ORDER BY query_id LIMIT 1")[0][0]
        hits = served.search(text, k=20)
        assert len(hits) == 20 and all(h.title and h.source == "dense" for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert len({h.item_id for h in hits}) == 20
        hyb = served.search(text, k=20, mode="hybrid")
        assert len(hyb) == 20 and len({h.item_id for h in hyb}) == 20
        assert {h.source for h in hyb} <= {"dense", "bm25", "both"} and any(h.source != "dense" for h in hyb)
        for q, k, mode, msg in [("  ", 10, "dense", "empty"), ("x" * 600, 10, "dense", "characters"),
                                (text, 0, "dense", "between 1 and 1000"), (text, 1001, "dense", "between 1 and 1000"),
                                (text, 10, "sparse", "unknown mode")]:
            with pytest.raises(ValueError, match=msg):
                served.search(q, k, mode)


def test_search_refuses_an_index_whose_checkpoint_changed(exported, tmp_path):
    ws, ckpt, flat, _ = exported
    ws2 = copy_ws(ws, tmp_path / "ws")
    moved = tmp_path / "ckpt"
    model = TwoTower.load(ckpt)
    with torch.no_grad():
        next(model.query_tower.parameters()).add_(0.01)
    model.save(moved)
    man_file = ws2 / "artifacts/index" / flat["index_id"] / "manifest.json"
    man = json.loads(man_file.read_text())
    man["checkpoint_path"] = str(moved)
    man_file.write_text(json.dumps(man))
    with Store.open(ws2) as s:
        s.exec("UPDATE indexes SET path = ? WHERE index_id = ?", [str(man_file.parent), flat["index_id"]])
        with pytest.raises(ValueError, match="assay export-index"):
            Served(AssayConfig(), s, flat["index_id"])


def test_multi_head_search_rescoring_matches_exact_soft_dot():
    import faiss

    from assay.trainer.model import soft_dot

    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    q = rng.normal(size=(3, 2, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    index = faiss.IndexFlatIP(16)
    index.add(items)
    scores, rows = serving.search_index(index, q, 500, beta=10.0)  # every item is a candidate: exact
    want = soft_dot(torch.from_numpy(q), torch.from_numpy(items), 10.0).numpy()
    for r in range(3):
        assert rows[r][0] == int(np.argmax(want[r]))
        np.testing.assert_allclose(scores[r], np.sort(want[r])[::-1], rtol=1e-5, atol=1e-5)


def test_search_from_the_cli(exported, tmp_path):
    from typer.testing import CliRunner

    from assay.cli import app

    ws = str(copy_ws(exported[0], tmp_path / "ws"))
    runner = CliRunner()
    r = runner.invoke(app, ["search", "velvet sofa", "-w", ws, "-k", "5", "--json", "-q"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)  # progress bars of the model load go to stderr
    assert len(rows) == 5 and all(set(h) == {"item_id", "title", "score", "source"} for h in rows)
    r = runner.invoke(app, ["search", "velvet sofa", "-w", ws, "-k", "0", "-q"])
    assert r.exit_code == 2 and "between 1 and 1000" in r.output
