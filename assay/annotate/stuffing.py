"""Keyword stuffing, the attack sellers actually use: the query's words appended to an unrelated product's title.

- :func:`stuff` builds the stuffed pair (the title followed by the query's words, nothing else changed);
- :func:`stuffed_copies` is the defence at training time: judges (``JudgeConfig.stuffed_negatives``; classifier
  judges and the features judge) also learn, for a share of their training pairs graded 0 or 1, the stuffed copy
  with the same grade, so words that merely repeat the query do not buy relevance;
- :func:`stuffing_features` are the text signals the features judge reads to see stuffing (query words as a run at
  the end of the title, repeated, found in the title only, a title long for its category); pure functions of the
  pair's text and the catalog's typical title length per category, no simulator knowledge;
- :func:`measure` is the check: on pairs whose reference grade is 0 or 1, the share whose grade the judge raises when
  the title is stuffed, and the share it puts at grade 3 or above, clean and stuffed
  (``benchmarks/bench_stuffing.py`` runs it on a workspace's trained judges).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import numpy as np

from assay.annotate.base import Pair

STUFFING_FEATURES = ["tail_query_run", "query_repeats", "title_only_share", "title_len_ratio"]
_TOKEN = re.compile(r"[a-z0-9]+")


def stuff(pair: Pair) -> Pair:
    """The pair with the query's words appended to the title."""
    return dataclasses.replace(pair, title=f"{pair.title} {pair.query}".strip())


def pick_stuffed(grades: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded ``share`` of the pairs graded 0 or 1 (the ones :func:`stuffed_copies` copies)."""
    grades = np.asarray(grades)
    low = np.flatnonzero(grades <= 1)
    if share <= 0 or not len(low):
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 17])
    return np.sort(rng.choice(low, size=int(round(share * len(low))), replace=False))


def stuffed_copies(pairs: Sequence[Pair], grades: np.ndarray, share: float, seed: int) -> tuple[list[Pair], np.ndarray]:
    """``pairs`` plus a stuffed copy (same grade) of a seeded ``share`` of the pairs graded 0 or 1."""
    pairs = list(pairs)
    grades = np.asarray(grades)
    pick = pick_stuffed(grades, share, seed)
    if not len(pick):
        return pairs, grades
    return pairs + [stuff(pairs[i]) for i in pick], np.concatenate([grades, grades[pick]])


def tokens(text: str | None) -> list[str]:
    """Lower-case alphanumeric tokens (the tokenisation of the features judge's text signals)."""
    return _TOKEN.findall((text or "").lower())


def _attr_text(attributes: str | dict | None) -> str:
    if isinstance(attributes, dict):
        return " ".join(f"{k} {v}" for k, v in attributes.items())
    try:
        obj = json.loads(attributes) if attributes else {}
    except (TypeError, ValueError):
        return str(attributes)
    return " ".join(f"{k} {v}" for k, v in obj.items()) if isinstance(obj, dict) else str(obj)


def stuffing_features(pairs: Sequence[Pair], typical_title_tokens: dict[str, float] | None = None) -> np.ndarray:
    """(n, 4) float32, columns :data:`STUFFING_FEATURES`:

    - ``tail_query_run``: how many of the title's last tokens are query tokens, over the query's token count (1 or
      more when the whole query was appended);
    - ``query_repeats``: occurrences of query tokens in the title beyond the first of each (stuffing a title that
      already names the product repeats its words);
    - ``title_only_share``: share of the query's tokens found in the title but nowhere in brand, category or
      attributes (an honest match usually shows in the category or attributes too);
    - ``title_len_ratio``: title tokens over the typical (median) title tokens of the item's category in this
      catalog; NaN when the category's typical length is not given.
    """
    out = np.zeros((len(pairs), len(STUFFING_FEATURES)), dtype=np.float32)
    typical = typical_title_tokens or {}
    for k, p in enumerate(pairs):
        q = tokens(p.query)
        qset = set(q)
        title = tokens(p.title)
        n = max(len(q), 1)
        run = 0
        for t in reversed(title):
            if t not in qset:
                break
            run += 1
        counts: dict[str, int] = {}
        for t in title:
            if t in qset:
                counts[t] = counts.get(t, 0) + 1
        rest = set(tokens(f"{p.brand or ''} {p.category or ''} {_attr_text(p.attributes)}"))
        tset = set(title)
        only = sum(t in tset and t not in rest for t in q) / n
        typ = typical.get(p.category or "")
        out[k] = (run / n, sum(c - 1 for c in counts.values()), only,
                  len(title) / typ if typ else np.nan)
    return out


def measure(judge, pairs: Sequence[Pair], reference: np.ndarray, progress: bool = False) -> dict:
    """How far stuffing moves ``judge`` on the pairs whose reference grade is 0 or 1."""
    reference = np.asarray(reference)
    low = [p for p, g in zip(pairs, reference) if g <= 1]
    if not low:
        raise ValueError("no pairs with reference grade 0 or 1 to stuff")
    clean = judge.predict(low, progress=progress).grade
    stuffed = judge.predict([stuff(p) for p in low], progress=progress).grade
    ok = (clean >= 0) & (stuffed >= 0)
    c, s = clean[ok], stuffed[ok]
    return {"pairs": int(ok.sum()), "raised": round(float((s > c).mean()), 4),
            "mean_raise": round(float((s - c).mean()), 4),
            "clean_at_3_plus": round(float((c >= 3).mean()), 4), "stuffed_at_3_plus": round(float((s >= 3).mean()), 4)}
