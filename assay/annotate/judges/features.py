"""The features judge: a small calibrated model over signals mining already computed, first in the cascade.

It reads no text through a neural network of its own. Per pair it gathers, from the workspace:

- each channel's rank and score (``candidates``; missing when the channel did not retrieve the item), the score
  relative to the query's best, ``n_channels`` and the mining ``prior``;
- for mined negatives (``negatives``) the kind and the TF-IDF similarity used to pick them;
- engagement of the pair (impressions, clicks, add-to-carts, orders, click rate);
- the bi-encoder cosine of query and item text, from the embedding cache mining filled (``model``, ``max_length``
  and ``inference`` name the encoder and its backend; set ``model`` and ``max_length`` like ``mining.ann`` so the
  cache is hit; ``model: none`` drops it). At training, ``inference: auto`` takes the backend mining's newest run
  used for that encoder (else it chooses as mining would on the CPU: int8 ONNX behind the accuracy guard); the
  choice is recorded in the manifest, so the judge reads its cosine from the encoder it learned from; changing
  ``inference`` asks for retraining;
- lexical overlap of the query with the title and with the whole item text (share of query tokens found, whether
  the query's last token, usually the product type, is in the title or the category).

A gradient-boosted tree classifier (scikit-learn's HistGradientBoostingClassifier, which takes missing values as
they are) maps them to five grade probabilities; `assay calibrate` calibrates it like any other judge and fits the
thresholds at which it settles a pair. Cheap and sure of the clear cases (random negatives, unrelated items), it
keeps them from the cross-encoders.

- (``stuffing_features: true``) signals that see keyword stuffing, from the pair's text and the catalog's typical
  title length per category (:func:`assay.annotate.stuffing.stuffing_features`).

Training: `assay teachers train` on the same human labels as the other judges, ``class_weight`` as for the
classifiers, early stopping on 10% of the training pairs. With ``stuffed_negatives: S`` it also learns a stuffed
copy (same grade) of a share S of its grade 0-1 training pairs: text features and the embedding cosine are
recomputed on the stuffed title, the channel signals (ranks, scores, prior, negative kind) are taken from a training
pair that honestly holds every query word in its title (of the same query when there is one, grade 2 or above),
because that is how a title holding every query word looks to BM25 and the ANN channel, and engagement stays the
clean pair's (an edited title has no history).

Saved to ``artifacts/teachers/<name>/model/`` as ``trees.npz`` (the fitted trees as numeric arrays,
:mod:`assay.annotate.judges._trees`; loading it runs no code) plus ``manifest.json`` (config digest, feature list,
scikit-learn version, the sha256 of ``trees.npz``, the cosine encoder's backend and how many of the training
pairs' texts its cosine read from the embedding cache). A model trained with a different config or feature list, a
``trees.npz`` whose sha256 differs from the manifest's, and a model saved by an older assay as ``model.pkl`` (never
unpickled) are refused with the command that retrains it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from assay.annotate.base import N_GRADES, OK, JudgeOutput, Pair
from assay.annotate.judges import teacher_dir
from assay.annotate.judges import _trees
from assay.annotate.judges._classifier import (JudgeNotReady, cap_train_pairs, check_manifest, class_weights,
                                               config_digest, read_manifest, write_manifest)
from assay.annotate.stuffing import STUFFING_FEATURES, pick_stuffed, stuff, stuffing_features, tokens
from assay.text import file_sha256, item_text

log = logging.getLogger(__name__)

FEATURES_VERSION = "features/2"
MODEL_FILE = "trees.npz"
LEGACY_FILE = "model.pkl"
BASE_FEATURES = [
    "rank_bm25", "rank_ann", "rank_click", "score_bm25", "score_ann", "score_click", "rel_bm25", "gap_ann",
    "n_channels", "prior", "mined", "neg_token_sim", "neg_random", "neg_similarity",
    "impressions", "clicks", "add_to_carts", "orders", "ctr", "cosine",
    "q_tokens", "title_overlap", "text_overlap", "head_in_title", "head_in_category", "title_tokens",
]
FEATURES = BASE_FEATURES + STUFFING_FEATURES  # every feature this version knows; a judge uses feature_names(cfg)
# the mining-signal columns a stuffed training copy takes from a pair that holds every query word in its title
CHANNEL_FEATURES = ["rank_bm25", "rank_ann", "rank_click", "score_bm25", "score_ann", "score_click", "rel_bm25",
                    "gap_ann", "n_channels", "prior", "mined", "neg_token_sim", "neg_random", "neg_similarity"]
TRAIN_FIELDS = ("kind", "model", "max_length", "inference", "trees", "learning_rate", "max_train_pairs",
                "class_weight", "stuffed_negatives", "stuffing_features", "seed")
DEFAULT_LR = 0.1
# the mining signals of a stuffed training copy: "clean" (the pair's own: the title was edited after mining),
# "mined" (from a pair holding every query word: mined again after the edit) or "both" (one copy of each)
STUFFED_SIGNALS = "both"
_TYPICAL_SQL = """SELECT category, median(len(regexp_extract_all(lower(title), '[a-z0-9]+'))) FROM products
                  WHERE category IS NOT NULL GROUP BY 1"""


def feature_names(cfg) -> list[str]:
    """The features a judge with this config reads, in column order."""
    return BASE_FEATURES + (STUFFING_FEATURES if cfg.stuffing_features else [])


# the features read from the workspace (the SQL below); the rest are computed from the pair's texts
SIGNALS = FEATURES[:FEATURES.index("cosine")]

_SQL = """
SELECT p.ord, c.rank_bm25, c.rank_ann, c.rank_click, c.score_bm25, c.score_ann, c.score_click,
       c.score_bm25 / nullif(m.max_bm25, 0) AS rel_bm25, c.score_ann - m.max_ann AS gap_ann,
       coalesce(c.n_channels, 0) AS n_channels, c.prior,
       (c.query_id IS NOT NULL OR n.query_id IS NOT NULL)::INTEGER AS mined,
       (n.kind = 'token_sim')::INTEGER AS neg_token_sim, (n.kind = 'random')::INTEGER AS neg_random,
       n.similarity AS neg_similarity,
       coalesce(e.impressions, 0) AS impressions, coalesce(e.clicks, 0) AS clicks,
       coalesce(e.add_to_carts, 0) AS add_to_carts, coalesce(e.orders, 0) AS orders,
       e.clicks / nullif(e.impressions, 0) AS ctr
FROM _fpairs p
LEFT JOIN candidates c ON c.query_id = p.query_id AND c.item_id = p.item_id
LEFT JOIN negatives n ON n.query_id = p.query_id AND n.item_id = p.item_id
LEFT JOIN (SELECT query_id, max(score_bm25) AS max_bm25, max(score_ann) AS max_ann FROM candidates
           WHERE query_id IN (SELECT query_id FROM _fpairs) GROUP BY 1) m ON m.query_id = p.query_id
LEFT JOIN (SELECT query_id, item_id, sum(impressions) AS impressions, sum(clicks) AS clicks,
                  sum(add_to_carts) AS add_to_carts, sum(orders) AS orders
           FROM engagement WHERE query_id IN (SELECT query_id FROM _fpairs) GROUP BY 1, 2) e
       ON e.query_id = p.query_id AND e.item_id = p.item_id
ORDER BY p.ord
"""


def read_signals(store, query_ids: Sequence[str], item_ids: Sequence[str]) -> pa.Table:
    """The workspace signals (:data:`SIGNALS`, NULL where missing) of each (query, item) pair, in input order. The
    Ray engine's plan exports them into its shards, so workers never open the workspace (assay.scale.plan)."""
    keys = pa.table({"ord": np.arange(len(query_ids), dtype=np.int64), "query_id": pa.array(query_ids, pa.string()),
                     "item_id": pa.array(item_ids, pa.string())})
    store.con.register("_fpairs", keys)
    try:
        tbl = store.query(_SQL)
    finally:
        store.con.unregister("_fpairs")
    return tbl.select(SIGNALS)


_tokens = tokens


def text_features(pairs: Sequence[Pair]) -> np.ndarray:
    """(n, 6): query tokens, share of them in the title, share in the item text, last query token in the title,
    in the category, and title tokens."""
    out = np.zeros((len(pairs), 6), dtype=np.float32)
    for k, p in enumerate(pairs):
        q = _tokens(p.query)
        title = set(_tokens(p.title))
        text = set(_tokens(item_text(p.title, p.brand, p.category, p.attributes)))
        cat = set(_tokens(p.category))
        n = max(len(q), 1)
        head = q[-1] if q else ""
        out[k] = (len(q), sum(t in title for t in q) / n, sum(t in text for t in q) / n,
                  float(head in title), float(head in cat), len(title))
    return out


def typical_title_tokens(store) -> dict[str, float]:
    """Median title length in tokens per category of the workspace's catalog (kept in the manifest at training, so
    later title edits do not move the reference)."""
    return {c: float(m) for c, m in store.exec(_TYPICAL_SQL) if m}


class FeaturesJudge:
    """Gradient-boosted trees over mining signals; see the module docstring."""

    kind = "features"

    def __init__(self, cfg, model, manifest: dict):
        self.cfg = cfg
        self.model = model
        self.manifest = manifest
        self.name: str = cfg.name
        self.prompt_sha: str = manifest["features_sha"]
        self.model_id: str = f"{FEATURES_VERSION}+{cfg.name}@{manifest['weights_sha']}"
        self.store = None
        self.artifacts: Path | None = None
        self._signals: tuple[dict, np.ndarray] | None = None
        self._encoder = None
        self.cosine_cache = {"texts": 0, "cached": 0, "encoded": 0}  # the cosine's texts, read from the cache or not

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def train_config(cfg) -> dict:
        out = {f: getattr(cfg, f) for f in TRAIN_FIELDS}
        out["learning_rate"] = cfg.learning_rate or DEFAULT_LR
        return out

    @staticmethod
    def features_sha(cfg=None) -> str:
        names = FEATURES if cfg is None else feature_names(cfg)
        return config_digest({"version": FEATURES_VERSION, "features": names})

    @staticmethod
    def model_dir(cfg, artifacts: Path) -> Path:
        return teacher_dir(Path(artifacts), cfg.name) / "model"

    @classmethod
    def train(cls, cfg, pairs: Sequence[Pair], grades, artifacts: Path, progress: bool = True, store=None) -> dict:
        """Fit on human-labeled pairs (features read from ``store``) and save; returns the training summary."""
        from sklearn import __version__ as sk_version
        from sklearn.ensemble import HistGradientBoostingClassifier

        if store is None:
            raise ValueError(f"judge {cfg.name!r} (kind features) reads mining signals from the workspace; "
                             "train it with `assay teachers train`")
        g = np.asarray(grades, dtype=np.int64)
        if len(pairs) == 0 or len(g) != len(pairs):
            raise ValueError(f"judge {cfg.name!r}: need one grade per pair and at least one pair")
        pairs, g = cap_train_pairs(cfg, pairs, g)
        n_human = len(g)
        tcfg = cls.train_config(cfg)
        typical = typical_title_tokens(store) if cfg.stuffing_features else {}
        judge = cls(cfg, None, {"features_sha": cls.features_sha(cfg), "weights_sha": "untrained",
                                "typical_title_tokens": typical})
        judge.bind(store)
        t0 = time.perf_counter()
        x = judge.features(pairs, progress=progress)
        cosine_cache = dict(judge.cosine_cache)  # of the training pairs (stuffed copies are new texts)
        pick = pick_stuffed(g, cfg.stuffed_negatives, cfg.seed)
        if len(pick):
            xs, src = judge.stuffed_features(pairs, g, x, pick)
            x, g = np.concatenate([x, xs]), np.concatenate([g, g[src]])
        feat_s = time.perf_counter() - t0
        x[:, np.isnan(x).all(axis=0)] = 0.0  # a signal absent everywhere (model: none) cannot be binned; no split uses it
        cw = class_weights(g, cfg.class_weight)
        sw = None if cw is None else cw[g]
        model = HistGradientBoostingClassifier(max_iter=cfg.trees, learning_rate=tcfg["learning_rate"],
                                               early_stopping=len(g) >= 200, validation_fraction=0.1,
                                               n_iter_no_change=20, random_state=cfg.seed)
        t1 = time.perf_counter()
        model.fit(x, g, sample_weight=sw)
        fit_s = time.perf_counter() - t1
        final = cls.model_dir(cfg, artifacts)
        tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _trees.Trees.from_sklearn(model).save(tmp / MODEL_FILE)
        sha = file_sha256(tmp / MODEL_FILE)
        manifest = {"kind": cls.kind, "name": cfg.name, "features_version": FEATURES_VERSION,
                    "features": feature_names(cfg), "features_sha": cls.features_sha(cfg), "config": tcfg,
                    "config_digest": config_digest(tcfg), "sklearn": sk_version, "format": _trees.FORMAT,
                    "model_file": MODEL_FILE, "model_sha256": sha, "n_train": len(g), "n_stuffed": len(g) - n_human,
                    "grade_counts": np.bincount(g, minlength=N_GRADES).tolist(), "iterations": int(model.n_iter_),
                    "weights_sha": sha[:16], "typical_title_tokens": typical,
                    "encoder_backend": judge.manifest.get("encoder_backend"),
                    "encoder_guard": judge.manifest.get("encoder_guard"), "cosine_cache": cosine_cache,
                    "feature_seconds": round(feat_s, 3), "train_seconds": round(fit_s, 3)}
        write_manifest(tmp, manifest)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return {k: manifest[k] for k in ("n_train", "n_stuffed", "grade_counts", "iterations", "weights_sha",
                                          "encoder_backend", "cosine_cache", "feature_seconds", "train_seconds")}

    @classmethod
    def load(cls, cfg, artifacts: Path) -> "FeaturesJudge":
        """The trained judge from ``trees.npz`` (plain arrays, never unpickled); raises :class:`JudgeNotReady` when
        it is missing, stale, saved by an older assay, or does not match the sha256 its manifest recorded."""
        model_dir = cls.model_dir(cfg, artifacts)
        retrain = f"run `assay teachers train --judge {cfg.name}`"
        path = model_dir / MODEL_FILE
        if not path.exists() and (model_dir / LEGACY_FILE).exists():
            raise JudgeNotReady(f"judge {cfg.name!r} was saved by an older assay as a pickle ({model_dir / LEGACY_FILE}), "
                                f"which is never loaded because unpickling can run code; {retrain}")
        manifest = read_manifest(model_dir, cfg.name)
        check_manifest(manifest, {"kind": cls.kind, "config": cls.train_config(cfg),
                                  "features_sha": cls.features_sha(cfg), "format": _trees.FORMAT}, cfg.name)
        if not path.exists():
            raise JudgeNotReady(f"judge {cfg.name!r} is not trained: no {path}; {retrain}")
        if file_sha256(path) != manifest.get("model_sha256"):
            raise JudgeNotReady(f"judge {cfg.name!r}: {path} does not match the sha256 its manifest recorded (changed "
                                f"or replaced); {retrain}")
        try:
            model = _trees.load(path)
        except _trees.TreesFormatError as e:
            raise JudgeNotReady(f"judge {cfg.name!r}: {e}; {retrain}") from None
        if model.n_features != len(feature_names(cfg)):
            raise JudgeNotReady(f"judge {cfg.name!r}: {path} reads {model.n_features} features, the config "
                                f"{len(feature_names(cfg))}; {retrain}")
        return cls(cfg, model, manifest)

    def bind(self, store) -> None:
        """The workspace the mining signals are read from (done by ``prepare_judges``)."""
        self.store = store
        self.artifacts = store.artifacts

    def use_signals(self, keys: Sequence[tuple[str, str]], values: np.ndarray, artifacts: Path) -> None:
        """Read the workspace signals from ``values`` ((n, len(SIGNALS)) float, NaN where missing; row k belongs to
        ``keys[k]`` = (query_id, item_id)) instead of the workspace: a Ray worker, which never opens it.
        ``artifacts`` holds the embedding cache the cosine feature reads."""
        self._signals = ({k: r for r, k in enumerate(keys)}, np.asarray(values, dtype=np.float32))
        self.artifacts = Path(artifacts)

    def clear_signals(self) -> None:
        """Read the signals from the bound workspace again (after :meth:`use_signals`)."""
        self._signals = None

    # -- features -------------------------------------------------------------------------------

    def _cosine(self, pairs: Sequence[Pair]) -> np.ndarray:
        if str(self.cfg.model).lower() == "none":
            return np.full(len(pairs), np.nan, dtype=np.float32)
        from assay.encode import encode_cached

        items = [item_text(p.title, p.brand, p.category, p.attributes) for p in pairs]
        if self._encoder is None:
            self._encoder = self._open_encoder(items)
        qv, qs = encode_cached(self._encoder, [p.query for p in pairs], self.artifacts, desc="encode queries")
        iv, its = encode_cached(self._encoder, items, self.artifacts, desc="encode items")
        for k in self.cosine_cache:
            self.cosine_cache[k] += qs[k] + its[k]
        return (qv * iv).sum(axis=1).astype(np.float32)

    @property
    def encoder_loaded(self) -> bool:
        """Whether the cosine's encoder model is in memory (it loads at the first text missing from the cache)."""
        return self._encoder is not None and getattr(self._encoder, "loaded", True)

    def _open_encoder(self, sample_texts: list[str]):
        """The cosine's encoder, on the backend the judge was trained with (``encoder_backend`` in its manifest).

        At training, ``inference: auto`` takes the backend mining's encoder ran on in this workspace when that
        encoder is the judge's (same model, ``max_length`` and fp32; :meth:`_mining_backend`), so the vectors come
        from the embedding cache mining filled (int8 ONNX on a CPU by default, PyTorch where mining ran on a GPU).
        Without such a run, auto chooses as mining would on the CPU (int8 ONNX when it passes the accuracy guard on
        ``sample_texts``, else fp32 ONNX); any other value is used as named. A judge always reads its cosine from the
        encoder it learned from."""
        from assay.config import ModelsConfig
        from assay.encode import LazyEncoder, open_encoder

        backend = self.manifest.get("encoder_backend")
        if backend is None:
            mined = self._mining_backend() if self.cfg.inference == "auto" else None
            if mined is not None:
                self.manifest["encoder_backend"], self.manifest["encoder_guard"] = mined["backend"], mined
                backend = mined["backend"]
            else:
                enc = open_encoder(self.cfg.model, ModelsConfig(backend=self.cfg.inference), Path(self.artifacts),
                                   sample_texts, max_seq_length=self.cfg.max_length, batch_size=self.cfg.batch_size)
                self.manifest["encoder_backend"], self.manifest["encoder_guard"] = enc.backend, enc.guard
                return enc
        # opened at its first cache miss: a judge whose pairs' texts are all cached never loads the model
        return LazyEncoder(self.cfg.model, max_seq_length=self.cfg.max_length, batch_size=self.cfg.batch_size,
                           backend=backend, artifacts=Path(self.artifacts))

    def _mining_backend(self) -> dict | None:
        """The backend of the encoder the bound workspace's newest mining run used (assay.mining.run.mined_encoder)
        when it is this judge's encoder: the same model (resolved), ``max_seq_length`` = ``max_length`` and fp32.
        Returns mining's guard result with ``from_run``; None otherwise."""
        from assay import models
        from assay.mining.run import mined_encoder

        mined = mined_encoder(self.store) if self.store is not None else None
        if mined is None or mined["max_seq_length"] != self.cfg.max_length or mined["precision"] != "fp32":
            return None
        try:
            if models.resolve(mined["model"]).path != models.resolve(self.cfg.model).path:
                return None
        except (models.ModelNotInstalled, ValueError, OSError) as e:  # not resolvable here: choose as without a run
            log.info("judge %s: mining's encoder %r does not resolve here (%s); choosing the cosine's backend itself",
                     self.name, mined["model"], e)
            return None
        return {**mined["guard"], "from_run": mined["run_id"]}

    def stuffed_features(self, pairs: Sequence[Pair], grades: np.ndarray, x: np.ndarray,
                         pick: np.ndarray) -> np.ndarray:
        """Feature rows of the stuffed copies of ``pairs[pick]`` (see the module docstring): text features and cosine
        recomputed on the stuffed title, channel signals from a training pair of grade 2 or above that holds every
        query word in its title (same query first, else any), engagement kept."""
        names = feature_names(self.cfg)
        stuffed = [stuff(pairs[i]) for i in pick]
        xs = self.features(stuffed)
        xs[:, :len(SIGNALS)] = x[pick, :len(SIGNALS)]
        if STUFFED_SIGNALS == "clean":
            return xs, pick
        mined = xs.copy()
        donors = np.flatnonzero((x[:, names.index("title_overlap")] >= 1) & (np.asarray(grades) >= 2))
        if len(donors):
            by_query: dict[str, list[int]] = {}
            for d in donors:
                by_query.setdefault(pairs[d].query_id, []).append(int(d))
            rng = np.random.default_rng([self.cfg.seed, 29])
            cols = [names.index(c) for c in CHANNEL_FEATURES]
            for row, i in enumerate(pick):
                pool = by_query.get(pairs[i].query_id) or donors
                mined[row, cols] = x[pool[rng.integers(len(pool))], cols]
        if STUFFED_SIGNALS == "mined":
            return mined, pick
        return np.concatenate([xs, mined]), np.concatenate([pick, pick])

    def features(self, pairs: Sequence[Pair], progress: bool = False) -> np.ndarray:
        """(n, len(feature_names(cfg))) float32 with NaN for missing signals, rows in input order."""
        if self.store is None and self._signals is None:
            raise RuntimeError(f"judge {self.name!r} (kind features) is not bound to a workspace; load judges with "
                               "assay.annotate.fit.prepare_judges")
        n = len(pairs)
        names = feature_names(self.cfg)
        if n == 0:
            return np.zeros((0, len(names)), dtype=np.float32)
        x = np.full((n, len(names)), np.nan, dtype=np.float32)
        if self._signals is not None:
            rows, values = self._signals
            try:
                x[:, :len(SIGNALS)] = values[[rows[(p.query_id, p.item_id)] for p in pairs]]
            except KeyError as e:
                raise KeyError(f"judge {self.name!r}: no precomputed signals for pair {e.args[0]}") from None
        else:
            tbl = read_signals(self.store, [p.query_id for p in pairs], [p.item_id for p in pairs])
            for c in SIGNALS:
                x[:, FEATURES.index(c)] = tbl.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
        x[:, FEATURES.index("cosine")] = self._cosine(pairs)
        x[:, FEATURES.index("q_tokens"):len(BASE_FEATURES)] = text_features(pairs)
        if self.cfg.stuffing_features:
            x[:, len(BASE_FEATURES):] = stuffing_features(pairs, self.manifest.get("typical_title_tokens"))
        return x

    def predict(self, pairs: Sequence[Pair], progress: bool = False) -> JudgeOutput:
        n = len(pairs)
        t0 = time.perf_counter()
        probs = np.zeros((n, N_GRADES), dtype=np.float32)
        if n:
            x = self.features(pairs, progress=progress)
            probs[:, self.model.classes.astype(np.int64)] = self.model.predict_proba(x)
        ms = (time.perf_counter() - t0) * 1000.0 / max(n, 1)
        return JudgeOutput(probs=probs, raw=[None] * n, parse_status=[OK] * n, latency_ms=np.full(n, ms))

    def __repr__(self) -> str:
        return f"FeaturesJudge(name={self.name!r}, model_id={self.model_id!r})"

