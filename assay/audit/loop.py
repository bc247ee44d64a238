"""The audit loop: sample labels for people to check, import their grades, measure the judges against them.

- `assay audit sample`: a stratified sample of one cascade's labels, strata = tier x grade x decided_by (pairs not
  in the curriculum have tier ``none``). Each stratum gets a share proportional to its size with a floor
  (``audit.min_per_stratum``); inside a stratum, pairs whose confidence is below the ``audit.low_confidence``
  quantile are drawn ``audit.oversample`` times as often (weighted sampling without replacement, seeded). The file
  is an export (``assay.audit.export``: any format, every lineage column) plus ``stratum`` and an empty
  ``audit_grade`` column for people to fill in (Label Studio shows the cascade's grade as a prediction instead).
- `assay audit import FILE`: human grades from CSV, JSONL (``audit_grade``, else ``grade``, per row) or a Label
  Studio JSON export (every non-cancelled annotation of the ``grade`` choices) into ``human_labels`` with split
  ``audit``, through `assay ingest`'s checks (bad rows go to ``rejects`` with file, line and reason).
- `assay agreement --split audit`: the labels the cascade wrote against the audit grades (median over people):
  accuracy, quadratic weighted kappa, within-one and the confusion matrix for the cascade, for each judge's own vote,
  per tier and per deciding judge, as JSON and an HTML report with PNGs.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from assay.annotate.pairs import HUMAN_GRADE_SQL, current_labels_sql
from assay.audit import export as ex
from assay.config import AuditConfig, ExportConfig
from assay.reporting import confusion_png, img, table_html, write_report
from assay.store import Store, utcnow

AUDIT_SPLIT = "audit"
# the audit grade of each audited pair (median over the people who graded it) and each pair's curriculum tier
_AUDIT_CTE = f"""h AS (SELECT query_id, item_id, {HUMAN_GRADE_SQL} AS human FROM human_labels
                       WHERE split = '{AUDIT_SPLIT}' GROUP BY ALL)"""
_TIER_SQL = "(SELECT query_id, item_id, min(tier) AS tier FROM examples GROUP BY ALL)"


STRATA_SQL = f"""
    SELECT l.query_id, l.item_id, coalesce(l.confidence, 0) AS confidence,
           'tier=' || coalesce(t.tier::VARCHAR, 'none') || '/grade=' || l.grade || '/by=' ||
           coalesce(l.decided_by, '?') AS stratum
    FROM {current_labels_sql()} l LEFT JOIN {_TIER_SQL} t USING (query_id, item_id)
    WHERE l.cascade_sha = ? AND l.status = 'ok'
      AND NOT EXISTS (SELECT 1 FROM human_labels h WHERE h.query_id = l.query_id AND h.item_id = l.item_id
                      AND h.split = '{AUDIT_SPLIT}')
    ORDER BY l.query_id, l.item_id"""  # the seeded keys go to rows in this order: without it DuckDB's parallel scan
                                        # could hand them out differently and the same seed draw another sample


def inclusion_probabilities(weight: np.ndarray, k: int) -> np.ndarray:
    """Each unit's probability of being among ``k`` drawn in proportion to ``weight`` without replacement: the
    usual proportional-to-size approximation ``k * w_i / sum(w)``, capped at 1 with the cap's surplus handed to the
    rest until none passes 1. With equal weights it is exactly ``k / N``."""
    w = np.asarray(weight, dtype=np.float64)
    pi = np.zeros(len(w))
    if k <= 0 or len(w) == 0:
        return pi
    if k >= len(w):
        return np.ones(len(w))
    sure = np.zeros(len(w), dtype=bool)
    while True:
        left = k - sure.sum()
        pi[~sure] = left * w[~sure] / w[~sure].sum()
        over = ~sure & (pi >= 1.0)
        if not over.any():
            break
        sure |= over
        pi[sure] = 1.0
    return pi


def pick(store: Store, cfg: AuditConfig, sha: str, n: int) -> pa.Table:
    """(query_id, item_id, stratum, low_confidence, inclusion, design_weight) of the sample: proportional
    allocation with a floor over tier x grade x decided_by, low-confidence pairs weighted ``oversample`` inside
    their stratum. ``design_weight`` = 1 / inclusion probability (how many pairs of the population each stands
    for), which agreement and `calibrate --from-audit` use to read the sample back as the population."""
    from assay.annotate.requests import allocate

    pool = store.query(STRATA_SQL, [sha])
    if pool.num_rows == 0:
        raise ValueError(f"cascade {sha} has no labels left to audit (every labeled pair already has an audit "
                         "grade, or nothing is labeled: run `assay annotate`)")
    strata = np.asarray(pool.column("stratum").to_pylist(), dtype=object)
    conf = pool.column("confidence").to_numpy(zero_copy_only=False).astype(np.float64)
    names, sizes = np.unique(strata, return_counts=True)
    quota = allocate(dict(zip(names.tolist(), sizes.tolist())), min(n, len(strata)), cfg.min_per_stratum)
    cut = float(np.quantile(conf, cfg.low_confidence)) if len(conf) else 0.0
    weight = np.where(conf < cut, cfg.oversample, 1.0)
    rng = np.random.default_rng(cfg.seed)
    key = rng.random(len(conf)) ** (1.0 / weight)  # Efraimidis-Spirakis: the largest keys are the weighted sample
    keep, incl = [], np.zeros(len(conf))
    for name in names:
        idx = np.flatnonzero(strata == name)
        k = quota.get(str(name), 0)
        if k:
            keep.extend(idx[np.argsort(-key[idx], kind="stable")[:k]].tolist())
            incl[idx] = inclusion_probabilities(weight[idx], k)
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    return pa.table({"query_id": pool.column("query_id").take(keep), "item_id": pool.column("item_id").take(keep),
                     "stratum": pa.array(strata[keep].tolist(), pa.string()),
                     "low_confidence": pa.array((conf[keep] < cut).tolist(), pa.bool_()),
                     "inclusion": pa.array(incl[keep], pa.float64()),
                     "design_weight": pa.array(1.0 / incl[keep], pa.float64())})


def sample(cfg: AuditConfig, ecfg: ExportConfig, store: Store, out: Path, *, n: int | None = None,
           fmt: str | None = None, progress: bool = True) -> dict:
    """Write the audit sample to ``out`` (any export format) and record the run."""
    from tqdm.auto import tqdm

    fmt = fmt or ex._format_of(out)
    if fmt not in ex.FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {list(ex.FORMATS)}")
    sha = ecfg.cascade or ex.newest_cascade(store)
    n = n or cfg.n
    with store.run("audit-sample", {"audit": cfg.model_dump(mode="json"), "n": n, "format": fmt, "out": str(out),
                                    "cascade_sha": sha}) as run_id:
        picked = pick(store, cfg, sha, n)
        view = "_audit_pick"
        store.con.register(view, picked)
        try:
            sql, params = ex.lineage_sql(sha)
            sql = (f"SELECT x.*, s.stratum, s.low_confidence, s.design_weight, NULL::TINYINT AS audit_grade, "
                   f"NULL::VARCHAR AS annotator "
                   f"FROM ({sql}) x JOIN {view} s USING (query_id, item_id) ORDER BY s.stratum, x.query_id, x.item_id")
            batches = (ex.with_item_text(b) for b in store.iter_batches(sql, params, ecfg.batch_rows) if b.num_rows)
            with tqdm(total=picked.num_rows, desc=f"audit sample {fmt}", unit=" rows", disable=not progress) as bar:
                rows = ex.write_batches(batches, out, fmt, bar)
        finally:
            store.con.unregister(view)
        store.write("audit_samples", picked.append_column("cascade_sha", pa.array([sha] * picked.num_rows, pa.string()))
                    .append_column("run_id", pa.array([run_id] * picked.num_rows, pa.string()))
                    .append_column("created_at", pa.array([utcnow()] * picked.num_rows, pa.timestamp("us"))),
                    mode="upsert")
        strata = picked.column("stratum").to_pylist()
        summary = {"run_id": run_id, "rows": rows, "out": str(out), "format": fmt, "cascade_sha": sha,
                   "strata": len(set(strata)), "low_confidence": int(sum(picked.column("low_confidence").to_pylist())),
                   "by_stratum": {s: strata.count(s) for s in sorted(set(strata))}}
        store.finish_run(run_id, summary)
    return summary


def _labelstudio_rows(path: Path) -> list[dict]:
    tasks = json.loads(path.read_text())
    if isinstance(tasks, dict):
        tasks = [tasks]
    out = []
    for t in tasks:
        data = t.get("data") or {}
        for a in t.get("annotations") or []:
            if a.get("was_cancelled"):
                continue
            who = a.get("completed_by")
            if isinstance(who, dict):
                who = who.get("email") or who.get("id")
            grade = None
            for r in a.get("result") or []:
                if r.get("from_name") == "grade" and (r.get("value") or {}).get("choices"):
                    grade = r["value"]["choices"][0]
            out.append({"query_id": data.get("query_id"), "item_id": data.get("item_id"), "grade": grade,
                        "annotator": f"labelstudio:{who if who is not None else 'unknown'}"})
    return out


def _file_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _labelstudio_rows(path)
    if suffix == ".jsonl":
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            recs = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        recs = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: audit grades are read from .csv, .tsv, .jsonl, .parquet or a Label Studio "
                         ".json export")
    col = "audit_grade" if recs and "audit_grade" in recs[0] else "grade"
    return [{"query_id": r.get("query_id"), "item_id": r.get("item_id"), "grade": r.get(col),
             "annotator": r.get("annotator") or "auditor"} for r in recs]


def import_grades(store: Store, path: Path, *, progress: bool = True) -> dict:
    """People's grades from ``path`` into ``human_labels`` (split audit) through `assay ingest`'s validation. Rows
    left ungraded (an empty ``audit_grade``) are counted, not rejected."""
    from assay.config import IngestConfig
    from assay.data import ingest

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    rows = _file_rows(path)
    graded = [r for r in rows if r["grade"] not in (None, "")]
    if not graded:
        raise ValueError(f"{path} holds no grades (fill in the audit_grade column, or annotate the tasks in Label "
                         "Studio and export them as JSON)")
    with tempfile.TemporaryDirectory() as d:
        staged = Path(d) / path.with_suffix(".csv").name
        with open(staged, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["query_id", "item_id", "grade", "annotator", "split"])
            w.writeheader()
            for r in graded:
                w.writerow({**r, "split": AUDIT_SPLIT})
        summary = ingest.run(IngestConfig(), store, files={"human_labels": staged}, progress=progress)
    rep = summary["tables"]["human_labels"]
    return {"run_id": summary["run_id"], "file": str(path), "rows": len(rows), "ungraded": len(rows) - len(graded),
            "accepted": rep["accepted"], "rejected": rep["rejected"], "rejected_by_reason": rep["rejected_by_reason"],
            "replaced": rep["replaced"]}


def _metrics(pred: np.ndarray, y: np.ndarray) -> dict:
    """`assay agreement`'s metrics (accuracy, QWK, within one, recall per grade, confusion)."""
    from assay.annotate.agreement import _metrics as agreement_metrics

    return agreement_metrics(pred.astype(np.int64), y.astype(np.int64))


def agreement(store: Store, *, cascade_sha: str | None = None, out_dir: Path | None = None) -> dict:
    """The written labels (and each judge's vote) of one cascade against the audit grades."""
    sha = cascade_sha or ex.newest_cascade(store)
    tbl = store.query(f"""
        WITH {_AUDIT_CTE}
        SELECT h.query_id, h.item_id, h.human, l.grade, l.decided_by,
               coalesce(t.tier::VARCHAR, 'none') AS tier, a.design_weight
        FROM h JOIN {current_labels_sql()} l ON l.query_id = h.query_id AND l.item_id = h.item_id
                            AND l.cascade_sha = ? AND l.status = 'ok'
        LEFT JOIN {_TIER_SQL} t ON t.query_id = h.query_id AND t.item_id = h.item_id
        LEFT JOIN audit_samples a ON a.query_id = h.query_id AND a.item_id = h.item_id
        ORDER BY h.query_id, h.item_id""", [sha])
    if tbl.num_rows == 0:
        raise ValueError(f"no audit grades on labels of cascade {sha}; run `assay audit sample`, have people grade "
                         "the file, then `assay audit import FILE`")
    y = tbl.column("human").to_numpy(zero_copy_only=False)
    pred = tbl.column("grade").to_numpy(zero_copy_only=False)
    by = np.asarray(tbl.column("decided_by").to_pylist(), dtype=object)
    tier = np.asarray(tbl.column("tier").to_pylist(), dtype=object)
    from assay.curriculum.tiers import TIER_NAMES

    tier_name = np.array([TIER_NAMES.get(int(t), t) if t != "none" else "none" for t in tier], dtype=object)
    dw = np.asarray(tbl.column("design_weight").to_pylist(), dtype=np.float64)  # NaN: not from `audit sample`
    data: dict = {"split": AUDIT_SPLIT, "cascade_sha": sha, "pairs": int(len(y)),
                  "human_grades": {g: int((y == g).sum()) for g in range(5)}, "cascade": _metrics(pred, y),
                  "cascade_population": population_estimate(pred, y, dw),
                  "by_decided_by": {}, "by_tier": {}, "judges": {}}
    for w in sorted(set(by.tolist())):
        data["by_decided_by"][w] = _metrics(pred[by == w], y[by == w])
    for t in sorted(set(tier_name.tolist())):
        data["by_tier"][t] = _metrics(pred[tier_name == t], y[tier_name == t])
    votes = store.query(f"""
        WITH {_AUDIT_CTE}
        SELECT v.judge, any_value(v.model) AS model, list(v.grade ORDER BY h.query_id, h.item_id) AS pred,
               list(h.human ORDER BY h.query_id, h.item_id) AS human
        FROM h JOIN label_votes v ON v.query_id = h.query_id AND v.item_id = h.item_id AND v.cascade_sha = ?
        WHERE v.grade IS NOT NULL GROUP BY v.judge ORDER BY v.judge""", [sha])
    for judge, model, p, h in zip(*(votes.column(c).to_pylist() for c in ("judge", "model", "pred", "human"))):
        data["judges"][judge] = {"model": model, **_metrics(np.asarray(p), np.asarray(h))}
    folder = out_dir or store.artifacts / "reports" / f"agreement-audit-{utcnow():%Y%m%dT%H%M%S}"
    _write(folder, data)
    data["report"] = str(folder / "report.html")
    return data


def _population_html(pop: dict) -> str:
    if not pop["n"]:
        return "<p>No audited pair has a design weight (none came from <code>assay audit sample</code>).</p>"
    return (f"<p>The sample over-represents rare strata and low-confidence labels on purpose. Weighted back to the "
            f"population it was drawn from ({pop['n']} pairs, design weights): the cascade's accuracy is "
            f"<b>{pop['accuracy']}</b>, within one {pop['within_one']}.</p>")


def population_estimate(pred: np.ndarray, y: np.ndarray, design_weight: np.ndarray) -> dict:
    """Accuracy and within-one of the cascade on the population the audit sample was drawn from: each sampled pair
    weighted by its design weight (Horvitz-Thompson ratio estimate). Pairs graded without a sample row (imported
    from elsewhere) are left out of this figure and counted."""
    ok = ~np.isnan(design_weight)
    if not ok.any():
        return {"n": 0, "accuracy": None, "within_one": None, "unweighted_pairs": int(len(y))}
    from assay.annotate.cascade import agreement_score

    w, p, h = design_weight[ok], pred[ok].astype(np.int64), y[ok].astype(np.int64)
    return {"n": int(ok.sum()), "accuracy": round(agreement_score(p, h, "accuracy", w), 4),
            "within_one": round(float(np.average(np.abs(p - h) <= 1, weights=w)), 4),
            "unweighted_pairs": int((~ok).sum())}


def _write(folder: Path, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    head = ["", "pairs", "accuracy", "QWK", "within one", "recall per grade 0/1/2/3/4"]

    def row(name: str, m: dict) -> list:
        rec = " / ".join("-" if r is None else f"{r:.2f}" for r in m["grade_recall"])
        return [name, m["n"], m["accuracy"], m["qwk"], m["within_one"], rec]

    confusion_png(np.array(data["cascade"]["confusion"]), folder / "confusion_cascade.png",
                  "audit: people (rows) vs the cascade's labels")
    imgs = [img("confusion_cascade.png")]
    for name, m in data["judges"].items():
        f = "confusion_judge_" + "".join(c if c.isalnum() else "_" for c in name) + ".png"
        confusion_png(np.array(m["confusion"]), folder / f, f"audit: people (rows) vs {name}'s vote")
        imgs.append(img(f))
    write_report(folder, "assay agreement --split audit", data, [
        (f"Cascade {data['cascade_sha']} against {data['pairs']} audited pairs",
         table_html(head, [row("cascade (written labels)", data["cascade"])]
                    + [row(f"judge {n} (its own vote, where it voted)", m) for n, m in data["judges"].items()])
         + _population_html(data["cascade_population"])),
        ("By deciding judge", table_html(head, [row(n, m) for n, m in data["by_decided_by"].items()])),
        ("By tier", table_html(head, [row(n, m) for n, m in data["by_tier"].items()])),
        ("Confusion matrices", "".join(imgs)),
    ])
