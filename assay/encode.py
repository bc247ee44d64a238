"""Text encoding with a sentence-transformers model, and an on-disk embedding cache.

The cache lives under ``artifacts/embeddings/<key>/`` where key = digest(model sha, max sequence
length, precision, text template version). Each encode call that finds texts missing from the
cache appends one shard (``shard-N.sha.npy`` with 16-byte text digests and ``shard-N.vec.npy``
with float32 unit vectors). A shard becomes visible only when its digest file is renamed into
place, after its vectors, so an interrupted write is never read. Re-mining an unchanged catalog
therefore encodes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from assay import models
from assay.text import TEXT_TEMPLATE_VERSION, digest, text_shas

log = logging.getLogger(__name__)


class Encoder:
    """Encodes texts to L2-normalised float32 vectors."""

    def __init__(self, model_name: str, device: str = "cpu", max_seq_length: int = 64,
                 precision: str = "bf16", batch_size: int = 128):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.resolved = models.resolve(model_name)
        self.model = models.load_sentence_transformer(model_name, device=device)
        self.model.max_seq_length = max_seq_length
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.sha = models.model_sha(self.resolved)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    @property
    def cache_key(self) -> str:
        return digest([self.sha, self.model.max_seq_length, self.precision, TEXT_TEMPLATE_VERSION])

    def encode(self, texts: list[str], progress: bool = False, desc: str = "encode") -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ctx = (torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
               if self.precision == "bf16" else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            vecs = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=progress,
                                     convert_to_numpy=False, convert_to_tensor=True, normalize_embeddings=False)
        vecs = vecs.float().cpu().numpy()
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return (vecs / np.maximum(norms, 1e-12)).astype(np.float32)


class EmbeddingCache:
    def __init__(self, root: Path, key: str):
        self.dir = root / "embeddings" / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def _shards(self) -> list[tuple[Path, Path]]:
        out = []
        for sha_file in sorted(self.dir.glob("shard-*.sha.npy")):
            vec_file = sha_file.with_name(sha_file.name.replace(".sha.npy", ".vec.npy"))
            if vec_file.exists():
                out.append((sha_file, vec_file))
        return out

    def lookup(self, shas: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (vectors, found mask) for the given digests."""
        out = np.zeros((len(shas), dim), dtype=np.float32)
        found = np.zeros(len(shas), dtype=bool)
        for sha_file, vec_file in self._shards():
            cached = np.load(sha_file)
            if not len(cached):
                continue
            order = np.argsort(cached)
            pos = np.searchsorted(cached, shas, sorter=order)
            pos = np.clip(pos, 0, len(cached) - 1)
            hit = (cached[order[pos]] == shas) & ~found
            if hit.any():
                vecs = np.load(vec_file, mmap_mode="r")
                out[hit] = vecs[order[pos[hit]]]
                found |= hit
        return out, found

    def add(self, shas: np.ndarray, vecs: np.ndarray) -> None:
        if not len(shas):
            return
        n = len(list(self.dir.glob("shard-*.sha.npy")))
        base = self.dir / f"shard-{n:06d}-{os.getpid()}"
        for suffix, arr in ((".vec.npy", vecs.astype(np.float32)), (".sha.npy", shas)):
            tmp = base.with_name(base.name + suffix + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, base.with_name(base.name + suffix))

    def count(self) -> int:
        return sum(len(np.load(s)) for s, _ in self._shards())


def encode_cached(encoder: Encoder, texts: list[str], cache_root: Path, progress: bool = False,
                  desc: str = "encode items", chunk: int = 16384) -> tuple[np.ndarray, dict]:
    """Encode texts, reusing cached vectors. Returns (vectors, stats)."""
    shas = text_shas(texts)
    cache = EmbeddingCache(cache_root, encoder.cache_key)
    vecs, found = cache.lookup(shas, encoder.dim)
    missing = np.flatnonzero(~found)
    if len(missing):
        # encode each distinct missing text once, in chunks that each land as a shard, so an
        # interrupted encode resumes where it stopped
        from tqdm.auto import tqdm

        uniq, first, inv = np.unique(shas[missing], return_index=True, return_inverse=True)
        new = np.zeros((len(uniq), encoder.dim), dtype=np.float32)
        bar = tqdm(total=len(uniq), desc=desc, unit=" texts", disable=not progress)
        for lo in range(0, len(uniq), chunk):
            hi = min(lo + chunk, len(uniq))
            new[lo:hi] = encoder.encode([texts[missing[i]] for i in first[lo:hi]])
            cache.add(uniq[lo:hi], new[lo:hi])
            bar.update(hi - lo)
        bar.close()
        vecs[missing] = new[inv]
    stats = {"texts": len(texts), "cached": int(found.sum()), "encoded": int(len(missing))}
    (log.info if len(missing) else log.debug)("embeddings: %d texts, %d from cache, %d encoded", len(texts),
                                              stats["cached"], stats["encoded"])
    return vecs, stats
