"""The BM25 channel: bm25s over the item text (title, brand, category, attributes).

Tokenizers (``mining.bm25.tokenizer``), measured in benchmarks/bench_mining.py:
- ``stem``: lowercase word tokens (2+ chars), English stopwords removed, Snowball stems.
- ``char3``: character 3-grams of each padded word (``#sofa#`` -> ``#so sof ofa fa#``),
  which still match a word with one typo on most of its grams.
- ``stem+char3`` (default): both sets of tokens in one index; the stems keep exact-word
  precision and the grams give typo tolerance.

The index is persisted under ``artifacts/mining/bm25/<catalog sha>-<tokenizer>/`` and reused
while the catalog and tokenizer are unchanged.

Searching with the numba backend: bm25s compiles its numba retrieval kernel in every process, without numba's
on-disk cache (measured: 7-9 s on the first search of each process, whatever the catalog's size: every `assay search`,
`assay serve` start, `assay evaluate` and `assay mine` paid it). assay runs bm25s's serial kernel only, compiled once
with ``cache=True`` (numba keeps it in ``__pycache__`` beside bm25s, or its user cache directory when that is read
only; later processes load it in about 0.3 s), and spreads the queries of one search over ``threads`` Python threads
(the kernel releases the GIL). Each query's top k is computed by the same code as bm25s's parallel kernel, so the
hits are the same.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


# bm25s sets its own logger to DEBUG while indexing ("Building index from tokens"); keep its warnings only
logging.getLogger("bm25s").addFilter(_below_warning)

_WORD = re.compile(r"(?u)\b\w\w+\b")
TOKENIZERS = ("stem", "char3", "stem+char3")


class Hits(NamedTuple):
    """Top-k per query: row indices into the catalog (-1 = none) and scores (0 = none)."""

    idx: np.ndarray  # (n_queries, k) int64
    scores: np.ndarray  # (n_queries, k) float32


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def make_tokenizer(name: str) -> Callable[[str], list[str]]:
    if name not in TOKENIZERS:
        raise KeyError(f"Unknown tokenizer {name!r}. Available: {list(TOKENIZERS)}")
    import Stemmer

    stem = Stemmer.Stemmer("english").stemWord
    stop = _stopwords()
    use_stem = "stem" in name
    use_char = "char3" in name

    def tokenize(text: str) -> list[str]:
        words = [w for w in _WORD.findall(text.lower()) if w not in stop]
        out: list[str] = []
        if use_stem:
            out.extend(stem(w) for w in words)
        if use_char:
            for w in words:
                p = f"#{w}#"
                out.extend("~" + p[i:i + 3] for i in range(len(p) - 2))
        return out

    return tokenize


@functools.cache
def cached_numba_kernel() -> bool:
    """Swap bm25s's serial numba retrieval kernel for the same function compiled with numba's on-disk cache (see the
    module docstring). Only the serial kernel: numba names a cache entry after the Python function, so caching the
    parallel variant of the same function too would let one load the other's code. False when this bm25s has no
    such kernel (another version): its own kernel is used, compiled per process."""
    try:
        from numba import njit
        from bm25s.numba import retrieve_utils as ru

        ru._retrieve_internal_jitted_serial = njit(nogil=True, cache=True)(ru._retrieve_internal_jitted)
        return True
    except (ImportError, AttributeError) as e:
        log.debug("bm25s numba kernel left as it is (%s)", e)
        return False


class BM25Index:
    def __init__(self, retriever, tokenizer: str, n_items: int, backend: str):
        self.retriever = retriever
        self.tokenizer_name = tokenizer
        self.tokenize = make_tokenizer(tokenizer)
        self.n_items = n_items
        self.backend = backend

    @staticmethod
    def pick_backend(backend: str) -> str:
        if backend != "auto":
            return backend
        try:
            import numba  # noqa: F401

            return "numba"
        except ImportError:
            return "numpy"

    @classmethod
    def build(cls, texts: list[str], tokenizer: str = "stem+char3", k1: float = 1.5, b: float = 0.75,
              backend: str = "auto", progress: bool = False) -> "BM25Index":
        import bm25s

        backend = cls.pick_backend(backend)
        tok = make_tokenizer(tokenizer)
        corpus = [tok(t) or ["<empty>"] for t in texts]
        r = bm25s.BM25(k1=k1, b=b, backend=backend)
        r.index(corpus, show_progress=progress)
        return cls(r, tokenizer, len(texts), backend)

    def save(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(d), show_progress=False)
        (d / "assay.json").write_text(json.dumps({"tokenizer": self.tokenizer_name, "n_items": self.n_items}))

    @classmethod
    def load(cls, d: Path, backend: str = "auto") -> "BM25Index":
        import bm25s

        meta = json.loads((d / "assay.json").read_text())
        backend = cls.pick_backend(backend)
        r = bm25s.BM25.load(str(d), show_progress=False, mmap=False)
        r.backend = backend
        return cls(r, meta["tokenizer"], meta["n_items"], backend)

    def search(self, queries: list[str], k: int, threads: int = 1) -> Hits:
        k_eff = min(k, self.n_items)
        toks = [self.tokenize(q) for q in queries]
        idx = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        nonempty = [i for i, t in enumerate(toks) if t]
        if not nonempty:
            return Hits(idx, scores)
        docs, sc = self._retrieve([toks[i] for i in nonempty], k_eff, threads)
        docs[sc <= 0] = -1  # bm25s pads with arbitrary zero-score documents
        sc[sc <= 0] = 0
        idx[nonempty, :k_eff] = docs
        scores[nonempty, :k_eff] = sc
        return Hits(idx, scores)

    def _retrieve(self, toks: list[list[str]], k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """bm25s's top ``k`` (documents, scores) of tokenized queries; numba: the cached serial kernel on up to
        ``threads`` Python threads, each with its share of the queries, in order."""
        def one(part: list[list[str]], n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
            d, s = self.retriever.retrieve(part, k=k, show_progress=False, n_threads=n_threads,
                                           backend_selection=self.backend if self.backend == "numba" else "numpy")
            return np.asarray(d, dtype=np.int64), np.asarray(s, dtype=np.float32)

        if self.backend != "numba" or not cached_numba_kernel():
            return one(toks, threads)
        n = max(1, min(threads, len(toks)))
        if n == 1:
            return one(toks)
        bounds = np.linspace(0, len(toks), n + 1).astype(int)
        with ThreadPoolExecutor(n) as pool:
            parts = list(pool.map(one, [toks[a:b] for a, b in zip(bounds[:-1], bounds[1:])]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
