"""Query spelling correction against the catalog's vocabulary (the query side of every retriever).

Product-search logs carry misspelled queries ("drip cooffee maker", "xattress encasement"). BM25 over character
3-grams tolerates them; a WordPiece encoder does not: "cooffee" becomes pieces that mean nothing near "coffee",
and the dense top 10 fills with unrelated items. `assay evaluate`, `assay train`, `assay search` and `assay serve`
therefore pass every query through one :class:`Speller` first (config section ``spell``), so all systems see the
same query text, in training as in serving.

The rule, per word of the query (lowercased ``[a-z0-9]+`` runs; digits and words shorter than ``min_length`` are
left alone):

- a word is *known* when the catalog's item texts contain it, or (``model_vocab``) it is a whole word of the
  embedder's WordPiece vocabulary (ordinary English the catalog happens not to use: "gift", "everyday");
- an unknown word is replaced by the catalog word at the smallest Damerau-Levenshtein distance (insertions,
  deletions, substitutions and adjacent transpositions), at most 1 edit, or 2 for words of ``long_length``
  letters or more; ties go to the word more items use, then alphabetically;
- an unknown word with no catalog word that close is kept as it is.

Candidates come from a symmetric-delete index (every catalog word with one letter deleted, and with two for words
of ``long_length`` letters or more), so a lookup
costs a few dictionary probes whatever the catalog's size. The speller never reads the simulator's truth or the
labels: it is a function of the catalog and the config.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _deletes(word: str, n: int) -> set[str]:
    """Every string made by deleting exactly ``n`` letters of ``word``."""
    if n == 0:
        return {word}
    return {"".join(c for i, c in enumerate(word) if i not in drop) for drop in combinations(range(len(word)), n)}


def edit_distance(a: str, b: str, limit: int = 2) -> int:
    """Damerau-Levenshtein distance (optimal string alignment) of ``a`` and ``b``, capped at ``limit + 1``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return min(prev[-1], limit + 1)


class Speller:
    """Corrects unknown query words to the closest catalog word (see the module docstring)."""

    def __init__(self, counts: Counter | dict[str, int], *, known: Iterable[str] = (), min_length: int = 4,
                 long_length: int = 8):
        self.counts = {w: int(c) for w, c in counts.items() if w and not w.isdigit()}
        self.known = set(self.counts) | set(known)
        self.min_length, self.long_length = int(min_length), int(long_length)
        self._index: dict[str, list[str]] = {}
        for w in self.counts:
            if len(w) < max(self.min_length - 1, 2):
                continue
            # a query word two edits away is at least long_length letters; it meets a catalog word at two
            # deletions from each side only when the catalog word is that long too (shorter ones meet it at one)
            for n in (0, 1, 2) if len(w) >= self.long_length else (0, 1):
                for d in _deletes(w, n):
                    self._index.setdefault(d, []).append(w)
        self._memo: dict[str, str] = {}

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, known: Iterable[str] = (), min_length: int = 4,
                   long_length: int = 8) -> "Speller":
        """The vocabulary of item texts: each word counted once per text (how many items use it)."""
        counts: Counter = Counter()
        for t in texts:
            counts.update(set(words(t)))
        return cls(counts, known=known, min_length=min_length, long_length=long_length)

    def correct_word(self, word: str) -> str:
        if word in self._memo:
            return self._memo[word]
        out = word
        if len(word) >= self.min_length and word not in self.known and not any(ch.isdigit() for ch in word):
            limit = 2 if len(word) >= self.long_length else 1
            cands: set[str] = set()
            for n in range(limit + 1):
                for d in _deletes(word, n):
                    cands.update(self._index.get(d, ()))
            best = None
            for c in cands:
                dist = edit_distance(word, c, limit)
                if dist <= limit:
                    key = (dist, -self.counts.get(c, 0), c)
                    best = key if best is None or key < best else best
            if best is not None:
                out = best[2]
        self._memo[word] = out
        return out

    def correct(self, text: str) -> str:
        """The query with each unknown word replaced by its correction; everything else (case of known words,
        punctuation, spacing) is kept."""
        def fix(m: re.Match) -> str:
            w = m.group(0)
            c = self.correct_word(w.lower())
            return w if c == w.lower() else c
        return re.sub(r"[A-Za-z0-9]+", fix, text)

    def correct_many(self, texts: Iterable[str]) -> list[str]:
        return [self.correct(t) for t in texts]


def model_words(model_dir: str | Path) -> set[str]:
    """Whole words (no ``##`` continuation, letters only, 2+ characters) of a WordPiece ``vocab.txt``; empty when
    the model has none (a hub id, or a tokenizer of another kind)."""
    p = Path(model_dir) / "vocab.txt"
    if not p.is_file():
        return set()
    return {w for w in p.read_text(encoding="utf-8").split("\n") if len(w) >= 2 and w.isalpha() and w.islower()}


def for_workspace(cfg, store=None, texts: Iterable[str] | None = None) -> Speller | None:
    """The speller of a workspace's catalog under ``cfg.spell`` (an AssayConfig), or None when it is disabled.
    ``texts``: the catalog's item texts when the caller has them already, else read from ``products``."""
    return build(cfg.spell, cfg.train.base_model or cfg.models.embedder, store, texts)


def build(sc, model_name: str, store=None, texts: Iterable[str] | None = None) -> Speller | None:
    """:func:`for_workspace` from the ``spell`` section and the embedder's name."""
    if sc is None or not sc.enabled:
        return None
    if texts is None:
        from assay.mining.run import load_catalog

        texts = load_catalog(store).texts
    known: set[str] = set()
    if sc.model_vocab:
        from assay.models import resolve

        known = model_words(resolve(model_name).local_dir)
    return Speller.from_texts(texts, known=known, min_length=sc.min_length, long_length=sc.long_length)
