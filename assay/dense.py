"""The dense two-tower model at run time, shared by `assay export-index`, `assay serve` and `assay evaluate`:

- which checkpoint a command means (``resolve_checkpoint``: a path, ``best`` or the newest kept curriculum checkpoint);
- the backend it runs on (``open_backend``: PyTorch, or an ONNX export admitted by the accuracy guard), and the base
  encoder as evaluation and the search page open it (``open_base_encoder``);
- the catalog's item-tower vectors (``item_vectors``, cached per checkpoint sha and backend in the on-disk
  embedding cache, which ``serve.engine: ray`` fills from Ray actors), the query vectors (``query_vectors``);
- search over item vectors (``search_index``: any FAISS index; multi-head query towers re-score the union of their
  heads' hits; ``exact_search``: the exact inner-product top k).

Serving (assay.serving.index) builds and serves FAISS indexes on top of this; evaluation scores the same vectors
with exact search.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from assay.config import AssayConfig
from assay.store import Store
from assay.text import TEXT_TEMPLATE_VERSION, digest, text_shas

log = logging.getLogger(__name__)

BEST = "best"


def newest_checkpoint(store: Store) -> str:
    row = store.exec("""SELECT path FROM checkpoints WHERE kept AND name = 'curriculum'
                        ORDER BY created_at DESC, stage DESC LIMIT 1""")
    if not row:
        raise ValueError("no kept curriculum checkpoint in this workspace; run `assay train` first, or pass "
                         "--checkpoint PATH")
    return row[0][0]


def best_validated_checkpoint(store: Store) -> tuple[str, str, float]:
    """(path, checkpoint_id, validation NDCG@10) of the best-validated kept checkpoint among those trained in the
    same folder as the newest one: the curriculum's stages and the baselines of one training config, which were
    validated on the same queries and pools, so their scores compare (``serve.checkpoint: best``)."""
    row = store.exec("""SELECT path, checkpoint_id, val_ndcg10 FROM checkpoints
                        WHERE kept AND val_ndcg10 IS NOT NULL AND split_part(checkpoint_id, '/', 1) =
                              (SELECT split_part(checkpoint_id, '/', 1) FROM checkpoints WHERE kept
                               ORDER BY created_at DESC LIMIT 1)
                        ORDER BY val_ndcg10 DESC, created_at DESC LIMIT 1""")
    if not row:
        raise ValueError("no kept checkpoint in this workspace; run `assay train` (and `assay train --baseline "
                         "NAME`) first, or name a checkpoint")
    return row[0][0], row[0][1], float(row[0][2])


def checkpoint_id(store: Store, path: str) -> str | None:
    """The ``checkpoints`` id (``<training folder>/<phase>``, e.g. ``.../paced`` or ``.../baseline-binary``) of a
    checkpoint folder, or None for a folder that table does not know."""
    target = str(Path(path).resolve())
    for ckpt, p in store.exec("SELECT checkpoint_id, path FROM checkpoints ORDER BY created_at DESC"):
        if str(Path(p).resolve()) == target:
            return ckpt
    return None


def resolve_checkpoint(store: Store, requested: str | None) -> str:
    """The checkpoint folder that ``--checkpoint`` / ``serve.checkpoint`` names: a path, ``best``, or None (the
    newest kept curriculum checkpoint)."""
    if requested is None:
        return newest_checkpoint(store)
    if requested == BEST:
        path, ckpt_id, val = best_validated_checkpoint(store)
        log.info("serve.checkpoint best: %s (validation NDCG@10 %.4f)", ckpt_id, val)
        return path
    return requested


def open_backend(model, cfg: AssayConfig, store: Store, item_texts: list[str]) -> dict:
    """Put ``model`` on ``models.backend`` (see assay.inference); returns what was chosen and measured.

    An int8 export is compared with the fp32 PyTorch towers before use: the mean cosine of item and query
    embeddings on a seeded sample of the catalog and of the workspace queries (``models.guard_min_cosine``), and,
    when the curriculum's validation queries have labeled pairs, NDCG@10 re-ranking them (``models.guard_max_ndcg_drop``).
    The result is stored in the export's ``export.json``, so later runs on the same sample reuse it."""
    import torch

    from assay import inference
    from assay.encode import guard_sample

    mc = cfg.models
    n = mc.guard_sample
    items = guard_sample(item_texts, n)
    queries = guard_sample([r[0] for r in store.exec("SELECT text FROM queries")], n)

    def build(backend: str):
        model.use_backend(backend, store.artifacts)
        return model

    def measure(m) -> dict:
        runners = m._runners
        folder = runners["item"].folder
        # v2: results cached before the eval-mode fix compared against a dropout-noised reference; not reused
        key = "twotower-v2-" + inference.sample_digest(items + queries + [str(store.count("labels"))])
        known = (inference.read_export(folder) or {}).get("guard", {}).get(key)
        if known:
            return known
        with torch.inference_mode():
            got = (m.encode_items(items).numpy(), m.encode_queries(queries).reshape(len(queries), -1).numpy())
            data = _val_data(cfg, store)  # loaded once, scored with both backends
            val = _validate(m, data)
            m._runners = {}
            ref = (m.encode_items(items).numpy(), m.encode_queries(queries).reshape(len(queries), -1).numpy())
            ref_val = _validate(m, data)
            m._runners = runners
        it, qu = inference.embedding_agreement(ref[0], got[0]), inference.embedding_agreement(ref[1], got[1])
        result = {"mean_cosine": min(it["mean_cosine"], qu["mean_cosine"]), "item_cosine": it["mean_cosine"],
                  "query_cosine": qu["mean_cosine"], "n_items": it["n"], "n_queries": qu["n"]}
        if val is not None:
            result.update(ndcg_fp32=round(ref_val, 4), ndcg_backend=round(val, 4), ndcg_drop=round(ref_val - val, 4))
        inference.record_guard(folder, key, result)
        return result

    limits = {"mean_cosine": ("min", mc.guard_min_cosine, "models.guard_min_cosine"),
              "ndcg_drop": ("max", mc.guard_max_ndcg_drop, "models.guard_max_ndcg_drop")}
    _, backend, notes = inference.choose(inference.resolve(mc.backend, mc.device), build,
                                         measure if n else None, limits, "two-tower model", "models.backend")
    return {"backend": backend, **notes}


def open_base_encoder(base_model: str, store: Store, item_texts: list[str], backend_cfg: AssayConfig | None = None,
                      device: str = "cpu"):
    """The untrained two-tower model of ``base_model`` ("the base encoder"), as `assay evaluate` and the search page
    both open it, so that they share its export and its cached catalog vectors: on ``backend_cfg``'s backend with its
    guard (:func:`open_backend`; None = PyTorch), then keyed by the base weights' sha. The order matters: an untrained
    model's export is keyed by its base weights and settings (``TwoTower.source_sha``) only while it has no sha.
    Returns (model, guard result or None)."""
    from assay.trainer.model import TwoTower

    model = TwoTower.from_base(base_model, device=device)
    guard = open_backend(model, backend_cfg, store, item_texts) if backend_cfg is not None else None
    model.sha = model.info["base_model_sha"]
    return model, guard


def _val_data(cfg: AssayConfig, store: Store):
    """The curriculum's labeled validation pairs (None when the workspace has no examples)."""
    from assay.trainer import data as tdata

    if store.count("examples") == 0:
        return None
    tc = cfg.train
    return tdata.load(store, val_max_queries=tc.val_max_queries, val_pool_per_query=tc.val_pool_per_query,
                      random_pool=0, seed=tc.seed)


def _validate(model, data) -> float | None:
    """Validation NDCG@10 re-ranking those pairs (None without data or pairs)."""
    from assay.trainer.loop import validate

    if data is None:
        return None
    v = validate(model, data)
    return None if v != v else float(v)


def item_cache_key(model) -> str:
    """The embedding-cache key of a two-tower model's item vectors: checkpoint sha, item text template and length,
    and the backend (so int8 vectors never mix with fp32 ones).

    The base encoder (:func:`open_base_encoder`) whose item tower is its sentence-transformers model as published
    (the transformer, mean pooling, unit length: ``TwoTower.same_as_encoder``) has the key of that model's own
    vectors (:func:`assay.encode.cache_key`, fp32): at the same item length and backend they are the vectors
    `assay mine` cached for the catalog (the same weights, the same function; measured equal to 1e-7 on PyTorch,
    and on int8 ONNX within the spread of one export's own vectors batched differently: mean cosine 0.9939, against
    0.9921 for one export batched 128 and 1 at a time), so evaluation and the search page read them instead of
    encoding the catalog again."""
    backend = getattr(model, "backend", "torch")
    if model.same_as_encoder and model.sha == model.info["base_model_sha"]:
        from assay.encode import cache_key

        return cache_key(model.sha, model.item_max_length, "fp32", backend)
    return digest(["twotower-items", model.sha, TEXT_TEMPLATE_VERSION, model.item_max_length]
                  + ([backend] if backend != "torch" else []))


def encode_items(model, texts: list[str]) -> np.ndarray:
    """Item-tower vectors of ``texts`` (float32 (n, d)), uncached; batches grouped by length."""
    import torch

    from assay.trainer.loop import encode_by_length

    model.eval()
    with torch.inference_mode():
        return encode_by_length(model.encode_items, texts, 128).float().cpu().numpy()


def item_vectors(model, texts: list[str], artifacts: Path, chunk: int, progress: bool, stats: dict | None = None
                 ) -> np.ndarray:
    """Item-tower vectors of ``texts``, cached per checkpoint sha and backend (shared with `assay evaluate`, and
    filled on Ray by `export-index` with ``serve.engine: ray``). ``stats`` (optional) gets ``cached`` (texts read
    from the cache), ``encoded`` and the cache ``key``."""
    from tqdm.auto import tqdm

    from assay.encode import EmbeddingCache

    cache = EmbeddingCache(artifacts, item_cache_key(model))
    shas = text_shas(texts)
    vecs, found = cache.lookup(shas, model.dim)
    miss = np.flatnonzero(~found)
    if stats is not None:
        stats.update(cached=int(len(texts) - len(miss)), encoded=int(len(miss)), key=cache.dir.name)
    bar = tqdm(total=len(texts), initial=len(texts) - len(miss), desc="encode items", unit=" items",
               disable=not progress)
    for lo in range(0, len(miss), chunk):
        part = miss[lo:lo + chunk]
        new = encode_items(model, [texts[i] for i in part])
        cache.add(shas[part], new)
        vecs[part] = new
        bar.update(len(part))
    bar.close()
    return np.ascontiguousarray(vecs, dtype=np.float32)


def query_vectors(model, texts: list[str]) -> np.ndarray:
    """Query-tower vectors of ``texts`` (float32; (n, d), or (n, heads, d) for a multi-head tower)."""
    import torch

    from assay.trainer.loop import encode_by_length

    with torch.inference_mode():
        return encode_by_length(model.encode_queries, texts, 128).float().cpu().numpy()


def exact_search(vecs: np.ndarray, q: np.ndarray, k: int, beta: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the exact inner-product top ``k`` of ``vecs`` for each query (see ``search_index``)."""
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return search_index(index, q, k, beta)


def search_index(index, q: np.ndarray, k: int, beta: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the top ``k`` for each query; (B, H, d) multi-head queries search with every head and
    re-score the union with soft-dot attention over reconstructed item vectors."""
    k = min(k, index.ntotal)
    if q.ndim == 2:
        return index.search(np.ascontiguousarray(q, dtype=np.float32), k)
    import torch

    from assay.trainer.model import soft_dot

    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    rows = np.full((len(q), k), -1, dtype=np.int64)
    for r in range(len(q)):
        cand = np.unique(index.search(np.ascontiguousarray(q[r], dtype=np.float32), k)[1].ravel())
        cand = cand[cand >= 0]
        items = np.stack([index.reconstruct(int(c)) for c in cand])
        s = soft_dot(torch.from_numpy(q[r][None]), torch.from_numpy(items), beta)[0].numpy()
        top = np.argsort(-s, kind="stable")[:k]
        scores[r, :len(top)], rows[r, :len(top)] = s[top], cand[top]
    return scores, rows
