"""The agreement report: each judge alone and the cascade, on the human eval split and on mined pairs.

Distributions (each one a table in the report, side by side):

- ``human eval``: the held-out human ``eval`` split, all of it (the headline, as before);
- ``seed pairs`` / ``mined pairs``: that split cut into pairs drawn for the seed set and pairs people graded
  through `assay label-request` (only when both exist): the mined pairs are the distribution the cascade labels;
- ``mined vs truth``: a seeded sample of ``annotate.agreement_sample`` mined pairs (the work set of `assay
  annotate`, without human labels) graded by the simulator's truth (simulated worlds only);
- ``labels vs truth``: every label the cascade wrote (``labels``, this cascade) against truth: the grades the
  curriculum will consume, with no re-grading.

Every judge grades every pair of a distribution (calibrated with its stored calibrator); the cascade is then
replayed on those outputs with assay.annotate.cascade.route, so each judge is charged only for the pairs that
would have reached it. Per judge and for the cascade: accuracy, quadratic-weighted kappa, recall per grade, the
confusion matrix (table and PNG); for the cascade also coverage (each judge's share of decisions and its
accuracy there) and compute in judge-seconds against the last judge, and the best judge, run on everything.
The report says which pairs the thresholds were fitted on (from ``cascade.json``).

Writes ``artifacts/reports/agreement-<time>/`` (report.json, report.html, PNGs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from assay.annotate import calibrate as cal_mod
from assay.annotate.base import pairs_from_arrow
from assay.annotate.cascade import VOTE, route
from assay.annotate.pairs import _FIELDS, human_pairs, requested_pairs, work_sql
from assay.annotate.runtime import cascade_file, load_cascade
from assay.config import AnnotateConfig
from assay.reporting import bar_png, confusion_png, img, table_html, write_report
from assay.store import Store, utcnow


def grade_recall(confusion: np.ndarray) -> list[float | None]:
    """Recall of each grade (rows: reference grade, columns: predicted); None where the grade never occurs."""
    c = np.asarray(confusion, dtype=np.float64)
    rows = c.sum(axis=1)
    return [round(float(c[g, g] / rows[g]), 4) if rows[g] else None for g in range(len(c))]


def _metrics(pred: np.ndarray, y: np.ndarray) -> dict:
    ok = pred >= 0
    conf = cal_mod.confusion(pred[ok], y[ok]) if ok.any() else np.zeros((5, 5), np.int64)
    rec = grade_recall(conf)
    seen = [r for r in rec if r is not None]
    return {"n": int(ok.sum()), "accuracy": round(cal_mod.accuracy(pred[ok], y[ok]), 4) if ok.any() else None,
            "qwk": round(cal_mod.quadratic_kappa(pred[ok], y[ok]), 4) if ok.any() else None,
            "within_one": round(float((np.abs(pred[ok].astype(int) - y[ok].astype(int)) <= 1).mean()), 4)
            if ok.any() else None,
            "grade_recall": rec, "mean_grade_recall": round(float(np.mean(seen)), 4) if seen else None,
            "confusion": conf.tolist()}


class _Graded:
    """Every judge's calibrated output on one set of pairs, and the cascade replayed on it."""

    def __init__(self, cascade, pairs, progress: bool):
        self.names = cascade.names
        self.preds, self.lat, self.wall = [], [], []
        calibrated = []
        for j, judge in enumerate(cascade.judges):
            t0 = time.perf_counter()
            out = judge.predict(pairs, progress=progress)
            self.wall.append(time.perf_counter() - t0)
            cp = cascade.calibrate(j, out.probs)
            calibrated.append(cp)
            self.lat.append(out.latency_ms / 1000.0)
            self.preds.append(np.where(out.ok, np.nan_to_num(cp, nan=-1).argmax(axis=1), -1))
        self.dec = route(calibrated, self.names, cascade.thresholds)

    def block(self, y: np.ndarray, kinds: list[str], mask: np.ndarray | None = None) -> dict:
        m = np.ones(len(y), dtype=bool) if mask is None else mask
        yy = y[m]
        per_judge = {}
        for j, name in enumerate(self.names):
            secs = float(self.lat[j][m].sum())
            per_judge[name] = {"kind": kinds[j], **_metrics(self.preds[j][m], yy), "judge_seconds": round(secs, 2),
                               "pairs_per_second": round(int(m.sum()) / max(self.wall[j] * m.mean(), 1e-9), 2)}
        dec = self.dec
        cas = _metrics(dec.grade[m].astype(np.int64), yy)
        compute = float(sum((self.lat[j][m] * dec.reached[j][m]).sum() for j in range(len(self.names))))
        last = self.names[-1]
        best = max(self.names, key=lambda n: per_judge[n]["accuracy"] or 0)
        coverage = {}
        by = dec.decided_by[m]
        g = dec.grade[m]
        for who in self.names + [VOTE]:
            sel = by == who
            if sel.any():
                coverage[who] = {"share": round(float(sel.mean()), 4),
                                 "accuracy": round(cal_mod.accuracy(g[sel], yy[sel]), 4)}
        cas.update({
            "coverage": coverage, "failed": int((g < 0).sum()), "judge_seconds": round(compute, 2),
            "reach": {n: round(float(dec.reached[j][m].mean()), 4) for j, n in enumerate(self.names)},
            "compute_share": {n: round(float((self.lat[j][m] * dec.reached[j][m]).sum() / max(compute, 1e-12)), 4)
                              for j, n in enumerate(self.names)},
            "compute_vs_last_judge": round(compute / max(per_judge[last]["judge_seconds"], 1e-9), 4),
            "compute_vs_best_judge": round(compute / max(per_judge[best]["judge_seconds"], 1e-9), 4),
            "accuracy_minus_best_judge_points": round(
                100 * ((cas["accuracy"] or 0) - (per_judge[best]["accuracy"] or 0)), 2),
        })
        return {"pairs": int(m.sum()), "best_judge": best, "last_judge": last, "judges": per_judge, "cascade": cas,
                "reference_grades": {int(k): int((yy == k).sum()) for k in range(5)}}


def mined_sample(store: Store, sources: list[str], n: int, seed: int = 0):
    """Up to ``n`` mined pairs of the work set (``annotate.sources``) without a human label: seeded, stable, and
    independent of the cascade, so cascades fitted differently are measured on the same pairs."""
    tbl = store.query(f"""
        SELECT w.query_id, w.item_id, {_FIELDS}
        FROM ({work_sql(sources)}) w JOIN queries q USING (query_id) JOIN products p USING (item_id)
        WHERE NOT EXISTS (SELECT 1 FROM human_labels h WHERE h.query_id = w.query_id AND h.item_id = w.item_id)
        ORDER BY hash(w.query_id || '|' || w.item_id || ?), w.query_id, w.item_id LIMIT {int(n)}""", [str(seed)])
    return pairs_from_arrow(tbl)


def labels_vs_truth(store: Store, oracle, cascade_sha: str) -> dict | None:
    """Every ok label of this cascade against the simulator's truth, overall and per deciding judge."""
    rows = store.query("SELECT query_id, item_id, grade, decided_by FROM labels WHERE cascade_sha = ? AND status = 'ok'",
                       [cascade_sha])
    if rows.num_rows == 0:
        return None
    q = np.asarray(rows.column("query_id").to_pylist(), dtype=object)
    i = np.asarray(rows.column("item_id").to_pylist(), dtype=object)
    truth = oracle.grade(q, i).astype(np.int64)
    pred = rows.column("grade").to_numpy(zero_copy_only=False).astype(np.int64)
    by = np.asarray(rows.column("decided_by").to_pylist(), dtype=object)
    out = {"pairs": int(len(pred)), **_metrics(pred, truth),
           "truth_grades": {int(k): int((truth == k).sum()) for k in range(5)},
           "decided_by": {str(w): {"share": round(float((by == w).mean()), 4),
                                   "accuracy": round(float((pred[by == w] == truth[by == w]).mean()), 4)}
                          for w in sorted(set(by.tolist()), key=str)}}
    return out


def run(cfg: AnnotateConfig, store: Store, *, progress: bool = True, judges: list | None = None,
        out_dir: Path | None = None) -> dict:
    from assay.annotate.fit import prepare_judges
    from assay.data.judgments import load_oracle

    pairs, y = human_pairs(store, "eval")
    cascade = load_cascade(cfg, store.artifacts, judges=judges or prepare_judges(cfg, store))
    kinds = [j.kind for j in cfg.judges]
    graded = _Graded(cascade, pairs, progress)
    head = graded.block(y, kinds)
    data = {"split": "eval", "pairs": len(pairs), "cascade_sha": cascade.sha, "thresholds": cascade.threshold_source,
            **{k: head[k] for k in ("best_judge", "last_judge", "judges", "cascade")},
            "human_grades": head["reference_grades"], "distributions": {}}
    cf = cascade_file(store.artifacts)
    data["thresholds_fitted_on"] = (json.loads(cf.read_text()).get("fitted_on") if cf.exists() else None)
    dists = data["distributions"]
    dists["human eval"] = {"reference": "human labels (eval split)", **head}
    requested = requested_pairs(store)
    mined = np.array([(p.query_id, p.item_id) in requested for p in pairs], dtype=bool)
    if mined.any() and (~mined).any():
        dists["seed pairs"] = {"reference": "human labels (eval split, seed pairs)", **graded.block(y, kinds, ~mined)}
        dists["mined pairs"] = {"reference": "human labels (eval split, label requests on mined pairs)",
                                **graded.block(y, kinds, mined)}
    oracle = load_oracle(store)
    if oracle is not None:
        sample = mined_sample(store, cfg.sources, cfg.agreement_sample)
        if sample:
            truth = oracle.grade(np.asarray([p.query_id for p in sample], dtype=object),
                                 np.asarray([p.item_id for p in sample], dtype=object)).astype(np.int8)
            dists["mined vs truth"] = {"reference": f"simulator truth ({len(sample)} mined pairs, sampled)",
                                       **_Graded(cascade, sample, progress).block(truth, kinds)}
        data["labels_vs_truth"] = labels_vs_truth(store, oracle, cascade.sha)
    folder = out_dir or store.artifacts / "reports" / f"agreement-{utcnow():%Y%m%dT%H%M%S}"
    _write(folder, data)
    data["report"] = str(folder / "report.html")
    return data


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _block_html(folder: Path, key: str, block: dict) -> str:
    rows = [[n, j["kind"], j["n"], j["accuracy"], j["qwk"], " / ".join(_fmt(r) for r in j["grade_recall"]),
             j["judge_seconds"], j["pairs_per_second"]] for n, j in block["judges"].items()]
    c = block["cascade"]
    rows.append(["cascade", "-", c["n"], c["accuracy"], c["qwk"], " / ".join(_fmt(r) for r in c["grade_recall"]),
                 c["judge_seconds"], "-"])
    cov_rows = [[k, v["share"], v["accuracy"], c["compute_share"].get(k, "-")] for k, v in c["coverage"].items()]
    imgs = []
    slug = "" if key == "human eval" else "".join(ch if ch.isalnum() else "_" for ch in key) + "_"
    for name, b in list(block["judges"].items()) + [("cascade", c)]:
        f = f"confusion_{slug}{name}.png"
        confusion_png(np.array(b["confusion"]), folder / f, f"{key} - {name}: reference (rows) vs predicted")
        imgs.append(img(f))
    return (f"<p>reference: {block['reference']}; {block['pairs']} pairs; reference grades 0-4: "
            f"{list(block['reference_grades'].values())}</p>" +
            table_html(["judge", "kind", "pairs", "accuracy", "QWK", "recall per grade 0/1/2/3/4", "judge-seconds",
                        "pairs/s"], rows) +
            table_html(["decided by", "share", "accuracy on share", "share of compute"], cov_rows) +
            f"<p>compute vs last judge on everything: {c['compute_vs_last_judge']:.1%}; vs best judge "
            f"({block['best_judge']}): {c['compute_vs_best_judge']:.1%}; accuracy minus best judge: "
            f"{c['accuracy_minus_best_judge_points']:+.2f} points; failed pairs: {c['failed']}</p>" + "".join(imgs))


def _write(folder: Path, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    side = [["distribution", "reference", "pairs", "cascade accuracy", "QWK", "grade-4 recall", "best judge",
             "its accuracy", "compute vs best judge"]]
    for key, b in data["distributions"].items():
        c = b["cascade"]
        side.append([key, b["reference"], b["pairs"], c["accuracy"], c["qwk"], c["grade_recall"][4], b["best_judge"],
                     b["judges"][b["best_judge"]]["accuracy"], c["compute_vs_best_judge"]])
    lvt = data.get("labels_vs_truth")
    if lvt:
        side.append(["labels vs truth", "simulator truth (every label written)", lvt["pairs"], lvt["accuracy"],
                     lvt["qwk"], lvt["grade_recall"][4], "-", "-", "-"])
    c = data["cascade"]
    bar_png(list(data["judges"]) + ["cascade"], [j["judge_seconds"] for j in data["judges"].values()] +
            [c["judge_seconds"]], folder / "compute.png", "judge-seconds on the eval split", "seconds")
    fitted = data.get("thresholds_fitted_on")
    sections = [
        ("Side by side", table_html(side[0], side[1:]) +
         f"<p>thresholds ({data['thresholds']}) were fitted on: {json.dumps(fitted) if fitted else 'unknown'}</p>" +
         img("compute.png")),
    ]
    for key, block in data["distributions"].items():
        sections.append((f"{key}", _block_html(folder, key, block)))
    if lvt:
        confusion_png(np.array(lvt["confusion"]), folder / "confusion_labels_vs_truth.png",
                      "labels written vs truth (rows: truth)")
        sections.append(("Labels written vs truth", table_html(
            ["decided by", "share", "accuracy"], [[k, v["share"], v["accuracy"]] for k, v in lvt["decided_by"].items()])
            + img("confusion_labels_vs_truth.png")))
    write_report(folder, f"assay agreement report ({data['pairs']} eval pairs)", data, sections)
