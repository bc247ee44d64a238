"""The BM25 channel: bm25s over the item text (title, brand, category, attributes).

Tokenizers (``mining.bm25.tokenizer``), measured in benchmarks/bench_mining.py:
- ``stem``: lowercase word tokens (2+ chars), English stopwords removed, Snowball stems.
- ``char3``: character 3-grams of each padded word (``#sofa#`` -> ``#so sof ofa fa#``),
  which still match a word with one typo on most of its grams.
- ``stem+char3`` (default): both sets of tokens in one index; the stems keep exact-word
  precision and the grams give typo tolerance.

The index is persisted under ``artifacts/mining/bm25/<catalog sha>-<tokenizer>/`` and reused
while the catalog and tokenizer are unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
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
        docs, sc = self.retriever.retrieve(
            [toks[i] for i in nonempty], k=k_eff, show_progress=False, n_threads=threads,
            backend_selection=self.backend if self.backend == "numba" else "numpy")
        docs = np.asarray(docs, dtype=np.int64)
        sc = np.asarray(sc, dtype=np.float32)
        docs[sc <= 0] = -1  # bm25s pads with arbitrary zero-score documents
        sc[sc <= 0] = 0
        idx[nonempty, :k_eff] = docs
        scores[nonempty, :k_eff] = sc
        return Hits(idx, scores)
