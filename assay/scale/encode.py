"""Catalog encoding on Ray (``mining.engine: ray``): the item texts missing from the embedding cache are encoded by a
Ray Data actor pool, and each actor writes its vectors into the same on-disk cache (assay.encode.EmbeddingCache:
one shard per batch, named by process id, made visible by a rename), so mining's ANN channel, the features judge's
cosine and `export-index` then read them as cache hits and build FAISS exactly as before.

Each actor opens the encoder the driver chose (same model, sequence length, precision and backend, so the same
cache key; an actor that ends up with another key refuses to write). Workers never open ``assay.duckdb``; on a
cluster the workspace's ``artifacts/`` must be shared storage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)


class EncodeStage:
    """A Ray Data actor: encodes a batch of texts and adds them to the embedding cache."""

    def __init__(self, spec: dict):
        from assay.encode import Encoder

        self.encoder = Encoder(spec["model"], max_seq_length=spec["max_seq_length"], precision=spec["precision"],
                               batch_size=spec["batch_size"], backend=spec["backend"],
                               artifacts=Path(spec["artifacts"]))
        if self.encoder.cache_key != spec["cache_key"]:
            raise RuntimeError(f"the worker's encoder has cache key {self.encoder.cache_key}, the driver's "
                               f"{spec['cache_key']}: another model or backend under {spec['artifacts']}")
        self.artifacts = Path(spec["artifacts"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from assay.encode import EmbeddingCache

        texts = batch.column("text").to_pylist()
        shas = np.array(batch.column("sha").to_pylist(), dtype="S16")
        vecs = self.encoder.encode(texts)
        EmbeddingCache(self.artifacts, self.encoder.cache_key).add(shas, vecs)
        return pa.table({"n": pa.array([len(texts)], pa.int64())})


class ItemTowerStage:
    """A Ray Data actor: a two-tower checkpoint's item tower (on the backend the driver's accuracy guard admitted)
    encodes a batch of item texts into the checkpoint's item-vector cache (assay.dense.item_vectors reads it)."""

    def __init__(self, spec: dict):
        from assay.dense import item_cache_key
        from assay.trainer.model import TwoTower

        self.model = TwoTower.load(spec["checkpoint"], device="cpu")
        if spec["backend"] != "torch":
            self.model.use_backend(spec["backend"], Path(spec["artifacts"]))
        if item_cache_key(self.model) != spec["cache_key"]:
            raise RuntimeError(f"the worker's checkpoint {spec['checkpoint']} has another item-vector cache key than "
                               "the driver's: the checkpoint changed on disk, or another backend")
        self.artifacts, self.key = Path(spec["artifacts"]), spec["cache_key"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from assay.dense import encode_items
        from assay.encode import EmbeddingCache

        texts = batch.column("text").to_pylist()
        shas = np.array(batch.column("sha").to_pylist(), dtype="S16")
        EmbeddingCache(self.artifacts, self.key).add(shas, encode_items(self.model, texts))
        return pa.table({"n": pa.array([len(texts)], pa.int64())})


def _fill(stage, spec: dict, texts: list[str], artifacts: Path, key: str, dim: int, *, concurrency: int,
          num_cpus: float, num_gpus: float, batch_rows: int) -> dict:
    """Encode on Ray (``stage`` actors built from ``spec``) every distinct text of ``texts`` that the embedding cache
    ``key`` lacks (Ray must be connected: assay.scale.cluster.connect). Returns texts, cached, encoded, seconds."""
    import ray

    from assay.encode import EmbeddingCache
    from assay.text import text_shas

    t0 = time.perf_counter()
    shas = text_shas(texts)
    _, found = EmbeddingCache(Path(artifacts), key).lookup(shas, dim)
    missing = np.flatnonzero(~found)
    uniq, first = np.unique(shas[missing], return_index=True)
    stats = {"texts": len(texts), "cached": int(found.sum()), "encoded": int(len(uniq)), "seconds": 0.0}
    if len(uniq):
        # from the raw 16-byte rows: numpy's bytes scalars (and .tolist()) drop a digest's trailing zero bytes
        sha_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(uniq),
                                                       [None, pa.py_buffer(np.ascontiguousarray(uniq).tobytes())])
        tbl = pa.table({"sha": sha_col,
                        "text": pa.array([texts[missing[i]] for i in first], pa.string())})
        ds = ray.data.from_arrow(tbl).map_batches(stage, fn_constructor_kwargs={"spec": spec},
                                                  batch_format="pyarrow", batch_size=batch_rows,
                                                  concurrency=concurrency, num_cpus=num_cpus,
                                                  num_gpus=num_gpus or None)
        done = sum(int(b["n"].sum()) for b in ds.iter_batches(batch_format="numpy", batch_size=None))
        if done < len(uniq):
            raise RuntimeError(f"Ray encoded {done} of {len(uniq)} texts; rerun (the cache keeps what was written)")
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("ray encode (%s): %d texts, %d cached, %d encoded in %.1f s", stage.__name__,
             *(stats[k] for k in ("texts", "cached", "encoded", "seconds")))
    return stats


def warm_cache(encoder, model_name: str, texts: list[str], artifacts: Path, *, concurrency: int = 1, num_cpus: float = 1.0,
               num_gpus: float = 0.0, batch_rows: int = 4096) -> dict:
    """Encode on Ray every distinct text of ``texts`` that the cache of ``encoder`` (opened on ``model_name``) lacks:
    mining's ANN channel (``mining.engine: ray``)."""
    spec = {"model": model_name, "max_seq_length": int(encoder.model.max_seq_length), "precision": encoder.precision,
            "batch_size": encoder.batch_size, "backend": encoder.backend, "artifacts": str(Path(artifacts)),
            "cache_key": encoder.cache_key}
    return _fill(EncodeStage, spec, texts, artifacts, encoder.cache_key, encoder.dim, concurrency=concurrency,
                 num_cpus=num_cpus, num_gpus=num_gpus, batch_rows=batch_rows)


def warm_item_vectors(model, checkpoint: str | Path, texts: list[str], artifacts: Path, *, concurrency: int = 1,
                      num_cpus: float = 1.0, num_gpus: float = 0.0, batch_rows: int = 4096) -> dict:
    """Encode on Ray every distinct item text the item-vector cache of ``model`` (loaded from ``checkpoint``, already
    on its backend) lacks: `export-index` with ``serve.engine: ray``."""
    from assay.dense import item_cache_key

    key = item_cache_key(model)
    spec = {"checkpoint": str(checkpoint), "backend": getattr(model, "backend", "torch"),
            "artifacts": str(Path(artifacts)), "cache_key": key}
    return _fill(ItemTowerStage, spec, texts, artifacts, key, model.dim, concurrency=concurrency, num_cpus=num_cpus,
                 num_gpus=num_gpus, batch_rows=batch_rows)
