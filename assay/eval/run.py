"""`assay evaluate`: BM25, the base encoder, the curriculum model and the trained baselines on held-out queries.

Reads ``checkpoints`` (the newest kept curriculum checkpoint, whose stage is the highest, and the newest of each
baseline), the ``test`` (or ``val``) queries of ``examples``, and the judgments described in
:mod:`assay.eval.retrieval`. Writes ``artifacts/reports/eval-<time>/`` (report.json, report.html, PNGs, and
per_query.csv: every query's NDCG@10, embarrassing rate@10 and recall@100 for every system) and records the run.
Checkpoint selection never reads the simulator's truth; this report is where truth is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from assay.config import AssayConfig
from assay.eval.retrieval import evaluate
from assay.reporting import bar_png, img, table_html, write_report
from assay.store import Store, utcnow

METRICS = ("ndcg@10", "recall@10", "recall@100", "embarrassing@10", "judged@10")


def default_systems(store: Store) -> dict[str, str]:
    systems = {"bm25": "bm25", "base encoder": "base"}
    rows = store.exec("""SELECT name, path FROM checkpoints WHERE kept AND name IS NOT NULL
                         QUALIFY row_number() OVER (PARTITION BY name ORDER BY created_at DESC, stage DESC) = 1
                         ORDER BY name DESC""")
    for name, path in rows:
        if Path(path).exists():
            systems[name] = path
    return systems


def served_system(cfg: AssayConfig, store: Store, systems: dict[str, str]) -> dict | None:
    """Which evaluated system `assay export-index` would serve (``serve.checkpoint``: a path, ``best``, or the
    newest curriculum checkpoint), so the report says what users get. A served checkpoint that no other system
    names is added to ``systems`` as ``served``. None when nothing is trained yet."""
    from assay.dense import resolve_checkpoint

    try:
        path = resolve_checkpoint(store, cfg.serve.checkpoint)
    except ValueError:
        return None
    target = Path(path).resolve()
    same = next((n for n, p in systems.items() if p not in ("bm25", "base") and Path(p).resolve() == target), None)
    if same is None:
        systems["served"] = path
    return {"serve.checkpoint": cfg.serve.checkpoint, "path": path, "system": same or "served"}


def served_line(served: dict) -> str:
    what = served["serve.checkpoint"] or "unset (the newest kept curriculum checkpoint)"
    return f"serve.checkpoint {what}: `assay export-index` serves {served['system']} ({served['path']})"


def run(cfg: AssayConfig, store: Store, *, split: str = "test", checkpoints: dict[str, str] | None = None,
        progress: bool = True, qrels: str | None = None) -> dict:
    """Every system on the held-out queries, plus ``hybrid``: BM25 fused with the curriculum model (the base
    encoder when no curriculum checkpoint exists). Judgments: ``qrels`` when given, else truth, else labels."""
    systems = default_systems(store)
    systems.update(checkpoints or {})
    served = served_system(cfg, store, systems)
    dense = "curriculum" if "curriculum" in systems else "base encoder"
    with store.run("evaluate", {"split": split, "systems": systems, "qrels": qrels}) as run_id:
        res = evaluate(store, systems, split=split, bm25=cfg.mining.bm25,
                       base_model=cfg.train.base_model or cfg.models.embedder, device=cfg.models.device,
                       progress=progress, hybrid=("bm25", dense), qrels=Path(qrels) if qrels else None,
                       backend_cfg=cfg, spell=cfg.spell, reference=cfg.evaluate.reference,
                       bootstrap=cfg.evaluate.bootstrap, confidence=cfg.evaluate.confidence, seed=cfg.evaluate.seed)
        per_query = res.pop("per_query")
        res["run_id"] = run_id
        res["served"] = served
        res["context"] = context(cfg, store)
        folder = store.artifacts / "reports" / f"eval-{utcnow():%Y%m%dT%H%M%S}"
        res["report"] = str(_report(folder, res))
        res["per_query"] = str(_per_query_csv(folder / "per_query.csv", per_query))
        keys = ("split", "queries", "judgments", "segments", "systems", "backends", "backend_note", "reference",
                "confidence", "comparisons", "served")
        (folder / "metrics.json").write_text(json.dumps({k: res[k] for k in keys}, indent=1))
        store.finish_run(run_id, res)
    return res


def _per_query_csv(path: Path, per_query: dict) -> Path:
    """One row per (query, system): query_id, segment, system, then the compared metrics (empty = undefined)."""
    import csv

    keys = [k for k in per_query if "|" in k]
    systems = list(dict.fromkeys(k.split("|")[0] for k in keys))
    metrics = list(dict.fromkeys(k.split("|")[1] for k in keys))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "segment", "system", *metrics])
        for r, (q, seg) in enumerate(zip(per_query["query_id"], per_query["segment"])):
            for s in systems:
                vals = [per_query[f"{s}|{m}"][r] for m in metrics]
                w.writerow([q, seg, s, *["" if v is None or v != v else round(float(v), 5) for v in vals]])
    return path


def p_better(metric: str, c: dict) -> float:
    """The bootstrap probability that the reference is better on ``metric``: a lower embarrassing rate, a
    higher anything else."""
    return c["p_below_0"] if metric.startswith("embarrassing") else c["p_above_0"]


def comparison_rows(res: dict) -> list[list]:
    """Rows of the comparison table: system, segment, then for each metric the reference's mean difference with
    its interval and the bootstrap probability that the reference is better (higher NDCG/recall, lower
    embarrassing rate)."""
    rows = []
    for name, by_seg in (res.get("comparisons") or {}).items():
        for seg, ms in by_seg.items():
            row = [name, seg, ms["ndcg@10"]["queries"]]
            for m in ("ndcg@10", "embarrassing@10", "recall@100"):
                c = ms[m]
                row += [f"{c['delta']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]", p_better(m, c)]
            rows.append(row)
    return rows


COMPARISON_HEADER = ["system", "segment", "queries", "NDCG@10 diff [CI]", "P(ref better)", "embarrassing@10 diff [CI]",
                     "P(ref better)", "recall@100 diff [CI]", "P(ref better)"]


def context(cfg: AssayConfig, store: Store) -> dict:
    """What the evaluated models were built from: examples per tier and split, the newest cascade's coverage of
    the mined pairs (who decided), its agreement with human eval labels (the newest `assay agreement` report),
    and the newest training run's ablation and validation curves."""
    from assay.annotate.pairs import work_sql
    from assay.audit.export import newest_cascade
    from assay.curriculum.tiers import TIER_NAMES

    out: dict = {}
    tiers: dict[str, dict[str, int]] = {}
    for tier, split, n in store.exec("SELECT tier, split, count(*) FROM examples GROUP BY ALL ORDER BY ALL"):
        tiers.setdefault(TIER_NAMES.get(int(tier), str(tier)), {})[split] = int(n)
    if tiers:
        out["tiers"] = tiers
    try:
        sha = newest_cascade(store)
    except ValueError:  # nothing annotated
        sha = None
    if sha:
        mined = store.exec(f"SELECT count(*) FROM ({work_sql(cfg.annotate.sources)})")[0][0]
        by = store.exec("""SELECT coalesce(decided_by, status), count(*) FROM labels WHERE cascade_sha = ?
                           GROUP BY ALL ORDER BY 2 DESC""", [sha])
        labeled = sum(n for _, n in by)
        out["cascade"] = {"cascade_sha": sha, "mined_pairs": int(mined), "labeled": int(labeled),
                          "coverage": round(labeled / mined, 4) if mined else None,
                          "decided_by": {str(k): int(n) for k, n in by}}
        reports = sorted((store.artifacts / "reports").glob("agreement-*/report.json"), key=lambda p: p.stat().st_mtime,
                         reverse=True)
        # the newest `assay agreement` on the human eval split (not an audit report); older reports are not read
        path, agr = next(((p, d) for p, d in ((p, json.loads(p.read_text())) for p in reports)
                          if d.get("split") == "eval"), (None, None))
        if agr is not None:
            c = agr.get("cascade", {})
            out["cascade"]["agreement"] = {
                "report": str(path.parent / "report.html"), "cascade_sha": agr.get("cascade_sha"),
                "human_eval_pairs": agr.get("pairs"), "accuracy": c.get("accuracy"), "qwk": c.get("qwk"),
                "labels_vs_truth_accuracy": (agr.get("labels_vs_truth") or {}).get("accuracy")}
    row = store.exec("""SELECT summary FROM runs WHERE stage = 'train' AND status = 'ok'
                        ORDER BY ended_at DESC LIMIT 1""")
    if row and row[0][0]:
        summary = json.loads(row[0][0])
        out["training"] = {k: summary.get(k) for k in ("run_id", "ablation", "curves", "base_val_ndcg10",
                                                       "skipped_stages", "report")}
    return out


def _context_sections(folder: Path, ctx: dict) -> list[tuple[str, str]]:
    from assay.trainer.run import curves_png

    sections = []
    if ctx.get("tiers"):
        splits = sorted({s for v in ctx["tiers"].values() for s in v})
        sections.append(("Training examples per tier and split (`assay curriculum`)", table_html(
            ["tier"] + splits, [[t] + [v.get(s, 0) for s in splits] for t, v in ctx["tiers"].items()])))
    if ctx.get("cascade"):
        c = ctx["cascade"]
        rows = [[k, n, round(n / c["labeled"], 4) if c["labeled"] else 0] for k, n in c["decided_by"].items()]
        a = c.get("agreement")
        agree = "" if not a else (
            f"<p>Agreement with human eval labels ({a['human_eval_pairs']} pairs, cascade {a['cascade_sha']}): "
            f"accuracy {a['accuracy']}, QWK {a['qwk']}"
            + (f"; every written label against the simulator's truth: accuracy {a['labels_vs_truth_accuracy']}"
               if a.get("labels_vs_truth_accuracy") is not None else "") + "</p>")
        sections.append((f"The cascade's labels (cascade {c['cascade_sha']})",
                         f"<p>{c['labeled']:,} of {c['mined_pairs']:,} mined pairs labeled "
                         f"(coverage {c['coverage']})</p>" + table_html(["decided by", "labels", "share"], rows)
                         + agree))
    t = ctx.get("training")
    if t and t.get("ablation"):
        curves_png(t, folder / "curves.png")
        rows = [[r["model"], r["val_ndcg10"], r["steps"],
                 "" if r.get("kept") is None else ("kept" if r["kept"] else "skipped")] for r in t["ablation"]]
        sections.append(("Training (validation NDCG@10 on the cascade's labels of validation queries)",
                         table_html(["model", "val NDCG@10", "steps", "stage"], rows) + img("curves.png")))
    return sections


def _report(folder: Path, res: dict) -> Path:
    names = list(res["systems"])
    segs = ["all"] + [s for s in res["segments"]]
    sections = []
    for m in METRICS:
        rows = [[n] + [res["systems"][n].get(s, {}).get(m, float("nan")) for s in segs] for n in names]
        sections.append((f"{m} ({res['judgments']} judgments, {res['split']} queries)", table_html(["system"] + segs, rows)))
    bar_png(names, [res["systems"][n]["all"]["ndcg@10"] for n in names], folder / "ndcg10.png",
            f"NDCG@10 on {res['queries']} {res['split']} queries ({res['judgments']})", "NDCG@10")
    bar_png(names, [res["systems"][n]["all"]["embarrassing@10"] for n in names], folder / "embarrassing10.png",
            "embarrassing rate@10", "grade-0 share of judged top 10")
    sections.append(("Charts", img("ndcg10.png") + img("embarrassing10.png")))
    if res.get("served"):
        sections.append(("What serving answers with", f"<p>{served_line(res['served'])}</p>"))
    if res.get("backends"):
        note = f"<p><b>Warning:</b> {res['backend_note']}</p>" if res.get("backend_note") else ""
        sections.append(("Encoder backend of each dense system (`models.backend`)",
                         note + table_html(["system", "backend"], [[n, b] for n, b in res["backends"].items()])))
    if res.get("comparisons"):
        sections.append((f"{res['reference']} minus each system, same queries (paired bootstrap over queries)",
                         f"<p>Mean per-query difference with its confidence interval; P(ref better) is the share "
                         f"of resamples in which {res['reference']} is better (higher NDCG@10 or recall@100, lower "
                         f"embarrassing rate). An interval that contains 0 is not a measured difference. "
                         f"Per-query values: per_query.csv.</p>"
                         + table_html(COMPARISON_HEADER, comparison_rows(res))))
    sections += _context_sections(folder, res.get("context", {}))
    return write_report(folder, "assay evaluate", res, sections)
