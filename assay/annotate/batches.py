"""`assay annotate`: label the mined pairs with the cascade, in resumable, idempotent batches.

Reads ``candidates`` and/or ``negatives`` (``annotate.sources``) with query and product text.
Writes ``labels`` (one row per (query_id, item_id, cascade_sha)) and ``label_votes`` (every
judge's vote on every pair it saw: model, template sha, raw output, parse status, latency,
tokens).

Invariants:
- Work is keyed by (query, item, cascade sha), and each label and vote carries ``text_sha``, the digest of the
  query and item texts it judged: a pair whose text changed (a re-ingested catalog) is pending again and its
  relabel replaces the stale label. A batch's labels and votes commit in one
  transaction, keyed upserts, so an interrupted run (even ``kill -9``) loses at most the batch
  in flight and a rerun writes every pair exactly once.
- A pair that no judge could grade (unparseable output, a call that failed after retries) is
  stored with ``status = 'failed'`` and its votes; the next `assay annotate` retries it.
- Judges only compute the pairs that reach them; the routing is assay.annotate.cascade.route.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from assay.annotate.base import N_GRADES, pairs_from_arrow
from assay.annotate.cascade import accept_mask, route
from assay.annotate.pairs import count_work, failure_reasons, pending_pairs
from assay.annotate.runtime import Cascade, cascade_file, cascade_sha, load_cascade, thresholds_in_force
from assay.config import AnnotateConfig
from assay.store import Store, utcnow
from assay.text import digest

log = logging.getLogger(__name__)

PROBS = pa.list_(pa.float32(), N_GRADES)


class Interrupted(RuntimeError):
    """Raised by the test hook `stop_after_batches`."""


def _probs_array(p: np.ndarray) -> pa.Array:
    """(n, 5) float with NaN rows -> FLOAT[5] with nulls."""
    ok = ~np.isnan(p).any(axis=1)
    flat = pa.array(np.nan_to_num(p, nan=0.0).astype(np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, N_GRADES, mask=pa.array(~ok))


def annotate_batch(cascade: Cascade, pairs: list, *, batch_id: str, run_id: str) -> tuple[pa.Table, pa.Table, dict]:
    """Run the cascade on one batch. Returns (labels rows, vote rows, stats)."""
    n = len(pairs)
    names = cascade.names
    calibrated = [np.full((n, N_GRADES), np.nan, dtype=np.float32) for _ in names]
    open_ = np.ones(n, dtype=bool)
    votes: list[dict] = []
    seconds: dict[str, float] = {}
    for j, (judge, name) in enumerate(zip(cascade.judges, names)):
        idx = np.flatnonzero(open_)
        if not len(idx):
            break
        t0 = time.perf_counter()
        out = judge.predict([pairs[i] for i in idx])
        seconds[name] = time.perf_counter() - t0
        cp = cascade.calibrate(j, out.probs)
        calibrated[j][idx] = cp
        open_[idx[accept_mask(cp, cascade.thresholds[j])]] = False
        raw_grade = out.grade
        for r, i in enumerate(idx):
            votes.append({
                "query_id": pairs[i].query_id, "item_id": pairs[i].item_id, "judge": name,
                "model": judge.model_id, "prompt_sha": judge.prompt_sha,
                "grade": int(raw_grade[r]) if raw_grade[r] >= 0 else None,
                "probs": out.probs[r], "calibrated": cp[r], "raw": out.raw[r], "parse_status": out.parse_status[r],
                "latency_ms": float(out.latency_ms[r]),
                "tokens": int(out.tokens[r]) if out.tokens is not None and out.tokens[r] >= 0 else None,
                "text_sha": pairs[i].text_sha,
            })
    dec = route(calibrated, names, cascade.thresholds)
    status = np.where(dec.grade >= 0, "ok", "failed")
    now = utcnow()
    labels = pa.table({
        "query_id": pa.array([p.query_id for p in pairs], pa.string()),
        "item_id": pa.array([p.item_id for p in pairs], pa.string()),
        "cascade_sha": pa.array([cascade.sha] * n, pa.string()),
        "grade": pa.array([int(g) if g >= 0 else None for g in dec.grade], pa.int8()),
        "probs": _probs_array(dec.probs),
        "decided_by": pa.array(dec.decided_by.tolist(), pa.string()),
        "confidence": pa.array([None if np.isnan(c) else float(c) for c in dec.confidence], pa.float32()),
        "status": pa.array(status.tolist(), pa.string()),
        "batch_id": pa.array([batch_id] * n, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
        "created_at": pa.array([now] * n, pa.timestamp("us")),
        "text_sha": pa.array([p.text_sha for p in pairs], pa.string()),
    })
    vt = pa.table({
        "query_id": pa.array([v["query_id"] for v in votes], pa.string()),
        "item_id": pa.array([v["item_id"] for v in votes], pa.string()),
        "cascade_sha": pa.array([cascade.sha] * len(votes), pa.string()),
        "judge": pa.array([v["judge"] for v in votes], pa.string()),
        "model": pa.array([v["model"] for v in votes], pa.string()),
        "prompt_sha": pa.array([v["prompt_sha"] for v in votes], pa.string()),
        "grade": pa.array([v["grade"] for v in votes], pa.int8()),
        "probs": _probs_array(np.array([v["probs"] for v in votes]).reshape(-1, N_GRADES)),
        "calibrated": _probs_array(np.array([v["calibrated"] for v in votes]).reshape(-1, N_GRADES)),
        "raw": pa.array([v["raw"] for v in votes], pa.string()),
        "parse_status": pa.array([v["parse_status"] for v in votes], pa.string()),
        "latency_ms": pa.array([v["latency_ms"] for v in votes], pa.float32()),
        "tokens": pa.array([v["tokens"] for v in votes], pa.int32()),
        "batch_id": pa.array([batch_id] * len(votes), pa.string()),
        "run_id": pa.array([run_id] * len(votes), pa.string()),
        "text_sha": pa.array([v["text_sha"] for v in votes], pa.string()),
    })
    stats = {"decided_by": {}, "seconds": seconds, "failed": int((status == "failed").sum())}
    for b in dec.decided_by.tolist():
        stats["decided_by"][str(b)] = stats["decided_by"].get(str(b), 0) + 1
    return labels, vt, stats


def write_labels(store: Store, labels: pa.Table, votes: pa.Table) -> None:
    """Upsert a batch's labels and votes in one transaction. The pairs' earlier votes under the same cascade go
    first: a pair relabeled because its text changed may be decided by fewer judges than before, and a vote on
    the old text must not stay beside the new label."""
    keys = labels.select(["query_id", "item_id", "cascade_sha"])
    with store.transaction():
        store.con.register("_relabeled", keys)
        try:
            store.exec("""DELETE FROM label_votes v USING _relabeled k WHERE v.query_id = k.query_id
                          AND v.item_id = k.item_id AND v.cascade_sha = k.cascade_sha""")
        finally:
            store.con.unregister("_relabeled")
        store.write("labels", labels, mode="upsert")
        store.write("label_votes", votes, mode="upsert")


def estimate(cfg: AnnotateConfig, store: Store) -> dict:
    """The dry-run cost estimate: pending pairs, expected calls and seconds per judge."""
    import json

    sha = cascade_sha(cfg, store.artifacts)
    counts = count_work(store, cfg.sources, sha)
    pending = min(counts["pending"], cfg.max_pairs or counts["pending"])
    cf = cascade_file(store.artifacts)
    fitted = json.loads(cf.read_text()) if cf.exists() else {}
    reach = fitted.get("reach", {})
    ms = fitted.get("ms_per_pair", {})
    per = {}
    for j in cfg.judges:
        r = reach.get(j.name, 1.0)
        calls = int(round(pending * r))
        per[j.name] = {"kind": j.kind, "reach": r, "expected_calls": calls,
                       "expected_seconds": round(calls * ms[j.name] / 1000, 1) if j.name in ms else None}
    _, src = thresholds_in_force(cfg, store.artifacts)
    return {"cascade_sha": sha, **counts, "to_annotate": pending, "judges": per, "thresholds": src,
            "calibrated": bool(fitted), "estimate_source": "calibration replay" if fitted else
            "no calibration yet: every judge assumed to see every pair"}


def read_signals_once(cascade, store: Store, part) -> None:
    """Give each features judge of ``cascade`` the mining signals of the pairs in ``part`` (the next window of
    pending pairs) in one read of the workspace, which its batches then look up."""
    from assay.annotate.judges.features import SIGNALS, FeaturesJudge, read_signals

    judges = [j for j in cascade.judges if isinstance(j, FeaturesJudge)]
    if not judges or not part.num_rows:
        return
    qids, iids = part.column("query_id").to_pylist(), part.column("item_id").to_pylist()
    sig = read_signals(store, qids, iids)
    values = np.column_stack([sig.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in SIGNALS])
    for judge in judges:
        judge.use_signals(list(zip(qids, iids)), values, store.artifacts)


def run(cfg: AnnotateConfig, store: Store, *, progress: bool = True, dry_run: bool = False,
        stop_after_batches: int | None = None, judges: list | None = None,
        skip: set[tuple[str, str]] | None = None) -> dict:
    """Annotate the pending pairs (at most ``annotate.max_pairs``), failed ones included, except ``skip``. The
    summary is recorded in ``runs``; the returned dict also lists ``failed_pairs`` (query_id, item_id) of this
    launch, so a caller can bound how often a pair is retried."""
    if dry_run:
        return {"dry_run": True, **estimate(cfg, store)}
    from assay.annotate.fit import prepare_judges

    from assay.mining.run import stale_inputs

    changed = stale_inputs(store)
    if changed:
        log.warning("the mined pairs predate a change to %s: run `assay mine` first so the pairs (and the features "
                    "judge's mining signals) follow the workspace as it is now", ", ".join(changed))
    cascade = load_cascade(cfg, store.artifacts, judges=judges or prepare_judges(cfg, store))
    before = count_work(store, cfg.sources, cascade.sha)
    todo = pending_pairs(store, cfg.sources, cascade.sha, cfg.max_pairs, skip=skip)
    n = todo.num_rows
    decided: dict[str, int] = {}
    judge_s: dict[str, float] = {}
    failed = 0
    failed_pairs: list[tuple[str, str]] = []
    done_batches = 0
    t_start = time.perf_counter()
    with store.run("annotate", {"annotate": cfg.model_dump(mode="json"), "cascade_sha": cascade.sha},
                   models={j.name: judge.model_id for j, judge in zip(cfg.judges, cascade.judges)}) as run_id:
        bar = tqdm(total=n, desc="annotate", unit=" pair", disable=not progress)
        window = -(-cfg.signal_window // cfg.batch_size) * cfg.batch_size
        for lo in range(0, n, cfg.batch_size):
            if lo % window == 0:
                read_signals_once(cascade, store, todo.slice(lo, window))
            chunk = todo.slice(lo, cfg.batch_size)
            pairs = pairs_from_arrow(chunk)
            batch_id = digest([cascade.sha, pairs[0].query_id, pairs[0].item_id, pairs[-1].query_id,
                               pairs[-1].item_id, len(pairs)])
            labels, votes, st = annotate_batch(cascade, pairs, batch_id=batch_id, run_id=run_id)
            write_labels(store, labels, votes)
            for k, v in st["decided_by"].items():
                decided[k] = decided.get(k, 0) + v
            for k, v in st["seconds"].items():
                judge_s[k] = judge_s.get(k, 0.0) + v
            failed += st["failed"]
            if st["failed"]:
                failed_pairs += [(q, i) for q, i, ok in zip(labels.column("query_id").to_pylist(),
                                                            labels.column("item_id").to_pylist(),
                                                            labels.column("status").to_pylist()) if ok != "ok"]
            done_batches += 1
            bar.update(len(pairs))
            total = sum(decided.values())
            bar.set_postfix_str(" ".join(f"{k}={v / total:.0%}" for k, v in sorted(decided.items())) +
                                (f" failed={failed}" if failed else ""))
            if stop_after_batches is not None and done_batches >= stop_after_batches:
                raise Interrupted(f"stopped after {done_batches} batches (test hook)")
        bar.close()
        for judge in cascade.judges:  # later callers of these judges read the workspace as it is then
            if hasattr(judge, "clear_signals"):
                judge.clear_signals()
        secs = time.perf_counter() - t_start
        after = count_work(store, cfg.sources, cascade.sha)
        summary = {
            "run_id": run_id, "cascade_sha": cascade.sha, "thresholds": cascade.threshold_source,
            "annotated": n, "batches": done_batches, "seconds": round(secs, 1),
            "pairs_per_second": round(n / secs, 2) if secs > 0 else None,
            "decided_by": decided, "decided_share": {k: round(v / max(n, 1), 4) for k, v in decided.items()},
            "failed": failed, "judge_seconds": {k: round(v, 1) for k, v in judge_s.items()},
            "before": before, "after": after,
            "failure_reasons": failure_reasons(store, cascade.sha) if after["failed"] else [],
            "mining_stale": changed or [],
        }
        store.finish_run(run_id, summary)
    return {**summary, "failed_pairs": failed_pairs}
