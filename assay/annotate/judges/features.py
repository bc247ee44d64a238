"""The features judge: a small calibrated model over signals mining already computed, first in the cascade.

It reads no text through a neural network of its own. Per pair it gathers, from the workspace:

- each channel's rank and score (``candidates``; missing when the channel did not retrieve the item), the score
  relative to the query's best, ``n_channels`` and the mining ``prior``;
- for mined negatives (``negatives``) the kind and the TF-IDF similarity used to pick them;
- engagement of the pair (impressions, clicks, add-to-carts, orders, click rate);
- the bi-encoder cosine of query and item text, from the embedding cache mining filled (``model`` and
  ``max_length`` name the encoder; set them like ``mining.ann`` so the cache is hit; ``model: none`` drops it);
- lexical overlap of the query with the title and with the whole item text (share of query tokens found, whether
  the query's last token, usually the product type, is in the title or the category).

A gradient-boosted tree classifier (scikit-learn's HistGradientBoostingClassifier, which takes missing values as
they are) maps them to five grade probabilities; `assay calibrate` calibrates it like any other judge and fits the
thresholds at which it settles a pair. Cheap and sure of the clear cases (random negatives, unrelated items), it
keeps them from the cross-encoders.

Training: `assay teachers train` on the same human labels as the other judges, ``class_weight`` as for the
classifiers, early stopping on 10% of the training pairs. Saved to ``artifacts/teachers/<name>/model/`` as
``model.pkl`` plus ``manifest.json`` (config digest, feature list, scikit-learn version); a model trained with a
different config or feature list is refused with the command that retrains it.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from assay.annotate.base import N_GRADES, OK, JudgeOutput, Pair
from assay.annotate.judges import teacher_dir
from assay.annotate.judges._classifier import (JudgeNotReady, cap_train_pairs, check_manifest, class_weights,
                                               config_digest, files_sha, read_manifest, write_manifest)
from assay.text import item_text

FEATURES_VERSION = "features/1"
FEATURES = [
    "rank_bm25", "rank_ann", "rank_click", "score_bm25", "score_ann", "score_click", "rel_bm25", "gap_ann",
    "n_channels", "prior", "mined", "neg_token_sim", "neg_random", "neg_similarity",
    "impressions", "clicks", "add_to_carts", "orders", "ctr", "cosine",
    "q_tokens", "title_overlap", "text_overlap", "head_in_title", "head_in_category", "title_tokens",
]
TRAIN_FIELDS = ("kind", "model", "max_length", "trees", "learning_rate", "max_train_pairs", "class_weight", "seed")
DEFAULT_LR = 0.1
_TOKEN = re.compile(r"[a-z0-9]+")

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


def _tokens(text: str | None) -> list[str]:
    return _TOKEN.findall((text or "").lower())


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
        self._encoder = None

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def train_config(cfg) -> dict:
        out = {f: getattr(cfg, f) for f in TRAIN_FIELDS}
        out["learning_rate"] = cfg.learning_rate or DEFAULT_LR
        return out

    @staticmethod
    def features_sha() -> str:
        return config_digest({"version": FEATURES_VERSION, "features": FEATURES})

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
        tcfg = cls.train_config(cfg)
        judge = cls(cfg, None, {"features_sha": cls.features_sha(), "weights_sha": "untrained"})
        judge.bind(store)
        t0 = time.perf_counter()
        x = judge.features(pairs, progress=progress)
        feat_s = time.perf_counter() - t0
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
        with open(tmp / "model.pkl", "wb") as fh:
            pickle.dump(model, fh, protocol=pickle.HIGHEST_PROTOCOL)
        manifest = {"kind": cls.kind, "name": cfg.name, "features_version": FEATURES_VERSION, "features": FEATURES,
                    "features_sha": cls.features_sha(), "config": tcfg, "config_digest": config_digest(tcfg),
                    "sklearn": sk_version, "n_train": len(g), "grade_counts": np.bincount(g, minlength=N_GRADES).tolist(),
                    "iterations": int(model.n_iter_), "weights_sha": files_sha(tmp, ".pkl"),
                    "feature_seconds": round(feat_s, 3), "train_seconds": round(fit_s, 3)}
        write_manifest(tmp, manifest)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return {k: manifest[k] for k in ("n_train", "grade_counts", "iterations", "weights_sha", "feature_seconds",
                                          "train_seconds")}

    @classmethod
    def load(cls, cfg, artifacts: Path) -> "FeaturesJudge":
        model_dir = cls.model_dir(cfg, artifacts)
        manifest = read_manifest(model_dir, cfg.name)
        check_manifest(manifest, {"kind": cls.kind, "config": cls.train_config(cfg),
                                  "features_sha": cls.features_sha()}, cfg.name)
        if files_sha(model_dir, ".pkl") != manifest.get("weights_sha"):
            raise JudgeNotReady(f"judge {cfg.name!r}: {model_dir / 'model.pkl'} does not match its manifest; "
                                "run `assay teachers train`")
        with open(model_dir / "model.pkl", "rb") as fh:
            model = pickle.load(fh)  # noqa: S301 - our own artifact, checked against the manifest sha above
        return cls(cfg, model, manifest)

    def bind(self, store) -> None:
        """The workspace the mining signals are read from (done by ``prepare_judges``)."""
        self.store = store

    # -- features -------------------------------------------------------------------------------

    def _cosine(self, pairs: Sequence[Pair]) -> np.ndarray:
        if str(self.cfg.model).lower() == "none":
            return np.full(len(pairs), np.nan, dtype=np.float32)
        from assay.encode import Encoder, encode_cached

        if self._encoder is None:
            self._encoder = Encoder(self.cfg.model, max_seq_length=self.cfg.max_length, precision="fp32",
                                    batch_size=self.cfg.batch_size)
        items = [item_text(p.title, p.brand, p.category, p.attributes) for p in pairs]
        qv, _ = encode_cached(self._encoder, [p.query for p in pairs], self.store.artifacts, desc="encode queries")
        iv, _ = encode_cached(self._encoder, items, self.store.artifacts, desc="encode items")
        return (qv * iv).sum(axis=1).astype(np.float32)

    def features(self, pairs: Sequence[Pair], progress: bool = False) -> np.ndarray:
        """(n, len(FEATURES)) float32 with NaN for missing signals, rows in input order."""
        if self.store is None:
            raise RuntimeError(f"judge {self.name!r} (kind features) is not bound to a workspace; load judges with "
                               "assay.annotate.fit.prepare_judges")
        n = len(pairs)
        if n == 0:
            return np.zeros((0, len(FEATURES)), dtype=np.float32)
        keys = pa.table({"ord": np.arange(n, dtype=np.int64), "query_id": [p.query_id for p in pairs],
                         "item_id": [p.item_id for p in pairs]})
        self.store.con.register("_fpairs", keys)
        try:
            tbl = self.store.query(_SQL)
        finally:
            self.store.con.unregister("_fpairs")
        sql_cols = [c for c in tbl.column_names if c != "ord"]
        x = np.full((n, len(FEATURES)), np.nan, dtype=np.float32)
        for c in sql_cols:
            x[:, FEATURES.index(c)] = tbl.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
        x[:, FEATURES.index("cosine")] = self._cosine(pairs)
        x[:, FEATURES.index("q_tokens"):] = text_features(pairs)
        return x

    def predict(self, pairs: Sequence[Pair], progress: bool = False) -> JudgeOutput:
        n = len(pairs)
        t0 = time.perf_counter()
        probs = np.zeros((n, N_GRADES), dtype=np.float32)
        if n:
            x = self.features(pairs, progress=progress)
            p = self.model.predict_proba(x)
            probs[:, self.model.classes_.astype(np.int64)] = p
        ms = (time.perf_counter() - t0) * 1000.0 / max(n, 1)
        return JudgeOutput(probs=probs, raw=[None] * n, parse_status=[OK] * n, latency_ms=np.full(n, ms))

    def __repr__(self) -> str:
        return f"FeaturesJudge(name={self.name!r}, model_id={self.model_id!r})"

