"""Human-labeled seed set: sampled queries, ~``pairs_per_label_query`` pairs each, noisy annotator grades.

Pairs per labeled query come from the sources in ``label_pair_mix``: the production ranker's top results, items of
the same type (for brand-only queries: of the same brand), of substitute types, of complement types, of lexical-trap
types (share a word with the query type, unrelated in meaning) and uniformly random items; an empty source hands
its share to random items. Pairs are unique per query.

Annotators: ``n_annotators`` ids; each labeled query goes to one annotator, whose accuracy is
``annotator_accuracy`` ± ``annotator_accuracy_spread`` (uniform). A wrong label is off by exactly one grade with
probability ``annotator_near_miss`` (towards the inside of the scale at 0 and 4), otherwise a grade at distance >= 2.

Splits are by query: labeled queries are shuffled and cut by ``split_fractions`` (so no query is in two splits).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .params import SimulateConfig
from .rng import rng_for
from .taxonomy import Taxonomy
from .truth import TruthOracle


class Labels(NamedTuple):
    q: np.ndarray  # query index
    item: np.ndarray  # item index
    grade: np.ndarray  # int8, noisy
    truth: np.ndarray  # int8, true grade
    annotator: list[str]
    split: list[str]


def sample_labels(tax: Taxonomy, oracle: TruthOracle, top: np.ndarray, cfg: SimulateConfig) -> Labels:
    rng = rng_for(cfg.seed, "labels")
    n_q = len(oracle.query_ids)
    n_items = len(oracle.item_ids)
    n_lab = int(round(cfg.label_queries * n_q)) if cfg.label_queries < 1 else int(cfg.label_queries)
    n_lab = max(1, min(n_lab, n_q))
    chosen = np.sort(rng.choice(n_q, size=n_lab, replace=False))
    mix = {k: v for k, v in cfg.label_pair_mix.items() if v > 0}
    tot = sum(mix.values())
    of_types = oracle.items_of_types

    qs, its = [], []
    for q in chosen:
        target = max(5, cfg.pairs_per_label_query + int(rng.integers(-3, 4)))
        t, b = int(oracle.q_type[q]), int(oracle.q_brand[q])
        pools: dict[str, np.ndarray] = {"ranker": top[q][top[q] >= 0]}
        if t >= 0:
            pools["same_type"] = of_types(np.array([t]))
            pools["substitute"] = of_types(np.flatnonzero(tax.substitute[t]))
            pools["complement"] = of_types(np.flatnonzero(tax.complement[t]))
            pools["trap"] = of_types(np.flatnonzero(tax.trap[t]))
        else:
            pools["same_type"] = oracle.items_of_brand(b)
        picked: list[np.ndarray] = []
        short = 0
        for src, w in mix.items():
            want = int(round(target * w / tot))
            if src == "random":
                continue
            pool = pools.get(src, np.empty(0, np.int64))
            if src == "ranker":
                take = pool[:want]
            else:
                take = pool[rng.choice(len(pool), size=min(want, len(pool)), replace=False)] if len(pool) else pool
            picked.append(take)
            short += want - len(take)
        picked.append(rng.integers(0, n_items, size=int(round(target * mix.get("random", 0) / tot)) + short))
        items = np.unique(np.concatenate(picked).astype(np.int64))
        items = rng.permutation(items)[:target]
        qs.append(np.full(len(items), q, np.int64))
        its.append(np.sort(items))
    q_arr = np.concatenate(qs)
    i_arr = np.concatenate(its)
    truth = oracle.grade_idx(q_arr, i_arr)
    # annotators, per query (accuracies drawn here first: the stream of earlier worlds stays the same)
    acc = np.clip(cfg.annotator_accuracy + rng.uniform(-cfg.annotator_accuracy_spread, cfg.annotator_accuracy_spread,
                                                       size=cfg.n_annotators), 0, 1)
    ann_of_query = rng.integers(0, cfg.n_annotators, size=n_lab)
    ann = ann_of_query[np.searchsorted(chosen, q_arr)]
    noisy = noisy_grades(truth, ann, acc, cfg.annotator_near_miss, rng)
    # splits by query
    names = list(cfg.split_fractions)
    fr = np.array([cfg.split_fractions[k] for k in names])
    order = rng.permutation(n_lab)
    cuts = np.round(np.cumsum(fr) * n_lab).astype(int)
    split_of = np.empty(n_lab, dtype=object)
    prev = 0
    for name, c in zip(names, cuts):
        split_of[order[prev:c]] = name
        prev = c
    pos = np.searchsorted(chosen, q_arr)
    return Labels(q=q_arr, item=i_arr, grade=noisy, truth=truth, annotator=annotator_names(ann, cfg),
                  split=split_of[pos].tolist())


def annotator_accuracies(cfg: SimulateConfig) -> np.ndarray:
    """P(label == truth) of each annotator who answers label requests: ``annotator_accuracy`` ±
    ``annotator_accuracy_spread``, fixed by the seed (the same mean and spread as the seed set's annotators)."""
    rng = rng_for(cfg.seed, "request-annotators")
    acc = cfg.annotator_accuracy + rng.uniform(-cfg.annotator_accuracy_spread, cfg.annotator_accuracy_spread,
                                               size=cfg.n_annotators)
    return np.clip(acc, 0, 1)


def annotator_names(ann: np.ndarray, cfg: SimulateConfig) -> list[str]:
    width = max(2, len(str(cfg.n_annotators)))
    return [f"ann{a + 1:0{width}d}" for a in np.asarray(ann).tolist()]


def noisy_grades(truth: np.ndarray, ann: np.ndarray, acc: np.ndarray, near_miss: float,
                 rng: np.random.Generator) -> np.ndarray:
    """What annotators ``ann`` (indices into ``acc``) answer for pairs whose true grades are ``truth``.

    A label is right with the annotator's accuracy; a wrong one is off by exactly one grade with probability
    ``near_miss`` (towards the inside of the scale at 0 and 4), otherwise a grade at distance >= 2."""
    truth = np.asarray(truth, dtype=np.int64)
    n = len(truth)
    wrong = rng.random(n) >= acc[ann]
    near = rng.random(n) < near_miss
    up = rng.random(n) < 0.5
    step = np.where(up, 1, -1)
    step = np.where(truth == 0, 1, np.where(truth == 4, -1, step))
    far_choices = rng.integers(0, 5, size=n)
    far = np.where(np.abs(far_choices - truth) >= 2, far_choices,
                   np.where(truth >= 2, truth - 2, truth + 2))  # a grade at distance >= 2
    return np.where(wrong, np.where(near, truth + step, far), truth).astype(np.int8)
