"""`assay mine`: three channels, federation, mined negatives, and the channel report.

Reads ``products``, ``queries``, ``engagement`` (and, for the report, ``truth_*`` or
``human_labels``). Writes ``channel_hits`` and ``mining_progress`` while it works, then
``candidates`` and ``negatives`` (both replaced, stamped with the run_id).

Each run records a content fingerprint of its inputs (``Store.fingerprint`` of products, queries and engagement);
``stale_inputs`` says which changed since, so `assay summary`, `assay doctor` and `assay annotate` can say that
the candidates describe an older catalog, and `assay run` mines again.

Resume: a mining run is identified by ``run_key`` = digest(mining config, encoder, catalog,
queries). Each channel works through query batches of ``batch_queries``; a batch's hits and its
progress row commit in one transaction, so after an interrupt (even ``kill -9``) a rerun with
the same inputs skips the finished batches and writes every remaining one exactly once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from assay.config import MiningConfig, ModelsConfig
from assay.mining import ann as ann_mod
from assay.mining import clicks as click_mod
from assay.mining.bm25 import BM25Index, Hits
from assay.mining.federate import federate
from assay.mining.negatives import TfidfSpace, mine_negatives
from assay.mining.report import channel_report
from assay.store import Store, utcnow
from assay.text import digest, item_texts, text_shas

log = logging.getLogger(__name__)


@dataclass
class Catalog:
    item_ids: np.ndarray  # object array of str, sorted
    texts: list[str]
    sha: str


@dataclass
class QuerySet:
    query_ids: list[str]
    texts: list[str]
    sha: str


def load_catalog(store: Store) -> Catalog:
    tbl = store.query("SELECT item_id, title, brand, category, attributes FROM products ORDER BY item_id")
    if tbl.num_rows == 0:
        raise ValueError("the workspace has no products; run `assay ingest` first")
    texts = item_texts(tbl)
    ids = np.array(tbl.column("item_id").to_pylist(), dtype=object)
    sha = digest([b"".join(text_shas(texts).tolist()), "\x1f".join(ids.tolist())])
    return Catalog(ids, texts, sha)


def load_queries(store: Store) -> QuerySet:
    tbl = store.query("SELECT query_id, text FROM queries ORDER BY query_id")
    if tbl.num_rows == 0:
        raise ValueError("the workspace has no queries; run `assay ingest` first")
    qids = tbl.column("query_id").to_pylist()
    texts = tbl.column("text").to_pylist()
    return QuerySet(qids, texts, digest(["\x1f".join(qids), "\x1f".join(texts)]))


def _write_batch(store: Store, run_key: str, channel: str, batch: int, qids: list[str], hits: Hits,
                 item_ids: np.ndarray, run_id: str) -> int:
    rows_q, rows_i, rows_r, rows_s = [], [], [], []
    for r, qid in enumerate(qids):
        idx = hits.idx[r]
        ok = idx >= 0
        n = int(ok.sum())
        if not n:
            continue
        rows_q += [qid] * n
        rows_i += item_ids[idx[ok]].tolist()
        rows_r += list(range(1, n + 1))
        rows_s += hits.scores[r][ok].tolist()
    tbl = pa.table({
        "run_key": pa.array([run_key] * len(rows_q), pa.string()), "channel": pa.array([channel] * len(rows_q), pa.string()),
        "query_id": pa.array(rows_q, pa.string()), "item_id": pa.array(rows_i, pa.string()),
        "rank": pa.array(rows_r, pa.int32()), "score": pa.array(rows_s, pa.float32()),
    })
    with store.transaction():
        store.write("channel_hits", tbl)
        store.write("mining_progress", pa.table({
            "run_key": [run_key], "channel": [channel], "batch": pa.array([batch], pa.int32()),
            "run_id": [run_id], "done_at": [utcnow()]}))
    return tbl.num_rows


class _Lazy:
    """Builds expensive shared state (encoder, item vectors) only when a channel needs it."""

    def __init__(self, cfg: MiningConfig, models_cfg: ModelsConfig, store: Store, catalog: Catalog,
                 queries: QuerySet, progress: bool):
        self.cfg, self.models_cfg, self.store, self.catalog, self.queries = cfg, models_cfg, store, catalog, queries
        self.progress = progress
        self._encoder = None
        self._item_vecs = None
        self._query_vecs = None
        self.stats: dict = {}

    @property
    def model_name(self) -> str:
        return self.cfg.ann.model or self.models_cfg.embedder

    def encoder(self):
        if self._encoder is None:
            from assay.encode import open_encoder

            a = self.cfg.ann
            self._encoder = open_encoder(self.model_name, self.models_cfg, self.store.artifacts, self.catalog.texts,
                                         max_seq_length=a.max_seq_length, precision=a.precision,
                                         batch_size=a.batch_size)
            self.stats["encoder"] = self._encoder.guard
        return self._encoder

    def item_vecs(self) -> np.ndarray:
        if self._item_vecs is None:
            from assay.encode import encode_cached

            t = time.perf_counter()
            if self.cfg.engine == "ray":  # fill the cache on Ray; encode_cached below then reads it
                from assay.config import RayConfig
                from assay.scale.cluster import connect
                from assay.scale.encode import warm_cache

                connect(RayConfig())
                self.stats["ray_encode"] = warm_cache(self.encoder(), self.model_name, self.catalog.texts,
                                                      self.store.artifacts, concurrency=self.cfg.ray_encoders)
            self._item_vecs, st = encode_cached(self.encoder(), self.catalog.texts, self.store.artifacts,
                                                progress=self.progress, desc="encode items")
            self.stats["item_embeddings"] = {**st, "seconds": round(time.perf_counter() - t, 2)}
        return self._item_vecs

    def query_vecs(self) -> np.ndarray:
        if self._query_vecs is None:
            from assay.encode import encode_cached

            self._query_vecs, st = encode_cached(self.encoder(), self.queries.texts, self.store.artifacts,
                                                 progress=self.progress, desc="encode queries")
            self.stats["query_embeddings"] = st
        return self._query_vecs


def bm25_index(store: Store, catalog: Catalog, c, progress: bool = False) -> tuple[BM25Index, dict]:
    """The catalog's BM25 index (``mining.bm25`` settings), built once and reused from artifacts/mining/bm25/."""
    d = store.artifacts / "mining" / "bm25" / f"{catalog.sha}-{c.tokenizer.replace('+', '_')}-{c.k1}-{c.b}"
    t = time.perf_counter()
    if (d / "assay.json").exists():
        return BM25Index.load(d, backend=c.backend), {"reused": True, "path": str(d)}
    index = BM25Index.build(catalog.texts, c.tokenizer, c.k1, c.b, c.backend, progress=progress)
    index.save(d)
    return index, {"reused": False, "path": str(d), "build_seconds": round(time.perf_counter() - t, 2)}


def _bm25_searcher(lz: _Lazy) -> Callable[[np.ndarray], Hits]:
    index, lz.stats["bm25_index"] = bm25_index(lz.store, lz.catalog, lz.cfg.bm25, lz.progress)
    threads = lz.store.compute_threads
    return lambda qidx: index.search([lz.queries.texts[i] for i in qidx], lz.cfg.k, threads=threads)


def _ann_searcher(lz: _Lazy) -> Callable[[np.ndarray], Hits]:
    import faiss

    a = lz.cfg.ann
    faiss.omp_set_num_threads(lz.store.compute_threads)
    vecs = lz.item_vecs()
    kind = ann_mod.choose_kind(a.index, len(vecs), a.exact_max_items)
    enc = lz.encoder()
    path = lz.store.artifacts / "mining" / "ann" / f"{enc.cache_key}-{lz.catalog.sha}-{kind}-{a.hnsw_m}.faiss"
    t = time.perf_counter()
    if path.exists():
        index = ann_mod.load_index(path, a.ef_search, a.nprobe)
        info = {"kind": kind, "reused": True}
    else:
        index = ann_mod.build_index(vecs, kind, a.hnsw_m, a.ef_construction, a.ef_search, a.nprobe, lz.cfg.seed)
        ann_mod.save_index(index, path)
        info = {"kind": kind, "reused": False, "build_seconds": round(time.perf_counter() - t, 2)}
    qv = lz.query_vecs()
    if kind != "flat" and a.recall_sample:
        rng = np.random.default_rng(lz.cfg.seed)
        sample = rng.choice(len(qv), size=min(a.recall_sample, len(qv)), replace=False)
        info["recall_vs_exact"] = round(ann_mod.recall_vs_exact(index, vecs, qv[sample], lz.cfg.k), 4)
    lz.stats["ann_index"] = info
    return lambda qidx: ann_mod.search(index, qv[qidx], lz.cfg.k)


def _click_searcher(lz: _Lazy) -> Callable[[np.ndarray], Hits]:
    c = lz.cfg.click
    qpos = {q: i for i, q in enumerate(lz.queries.query_ids)}
    ipos = {it: i for i, it in enumerate(lz.catalog.item_ids.tolist())}
    eng = lz.store.query("SELECT query_id, item_id, impressions, clicks, position FROM engagement")
    ix = click_mod.build_engagement_index(eng, qpos, ipos, c.alpha, c.min_clicks, c.max_position)
    has = np.diff(ix.offsets) > 0
    emb = lz.query_vecs() if c.neighbours in ("embedding", "both") else None
    nb = click_mod.QueryNeighbours(lz.queries.texts, emb, has, c.n_neighbors, c.min_similarity,
                                   use_lexical=c.neighbours in ("lexical", "both"))
    lz.stats["click"] = {"engaged_pairs": int(len(ix.item_idx)), "queries_with_engagement": int(has.sum()),
                         "ctr_by_position": [round(float(x), 5) for x in ix.ctr_by_position[1:11]]}
    return lambda qidx: click_mod.search(ix, nb, qidx, lz.cfg.k, c.neighbor_weight)


SEARCHERS: dict[str, Callable[[_Lazy], Callable[[np.ndarray], Hits]]] = {
    "bm25": _bm25_searcher, "ann": _ann_searcher, "click": _click_searcher,
}


def run(cfg: MiningConfig, store: Store, models_cfg: ModelsConfig | None = None, *, progress: bool = True) -> dict:
    """Mine candidates and negatives. Each channel batch commits on its own, so a run that is cut off (even by
    `kill -9`) resumes from its last committed batch."""
    models_cfg = models_cfg or ModelsConfig()
    catalog = load_catalog(store)
    queries = load_queries(store)
    lz = _Lazy(cfg, models_cfg, store, catalog, queries, progress)
    enc_id = digest([lz.model_name, cfg.ann.max_seq_length, cfg.ann.precision] +
                    ([models_cfg.backend] if models_cfg.backend != "torch" else [])) if "ann" in cfg.channels or \
        cfg.click.neighbours != "lexical" else "-"
    cfg_json = cfg.model_dump(mode="json")
    not_in_key = ("keep_channel_hits", "engine", "ray_encoders")  # where vectors are computed changes no candidate
    run_key = digest([json.dumps({k: v for k, v in cfg_json.items() if k not in not_in_key}, sort_keys=True),
                      enc_id, catalog.sha, queries.sha])
    n_batches = math.ceil(len(queries.query_ids) / cfg.batch_queries)
    timings: dict[str, float] = {}
    with store.run("mine", {"mining": cfg_json, "run_key": run_key, "backend": models_cfg.backend},
                   models={"embedder": lz.model_name}) as run_id:
        done = {(c, int(b)) for c, b in store.exec(
            "SELECT channel, batch FROM mining_progress WHERE run_key = ?", [run_key])}
        resumed = len(done)
        if resumed:
            log.info("resuming mining run %s: %d of %d channel batches already done", run_key, resumed,
                     n_batches * len(cfg.channels))
        for channel in cfg.channels:
            pending = [b for b in range(n_batches) if (channel, b) not in done]
            if not pending:
                continue
            t0 = time.perf_counter()
            searcher = SEARCHERS[channel](lz)
            timings[f"{channel}_setup_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            bar = tqdm(total=len(pending), desc=f"mine {channel}", unit=" batch", disable=not progress)
            for b in pending:
                qidx = np.arange(b * cfg.batch_queries, min((b + 1) * cfg.batch_queries, len(queries.query_ids)))
                hits = searcher(qidx)
                _write_batch(store, run_key, channel, b, [queries.query_ids[i] for i in qidx], hits,
                             catalog.item_ids, run_id)
                bar.update(1)
            bar.close()
            secs = time.perf_counter() - t0
            timings[f"{channel}_search_s"] = round(secs, 2)
            timings[f"{channel}_qps"] = round(len(pending) * cfg.batch_queries / max(secs, 1e-9), 1)

        t0 = time.perf_counter()
        n_cand = federate(store, run_key, run_id, cfg.channels, cfg.prior, cfg.rrf_k)
        timings["federate_s"] = round(time.perf_counter() - t0, 2)

        t0 = time.perf_counter()
        n_neg = _negatives(cfg, store, catalog, queries, run_id, progress)
        timings["negatives_s"] = round(time.perf_counter() - t0, 2)

        report = channel_report(store, cfg.channels, cfg.k)
        if not cfg.keep_channel_hits:
            with store.transaction():
                store.exec("DELETE FROM channel_hits WHERE run_key = ?", [run_key])
                store.exec("DELETE FROM mining_progress WHERE run_key = ?", [run_key])
        summary = {"run_id": run_id, "run_key": run_key, "inputs": _input_fingerprints(store),
                   "items": len(catalog.item_ids),
                   "queries": len(queries.query_ids), "batches": n_batches, "resumed_batches": resumed,
                   "candidates": n_cand, "negatives": n_neg, "timings": timings, **lz.stats, "report": report}
        store.finish_run(run_id, summary)
    return summary


INPUT_TABLES = ("products", "queries", "engagement")


def _input_fingerprints(store: Store) -> dict[str, str]:
    return {t: store.fingerprint(t) for t in INPUT_TABLES}


def newest_run(store: Store) -> dict | None:
    """The newest finished `assay mine` run: ``run_id`` and its recorded ``config``, ``models`` and ``summary``
    (parsed); None when nothing was mined."""
    row = store.exec("""SELECT run_id, config, models, summary FROM runs WHERE stage = 'mine' AND status = 'ok'
                        ORDER BY ended_at DESC LIMIT 1""")
    if not row:
        return None
    run_id, *parts = row[0]
    config, used, summary = ((json.loads(x) if isinstance(x, str) else x) or {} for x in parts)
    return {"run_id": run_id, "config": config, "models": used, "summary": summary}


def mined_encoder(store: Store) -> dict | None:
    """The text encoder the newest mining run used (the ANN channel's): ``model`` (as named), ``max_seq_length``,
    ``precision``, ``backend`` (what the accuracy guard admitted), its ``guard`` result and the ``run_id``. None when
    nothing was mined or that run encoded nothing. The features judge's cosine reads the vectors it cached."""
    run = newest_run(store)
    if run is None:
        return None
    ann = (run["config"].get("mining") or {}).get("ann") or {}
    guard = run["summary"].get("encoder") or {}
    model = run["models"].get("embedder")
    if not model or not guard.get("backend"):
        return None
    return {"model": model, "max_seq_length": ann.get("max_seq_length"), "precision": ann.get("precision", "fp32"),
            "backend": guard["backend"], "guard": guard, "run_id": run["run_id"]}


def stale_inputs(store: Store) -> list[str] | None:
    """The input tables that changed since the newest mining run (a re-ingested catalog, query log or engagement
    file): its candidates and negatives no longer describe the workspace and `assay mine` should run again. None
    when nothing was mined (or it was mined before mining recorded its inputs)."""
    run = newest_run(store)
    if run is None:
        return None
    recorded = run["summary"].get("inputs")
    if not recorded:
        return None
    now = _input_fingerprints(store)
    return [t for t in INPUT_TABLES if recorded.get(t) != now[t]]


def _negatives(cfg: MiningConfig, store: Store, catalog: Catalog, queries: QuerySet, run_id: str,
               progress: bool) -> int:
    n = cfg.negatives
    if n.n_token_sim == 0 and n.n_random == 0:
        with store.transaction():
            store.exec("DELETE FROM negatives")
        return 0
    space = TfidfSpace(catalog.texts, n.max_features)
    ipos = {it: i for i, it in enumerate(catalog.item_ids.tolist())}
    total = 0
    with store.transaction():
        store.exec("DELETE FROM negatives")
        bar = tqdm(total=len(queries.query_ids), desc="mine negatives", unit=" q", disable=not progress)
        for lo in range(0, len(queries.query_ids), cfg.batch_queries):
            qids = queries.query_ids[lo:lo + cfg.batch_queries]
            cand = store.query("SELECT query_id, item_id FROM candidates WHERE query_id IN "
                               "(SELECT unnest(?::VARCHAR[]))", [qids])
            by_q: dict[str, list[int]] = {}
            for q, it in zip(cand.column("query_id").to_pylist(), cand.column("item_id").to_pylist()):
                by_q.setdefault(q, []).append(ipos[it])
            exclude = [np.array(sorted(by_q.get(q, [])), dtype=np.int64) for q in qids]
            tbl = mine_negatives(space, qids, queries.texts[lo:lo + cfg.batch_queries], catalog.item_ids, exclude,
                                 n.token_sim_min, n.token_sim_max, n.n_token_sim, n.n_random, cfg.seed, run_id)
            store.write("negatives", tbl)
            total += tbl.num_rows
            bar.update(len(qids))
        bar.close()
    return total
