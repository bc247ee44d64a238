"""Plan (the workspace's writer): the pending pairs of `assay annotate` as Parquet shards a Ray job can run.

Reads the pending rule of `assay annotate` (assay.annotate.pairs.pending_pairs: no ``ok`` label for this cascade and
these texts; failed pairs included) and, for features judges, the mining signals they read
(assay.annotate.judges.features.read_signals), so workers never open ``assay.duckdb``.

Writes, under ``<root>/<plan_id>/`` (root: ``annotate.ray.root``, default ``<workspace>/artifacts/scale``):

- ``shards/<shard_id>.parquet``: ``annotate.ray.shard_pairs`` pairs each, sorted by query (prompts that share a query
  prefix batch together, for vLLM's prefix cache): the pair columns, ``text_sha`` where the rule gives it,
  ``sig_<name>`` signal columns, and ``shard``;
- ``plan.json``: plan id, workspace id, cascade sha, each judge's identity digest, backend and few-shot examples,
  the annotate config and thresholds in force, and per shard its rows and sha256;
- one ``work_shards`` row per shard, state ``planned``.

A plan whose shards are not all committed is resumed, not planned again (`plan` returns it), so a rerun after a
crash executes only what has no ``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from assay.config import AnnotateConfig
from assay.store import Store, utcnow
from assay.text import digest, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "plan.json"
SIG_PREFIX = "sig_"


def scale_root(cfg: AnnotateConfig, store: Store) -> Path:
    return Path(cfg.ray.root) if cfg.ray.root else store.artifacts / "scale"


def workspace_id(store: Store) -> str:
    """A random id of this workspace, made once (meta ``workspace_id``): outputs of another workspace are refused."""
    wid = store.get_meta("workspace_id")
    if not wid:
        wid = uuid.uuid4().hex
        store.set_meta("workspace_id", wid)
    return wid


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def read_manifest(plan_dir: Path) -> dict:
    f = Path(plan_dir) / MANIFEST
    if not f.exists():
        raise FileNotFoundError(f"{f} does not exist; plan the work first (`assay annotate --engine ray`)")
    return json.loads(f.read_text())


def open_plan(store: Store, cascade_sha: str) -> str | None:
    """The plan of this cascade that still has shards to commit, if any."""
    row = store.exec("SELECT plan_id FROM work_shards WHERE cascade_sha = ? AND state <> 'committed' "
                     "ORDER BY created_at DESC LIMIT 1", [cascade_sha])
    return row[0][0] if row else None


def _judge_setup(cfg: AnnotateConfig, store: Store) -> list[dict]:
    """What each worker needs to load a judge as `assay annotate` does: the inference backend the int8 guard chose
    (measured here, against the workspace's human labels) and prompted judges' few-shot examples."""
    from assay.annotate.fit import few_shot_examples, prepare_judges
    from assay.annotate.runtime import judge_identity

    out = []
    for j, judge in zip(cfg.judges, prepare_judges(cfg, store)):
        out.append({"name": j.name, "kind": j.kind, "identity": judge_identity(j, store.artifacts),
                    "model_id": judge.model_id, "prompt_sha": judge.prompt_sha,
                    "backend": getattr(judge, "backend", None),
                    "examples": few_shot_examples(store, j.few_shot) if j.kind == "prompted" and j.few_shot else []})
    return out


def plan(cfg: AnnotateConfig, store: Store, *, run_id: str) -> Path | None:
    """Resume this cascade's open plan, else shard the pending pairs into a new one. None when nothing is pending.
    Returns the plan's folder."""
    from assay.annotate.judges.features import SIGNALS, read_signals
    from assay.annotate.pairs import pending_pairs
    from assay.annotate.runtime import cascade_sha, thresholds_in_force

    sha = cascade_sha(cfg, store.artifacts)
    root = scale_root(cfg, store)
    existing = open_plan(store, sha)
    if existing:
        log.info("resuming plan %s (shards not yet committed)", existing)
        return root / existing
    todo = pending_pairs(store, cfg.sources, sha, cfg.max_pairs)
    if todo.num_rows == 0:
        return None
    wid = workspace_id(store)
    plan_id = f"plan-{utcnow():%Y%m%dT%H%M%S}-{digest([wid, sha, run_id])[:8]}"
    plan_dir = root / plan_id
    (plan_dir / "shards").mkdir(parents=True, exist_ok=False)
    (plan_dir / "out").mkdir()
    judges = _judge_setup(cfg, store)
    th, src = thresholds_in_force(cfg, store.artifacts)
    needs_signals = any(j.kind == "features" for j in cfg.judges)
    shards, rows = [], []
    now = utcnow()
    n = todo.num_rows
    step = cfg.ray.shard_pairs
    for k, lo in enumerate(range(0, n, step)):
        part = todo.slice(lo, step)
        sid = f"{k:05d}"
        if needs_signals:
            sig = read_signals(store, part.column("query_id").to_pylist(), part.column("item_id").to_pylist())
            for c in SIGNALS:
                col = sig.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                part = part.append_column(SIG_PREFIX + c, pa.array(col, pa.float32()))
        part = part.append_column("shard", pa.array([sid] * part.num_rows, pa.string()))
        path = plan_dir / "shards" / f"{sid}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(part, tmp)
        os.replace(tmp, path)
        q = part.column("query_id")
        entry = {"shard_id": sid, "path": f"shards/{sid}.parquet", "rows": part.num_rows, "sha256": file_sha256(path),
                 "first_query": q[0].as_py(), "last_query": q[-1].as_py()}
        shards.append(entry)
        rows.append({**entry, "path": str(path), "plan_id": plan_id, "cascade_sha": sha, "state": "planned",
                     "attempt": None, "failed": None, "note": None, "run_id": run_id, "created_at": now,
                     "committed_at": None})
    manifest = {"plan_id": plan_id, "workspace_id": wid, "cascade_sha": sha, "created_at": now.isoformat(),
                "artifacts": str(store.artifacts.resolve()), "annotate": cfg.model_dump(mode="json"),
                "thresholds": [t.tolist() for t in th], "threshold_source": src, "judges": judges,
                "signals": list(SIGNALS) if needs_signals else [], "rows": n, "shards": shards}
    write_json(plan_dir / MANIFEST, manifest)
    from assay.records import WORK_SHARDS

    tbl = pa.Table.from_pylist(rows).select(WORK_SHARDS.column_names)
    store.write("work_shards", tbl, mode="upsert")
    log.info("planned %d pairs in %d shards under %s", n, len(shards), plan_dir)
    return plan_dir
