"""Training data for the two-tower model: what `assay train` reads, and the seeded batch sampler.

Reads (read-only) ``examples`` (tiers, graded targets, split), ``queries``, ``products`` (item text through
:func:`assay.text.item_text`), the labeled pairs of the validation queries (cascade labels, human grades where
present; never the simulator's truth) and, for the click baseline, ``engagement``.

A batch is ``B`` query groups. A group is one query, one positive drawn from the stage's positive tiers (with
probability proportional to target x weight) and ``G - 1`` negatives from its negative tiers; a share ``replay``
of the groups is drawn from an earlier stage's tiers instead. Every batch is a pure function of
(seed, stage, step), so a resumed or repeated run sees the same batches, and rank r of a distributed run takes
groups r, r + world, ... of the same global batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from assay.curriculum.run import labeled_pairs_sql
from assay.curriculum.tiers import split_of
from assay.store import Store
from assay.text import item_text

log = logging.getLogger(__name__)


class GroupSpec(NamedTuple):
    pos_tiers: tuple[int, ...]
    neg_tiers: tuple[int, ...]
    binary: bool = False  # targets become 1[grade >= 3]


class Batch(NamedTuple):
    query_idx: np.ndarray  # (B,)
    item_idx: np.ndarray   # (B, G), -1 = padding
    targets: np.ndarray    # (B, G) float32
    mask: np.ndarray       # (B, G) bool
    grades: np.ndarray | None = None  # (B, G) float32 label grade, NaN = none (padding, click positives)
    first: np.ndarray | None = None   # (B,) bool: the group comes from the first stage's mix (paced schedule)

    def listwise_targets(self, min_grade: int, gain: str = "linear") -> np.ndarray:
        """Targets for the in-batch softmax losses: an item graded below ``min_grade`` gets none of the soft-target
        mass, whatever its target (a mining prior lifts grade-0 targets a little above 0, which in a softmax would
        rank it above every in-batch item); items without a grade keep theirs. ``gain`` ``exponential`` then maps
        each target t to ``2^(4t) - 1``, NDCG's gain of t read as a grade on 0-4 (the losses normalise the targets
        per query, so a linear target's share becomes a gain's share); 0 stays 0 and binary targets keep their
        shares."""
        t = self.targets
        if self.grades is not None and min_grade > 0:
            low = ~np.isnan(self.grades) & (np.nan_to_num(self.grades, nan=np.inf) < min_grade)
            t = np.where(low, 0.0, t).astype(np.float32)
        if gain == "exponential":
            t = np.exp2(4.0 * np.clip(t, 0.0, 1.0)).astype(np.float32) - np.float32(1.0)
        elif gain != "linear":
            raise ValueError(f"listwise gain {gain!r}: linear or exponential")
        return t


@dataclass
class ValPool:
    """What validation scores, from the labels a user has (cascade, human grades where present).

    ``query_idx``/``item_idx``/``grade``: labeled mined candidates of the validation queries (a seeded sample of
    ``val_pool_per_query`` each), re-ranked by the model to score rerank NDCG@10. Mined negatives are left out:
    ranking a random item last says little.

    ``lab_*`` (every labeled pair of those queries, token-similar negatives included) and ``catalog`` (their items
    plus a seeded sample of ``val_catalog_random`` catalog items): the model retrieves each query's top 10 from the
    whole of ``catalog``, as it will in serving, for retrieval NDCG@10 and the embarrassing rate (docs/training.md
    section 7). None when validation re-ranks only (``train.val_metric: rerank``)."""

    query_idx: np.ndarray
    item_idx: np.ndarray
    grade: np.ndarray
    lab_query: np.ndarray | None = None
    lab_item: np.ndarray | None = None
    lab_grade: np.ndarray | None = None
    catalog: np.ndarray | None = None

    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every labeled pair of the validation queries (the pool when none were loaded)."""
        if self.lab_query is None:
            return self.query_idx, self.item_idx, self.grade
        return self.lab_query, self.lab_item, self.lab_grade

    def catalog_items(self) -> np.ndarray:
        """Sorted item indices validation encodes: the catalog, or the pool's items without one."""
        return np.unique(self.item_idx) if self.catalog is None else self.catalog

    @property
    def n_queries(self) -> int:
        return len(np.unique(self.query_idx))


@dataclass
class TrainData:
    query_ids: list[str]
    query_texts: list[str]
    item_ids: list[str]
    item_texts: list[str]
    ex_query: np.ndarray
    ex_item: np.ndarray
    ex_tier: np.ndarray
    ex_target: np.ndarray
    ex_weight: np.ndarray
    ex_grade: np.ndarray
    ex_split: np.ndarray
    random_pool: np.ndarray          # item indices usable as random negatives
    val: ValPool
    examples_run_id: str
    clicks: tuple[np.ndarray, np.ndarray] | None = None  # (query_idx, item_idx) engaged pairs of train queries

    def summary(self) -> dict:
        return {"examples": int(len(self.ex_query)), "train_examples": int((self.ex_split == "train").sum()),
                "queries": len(self.query_ids), "items": len(self.item_ids),
                "val_queries": self.val.n_queries, "val_pairs": int(len(self.val.grade)),
                "val_catalog": int(len(self.val.catalog_items())),
                "examples_run_id": self.examples_run_id}


def load(store: Store, *, val_max_queries: int, val_pool_per_query: int, random_pool: int, seed: int,
         with_clicks: bool = False, click_min_clicks: int = 1, speller=None,
         val_catalog_random: int | None = None) -> TrainData:
    """Load everything a training run needs, in a few queries; raises with the missing step named. ``speller``
    (:class:`assay.spell.Speller`) corrects the query texts, as evaluation and serving do.
    ``val_catalog_random``: random catalog items in the retrieval-validation catalog (None: no catalog; validation
    re-ranks the pool only)."""
    if store.count("examples") == 0:
        raise ValueError("the workspace has no examples; run `assay curriculum` first (after `assay annotate`)")
    ex = store.query("SELECT query_id, item_id, tier, target, weight, grade, split, run_id FROM examples "
                     "ORDER BY query_id, item_id, stage")
    run_ids = sorted(set(ex.column("run_id").to_pylist()))
    qids_ex = ex.column("query_id").to_pylist()
    iids_ex = ex.column("item_id").to_pylist()
    val_q = sorted({q for q, s in zip(qids_ex, ex.column("split").to_pylist()) if s == "val"})
    rng = np.random.default_rng([seed, 7])
    if len(val_q) > val_max_queries:
        val_q = sorted(rng.choice(val_q, val_max_queries, replace=False).tolist())
    val_tbl = _val_pool(store, val_q, val_pool_per_query, seed)
    pool_q = sorted(set(val_tbl["query_id"]))
    lab_tbl = _val_labels(store, pool_q) if val_catalog_random is not None else None
    cat_sample = store.query("SELECT item_id FROM products ORDER BY hash(item_id || ? || 'val') LIMIT ?",
                             [str(seed), int(val_catalog_random)]).column("item_id").to_pylist() \
        if val_catalog_random else []
    click_q: list[str] = []
    click_i: list[str] = []
    if with_clicks:
        rows = store.exec("SELECT query_id, item_id FROM engagement GROUP BY 1, 2 HAVING sum(clicks) >= ? "
                          "ORDER BY 1, 2", [click_min_clicks])
        if not rows:
            raise ValueError("the click baseline needs engagement with clicks; the workspace has none "
                             "(ingest an engagement log with `assay ingest`)")
        all_q = sorted({r[0] for r in rows})
        sp = store.get_meta("curriculum_split", {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 13})
        split = dict(zip(all_q, split_of(all_q, sp["val_fraction"], sp["test_fraction"], sp["seed"])))
        kept = [r for r in rows if split[r[0]] == "train"]
        click_q, click_i = [r[0] for r in kept], [r[1] for r in kept]
    # random negatives: a seeded sample of the catalog (the whole catalog when it is small)
    n_products = store.count("products")
    sample = store.query("SELECT item_id FROM products ORDER BY hash(item_id || ?) LIMIT ?",
                         [str(seed), int(random_pool)]).column("item_id").to_pylist()
    qset = sorted(set(qids_ex) | set(val_tbl["query_id"]) | set(click_q))
    cat_ids = sorted(set(lab_tbl["item_id"]) | set(val_tbl["item_id"]) | set(cat_sample)) if lab_tbl else []
    iset = sorted(set(iids_ex) | set(val_tbl["item_id"]) | set(sample) | set(click_i) | set(cat_ids))
    qtext = dict(store.exec("SELECT query_id, text FROM queries"))
    if speller is not None:
        qtext = {q: speller.correct(t) for q, t in qtext.items()}
    items = _item_texts(store, iset)
    q_of = {q: i for i, q in enumerate(qset)}
    i_of = {t: i for i, t in enumerate(iset)}
    def idx(m, keys):
        return np.array([m[k] for k in keys], dtype=np.int64)
    data = TrainData(
        query_ids=qset, query_texts=[qtext[q] for q in qset], item_ids=iset, item_texts=[items[i] for i in iset],
        ex_query=idx(q_of, qids_ex), ex_item=idx(i_of, iids_ex),
        ex_tier=ex.column("tier").to_numpy().astype(np.int8),
        ex_target=ex.column("target").to_numpy().astype(np.float32),
        ex_weight=ex.column("weight").to_numpy().astype(np.float32),
        ex_grade=np.asarray(ex.column("grade").to_numpy(zero_copy_only=False), dtype=float),
        ex_split=np.array(ex.column("split").to_pylist(), dtype=object),
        random_pool=idx(i_of, sample),
        val=ValPool(idx(q_of, val_tbl["query_id"]), idx(i_of, val_tbl["item_id"]),
                    np.asarray(val_tbl["grade"], dtype=np.int64),
                    *((idx(q_of, lab_tbl["query_id"]), idx(i_of, lab_tbl["item_id"]),
                       np.asarray(lab_tbl["grade"], dtype=np.int64), idx(i_of, cat_ids)) if lab_tbl else ())),
        examples_run_id=",".join(run_ids),
        clicks=(idx(q_of, click_q), idx(i_of, click_i)) if with_clicks else None,
    )
    log.info("training data: %d examples (%d train), %d val queries (%d pairs, a catalog of %d items), "
             "%d random-negative items of %d", len(qids_ex), int((data.ex_split == "train").sum()),
             data.val.n_queries, len(data.val.grade), len(data.val.catalog_items()), len(sample), n_products)
    return data


def _val_pool(store: Store, val_q: list[str], per_query: int, seed: int) -> dict:
    if not val_q:
        return {"query_id": [], "item_id": [], "grade": []}
    tbl = store.query(f"""
        SELECT query_id, item_id, grade FROM ({labeled_pairs_sql()}) lp
        WHERE grade IS NOT NULL AND source = 'candidate' AND query_id IN (SELECT unnest(?::VARCHAR[]))
        QUALIFY row_number() OVER (PARTITION BY query_id ORDER BY hash(item_id || ?)) <= ?
        ORDER BY query_id, item_id""", [val_q, str(seed), int(per_query)])
    return {c: tbl.column(c).to_pylist() for c in ("query_id", "item_id", "grade")}


def _val_labels(store: Store, val_q: list[str]) -> dict | None:
    """Every labeled pair of the validation queries (any source): the judgments retrieval validation reads."""
    if not val_q:
        return None
    tbl = store.query(f"""
        SELECT query_id, item_id, min(grade) AS grade FROM ({labeled_pairs_sql()}) lp
        WHERE grade IS NOT NULL AND query_id IN (SELECT unnest(?::VARCHAR[]))
        GROUP BY 1, 2 ORDER BY query_id, item_id""", [val_q])
    return {c: tbl.column(c).to_pylist() for c in ("query_id", "item_id", "grade")}


def _item_texts(store: Store, ids: list[str]) -> dict[str, str]:
    tbl = store.query("SELECT item_id, title, brand, category, CAST(attributes AS VARCHAR) AS attributes "
                      "FROM products WHERE item_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
    cols = {c: tbl.column(c).to_pylist() for c in tbl.column_names}
    return {i: item_text(t, b, c, a) for i, t, b, c, a in
            zip(cols["item_id"], cols["title"], cols["brand"], cols["category"], cols["attributes"])}


class GroupSampler:
    """Seeded batches of query groups for one stage (see the module docstring)."""

    def __init__(self, data: TrainData, spec: GroupSpec, *, replay_specs: list[GroupSpec] = (), replay: float = 0.0,
                 batch_queries: int, group_size: int, seed: int, stage: int):
        self.data, self.spec, self.replay_specs = data, spec, list(replay_specs)
        self.replay = replay if self.replay_specs else 0.0
        self.B, self.G, self.seed, self.stage = batch_queries, group_size, seed, stage
        self.index = {s: self._index(s) for s in [spec, *self.replay_specs]}
        self.queries = self.index[spec][0]
        if not len(self.queries):
            raise ValueError(f"no train query has examples in tiers {list(spec.pos_tiers)} and {list(spec.neg_tiers)}; "
                             "check `assay curriculum`'s counts per tier (label more pairs with `assay annotate`)")

    def _index(self, spec: GroupSpec):
        d = self.data
        train = d.ex_split == "train"
        pos = np.flatnonzero(train & np.isin(d.ex_tier, spec.pos_tiers))
        neg = np.flatnonzero(train & np.isin(d.ex_tier, spec.neg_tiers))
        by_q_pos = _group(d.ex_query[pos], pos)
        by_q_neg = _group(d.ex_query[neg], neg)
        queries = np.array(sorted(set(by_q_pos) & set(by_q_neg)), dtype=np.int64)
        return queries, by_q_pos, by_q_neg

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        rng = np.random.default_rng([self.seed, self.stage, step])
        n_replay = int(round(self.replay * self.B))
        specs = [self.spec] * (self.B - n_replay) + [self.replay_specs[i] for i in
                                                     rng.integers(0, len(self.replay_specs), n_replay)] \
            if n_replay else [self.spec] * self.B
        return self._groups(rng, specs, rank, world)

    def _groups(self, rng: np.random.Generator, specs: list[GroupSpec], rank: int, world: int,
                first: np.ndarray | None = None) -> Batch:
        """One group per entry of ``specs`` (a query with examples in both of its tiers, one positive drawn by
        target x weight, G - 1 negatives); rank ``rank`` of ``world`` keeps groups rank, rank + world, ..."""
        qs = np.full(self.B, -1, dtype=np.int64)
        items = np.full((self.B, self.G), -1, dtype=np.int64)
        targets = np.zeros((self.B, self.G), dtype=np.float32)
        grades = np.full((self.B, self.G), np.nan, dtype=np.float32)
        used: dict[GroupSpec, set] = {}
        d = self.data
        for b, spec in enumerate(specs):
            queries, by_pos, by_neg = self.index[spec]
            if not len(queries):
                queries, by_pos, by_neg = self.index[self.spec]
                spec = self.spec
            seen = used.setdefault(spec, set())
            q = int(queries[rng.integers(len(queries))])
            for _ in range(8):  # prefer distinct queries in a batch (fewer false in-batch negatives)
                if q not in seen:
                    break
                q = int(queries[rng.integers(len(queries))])
            seen.add(q)
            pos, neg = by_pos[q], by_neg[q]
            w = d.ex_target[pos] * d.ex_weight[pos] + 1e-6
            p = int(pos[rng.choice(len(pos), p=w / w.sum())])
            k = min(self.G - 1, len(neg))
            negs = neg[rng.choice(len(neg), k, replace=False)]
            ex = np.r_[p, negs]
            qs[b] = q
            items[b, :len(ex)] = d.ex_item[ex]
            t = (d.ex_grade[ex] >= 3).astype(np.float32) if spec.binary else d.ex_target[ex]
            targets[b, :len(ex)] = t
            grades[b, :len(ex)] = d.ex_grade[ex]
        sel = slice(rank, None, world)
        return Batch(qs[sel], items[sel], targets[sel], items[sel] >= 0, grades[sel],
                     None if first is None else first[sel])

    def random_items(self, step: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stage, step, 1])
        pool = self.data.random_pool
        return pool[rng.choice(len(pool), min(n, len(pool)), replace=False)] if n and len(pool) else np.zeros(0, np.int64)


def pace_share(step: int, steps: int, share: float, kind: str) -> float:
    """The paced schedule's pacing function: the full mix's share of the groups of batch ``step`` (0-based) of a
    run of ``steps``. It grows from 0 at step 0 to 1 at ``share x steps`` and stays 1: with f = step /
    (share x steps) capped at 1, it is f (``linear``) or sqrt(f) (``root``, which reaches the full mix's tiers
    sooner, the competence function of Platanios et al. 2019)."""
    if kind not in ("linear", "root"):
        raise ValueError(f"pacing function {kind!r}: linear or root")
    f = min(1.0, step / max(share * steps, 1e-9))
    return f if kind == "linear" else float(np.sqrt(f))


class PacedSampler(GroupSampler):
    """Batches of the paced schedule: ``round(B x pace_share(step))`` groups from ``full`` (every tier: the stages'
    positive tiers against their negative tiers) and the rest from ``first`` (the first stage's mix), each group
    marked in :attr:`Batch.first`. A pure function of (seed, stage, step), like every sampler here."""

    def __init__(self, data: TrainData, first: GroupSpec, full: GroupSpec, *, steps: int, share: float, kind: str,
                 batch_queries: int, group_size: int, seed: int, stage: int):
        super().__init__(data, full, replay_specs=[first], batch_queries=batch_queries, group_size=group_size,
                         seed=seed, stage=stage)
        self.first, self.full = first, full
        self.steps, self.share, self.kind = steps, share, kind
        if not len(self.index[first][0]):
            raise ValueError(f"no train query has examples in tiers {list(first.pos_tiers)} and "
                             f"{list(first.neg_tiers)} (the first stage's mix); check `assay curriculum`'s counts")
        pace_share(0, steps, share, kind)  # an unknown pacing function fails here, before any step

    def n_full(self, step: int) -> int:
        """Groups of batch ``step`` drawn from the full mix."""
        return int(round(self.B * pace_share(step, self.steps, self.share, self.kind)))

    def tier_weights(self, step: int) -> dict[str, dict[int, float]]:
        """Expected share of batch ``step``'s groups whose positive / negatives come from each tier (a mix's share
        spread evenly over its tiers): ``{"pos": {tier: share}, "neg": {tier: share}}``."""
        n = self.n_full(step) / self.B
        out: dict[str, dict[int, float]] = {"pos": {}, "neg": {}}
        for side in ("pos", "neg"):
            for spec, w in ((self.first, 1.0 - n), (self.full, n)):
                tiers = spec.pos_tiers if side == "pos" else spec.neg_tiers
                for t in tiers:
                    out[side][t] = out[side].get(t, 0.0) + w / len(tiers)
        return out

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        rng = np.random.default_rng([self.seed, self.stage, step])
        n = self.n_full(step)
        first = np.r_[np.ones(self.B - n, bool), np.zeros(n, bool)]
        return self._groups(rng, [self.first if f else self.full for f in first], rank, world, first)


class ClickSampler(GroupSampler):
    """The click-trained baseline: groups of one engaged item per query, in-batch negatives only."""

    def __init__(self, data: TrainData, *, batch_queries: int, group_size: int, seed: int):
        if data.clicks is None or not len(data.clicks[0]):
            raise ValueError("the click baseline needs engaged (query, item) pairs on train queries; none found")
        self.data, self.B, self.G, self.seed, self.stage = data, batch_queries, group_size, seed, 0
        q, i = data.clicks
        self.by_q = _group(q, i)
        self.queries = np.array(sorted(self.by_q), dtype=np.int64)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        rng = np.random.default_rng([self.seed, 0, step])
        qs = self.queries[rng.choice(len(self.queries), self.B, replace=len(self.queries) < self.B)]
        items = np.full((self.B, self.G), -1, dtype=np.int64)
        items[:, 0] = [int(self.by_q[int(q)][rng.integers(len(self.by_q[int(q)]))]) for q in qs]
        targets = np.zeros((self.B, self.G), dtype=np.float32)
        targets[:, 0] = 1.0
        sel = slice(rank, None, world)
        return Batch(qs[sel], items[sel], targets[sel], items[sel] >= 0)


def _group(keys: np.ndarray, values: np.ndarray) -> dict[int, np.ndarray]:
    if not len(keys):
        return {}
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order]
    cut = np.flatnonzero(np.diff(k)) + 1
    return {int(kk[0]): vv for kk, vv in zip(np.split(k, cut), np.split(v, cut))}
