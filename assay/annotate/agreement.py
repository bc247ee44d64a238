"""The agreement report: each judge alone and the cascade against the held-out human split.

Every judge grades every pair of the ``eval`` split (calibrated with its stored calibrator);
the cascade is then replayed on those outputs with assay.annotate.cascade.route, so each judge
is charged only for the pairs that would have reached it. For each judge and for the cascade:
accuracy, quadratic-weighted Cohen's kappa, the per-grade confusion matrix (table and PNG);
for the cascade also coverage (each judge's share of decisions and its accuracy on that share)
and compute in judge-seconds against running the last judge, and the best judge, on everything.

Writes ``artifacts/reports/agreement-<time>/`` (report.json, report.html, PNGs).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from assay.annotate import calibrate as cal_mod
from assay.annotate.cascade import VOTE, route
from assay.annotate.pairs import human_pairs
from assay.annotate.runtime import load_cascade
from assay.config import AnnotateConfig
from assay.reporting import bar_png, confusion_png, img, table_html, write_report
from assay.store import Store, utcnow


def _metrics(pred: np.ndarray, y: np.ndarray) -> dict:
    ok = pred >= 0
    return {"n": int(ok.sum()), "accuracy": round(cal_mod.accuracy(pred[ok], y[ok]), 4) if ok.any() else None,
            "qwk": round(cal_mod.quadratic_kappa(pred[ok], y[ok]), 4) if ok.any() else None,
            "confusion": cal_mod.confusion(pred[ok], y[ok]).tolist()}


def run(cfg: AnnotateConfig, store: Store, *, progress: bool = True, judges: list | None = None,
        out_dir: Path | None = None) -> dict:
    from assay.annotate.fit import prepare_judges

    pairs, y = human_pairs(store, "eval")
    cascade = load_cascade(cfg, store.artifacts, judges=judges or prepare_judges(cfg, store))
    names = cascade.names
    calibrated, lat, per_judge = [], [], {}
    for j, (name, judge) in enumerate(zip(names, cascade.judges)):
        t0 = time.perf_counter()
        out = judge.predict(pairs, progress=progress)
        secs = time.perf_counter() - t0
        cp = cascade.calibrate(j, out.probs)
        calibrated.append(cp)
        lat.append(out.latency_ms / 1000.0)
        pred = np.where(out.ok, np.nan_to_num(cp, nan=-1).argmax(axis=1), -1)
        per_judge[name] = {"kind": cfg.judges[j].kind, **_metrics(pred, y), "judge_seconds": round(float(lat[-1].sum()), 2),
                           "wall_seconds": round(secs, 1), "pairs_per_second": round(len(pairs) / max(secs, 1e-9), 2)}
    dec = route(calibrated, names, cascade.thresholds)
    cas = _metrics(dec.grade.astype(np.int64), y)
    compute = float(sum((lat[j] * dec.reached[j]).sum() for j in range(len(names))))
    last = names[-1]
    best = max(names, key=lambda n: per_judge[n]["accuracy"] or 0)
    coverage = {}
    for who in names + [VOTE]:
        sel = dec.decided_by == who
        if sel.any():
            coverage[who] = {"share": round(float(sel.mean()), 4),
                             "accuracy": round(cal_mod.accuracy(dec.grade[sel], y[sel]), 4)}
    failed = int((dec.grade < 0).sum())
    cas.update({
        "coverage": coverage, "failed": failed, "judge_seconds": round(compute, 2),
        "reach": {n: round(float(dec.reached[j].mean()), 4) for j, n in enumerate(names)},
        "compute_vs_last_judge": round(compute / max(per_judge[last]["judge_seconds"], 1e-9), 4),
        "compute_vs_best_judge": round(compute / max(per_judge[best]["judge_seconds"], 1e-9), 4),
        "accuracy_minus_best_judge_points": round(100 * ((cas["accuracy"] or 0) - (per_judge[best]["accuracy"] or 0)), 2),
    })
    data = {"split": "eval", "pairs": len(pairs), "cascade_sha": cascade.sha, "thresholds": cascade.threshold_source,
            "best_judge": best, "last_judge": last, "judges": per_judge, "cascade": cas,
            "human_grades": {int(g): int((y == g).sum()) for g in range(5)}}
    folder = out_dir or store.artifacts / "reports" / f"agreement-{utcnow():%Y%m%dT%H%M%S}"
    _write(folder, data)
    data["report"] = str(folder / "report.html")
    return data


def _write(folder: Path, data: dict) -> None:
    rows = [[n, j["kind"], j["n"], j["accuracy"], j["qwk"], j["judge_seconds"], j["pairs_per_second"]]
            for n, j in data["judges"].items()]
    c = data["cascade"]
    rows.append(["cascade", "-", c["n"], c["accuracy"], c["qwk"], c["judge_seconds"], "-"])
    imgs = []
    for name, block in list(data["judges"].items()) + [("cascade", c)]:
        f = f"confusion_{name}.png"
        confusion_png(np.array(block["confusion"]), folder / f, f"{name}: human (rows) vs predicted")
        imgs.append(img(f))
    cov_rows = [[k, v["share"], v["accuracy"]] for k, v in c["coverage"].items()]
    bar_png(list(data["judges"]) + ["cascade"], [j["judge_seconds"] for j in data["judges"].values()] + [c["judge_seconds"]],
            folder / "compute.png", "judge-seconds on the eval split", "seconds")
    sections = [
        ("Agreement with held-out human labels",
         table_html(["judge", "kind", "pairs", "accuracy", "QWK", "judge-seconds", "pairs/s"], rows)),
        ("Cascade coverage", table_html(["decided by", "share", "accuracy on share"], cov_rows) +
         f"<p>compute vs last judge on everything: {c['compute_vs_last_judge']:.1%}; vs best judge "
         f"({data['best_judge']}): {c['compute_vs_best_judge']:.1%}; accuracy minus best judge: "
         f"{c['accuracy_minus_best_judge_points']:+.2f} points; failed pairs: {c['failed']}</p>" + img("compute.png")),
        ("Confusion matrices (rows: human grade, columns: predicted)", "".join(imgs)),
    ]
    write_report(folder, f"assay agreement report ({data['pairs']} eval pairs)", data, sections)
