"""`assay teachers train`: train the features judge and fine-tune the classifier judges on the human train split.

Reads ``human_labels`` (split ``train``, the pool ``annotate.train_on``: seed pairs, mined pairs
answered through `assay label-request`, or both; the median grade per pair) with the query and
product text. Writes each classifier judge's weights and manifest to ``artifacts/teachers/<judge>/model/``.
Prompted judges need no training and are skipped (reported as such).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from assay.annotate.judges import get_judge
from assay.annotate.pairs import count_mined, human_pairs
from assay.config import AnnotateConfig
from assay.store import Store

log = logging.getLogger(__name__)

TRAINABLE = ("features", "cross_encoder", "llm_classifier")


def run(cfg: AnnotateConfig, store: Store, *, only: list[str] | None = None, progress: bool = True) -> dict:
    names = [j.name for j in cfg.judges]
    for n in only or []:
        if n not in names:
            raise KeyError(f"Unknown judge {n!r}. Available: {names}")
    pairs, grades = human_pairs(store, "train", pool=cfg.train_on)
    n_mined = count_mined(store, pairs)
    out: dict = {"train_pairs": len(pairs), "pool": cfg.train_on, "seed_pairs": len(pairs) - n_mined,
                 "mined_pairs": n_mined, "grade_counts": np.bincount(grades, minlength=5).tolist(), "judges": {}}
    with store.run("teachers", {"annotate": cfg.model_dump(mode="json"), "only": only}) as run_id:
        for j in cfg.judges:
            if only and j.name not in only:
                continue
            if j.kind not in TRAINABLE:
                out["judges"][j.name] = {"kind": j.kind, "trained": False, "reason": "prompted judges are not trained"}
                continue
            t0 = time.perf_counter()
            info = get_judge(j.kind).train(j, pairs, grades, store.artifacts, progress=progress, store=store)
            out["judges"][j.name] = {"kind": j.kind, "trained": True, "seconds": round(time.perf_counter() - t0, 1),
                                     **{k: v for k, v in info.items() if k not in ("config",)}}
            log.info("trained %s (%s) on %d pairs in %.0fs", j.name, j.kind, len(pairs), time.perf_counter() - t0)
        out["run_id"] = run_id
        store.finish_run(run_id, out)
    return out
