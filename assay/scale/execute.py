"""Execute a plan on Ray Data. Never opens ``assay.duckdb``: everything comes from the plan folder and artifacts/.

The pipeline: ``read_parquet`` of the shards without ``_SUCCESS``, then one ``map_batches`` stage per judge, each
over an actor pool (``annotate.ray.judges.<name>``: ``num_cpus``, ``num_gpus``, ``concurrency``) whose actors load
the judge and its calibrator once. A stage runs its judge on the rows still open, calibrates, and closes the rows
it accepts (assay.annotate.cascade.accept_mask with the thresholds in force: the routing of `assay annotate`). It
adds the judge's raw outputs as columns ``j<k>_probs``, ``j<k>_raw``, ``j<k>_status`` (null where the judge did not
see the row), ``j<k>_latency``, ``j<k>_tokens``, ``j<k>_model``, ``j<k>_prompt_sha``; commit replays them through
assay.annotate.batches.annotate_batch, so labels and votes are those the local engine writes.

A judge that raises on a batch is retried on halves down to single pairs; a pair that still raises (a prompt over
the model's context, say) becomes a ``failed`` vote with the error as its raw text, and the job goes on. An actor
that dies is restarted (``annotate.ray.max_restarts``) and its task retried.

The driver gathers rows per shard; when a shard has all its planned pairs it writes
``out/<shard>/<attempt>.parquet`` and then ``out/<shard>/_SUCCESS.json`` (rows, sha256s, judge calls). Nothing is
overwritten: an attempt is a new file, and a shard with ``_SUCCESS`` is skipped by the next execute.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assay.annotate.base import FAILED, N_GRADES, JudgeOutput, pairs_from_arrow
from assay.scale.plan import SIG_PREFIX, file_sha256, read_manifest, write_json

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
STARTED = "_STARTED.json"
PROBS = pa.list_(pa.float32(), N_GRADES)


class Interrupted(RuntimeError):
    """Raised by the test hook ``stop_after_shards`` (a driver that dies mid-execute)."""


def shard_out(plan_dir: Path, shard_id: str) -> Path:
    return Path(plan_dir) / "out" / shard_id


def finished(plan_dir: Path, shard_id: str) -> bool:
    return (shard_out(plan_dir, shard_id) / SUCCESS).exists()


def shard_state(plan_dir: Path, shard_id: str) -> str:
    """planned (no output yet), running (started, no _SUCCESS) or finished (_SUCCESS written), from the files."""
    out = shard_out(plan_dir, shard_id)
    if (out / SUCCESS).exists():
        return "finished"
    if (out / STARTED).exists() or any(out.glob("*.parquet")):
        return "running"
    return "planned"


def predict_isolating(judge, pairs: list) -> JudgeOutput:
    """``judge.predict``, retried on halves when it raises; a single pair that still raises is a failed vote."""
    try:
        return judge.predict(pairs)
    except Exception as e:  # noqa: BLE001 - one bad pair must not stop the job; the error is kept as the vote's raw
        if len(pairs) == 1:
            log.warning("judge %s failed on pair %s/%s: %s", judge.name, pairs[0].query_id, pairs[0].item_id, e)
            return JudgeOutput(np.full((1, N_GRADES), np.nan, np.float32), [f"error: {type(e).__name__}: {e}"[:2000]],
                               [FAILED], np.zeros(1))
        mid = len(pairs) // 2
        return JudgeOutput.concat([predict_isolating(judge, pairs[:mid]), predict_isolating(judge, pairs[mid:])])


class _Poisoned:
    """Test hook: a judge that raises on a batch holding one of ``keys`` (as a prompt over the context would)."""

    def __init__(self, judge, keys):
        self._judge, self._keys = judge, {tuple(k) for k in keys}
        self.name, self.model_id, self.prompt_sha = judge.name, judge.model_id, judge.prompt_sha

    def predict(self, pairs, progress: bool = False):
        if any((p.query_id, p.item_id) in self._keys for p in pairs):
            raise ValueError("the prompt is longer than the model's context (test hook)")
        return self._judge.predict(pairs)

    def __getattr__(self, name):
        return getattr(self._judge, name)


class JudgeStage:
    """One judge of the cascade as a Ray Data actor: loads the judge and its calibrator once."""

    def __init__(self, plan: dict, k: int, fault: dict | None = None):
        from assay.annotate.calibrate import IsotonicCalibrator
        from assay.annotate.judges import load_judge
        from assay.annotate.runtime import calibrator_file, cascade_sha
        from assay.config import AnnotateConfig

        cfg = AnnotateConfig.model_validate(plan["annotate"])
        artifacts = Path(plan["artifacts"])
        got = cascade_sha(cfg, artifacts)
        if got != plan["cascade_sha"]:
            raise RuntimeError(f"the judges under {artifacts} are cascade {got}, the plan was made for "
                               f"{plan['cascade_sha']}; retrained or recalibrated since: plan again")
        self.k = k
        self.spec = plan["judges"][k]
        jcfg = cfg.judges[k]
        self.judge = load_judge(jcfg, artifacts)
        if self.spec.get("backend") and hasattr(self.judge, "use_backend"):
            self.judge.use_backend(self.spec["backend"], artifacts)
        if self.spec.get("examples") and hasattr(self.judge, "set_examples"):
            self.judge.set_examples(self.spec["examples"])
        f = calibrator_file(artifacts, jcfg.name)
        self.calibrator = IsotonicCalibrator.load(f) if f.exists() else None
        self.thresholds = np.asarray(plan["thresholds"][k], dtype=np.float64)
        self.signals = [SIG_PREFIX + s for s in plan.get("signals", [])]
        self.artifacts = artifacts
        self.sha = plan["cascade_sha"]
        self.fault = fault or {}
        if self.fault.get("poison"):  # every judge fails on these pairs, so their labels fail
            self.judge = _Poisoned(self.judge, self.fault["poison"])

    def _maybe_die(self) -> None:
        """Test hook: the first call anywhere (a marker file says so) kills this worker process mid-shard."""
        marker = self.fault.get("kill_once")
        if marker and self.fault.get("judge", 0) == self.k:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from assay.annotate.cascade import accept_mask

        self._maybe_die()
        n = batch.num_rows
        open_ = (batch.column("open").to_numpy(zero_copy_only=False).astype(bool) if "open" in batch.column_names
                 else np.ones(n, dtype=bool))
        idx = np.flatnonzero(open_)
        probs = np.full((n, N_GRADES), np.nan, np.float32)
        raw: list = [None] * n
        status: list = [None] * n
        latency = np.full(n, np.nan, np.float32)
        tokens = np.full(n, -1, np.int64)
        if len(idx):
            sub = batch.take(pa.array(idx))
            pairs = pairs_from_arrow(sub)
            if self.signals and hasattr(self.judge, "use_signals"):
                values = np.column_stack([sub.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                                          for c in self.signals])
                self.judge.use_signals([(p.query_id, p.item_id) for p in pairs], values, self.artifacts)
            out = predict_isolating(self.judge, pairs)
            cp = self.calibrator.transform(out.probs) if self.calibrator is not None else out.probs
            probs[idx] = out.probs
            for r, i in enumerate(idx):
                raw[i], status[i] = out.raw[r], out.parse_status[r]
            latency[idx] = out.latency_ms
            if out.tokens is not None:
                tokens[idx] = out.tokens
            open_[idx[accept_mask(cp, self.thresholds)]] = False
        seen = np.zeros(n, dtype=bool)
        seen[idx] = True
        p = f"j{self.k}_"
        cols = {  # rows the judge did not see are null; a pair it could not grade keeps NaN probabilities
            p + "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel(), pa.float32()), N_GRADES,
                                                           mask=pa.array(~seen)),
            p + "raw": pa.array(raw, pa.string()),
            p + "status": pa.array(status, pa.string()),
            p + "latency": pa.array(latency, pa.float32(), mask=~seen),
            p + "tokens": pa.array(tokens, pa.int32(), mask=tokens < 0),
            p + "model": pa.array([self.judge.model_id] * n, pa.string()),
            p + "prompt_sha": pa.array([self.judge.prompt_sha] * n, pa.string()),
        }
        out_tbl = batch
        if "open" in out_tbl.column_names:
            out_tbl = out_tbl.drop_columns(["open"])
        if "cascade_sha" not in out_tbl.column_names:
            out_tbl = out_tbl.append_column("cascade_sha", pa.array([self.sha] * n, pa.string()))
        for name, arr in cols.items():
            out_tbl = out_tbl.append_column(name, arr)
        return out_tbl.append_column("open", pa.array(open_))


def _write_shard(plan_dir: Path, plan: dict, entry: dict, parts: list[pa.Table]) -> dict:
    """Write one finished shard's rows as a new attempt file, then _SUCCESS.json (never overwriting either)."""
    tbl = pa.concat_tables(parts, promote_options="default")
    tbl = tbl.sort_by([("query_id", "ascending"), ("item_id", "ascending")])
    drop = [c for c in tbl.column_names if c.startswith(SIG_PREFIX) or c in ("open",)]
    tbl = tbl.drop_columns(drop)
    out = shard_out(plan_dir, entry["shard_id"])
    out.mkdir(parents=True, exist_ok=True)
    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    f = out / f"{attempt}.parquet"
    tmp = out / f".{attempt}.parquet.tmp"
    pq.write_table(tbl, tmp)
    os.link(tmp, f)  # fails rather than overwrite
    tmp.unlink()
    calls = {}
    for k, j in enumerate(plan["judges"]):
        calls[j["name"]] = int(tbl.num_rows - tbl.column(f"j{k}_status").null_count)
    success = {"plan_id": plan["plan_id"], "workspace_id": plan["workspace_id"], "shard_id": entry["shard_id"],
               "input_sha256": entry["sha256"], "rows": tbl.num_rows, "attempt": attempt, "file": f.name,
               "sha256": file_sha256(f), "cascade_sha": plan["cascade_sha"], "judge_calls": calls}
    s = out / SUCCESS
    tmp = out / f".{SUCCESS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(success, indent=1))
    os.link(tmp, s)
    tmp.unlink()
    return success


def execute(plan_dir: Path, ray_cfg, *, stop_after_shards: int | None = None, fault: dict | None = None,
            progress: bool = False) -> dict:
    """Run every shard of the plan that has no ``_SUCCESS`` (Ray must be connected: assay.scale.cluster.connect).
    Returns shards skipped and done, judge calls per judge, and seconds."""
    import ray

    plan_dir = Path(plan_dir)
    plan = read_manifest(plan_dir)
    entries = {s["shard_id"]: s for s in plan["shards"]}
    todo = [s for s in plan["shards"] if not finished(plan_dir, s["shard_id"])]
    calls = {j["name"]: 0 for j in plan["judges"]}
    summary = {"plan_id": plan["plan_id"], "shards": len(entries), "skipped": len(entries) - len(todo), "done": 0,
               "rows": 0, "judge_calls": calls, "seconds": 0.0}
    if not todo:
        return summary
    for s in todo:
        f = plan_dir / s["path"]
        if file_sha256(f) != s["sha256"]:
            raise ValueError(f"shard {f} does not match the plan's sha256; it was changed after planning: plan again")
        out = shard_out(plan_dir, s["shard_id"])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / STARTED, {"plan_id": plan["plan_id"], "pid": os.getpid(), "at": time.time()})
    t0 = time.perf_counter()
    from assay.config import RayJudgeConfig

    want = sum(ray_cfg.judges.get(j["name"], RayJudgeConfig()).num_cpus *
               ray_cfg.judges.get(j["name"], RayJudgeConfig()).concurrency for j in plan["judges"])
    have = ray.cluster_resources().get("CPU", 0)
    if want >= have:
        log.warning("the judges' actor pools reserve %.1f CPUs of the cluster's %.1f; the Parquet reader needs one "
                    "more, or the job waits (annotate.ray.judges.<name>.num_cpus / concurrency)", want, have)
    ds = ray.data.read_parquet([str(plan_dir / s["path"]) for s in todo])
    for k, j in enumerate(plan["judges"]):
        res = ray_cfg.judges.get(j["name"], RayJudgeConfig())
        ds = ds.map_batches(JudgeStage, fn_constructor_kwargs={"plan": plan, "k": k, "fault": fault},
                            batch_format="pyarrow", batch_size=ray_cfg.batch_rows, concurrency=res.concurrency,
                            num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
                            max_restarts=ray_cfg.max_restarts, max_task_retries=ray_cfg.max_restarts)
    pending: dict[str, list[pa.Table]] = {}
    seen: dict[str, set] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for sid in pc.unique(batch.column("shard")).to_pylist():
            part = batch.filter(pc.equal(batch.column("shard"), sid))
            keys = seen.setdefault(sid, set())
            fresh = [i for i, key in enumerate(zip(part.column("query_id").to_pylist(),
                                                   part.column("item_id").to_pylist())) if key not in keys]
            if len(fresh) < part.num_rows:  # a retried task's rows seen twice: keep the first
                part = part.take(pa.array(fresh, pa.int64()))
            keys.update(zip(part.column("query_id").to_pylist(), part.column("item_id").to_pylist()))
            pending.setdefault(sid, []).append(part)
            if len(keys) == entries[sid]["rows"]:
                success = _write_shard(plan_dir, plan, entries[sid], pending.pop(sid))
                for name, c in success["judge_calls"].items():
                    calls[name] += c
                summary["done"] += 1
                summary["rows"] += success["rows"]
                log.info("shard %s: %d rows written", sid, success["rows"])
                if stop_after_shards is not None and summary["done"] >= stop_after_shards:
                    raise Interrupted(f"stopped after {summary['done']} shards (test hook)")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    missing = [sid for sid in (s["shard_id"] for s in todo) if not finished(plan_dir, sid)]
    if missing:
        raise RuntimeError(f"Ray returned fewer rows than planned for shards {missing}; rerun "
                           "`assay annotate --engine ray` (finished shards are kept)")
    return summary
