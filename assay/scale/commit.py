"""Commit (the workspace's writer): finished shards of a plan -> ``labels`` and ``label_votes``.

For each shard of the plan still ``planned`` in ``work_shards`` whose folder has ``_SUCCESS.json``, in one
transaction: check ``_SUCCESS`` against the plan (plan id, workspace id, the input shard's sha256, the output
file's sha256), drop duplicate keys (Ray retries tasks), check the row count against the plan, refuse rows whose
cascade sha is not the cascade in force, replay the judges' outputs through
assay.annotate.batches.annotate_batch (the routing, vote and tables of `assay annotate`), upsert ``labels`` and
``label_votes``, and mark the shard ``committed``. A refused shard stays ``planned`` with the reason in
``work_shards.note``. A shard without ``_SUCCESS`` (partial, or still running) is never read. Committing twice
changes nothing: committed shards are skipped, and the upserts are keyed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assay.annotate.base import N_GRADES, JudgeOutput, pairs_from_arrow
from assay.config import AnnotateConfig
from assay.scale.execute import SUCCESS, shard_out
from assay.scale.plan import file_sha256, read_manifest, workspace_id
from assay.store import Store, utcnow

log = logging.getLogger(__name__)


class ShardRefused(ValueError):
    """A finished shard that does not belong to this plan, cascade or workspace, or disagrees with the plan."""


class Replay:
    """A judge that answers with the outputs Ray computed (columns ``j<k>_*`` of a shard's output)."""

    def __init__(self, name: str, k: int, tbl: pa.Table):
        self.name = name
        p = f"j{k}_"
        status = tbl.column(p + "status").to_pylist()
        self.rows = {key: r for r, key in enumerate(zip(tbl.column("query_id").to_pylist(),
                                                        tbl.column("item_id").to_pylist())) if status[r] is not None}
        probs = tbl.column(p + "probs")
        self.probs = np.array([v if v is not None else [np.nan] * N_GRADES for v in probs.to_pylist()],
                              dtype=np.float32).reshape(-1, N_GRADES)
        self.raw = tbl.column(p + "raw").to_pylist()
        self.status = status
        self.latency = tbl.column(p + "latency").to_numpy(zero_copy_only=False).astype(np.float64)
        self.tokens = tbl.column(p + "tokens").to_numpy(zero_copy_only=False)
        models = [m for m, s in zip(tbl.column(p + "model").to_pylist(), status) if s is not None]
        shas = [m for m, s in zip(tbl.column(p + "prompt_sha").to_pylist(), status) if s is not None]
        self.model_id = models[0] if models else None
        self.prompt_sha = shas[0] if shas else None

    def predict(self, pairs: list, progress: bool = False) -> JudgeOutput:
        try:
            idx = [self.rows[(p.query_id, p.item_id)] for p in pairs]
        except KeyError as e:
            raise ShardRefused(f"judge {self.name!r} has no output for pair {e.args[0]}, which the cascade routes to "
                               "it: the shard was not computed with these thresholds") from None
        tokens = np.nan_to_num(self.tokens[idx].astype(np.float64), nan=-1).astype(np.int64)
        return JudgeOutput(self.probs[idx], [self.raw[i] for i in idx], [self.status[i] for i in idx],
                           self.latency[idx], tokens if (tokens >= 0).any() else None)


def check_success(success: dict, shard: dict, plan: dict, wid: str) -> None:
    if success.get("workspace_id") != wid:
        raise ShardRefused(f"written for workspace {success.get('workspace_id')}, this is {wid}")
    if success.get("plan_id") != shard["plan_id"] or plan["plan_id"] != shard["plan_id"]:
        raise ShardRefused(f"written for plan {success.get('plan_id')}, the shard belongs to {shard['plan_id']}")
    if success.get("input_sha256") != shard["sha256"]:
        raise ShardRefused("computed from an input whose sha256 differs from the planned shard's")


def read_output(plan_dir: Path, shard: dict, plan: dict, wid: str, cascade_sha: str) -> pa.Table:
    """The shard's committed-to-be rows, checked (ShardRefused says why not)."""
    out = shard_out(plan_dir, shard["shard_id"])
    success = json.loads((out / SUCCESS).read_text())
    check_success(success, shard, plan, wid)
    f = out / success["file"]
    if not f.exists() or file_sha256(f) != success["sha256"]:
        raise ShardRefused(f"{f} is missing or does not match the sha256 in its {SUCCESS}")
    tbl = pq.read_table(f)
    keys = list(zip(tbl.column("query_id").to_pylist(), tbl.column("item_id").to_pylist()))
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) < len(keys):
        tbl = tbl.take(pa.array(sorted(first.values()), pa.int64()))
    if tbl.num_rows != shard["rows"]:
        raise ShardRefused(f"{tbl.num_rows} distinct pairs, the plan has {shard['rows']}")
    shas = pc.unique(tbl.column("cascade_sha")).to_pylist()
    if shas != [cascade_sha] or shard["cascade_sha"] != cascade_sha:
        raise ShardRefused(f"rows of cascade {shas}, the cascade in force is {cascade_sha} (planned under "
                           f"{shard['cascade_sha']})")
    return tbl


def commit(cfg: AnnotateConfig, store: Store, plan_dir: Path, *, run_id: str) -> dict:
    """Commit every finished, uncommitted shard of the plan in ``plan_dir``. Returns what was committed, refused
    (shard -> reason) and left unfinished, with the cascade's decided shares."""
    from assay.annotate.batches import annotate_batch
    from assay.annotate.runtime import load_cascade

    plan_dir = Path(plan_dir)
    plan = read_manifest(plan_dir)
    wid = workspace_id(store)
    shards = store.query("SELECT * FROM work_shards WHERE plan_id = ? ORDER BY shard_id",
                         [plan["plan_id"]]).to_pylist()
    if not shards:
        raise ShardRefused(f"plan {plan['plan_id']} is not a plan of this workspace ({store.root})")
    names = [j.name for j in cfg.judges]
    base = load_cascade(cfg, store.artifacts, judges=[None] * len(names))
    summary = {"plan_id": plan["plan_id"], "committed": [], "already": 0, "refused": {}, "unfinished": [],
               "rows": 0, "failed": 0, "decided_by": {}}
    for shard in shards:
        sid = shard["shard_id"]
        if shard["state"] == "committed":
            summary["already"] += 1
            continue
        if not (shard_out(plan_dir, sid) / SUCCESS).exists():
            summary["unfinished"].append(sid)
            continue
        try:
            tbl = read_output(plan_dir, shard, plan, wid, base.sha)
            cascade = dataclasses.replace(base, judges=[Replay(n, k, tbl) for k, n in enumerate(names)])
            labels, votes, st = annotate_batch(cascade, pairs_from_arrow(tbl), batch_id=f"{plan['plan_id']}/{sid}",
                                               run_id=run_id)
        except ShardRefused as e:
            log.warning("shard %s of %s refused: %s", sid, plan["plan_id"], e)
            summary["refused"][sid] = str(e)
            store.exec("UPDATE work_shards SET note = ? WHERE plan_id = ? AND shard_id = ?",
                       [str(e), plan["plan_id"], sid])
            continue
        success = json.loads((shard_out(plan_dir, sid) / SUCCESS).read_text())
        with store.transaction():
            store.write("labels", labels, mode="upsert")
            store.write("label_votes", votes, mode="upsert")
            store.exec("UPDATE work_shards SET state = 'committed', attempt = ?, failed = ?, note = NULL, "
                       "committed_at = ? WHERE plan_id = ? AND shard_id = ?",
                       [success["attempt"], st["failed"], utcnow(), plan["plan_id"], sid])
        summary["committed"].append(sid)
        summary["rows"] += labels.num_rows
        summary["failed"] += st["failed"]
        for k, v in st["decided_by"].items():
            summary["decided_by"][k] = summary["decided_by"].get(k, 0) + v
    return summary
