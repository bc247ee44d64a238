from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from assay.config import MiningConfig, ModelsConfig
from assay.mining import clicks as click_mod
from assay.mining import run as mine
from assay.mining.bm25 import BM25Index
from assay.store import Store

from conftest import MINING_FAST as FAST
from conftest import kill9_script


@pytest.fixture()
def mined(mined_master, tmp_path):
    ws = tmp_path / "mined_ws"
    shutil.copytree(mined_master[0], ws, ignore=shutil.ignore_patterns("assay.lock"))
    return ws, mined_master[1]


def test_federation_invariants(mined):
    ws, summary = mined
    with Store.open(ws, read_only=True) as s:
        assert s.count("candidates") == summary["candidates"] > 0
        assert s.scalar("""SELECT count(*) FROM candidates WHERE n_channels !=
                           (rank_bm25 IS NOT NULL)::INT + (rank_ann IS NOT NULL)::INT + (rank_click IS NOT NULL)::INT""") == 0
        assert s.scalar("SELECT count(*) FROM candidates WHERE prior < 0 OR prior > 1 OR prior IS NULL") == 0
        assert s.scalar("SELECT count(*) FROM (SELECT query_id, item_id FROM candidates GROUP BY 1, 2 HAVING count(*) > 1)") == 0
        # the default prior (rrf normalised per query) gives each query's best item prior 1
        assert s.scalar("SELECT min(m) FROM (SELECT max(prior) AS m FROM candidates GROUP BY query_id)") == pytest.approx(1.0)
        for c in ("bm25", "ann", "click"):
            # ranks of a channel within a query are exactly 1..n, and scores do not increase with rank
            bad = s.scalar(f"""SELECT count(*) FROM (
                    SELECT query_id, count(*) AS n, min(rank_{c}) AS lo, max(rank_{c}) AS hi, count(DISTINCT rank_{c}) AS d
                    FROM candidates WHERE rank_{c} IS NOT NULL GROUP BY query_id)
                WHERE lo != 1 OR hi != n OR d != n OR n > 100""")
            assert bad == 0, c
            inversions = s.scalar(f"""SELECT count(*) FROM (
                    SELECT score_{c} - lag(score_{c}) OVER (PARTITION BY query_id ORDER BY rank_{c}) AS d
                    FROM candidates WHERE rank_{c} IS NOT NULL) WHERE d > 1e-5""")
            assert inversions == 0, c
        # more channels agreeing -> higher prior on average
        means = dict(s.exec("SELECT n_channels, avg(prior) FROM candidates GROUP BY 1"))
        assert means[3] > means[2] > means[1]
        assert s.scalar("SELECT count(DISTINCT run_id) FROM candidates") == 1
        assert s.count("channel_hits") == 0 and s.count("mining_progress") == 0  # cleaned after federation


def test_union_recalls_more_than_any_channel(mined):
    _, summary = mined
    rec = summary["report"]["recall"]
    assert rec["source"] == "truth"
    best_single = max(rec["all"][c]["micro"] for c in ("bm25", "ann", "click"))
    assert rec["all"]["union"]["micro"] > best_single + 0.03
    # the semantic channel finds relevant items that BM25 misses for synonym and typo queries
    assert rec["by_kind"]["synonym"]["ann_not_bm25"] > 0
    assert rec["by_kind"]["typo"]["ann_not_bm25"] > 0


def test_negatives_are_outside_candidates_and_in_band(mined):
    ws, _ = mined
    with Store.open(ws, read_only=True) as s:
        assert s.count("negatives", "kind = 'token_sim'") > 0 and s.count("negatives", "kind = 'random'") > 0
        assert s.scalar("""SELECT count(*) FROM negatives n JOIN candidates c USING (query_id, item_id)""") == 0
        lo, hi = s.exec("SELECT min(similarity), max(similarity) FROM negatives WHERE kind = 'token_sim'")[0]
        assert 0.2 <= lo and hi <= 0.6
        assert s.scalar("SELECT count(*) FROM (SELECT query_id, item_id FROM negatives GROUP BY 1, 2 HAVING count(*) > 1)") == 0


# the fourth batch is searched but never committed
KILLER = kill9_script("assay.mining.run", "_write_batch", 4, """
    from assay.config import MiningConfig, ModelsConfig
    from assay.store import Store
    with Store.open(sys.argv[1]) as s:
        target.run(MiningConfig.model_validate_json(sys.argv[2]), s, ModelsConfig(backend="torch"), progress=False)
""")

def test_kill9_mid_mining_resumes_to_the_uninterrupted_result(mined, tiny_workspace):
    """`kill -9` between two batch commits, then a re-run: the committed batches are kept, the rest are mined,
    and candidates and negatives equal those of an uninterrupted run (the fixture, also on torch)."""
    ws_full, full = mined
    cfg = MiningConfig(**FAST)
    # the catalog's vectors as the uninterrupted run left them in its embedding cache (keyed by text digest): the
    # killed run reuses them instead of encoding 3,000 items again (about 45 s), and what it commits, and redoes after
    # the kill, is the same
    shutil.copytree(ws_full / "artifacts" / "embeddings", tiny_workspace / "artifacts" / "embeddings")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny_workspace), cfg.model_dump_json()],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with Store.open(tiny_workspace) as s:
        assert s.count("mining_progress") == 3
        assert s.count("candidates") == 0
        assert s.scalar("SELECT status FROM runs WHERE stage = 'mine'") == "interrupted"
        summary = mine(cfg, s, ModelsConfig(backend="torch"), progress=False)
        assert summary["resumed_batches"] == 3
        assert (summary["candidates"], summary["negatives"]) == (full["candidates"], full["negatives"])
        cols = "query_id, item_id, rank_bm25, rank_ann, rank_click, prior"
        got = s.query(f"SELECT {cols} FROM candidates ORDER BY 1, 2")
        got_neg = s.query("SELECT * EXCLUDE (run_id) FROM negatives ORDER BY ALL")
        assert s.scalar("SELECT count(*) FROM (SELECT query_id, item_id FROM candidates GROUP BY 1, 2 "
                        "HAVING count(*) > 1)") == 0
    with Store.open(ws_full, read_only=True) as s:
        want = s.query(f"SELECT {cols} FROM candidates ORDER BY 1, 2")
        want_neg = s.query("SELECT * EXCLUDE (run_id) FROM negatives ORDER BY ALL")
    assert got.equals(want)
    assert got_neg.equals(want_neg)


def test_embedding_cache_skips_unchanged_items(mined):
    ws, first = mined
    with Store.open(ws) as s:
        # 500 of the 3,000 products: the cache's behaviour, not the encoder's speed, is what this test checks
        s.exec("DELETE FROM products WHERE item_id NOT IN (SELECT item_id FROM products ORDER BY item_id LIMIT 500)")
        n = s.count("products")
        assert n == 500
        # The fixture encoded on torch; the default backend (ONNX) is a different encoder, so the cache key differs
        # and everything is encoded once, then reused. (The int8 guard on 64 sampled texts, not 256: the guard's
        # own tests are test_inference.py's.)
        auto = ModelsConfig(guard_sample=64)
        onnx = mine(MiningConfig(**FAST, channels=["ann"]), s, auto, progress=False)
        assert onnx["item_embeddings"]["encoded"] == n
        again = mine(MiningConfig(**FAST, channels=["ann"]), s, auto, progress=False)
        assert again["item_embeddings"]["encoded"] == 0 and again["item_embeddings"]["cached"] == n
        back = mine(MiningConfig(**FAST, channels=["ann"]), s, ModelsConfig(backend="torch"), progress=False)
        assert back["item_embeddings"]["encoded"] == 0 and back["item_embeddings"]["cached"] == n
        s.exec("UPDATE products SET title = title || ' (renamed)' WHERE item_id = (SELECT min(item_id) FROM products)")
        third = mine(MiningConfig(**FAST, channels=["ann"]), s, auto, progress=False)
        assert third["item_embeddings"]["encoded"] == 1
        assert third["ann_index"]["reused"] is False  # the catalog changed, so the index was rebuilt


def test_bm25_char_grams_tolerate_typos():
    docs = ["stainless coffee maker 12 cup", "solid oak coffee table", "velvet sofa"]
    stem = BM25Index.build(docs, "stem", backend="numpy")
    both = BM25Index.build(docs, "stem+char3", backend="numpy")
    assert stem.search(["cofee makr"], 3).idx[0][0] == -1  # no stem matches the misspelling
    assert both.search(["cofee makr"], 3).idx[0][0] == 0
    assert both.search(["coffee table"], 3).idx[0][0] == 1


def test_bm25_numba_search_uses_the_cached_kernel_and_threads_change_no_hit():
    """The numba backend searches with bm25s's serial kernel compiled into numba's on-disk cache (one compile per
    machine, not per process), queries split over threads; the hits are the same on 1 and 3 threads and the same
    as one call of bm25s's retrieve gives (query order, ties, empty queries and k past the catalog included)."""
    from bm25s.numba import retrieve_utils as ru

    from assay.mining.bm25 import cached_numba_kernel

    rng = np.random.default_rng(0)
    words = ["red", "sofa", "leather", "chair", "oak", "table", "lamp", "velvet", "rug", "desk"]
    docs = [" ".join(rng.choice(words, 5)) + f" model{i % 40}" for i in range(600)]
    queries = [" ".join(rng.choice(words, 2)) for _ in range(97)] + ["", "zzzz", "model7 oak"]
    index = BM25Index.build(docs, backend="numba")
    one, three = index.search(queries, 20, threads=1), index.search(queries, 20, threads=3)
    assert cached_numba_kernel() and ru._retrieve_internal_jitted_serial._cache.__class__.__name__ == "FunctionCache"
    assert np.array_equal(one.idx, three.idx) and np.array_equal(one.scores, three.scores)
    assert (one.idx[97:99] == -1).all() and (one.idx[:97, 0] >= 0).all()
    toks = [index.tokenize(q) for q in queries]
    keep = [i for i, t in enumerate(toks) if t]
    d, sc = index.retriever.retrieve([toks[i] for i in keep], k=20, show_progress=False, n_threads=1)
    d, sc = np.asarray(d), np.asarray(sc)
    assert np.array_equal(np.where(sc > 0, d, -1), one.idx[keep])
    assert index.search(["red sofa"], 1000, threads=2).idx.shape == (1, 1000)  # k past the catalog: padded with -1


def test_bm25_index_build_prints_no_debug_lines(caplog):
    """bm25s turns its own logger to DEBUG while indexing; assay keeps only its warnings."""
    import logging

    with caplog.at_level(logging.DEBUG):
        BM25Index.build(["red ceramic mug", "blue velvet sofa", "oak dining table"] * 4)
    assert not [r for r in caplog.records if r.name.startswith("bm25s") and r.levelno < logging.WARNING]


def test_click_scores_are_position_debiased():
    # the same query: item a shown at rank 1 (where everything gets clicks), item b at rank 8
    eng = pa.table({
        "query_id": ["q", "q", "o", "o"], "item_id": ["a", "b", "c", "d"],
        "impressions": [1000, 1000, 1000, 1000], "clicks": [300, 80, 310, 40], "position": [1.0, 8.0, 1.0, 8.0],
    })
    ix = click_mod.build_engagement_index(eng, {"q": 0, "o": 1}, {"a": 0, "b": 1, "c": 2, "d": 3},
                                          alpha=1.0, min_clicks=1, max_position=50)
    nb = click_mod.QueryNeighbours(["q", "o"], None, np.array([True, True]), 0, 0.5)
    hits = click_mod.search(ix, nb, np.array([0]), 10, 0.5)
    # raw clicks favour a (300 vs 80) but b is clicked 1.3x its expectation at rank 8, a 0.98x at rank 1
    assert hits.idx[0][:2].tolist() == [1, 0]


def test_click_channel_lends_items_to_similar_queries_without_engagement():
    eng = pa.table({"query_id": ["q0", "q0"], "item_id": ["a", "b"], "impressions": [50, 50], "clicks": [9, 3],
                    "position": [1.0, 2.0]})
    texts = ["blue velvet sofa", "blue velvet sofas", "garden hose"]
    ix = click_mod.build_engagement_index(eng, {"q0": 0, "q1": 1, "q2": 2}, {"a": 0, "b": 1}, 1.0, 1, 50)
    has = np.diff(ix.offsets) > 0
    nb = click_mod.QueryNeighbours(texts, None, has, n_neighbors=5, min_similarity=0.5)
    hits = click_mod.search(ix, nb, np.array([1, 2]), 10, neighbor_weight=0.5)
    assert set(hits.idx[0][hits.idx[0] >= 0].tolist()) == {0, 1}  # the tail query borrows q0's items
    assert (hits.idx[1] < 0).all()  # an unrelated query borrows nothing


def test_mining_report_on_tiny_world_reports_overlap_and_coverage(mined):
    _, summary = mined
    rep = summary["report"]
    assert set(rep["overlap"]) == {"bm25&ann", "bm25&click", "ann&click"}
    assert all(0 <= v["jaccard"] <= v["overlap"] <= 1 for v in rep["overlap"].values())
    assert rep["candidates_per_query"]["min"] >= 1
    assert sum(r["queries"] for r in rep["click_coverage"]) == rep["candidates_per_query"]["of_queries"]


def test_bad_mining_config_and_empty_workspace_errors(tmp_path):
    with pytest.raises(ValueError, match="channels must"):
        MiningConfig(channels=[])
    with Store.open(tmp_path / "empty") as s:
        with pytest.raises(ValueError, match="no products; run `assay ingest` first"):
            mine(MiningConfig(), s, progress=False)


def test_embedding_cache_index_finds_every_shard_and_what_another_process_adds(tmp_path):
    """The embedding cache keeps one sorted index of its shards per process (a lookup read every shard file before,
    which grew with lookups x shards): vectors come back from the right shard, the first shard wins a digest two
    shards hold, a shard another process writes is found, and a folder made again is a new cache."""
    import subprocess
    import sys

    from assay.encode import EmbeddingCache
    from assay.text import text_shas

    rng = np.random.default_rng(0)
    texts = [f"item {i}" for i in range(300)]
    shas, vecs = text_shas(texts), rng.normal(size=(300, 4)).astype(np.float32)
    cache = EmbeddingCache(tmp_path, "k")
    for lo in range(0, 200, 50):  # four shards, added by this process
        cache.add(shas[lo:lo + 50], vecs[lo:lo + 50])
    cache.add(shas[:10], vecs[:10] + 1)  # a later shard with digests already held: the first one wins
    pick = rng.permutation(300)
    out, found = EmbeddingCache(tmp_path, "k").lookup(shas[pick], 4)
    assert found.tolist() == (pick < 200).tolist()
    assert np.array_equal(out[found], vecs[pick[found]]) and not out[~found].any()
    # another process adds the rest
    code = ("import sys, numpy as np; from pathlib import Path; from assay.encode import EmbeddingCache; "
            "from assay.text import text_shas; v = np.load(sys.argv[2]); "
            "EmbeddingCache(Path(sys.argv[1]), 'k').add(text_shas([f'item {i}' for i in range(200, 300)]), v)")
    np.save(tmp_path / "rest.npy", vecs[200:])
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "rest.npy")], check=True)
    out, found = cache.lookup(shas[pick], 4)
    assert found.all() and np.array_equal(out, vecs[pick])
    # the folder removed and made again: nothing of the old index is returned
    import shutil

    shutil.rmtree(tmp_path / "embeddings")
    assert not EmbeddingCache(tmp_path, "k").lookup(shas, 4)[1].any()
    again = EmbeddingCache(tmp_path, "k")  # the same shard name written again by this process, other vectors
    again.add(shas[:50], vecs[:50] * 2)
    assert np.array_equal(EmbeddingCache(tmp_path, "k").lookup(shas[:50], 4)[0], vecs[:50] * 2)
