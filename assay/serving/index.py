"""`assay export-index` and `assay search`: a FAISS index bound to one two-tower checkpoint.

Export reads ``checkpoints`` (the newest kept curriculum checkpoint unless ``serve.checkpoint`` or ``--checkpoint``
names one; ``best`` names the best-validated of the newest training folder's curriculum stages and baselines),
``products`` and ``queries``, and writes ``artifacts/index/<index_id>/``:

- ``index.faiss``: the catalog's item-tower vectors (unit length, inner product), in an index chosen by size
  (``serve.index``: flat up to ``flat_max_items``, else HNSW; IVF-PQ on request; the factory strings are config);
- ``ids.json``: the item id of each index row;
- ``manifest.json``: the checkpoint path and sha, the text template version, dimension, metric, index kind, factory
  string and search parameters, items, the catalog's sha, recall@100 against exact search on a sample of workspace
  queries, and the encode and build seconds;

and records a row in ``indexes``. Item vectors are encoded in chunks that are cached as they finish (the same cache
`assay evaluate` uses, keyed by the checkpoint sha), so an interrupted export resumes where it stopped. The folder is
written under a temporary name and renamed when complete.

Search loads the newest index (or one by id), refuses it when the checkpoint at the manifest's path no longer has
the manifest's sha, encodes the query with the query tower and searches. ``mode="hybrid"`` fuses BM25 (mining's
index) and the dense hits by reciprocal rank and says where each hit came from. A multi-head query tower searches
with every head and re-scores the union with soft-dot attention.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assay.config import AssayConfig, ServeConfig
from assay.dense import checkpoint_id, exact_search, item_vectors, open_backend, query_vectors, resolve_checkpoint, \
    search_index
from assay.store import Store, utcnow
from assay.text import TEXT_TEMPLATE_VERSION

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECALL_K = 100
MODES = ("dense", "hybrid")


def choose_factory(cfg: ServeConfig, n_items: int, dim: int) -> tuple[str, str]:
    """(kind, FAISS index_factory string) for a catalog of ``n_items`` vectors of ``dim``."""
    kind = cfg.index
    if kind == "auto":
        kind = "flat" if n_items <= cfg.flat_max_items else "hnsw"
    if kind == "flat":
        return kind, "Flat"
    if kind == "hnsw":
        return kind, cfg.hnsw_factory
    nlist = max(1, int(4 * math.sqrt(n_items)))
    pq_m = max(1, dim // 8)
    return kind, cfg.ivfpq_factory.format(nlist=nlist, pq_m=pq_m)


def build(vecs: np.ndarray, factory: str, cfg: ServeConfig, seed: int = 0):
    import faiss

    dim = vecs.shape[1]
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vecs[rng.choice(len(vecs), size=min(len(vecs), 100_000), replace=False)]
        index.train(sample)
    if hasattr(index, "hnsw"):
        index.hnsw.efConstruction = cfg.ef_construction
    index.add(vecs)
    set_search_params(index, cfg)
    return index


def set_search_params(index, cfg: ServeConfig) -> None:
    import faiss

    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = cfg.ef_search
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = cfg.nprobe


def export(cfg: AssayConfig, store: Store, *, checkpoint: str | None = None, progress: bool = True) -> dict:
    """Encode the catalog with the item tower, build the index, measure its recall and write the folder."""
    import faiss

    from assay.mining.run import load_catalog
    from assay.trainer.model import TwoTower

    sc = cfg.serve
    path = resolve_checkpoint(store, checkpoint or sc.checkpoint)
    model = TwoTower.load(path, device=cfg.models.device)
    catalog = load_catalog(store)
    with store.run("export-index", {"serve": sc.model_dump(mode="json"), "checkpoint": str(path),
                                    "models": cfg.models.model_dump(mode="json")},
                   models={"two_tower": model.sha}) as run_id:
        guard = open_backend(model, cfg, store, catalog.texts)
        t0 = time.perf_counter()
        ray_encode = None
        if sc.engine == "ray":  # fill the checkpoint's vector cache on Ray; item_vectors below then reads it
            from assay.scale.cluster import connect
            from assay.scale.encode import warm_item_vectors

            connect(cfg.annotate.ray)
            ray_encode = warm_item_vectors(model, path, catalog.texts, store.artifacts, concurrency=sc.ray_encoders)
        vecs = item_vectors(model, catalog.texts, store.artifacts, sc.encode_chunk, progress)
        encode_s = time.perf_counter() - t0
        if model.heads > 1 and sc.index == "ivfpq":
            raise ValueError("a multi-head query tower re-scores reconstructed item vectors, which IVF-PQ only "
                             "approximates; set serve.index to flat or hnsw")
        kind, factory = choose_factory(sc, len(vecs), vecs.shape[1])
        t1 = time.perf_counter()
        index = build(vecs, factory, sc)
        build_s = time.perf_counter() - t1
        recall = _recall_vs_exact(store, model, index, vecs, sc)
        index_id = f"{kind}-{model.sha[:12]}-{catalog.sha[:8]}"
        final = store.artifacts / "index" / index_id
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        faiss.write_index(index, str(tmp / "index.faiss"))
        (tmp / "ids.json").write_text(json.dumps(catalog.item_ids.tolist()))
        manifest = {
            "format": "assay-index/1", "index_id": index_id, "checkpoint_path": str(Path(path).resolve()),
            "checkpoint_id": checkpoint_id(store, path), "checkpoint_requested": checkpoint or sc.checkpoint,
            "checkpoint_sha": model.sha, "text_template": TEXT_TEMPLATE_VERSION, "dim": int(vecs.shape[1]),
            "heads": model.heads, "beta": model.beta, "backend": guard["backend"], "guard": guard,
            "metric": "inner_product", "kind": kind, "factory": factory,
            "params": {"ef_search": sc.ef_search, "ef_construction": sc.ef_construction, "nprobe": sc.nprobe},
            "n_items": len(vecs), "catalog_sha": catalog.sha, f"recall@{RECALL_K}": recall["recall"],
            "recall_queries": recall["queries"], "encode_seconds": round(encode_s, 2),
            "build_seconds": round(build_s, 3), "created_at": utcnow().isoformat(timespec="seconds"),
        }
        if ray_encode is not None:
            manifest["ray_encode"] = ray_encode
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        import pyarrow as pa

        store.write("indexes", pa.table({"index_id": [index_id], "checkpoint_sha": [model.sha], "path": [str(final)],
                                         "kind": [kind], "n_items": [len(vecs)], "run_id": [run_id]}), mode="upsert")
        summary = {**manifest, "path": str(final), "run_id": run_id}
        store.finish_run(run_id, summary)
    return summary


def _recall_vs_exact(store: Store, model, index, vecs: np.ndarray, sc: ServeConfig) -> dict:
    """recall@100 of the index against exact search, for a seeded sample of workspace queries."""
    rows = store.exec("SELECT text FROM queries ORDER BY hash(query_id), query_id LIMIT ?", [sc.recall_sample])
    if not rows or sc.recall_sample == 0:
        return {"recall": None, "queries": 0}
    q = query_vectors(model, [r[0] for r in rows])
    k = min(RECALL_K, len(vecs))
    _, want = exact_search(vecs, q, k, model.beta)
    _, got = search_index(index, q, k, model.beta)
    hits = sum(len(np.intersect1d(w[w >= 0], g[g >= 0])) for w, g in zip(want, got))
    return {"recall": round(hits / float((want >= 0).sum()), 4), "queries": len(rows)}


@dataclass
class Hit:
    item_id: str
    title: str
    score: float
    source: str  # dense | bm25 | both


class Served:
    """The query tower and the index of one export, checked against each other (the single servable)."""

    def __init__(self, cfg: AssayConfig, store: Store, index_id: str | None = None):
        import faiss

        from assay.trainer.model import TwoTower

        row = store.exec("SELECT index_id, path FROM indexes " + ("WHERE index_id = ? " if index_id else "") +
                         "ORDER BY rowid DESC LIMIT 1", [index_id] if index_id else None)
        if not row:
            raise ValueError("no serving index in this workspace" + (f" with id {index_id!r}" if index_id else "") +
                             "; run `assay export-index` first")
        self.dir = Path(row[0][1])
        man_file = self.dir / MANIFEST
        if not man_file.exists():
            raise FileNotFoundError(f"{man_file} is missing; run `assay export-index` again")
        self.manifest = json.loads(man_file.read_text())
        self.model = TwoTower.load(self.manifest["checkpoint_path"], device=cfg.models.device)
        if self.model.sha != self.manifest["checkpoint_sha"]:
            raise ValueError(f"index {self.manifest['index_id']} was built for checkpoint sha "
                             f"{self.manifest['checkpoint_sha']}, but {self.manifest['checkpoint_path']} now holds "
                             f"{self.model.sha}; run `assay export-index` for this checkpoint")
        # the query tower runs where the item vectors were made (the guard was passed at export time)
        self.model.use_backend(self.manifest.get("backend", "torch"), store.artifacts)
        if self.manifest.get("text_template") != TEXT_TEMPLATE_VERSION:
            raise ValueError(f"index {self.manifest['index_id']} renders items as {self.manifest.get('text_template')!r}"
                             f", this assay as {TEXT_TEMPLATE_VERSION!r}; run `assay export-index` again")
        self.index = faiss.read_index(str(self.dir / "index.faiss"))
        set_search_params(self.index, cfg.serve)
        self.ids = np.asarray(json.loads((self.dir / "ids.json").read_text()), dtype=object)
        self.cfg, self.store = cfg, store
        self._bm25 = None
        self._catalog = None
        # the title of each index row, read once: looking titles up per hit cost a DuckDB scan of `products` for
        # every item no earlier request had returned (80 ms of a first-seen query at 20k items, k=100)
        self._titles = self._row_titles()
        self._row_of = {item_id: r for r, item_id in enumerate(self.ids.tolist())}
        from assay.spell import for_workspace

        # None when spell.enabled is false; otherwise built at start-up from the catalog BM25 also uses
        self.speller = for_workspace(self.cfg, texts=self.catalog.texts) if cfg.spell.enabled else None

    @property
    def catalog(self):
        """The workspace's catalog (ids and item texts), read once: the speller, BM25 and the page share it."""
        if self._catalog is None:
            from assay.mining.run import load_catalog

            self._catalog = load_catalog(self.store)
        return self._catalog

    def correct(self, query: str) -> str:
        """The query as every system searches it: spelling corrected against the catalog (assay/spell.py)."""
        return self.speller.correct(query) if self.speller is not None else query

    def check_query(self, query: str, k: int, mode: str) -> str:
        q = (query or "").strip()
        if not q:
            raise ValueError("the query is empty")
        if len(q) > self.cfg.serve.max_query_chars:
            raise ValueError(f"the query has {len(q)} characters; at most {self.cfg.serve.max_query_chars} "
                             "(serve.max_query_chars)")
        if not 1 <= k <= 1000:
            raise ValueError(f"k must be between 1 and 1000, got {k}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {list(MODES)}")
        return q

    def dense(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():  # one request's queries: no length bucketing (query_vectors) to pay for
            q = self.model.encode_queries(queries).float().cpu().numpy()
        return search_index(self.index, q, k, self.model.beta)

    def search(self, query: str, k: int = 10, mode: str = "dense") -> list[Hit]:
        q = self.correct(self.check_query(query, k, mode))
        scores, rows = self.dense([q], k)
        found = rows[0] >= 0
        if mode == "dense":
            return [Hit(str(self.ids[r]), t, float(s), "dense")
                    for r, s, t in zip(rows[0][found], scores[0][found], self.titles(rows[0][found]))]
        dense = [(str(self.ids[r]), float(s)) for r, s in zip(rows[0][found], scores[0][found])]
        bm = self.bm25_hits(q, k)
        fused: dict[str, float] = {}
        source: dict[str, str] = {}
        for name, hits in (("dense", dense), ("bm25", bm)):
            for rank, (i, _) in enumerate(hits):
                fused[i] = fused.get(i, 0.0) + 1.0 / (self.cfg.serve.rrf_k + rank + 1)
                source[i] = "both" if i in source and source[i] != name else name
        top = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        return [Hit(i, self.title(i), round(fused[i], 6), source[i]) for i in top]

    def bm25_hits(self, query: str, k: int) -> list[tuple[str, float]]:
        from assay.mining.run import bm25_index

        if self._bm25 is None:
            index, _ = bm25_index(self.store, self.catalog, self.cfg.mining.bm25)
            self._bm25 = (index, self.catalog.item_ids)
        index, ids = self._bm25
        hits = index.search([query], k)
        return [(str(ids[r]), float(s)) for r, s in zip(hits.idx[0], hits.scores[0]) if r >= 0]

    def _row_titles(self):
        """The title of each index row (an Arrow string array), in one query."""
        import pyarrow as pa

        name = f"_served_rows_{id(self)}"
        self.store.con.register(name, pa.table({"item_id": pa.array(self.ids.tolist(), pa.string()),
                                                "row": pa.array(np.arange(len(self.ids), dtype=np.int64))}))
        try:
            t = self.store.query(f"""SELECT any_value(coalesce(p.title, '')) AS title FROM {name} s
                                     LEFT JOIN products p USING (item_id) GROUP BY s.row ORDER BY s.row""")
        finally:
            self.store.con.unregister(name)
        return t.column("title").combine_chunks()

    def titles(self, rows: np.ndarray) -> list[str]:
        """Titles of index rows."""
        import pyarrow as pa

        return self._titles.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def title(self, item_id: str) -> str:
        r = self._row_of.get(item_id)
        if r is not None:
            return self._titles[r].as_py()
        row = self.store.exec("SELECT title FROM products WHERE item_id = ?", [item_id])  # not in the index
        return row[0][0] if row else ""
