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


def check_bf16(precision: str, device: str, setting: str) -> None:
    """Refuse bf16 autocast on a CPU without native bf16 matrix units.

    Profiled (docs/inference.md): on an AVX2-only CPU (AMD EPYC, 2 threads) oneDNN reports no bf16 support, and
    ``aten::addmm`` under bf16 autocast took 5.0 s against 0.67 s in fp32 for the same 128 texts (5.6x slower end to
    end). Where ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is true (AVX512-BF16 or AMX) bf16 is the fast path."""
    import torch

    if precision == "bf16" and device.startswith("cpu") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(f"{setting} is bf16, but this CPU has no native bf16 matrix instructions (AVX512-BF16 or "
                         "AMX), so PyTorch runs bf16 matmuls on a slow fallback (measured 5.6x slower than fp32); set "
                         f"{setting}: fp32, and models.backend: onnx-int8 (or auto) for speed")


class Encoder:
    """Encodes texts to L2-normalised float32 vectors, with PyTorch or an ONNX Runtime export of the same model
    (``backend``: torch, onnx or onnx-int8; see assay.inference and :func:`open_encoder`)."""

    def __init__(self, model_name: str, device: str = "cpu", max_seq_length: int = 64,
                 precision: str = "fp32", batch_size: int = 128, backend: str = "torch",
                 artifacts: Path | None = None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        check_bf16(precision, device, "mining.ann.precision")
        self.resolved = models.resolve(model_name)
        self.model = models.load_sentence_transformer(model_name, device=device)
        self.model.max_seq_length = max_seq_length
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.sha = models.model_sha(self.resolved)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.backend = backend
        self.runner = None
        self.guard: dict = {}
        if backend != "torch":
            if artifacts is None:
                raise ValueError(f"backend {backend!r} needs an artifacts folder for its export")
            from assay import inference

            folder = inference.ensure_export(self.model, self.model.tokenizer, artifacts=artifacts, what="encoder",
                                             source_sha=self.sha, backend=backend, output="sentence_embedding",
                                             max_length=max_seq_length, setting="models.backend")
            self.runner = inference.OnnxRunner(folder, self.model.tokenizer, max_seq_length)

    @property
    def cache_key(self) -> str:
        return cache_key(self.sha, self.model.max_seq_length, self.precision, self.backend)

    def encode(self, texts: list[str], progress: bool = False, desc: str = "encode") -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.runner is not None:
            return _unit(self.runner(texts, self.batch_size))
        return self.encode_torch(texts, progress)

    def encode_torch(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """The PyTorch forward pass, whatever the backend (the accuracy guard's reference)."""
        import torch

        ctx = (torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
               if self.precision == "bf16" else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            vecs = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=progress,
                                     convert_to_numpy=False, convert_to_tensor=True, normalize_embeddings=False)
        return _unit(vecs.float().cpu().numpy())


def cache_key(model_sha: str, max_seq_length: int, precision: str, backend: str) -> str:
    """The embedding-cache key of a model's vectors: its weights' sha, max sequence length, precision, the text
    template version and the backend. torch keeps its historical key, so existing caches stay valid; an export's
    vectors differ, so it adds its name."""
    extra = [] if backend == "torch" else [backend]
    return digest([model_sha, max_seq_length, precision, TEXT_TEMPLATE_VERSION] + extra)


def _unit(vecs: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return (vecs / np.maximum(norms, 1e-12)).astype(np.float32)


def guard_sample(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """A seeded sample of at most ``n`` distinct texts: what the accuracy guard compares backends on."""
    uniq = sorted(set(texts))
    if len(uniq) <= n:
        return uniq
    pick = np.random.default_rng(seed).choice(len(uniq), n, replace=False)
    return [uniq[i] for i in sorted(pick)]


def open_encoder(model_name: str, models_cfg, artifacts: Path, sample_texts: list[str], *, max_seq_length: int = 64,
                 precision: str = "fp32", batch_size: int = 128) -> Encoder:
    """An :class:`Encoder` on ``models_cfg.backend``. An int8 export must keep the mean cosine of its embeddings to
    the fp32 PyTorch ones, on a sample of ``sample_texts``, at ``models.guard_min_cosine`` or above; under
    ``auto`` a failing int8 export is replaced by the fp32 one (logged, and recorded in ``encoder.guard``)."""
    from assay import inference

    sample = guard_sample(sample_texts, models_cfg.guard_sample)

    def build(backend: str) -> Encoder:
        return Encoder(model_name, device=models_cfg.device, max_seq_length=max_seq_length, precision=precision,
                       batch_size=batch_size, backend=backend, artifacts=artifacts)

    def measure(enc: Encoder) -> dict:
        key = f"cosine-{inference.sample_digest(sample)}"
        known = (inference.read_export(enc.runner.folder) or {}).get("guard", {}).get(key)
        if known:
            return known
        result = inference.embedding_agreement(enc.encode_torch(sample), enc.encode(sample))
        inference.record_guard(enc.runner.folder, key, result)
        return result

    limits = {"mean_cosine": ("min", models_cfg.guard_min_cosine, "models.guard_min_cosine")}
    enc, backend, notes = inference.choose(inference.resolve(models_cfg.backend, models_cfg.device), build,
                                           measure if sample else None, limits, f"encoder {model_name}",
                                           "models.backend")
    enc.guard = {"backend": backend, **notes}
    return enc


class EmbeddingCache:
    """Vectors keyed by text digest, in shard files (``shard-*.sha.npy`` + ``shard-*.vec.npy``) that any process
    may add. Each process keeps one merged, sorted index of the shards it has read (per cache folder), so a lookup
    is one binary search, and reads the folder again only for digests it does not hold (a shard another process
    wrote). Reading every shard on every lookup grew with lookups x shards: the features judge looks up each batch
    and adds a shard for each batch that encodes (2,900 shards, and growing, 18 minutes into annotating the
    100k-item world of bench_scale)."""

    _indexes: dict[tuple, dict] = {}

    def __init__(self, root: Path, key: str):
        self.dir = root / "embeddings" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        key = str(self.dir.resolve())
        ix = EmbeddingCache._indexes.get(key)
        if ix is None or not self._same_first_shard(ix):  # a folder removed and made again is another cache
            ix = EmbeddingCache._indexes[key] = {
                "seen": set(), "files": [], "vecs": {}, "first": None, "shas": np.zeros(0, "S16"),
                "shard": np.zeros(0, np.int64), "row": np.zeros(0, np.int64)}
        self._ix = ix

    @staticmethod
    def _same_first_shard(ix: dict) -> bool:
        if ix["first"] is None:
            return True
        path, ino, mtime = ix["first"]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_mtime_ns) == (ino, mtime)

    def _shards(self) -> list[tuple[Path, Path]]:
        out = []
        for sha_file in sorted(self.dir.glob("shard-*.sha.npy")):
            vec_file = sha_file.with_name(sha_file.name.replace(".sha.npy", ".vec.npy"))
            if vec_file.exists():
                out.append((sha_file, vec_file))
        return out

    def _merge(self, shards: list[tuple[Path, np.ndarray, Path]]) -> None:
        """Add (sha file, its digests, vector file) to the index; among equal digests the shard read first wins."""
        ix = self._ix
        shas, shard, row = [ix["shas"]], [ix["shard"]], [ix["row"]]
        for sha_file, digests, vec_file in shards:
            k = len(ix["files"])
            if k == 0:
                st = os.stat(sha_file)
                ix["first"] = (str(sha_file), st.st_ino, st.st_mtime_ns)
            ix["files"].append(vec_file)
            ix["seen"].add(sha_file.name)
            shas.append(digests.astype("S16"))
            shard.append(np.full(len(digests), k, np.int64))
            row.append(np.arange(len(digests), dtype=np.int64))
        cat = np.concatenate(shas)
        order = np.argsort(cat, kind="stable")
        ix["shas"], ix["shard"], ix["row"] = cat[order], np.concatenate(shard)[order], np.concatenate(row)[order]

    def _refresh(self) -> None:
        """Merge the shards this process has not read: one listing of the folder, no stat per file."""
        names = set(os.listdir(self.dir))
        new = sorted(n for n in names if n.startswith("shard-") and n.endswith(".sha.npy")
                     and n not in self._ix["seen"] and n.replace(".sha.npy", ".vec.npy") in names)
        if new:
            self._merge([(self.dir / n, np.load(self.dir / n, allow_pickle=False),
                          self.dir / n.replace(".sha.npy", ".vec.npy")) for n in new])

    def _find(self, shas: np.ndarray, out: np.ndarray, found: np.ndarray) -> None:
        ix = self._ix
        if not len(ix["shas"]) or not len(shas):
            return
        pos = np.clip(np.searchsorted(ix["shas"], shas), 0, len(ix["shas"]) - 1)
        hit = (ix["shas"][pos] == shas) & ~found
        ks, rs = ix["shard"][pos], ix["row"][pos]
        for k in np.unique(ks[hit]):
            sel = hit & (ks == k)
            if k not in ix["vecs"]:
                ix["vecs"][k] = np.load(ix["files"][k], mmap_mode="r", allow_pickle=False)
            out[sel] = ix["vecs"][k][rs[sel]]
        found |= hit

    def lookup(self, shas: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (vectors, found mask) for the given digests."""
        out = np.zeros((len(shas), dim), dtype=np.float32)
        found = np.zeros(len(shas), dtype=bool)
        self._find(shas, out, found)
        if not found.all():  # shards this process has not read yet
            self._refresh()
            self._find(shas, out, found)
        return out, found

    def add(self, shas: np.ndarray, vecs: np.ndarray) -> None:
        if not len(shas):
            return
        n = sum(n.endswith(".sha.npy") for n in os.listdir(self.dir))
        base = self.dir / f"shard-{n:06d}-{os.getpid()}"
        for suffix, arr in ((".vec.npy", vecs.astype(np.float32)), (".sha.npy", shas)):
            tmp = base.with_name(base.name + suffix + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, base.with_name(base.name + suffix))
        self._merge([(base.with_name(base.name + ".sha.npy"), np.asarray(shas), base.with_name(base.name + ".vec.npy"))])

    def count(self) -> int:
        return sum(len(np.load(s, allow_pickle=False)) for s, _ in self._shards())

    def stored_dim(self) -> int | None:
        """The width of the cached vectors, from one shard's header (None while the cache is empty)."""
        self._refresh()
        if not self._ix["files"]:
            return None
        return int(np.load(self._ix["files"][0], mmap_mode="r", allow_pickle=False).shape[1])


class LazyEncoder:
    """An :class:`Encoder` opened at its first encode. Its cache key comes from the model's files and settings (the
    same :func:`cache_key`, checked against the real encoder's when it opens), so :func:`encode_cached` reads every
    cached text without loading the model: a judge, or a Ray worker, whose texts are all in the cache never loads
    it (opening MiniLM in a fresh process took 4.8 s, sentence-transformers' import included)."""

    def __init__(self, model_name: str, *, artifacts: Path, max_seq_length: int = 64, batch_size: int = 128,
                 backend: str = "torch"):
        self.sha = models.model_sha(models.resolve(model_name))
        self.backend, self.precision = backend, "fp32"
        self.cache_key = cache_key(self.sha, max_seq_length, self.precision, backend)
        self._args = dict(model_name=model_name, max_seq_length=max_seq_length, batch_size=batch_size,
                          backend=backend, artifacts=artifacts)
        self._encoder: Encoder | None = None
        self._dim: int | None = None

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            enc = Encoder(**self._args)
            if enc.cache_key != self.cache_key:  # the key's recipe and the encoder's must never drift apart
                raise RuntimeError(f"encoder {self._args['model_name']!r}: cache key {enc.cache_key} differs from the "
                                   f"one computed without loading it ({self.cache_key})")
            self._encoder = enc
        return self._encoder

    @property
    def dim(self) -> int:
        # read once: encode_cached asks for it on every call (twice a batch in annotation)
        if self._dim is None:
            self._dim = (EmbeddingCache(self._args["artifacts"], self.cache_key).stored_dim() if self._encoder is None
                         else None) or self.encoder.dim
        return self._dim

    def encode(self, texts: list[str], progress: bool = False, desc: str = "encode") -> np.ndarray:
        return self.encoder.encode(texts, progress, desc)


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
