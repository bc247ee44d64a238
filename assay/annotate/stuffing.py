"""Keyword stuffing, the attack sellers actually use: the query's words appended to an unrelated product's title.

- :func:`stuff` builds the stuffed pair (the title followed by the query's words, nothing else changed);
- :func:`stuffed_copies` is the defence at training time: classifier judges (``JudgeConfig.stuffed_negatives``)
  also learn, for a share of their training pairs graded 0 or 1, the stuffed copy with the same grade, so words
  that merely repeat the query do not buy relevance;
- :func:`measure` is the check: on pairs whose reference grade is 0 or 1, the share whose grade the judge raises when
  the title is stuffed, and the share it puts at grade 3 or above, clean and stuffed
  (``benchmarks/bench_stuffing.py`` runs it on a workspace's trained judges).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from assay.annotate.base import Pair


def stuff(pair: Pair) -> Pair:
    """The pair with the query's words appended to the title."""
    return dataclasses.replace(pair, title=f"{pair.title} {pair.query}".strip())


def stuffed_copies(pairs: Sequence[Pair], grades: np.ndarray, share: float, seed: int) -> tuple[list[Pair], np.ndarray]:
    """``pairs`` plus a stuffed copy (same grade) of a seeded ``share`` of the pairs graded 0 or 1."""
    pairs = list(pairs)
    grades = np.asarray(grades)
    if share <= 0:
        return pairs, grades
    low = np.flatnonzero(grades <= 1)
    rng = np.random.default_rng([seed, 17])
    pick = np.sort(rng.choice(low, size=int(round(share * len(low))), replace=False)) if len(low) else low
    return pairs + [stuff(pairs[i]) for i in pick], np.concatenate([grades, grades[pick]])


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
