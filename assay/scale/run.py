"""`assay annotate --engine ray`: connect (or start) Ray, plan, execute, commit; one recorded ``annotate`` run.

Ray is reached before anything is written, so a missing extra or a cluster that does not answer fails with nothing
planned. A rerun resumes: the open plan is reused, shards with ``_SUCCESS`` are not executed again, committed shards
are not committed again. When every shard of the plan is committed, pairs that failed are pending again and the
next run plans them afresh. The summary has the keys of `assay annotate`'s, plus ``engine``, ``plan`` and the
execute and commit details.
"""

from __future__ import annotations

import logging
import time

from assay.config import AnnotateConfig
from assay.store import Store

log = logging.getLogger(__name__)


def run(cfg: AnnotateConfig, store: Store, *, progress: bool = True, address: str | None = None,
        stop_after_shards: int | None = None, fault: dict | None = None) -> dict:
    from assay.annotate.pairs import count_work
    from assay.annotate.runtime import cascade_sha, load_cascade
    from assay.scale.cluster import connect
    from assay.scale.commit import ShardRefused, commit
    from assay.scale.execute import execute
    from assay.scale.plan import plan

    ray_info = connect(cfg.ray, address)
    load_cascade(cfg, store.artifacts, judges=[None] * len(cfg.judges))  # calibrators present, else a clear error
    sha = cascade_sha(cfg, store.artifacts)
    before = count_work(store, cfg.sources, sha)
    t0 = time.perf_counter()
    with store.run("annotate", {"annotate": cfg.model_dump(mode="json"), "cascade_sha": sha, "engine": "ray"},
                   models={j.name: j.model for j in cfg.judges}) as run_id:
        plan_dir = plan(cfg, store, run_id=run_id)
        ex, cm = None, None
        if plan_dir is not None:
            ex = execute(plan_dir, cfg.ray, stop_after_shards=stop_after_shards, fault=fault, progress=progress)
            cm = commit(cfg, store, plan_dir, run_id=run_id)
        secs = time.perf_counter() - t0
        after = count_work(store, cfg.sources, sha)
        n = cm["rows"] if cm else 0
        decided = cm["decided_by"] if cm else {}
        summary = {
            "run_id": run_id, "engine": "ray", "ray": {"address": ray_info["address"]}, "cascade_sha": sha,
            "plan": str(plan_dir) if plan_dir else None, "annotated": n, "seconds": round(secs, 1),
            "pairs_per_second": round(n / secs, 2) if secs > 0 and n else None, "decided_by": decided,
            "decided_share": {k: round(v / max(n, 1), 4) for k, v in decided.items()},
            "failed": cm["failed"] if cm else 0, "judge_calls": ex["judge_calls"] if ex else {},
            "execute": ex, "commit": cm, "before": before, "after": after,
        }
        if cm and cm["refused"]:
            store.finish_run(run_id, summary, status="failed")
            raise ShardRefused(f"{len(cm['refused'])} shard(s) of {cm['plan_id']} refused: " +
                               "; ".join(f"{k}: {v}" for k, v in cm["refused"].items()))
        store.finish_run(run_id, summary)
    return summary
