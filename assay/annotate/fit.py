"""`assay calibrate`: calibrate every judge and fit the cascade's thresholds on the calib split.

Reads the human ``calib`` split. For each judge: runs it on every calibration pair, fits a
per-class isotonic calibrator (``artifacts/teachers/<judge>/calibrator.json``) and reports the
expected calibration error before and after. Then fits per-grade thresholds: the cheapest
cascade, in measured judge-ms per pair, whose replayed agreement on the calibration pairs is
within ``agreement_tolerance`` of the target (assay.annotate.cascade.fit_cascade), and records
how far pairs travel (each judge's reach) and what a pair costs at each judge. All of it
goes to ``artifacts/teachers/cascade.json``; `annotate --dry-run` reads it for its estimate.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from assay.annotate import calibrate as cal_mod
from assay.annotate.agreement import grade_recall
from assay.annotate.cascade import NEVER, agreement_score, fit_cascade
from assay.annotate.pairs import count_mined, human_pairs
from assay.annotate.runtime import calibrator_file, cascade_file, cascade_sha
from assay.config import AnnotateConfig
from assay.store import Store

log = logging.getLogger(__name__)


def prepare_judges(cfg: AnnotateConfig, store: Store) -> list:
    """Load every judge; prompted judges with few_shot > 0 get examples from the train split
    (one per grade in turn, deterministic), the same in calibrate, annotate and agreement; judges
    that read mining signals are bound to the workspace."""
    from assay.annotate.judges import load_judge

    judges = []
    for j in cfg.judges:
        judge = load_judge(j, store.artifacts)
        if hasattr(judge, "use_backend"):
            judge.guard = choose_backend(judge, j, store)
        elif j.inference not in ("auto", "torch") and j.kind != "features":  # features: its encoder's backend
            raise ValueError(f"judge {j.name!r} (kind {j.kind}) runs on torch only; set its inference to torch or auto")
        if hasattr(judge, "bind"):  # judges that read the workspace (the features judge)
            judge.bind(store)
        if getattr(j, "few_shot", 0) and hasattr(judge, "set_examples"):
            judge.set_examples(few_shot_examples(store, j.few_shot))
        judges.append(judge)
    return judges


def choose_backend(judge, j, store: Store, max_pairs: int = 1000) -> dict:
    """Put a classifier judge on its ``inference`` backend (assay.inference). An int8 export is used only when its
    accuracy against the human grades of the calib split (the train split when there is no calib split; at most
    ``max_pairs`` pairs, seeded) is within ``guard_max_accuracy_drop`` of the fp32 PyTorch model's; the measured
    numbers are kept in the export's ``export.json`` and returned."""
    from assay import inference
    from assay.encode import check_bf16

    check_bf16(j.precision, "cpu", f"judges[{j.name}].precision")
    if not judge.exportable:
        if j.inference not in ("auto", "torch"):
            judge.use_backend(j.inference, store.artifacts)  # raises, naming the setting
        return {"backend": "torch"}
    pairs, grades = [], np.zeros(0, dtype=np.int64)
    for split in ("calib", "train"):
        try:
            pairs, grades = human_pairs(store, split)
        except ValueError:
            continue
        if len(pairs):
            break
    if len(pairs) > max_pairs:
        keep = np.sort(np.random.default_rng(j.seed).choice(len(pairs), max_pairs, replace=False))
        pairs, grades = [pairs[i] for i in keep], grades[keep]

    def build(backend: str):
        judge.use_backend(backend, store.artifacts)
        return judge

    def measure(jd) -> dict:
        key = "accuracy-" + inference.sample_digest([f"{p.query_id}\x1e{p.item_id}" for p in pairs] +
                                                    [str(g) for g in grades.tolist()])
        known = (inference.read_export(jd.runner.folder) or {}).get("guard", {}).get(key)
        if known:
            return known
        got = jd.predict(pairs).probs.argmax(1)
        runner, jd.runner = jd.runner, None
        ref = jd.predict(pairs).probs.argmax(1)
        jd.runner = runner
        acc, acc_ref = float((got == grades).mean()), float((ref == grades).mean())
        result = {"accuracy_fp32": round(acc_ref, 4), "accuracy_backend": round(acc, 4),
                  "accuracy_drop": round(acc_ref - acc, 4), "same_argmax": round(float((got == ref).mean()), 4),
                  "pairs": len(pairs)}
        inference.record_guard(jd.runner.folder, key, result)
        return result

    limits = {"accuracy_drop": ("max", j.guard_max_accuracy_drop, f"judges[{j.name}].guard_max_accuracy_drop")}
    _, backend, notes = inference.choose(inference.resolve(j.inference, "cpu"), build, measure if pairs else None,
                                         limits, f"judge {j.name!r}", f"judges[{j.name}].inference")
    return {"backend": backend, **notes}


def few_shot_examples(store: Store, n: int) -> list[dict]:
    try:
        pairs, grades = human_pairs(store, "train")
    except ValueError:
        return []
    by_grade: dict[int, list] = {}
    for p, g in zip(pairs, grades.tolist()):
        by_grade.setdefault(g, []).append(p)
    out, i = [], 0
    while len(out) < n and any(by_grade.values()):
        g = [4, 0, 2, 1, 3][i % 5]
        if by_grade.get(g):
            p = by_grade[g].pop(0)
            out.append({"query": p.query, "title": p.title, "grade": g})
        i += 1
    return out


def calibration_pairs(store: Store, pool: str, with_audit: bool,
                      weights: str = "design") -> tuple[list, np.ndarray, np.ndarray, int]:
    """The calib split (of ``pool``), plus the audit split when ``with_audit`` (an audited pair's audit grade wins
    over a calib grade of the same pair). Returns (pairs, grades, sampling weights, audit pairs used).

    Calib pairs weigh 1, and so do audited pairs with ``weights`` = ``none``. With ``design`` (an audit sample
    over-represents rare strata and low-confidence labels on purpose) each audited pair weighs its design weight
    (1 / inclusion probability, from ``audit_samples``), scaled so that the audit pairs' weights average 1: the
    audit keeps the influence of its size, and inside it the strata count as often as they occur in the labels. An
    audited pair with no sample row (graded outside `assay audit sample`) weighs 1."""
    if weights not in ("none", "design"):
        raise ValueError(f"audit.calibration_weights must be none or design, got {weights!r}")
    pairs, y = human_pairs(store, "calib", pool=pool)
    if not with_audit:
        return pairs, y, np.ones(len(y)), 0
    a_pairs, a_y = human_pairs(store, "audit")
    audited = {(p.query_id, p.item_id) for p in a_pairs}
    keep = [i for i, p in enumerate(pairs) if (p.query_id, p.item_id) not in audited]
    design = {} if weights == "none" else {
        (q, i): w for q, i, w in store.exec("SELECT query_id, item_id, design_weight FROM audit_samples")}
    a_w = np.array([design.get((p.query_id, p.item_id), np.nan) for p in a_pairs], dtype=np.float64)
    has = ~np.isnan(a_w)
    if has.any():
        a_w[has] /= a_w[has].mean()
    a_w[~has] = 1.0
    return ([pairs[i] for i in keep] + a_pairs, np.concatenate([y[keep], a_y]),
            np.concatenate([np.ones(len(keep)), a_w]), len(a_pairs))


def run(cfg: AnnotateConfig, store: Store, *, progress: bool = True, judges: list | None = None,
        with_audit: bool = False, audit_weights: str = "design") -> dict:
    """Fit each judge's calibrator and the cascade thresholds on the calib split (``with_audit``: plus the grades
    people gave in `assay audit import`)."""
    pairs, y, w, n_audit = calibration_pairs(store, cfg.calibrate_on, with_audit, audit_weights)
    n_mined = count_mined(store, pairs[:len(pairs) - n_audit])
    fitted_on = {"split": "calib+audit" if with_audit else "calib", "pool": cfg.calibrate_on,
                 "seed_pairs": len(pairs) - n_mined - n_audit, "mined_pairs": n_mined, "audit_pairs": n_audit,
                 "metric": cfg.agreement_metric}
    if n_audit:
        a_w = w[len(pairs) - n_audit:]
        fitted_on["audit_weights"] = {"scheme": "design weight / mean" if audit_weights == "design" else "none",
                                      "min": round(float(a_w.min()), 3), "max": round(float(a_w.max()), 3)}
    judges = judges or prepare_judges(cfg, store)
    summary: dict = {"calib_pairs": len(pairs), "fitted_on": fitted_on, "judges": {}}
    calibrated, latency = [], []
    with store.run("calibrate", {"annotate": cfg.model_dump(mode="json"), "with_audit": with_audit,
                                 "audit_weights": audit_weights}) as run_id:
        for jcfg, judge in zip(cfg.judges, judges):
            t0 = time.perf_counter()
            out = judge.predict(pairs, progress=progress)
            secs = time.perf_counter() - t0
            ok = out.ok
            if ok.sum() < 10:
                raise ValueError(f"judge {jcfg.name!r} graded only {int(ok.sum())} of {len(pairs)} calibration pairs; "
                                 "check its model/backend before calibrating")
            calibrator = cal_mod.IsotonicCalibrator().fit(out.probs[ok], y[ok], w[ok])
            calibrator.save(calibrator_file(store.artifacts, jcfg.name))
            cp = calibrator.transform(out.probs)
            calibrated.append(cp)
            latency.append(float(np.nanmean(out.latency_ms)))
            summary["judges"][jcfg.name] = {
                "kind": jcfg.kind, "graded": int(ok.sum()), "parse_status": _counts(out.parse_status),
                "ece_before": round(cal_mod.ece(out.probs, y), 4), "ece_after": round(cal_mod.ece(cp, y), 4),
                "brier_before": round(cal_mod.brier(out.probs, y), 4), "brier_after": round(cal_mod.brier(cp, y), 4),
                "accuracy": round(cal_mod.accuracy(cp.argmax(axis=1)[ok], y[ok]), 4),
                "score": round(agreement_score(np.where(ok, np.nan_to_num(cp, nan=-1).argmax(axis=1), -1), y,
                                               cfg.agreement_metric, w), 4),
                "grade_recall": grade_recall(cal_mod.confusion(cp.argmax(axis=1)[ok], y[ok])),
                "ms_per_pair": round(latency[-1], 2), "seconds": round(secs, 1)}
        scores = [summary["judges"][j.name]["score"] for j in cfg.judges]
        target = cfg.target_agreement or max(scores)
        fit = fit_cascade(calibrated, y, latency, target, tolerance=cfg.agreement_tolerance,
                          min_support=cfg.min_support, names=[j.name for j in cfg.judges], metric=cfg.agreement_metric,
                          weight=w)
        th, dec = fit.thresholds, fit.decisions
        if not fit.met_target:
            log.warning("no threshold combination reaches %s %.4f - %.4f on the calibration split; kept the "
                        "best one (%.4f)", cfg.agreement_metric, target, cfg.agreement_tolerance, fit.accuracy)
        reach = (dec.reached * w).sum(axis=1) / w.sum()
        summary.update({
            "target_agreement": round(float(target), 4), "target_source": "config" if cfg.target_agreement else "best judge",
            "agreement_tolerance": cfg.agreement_tolerance, "target_met": fit.met_target,
            "precision_levels": {j.name: None if t >= NEVER else t for j, t in zip(cfg.judges, fit.taus)},
            "expected_ms_per_pair": round(fit.cost, 3), "combinations_searched": fit.searched,
            "thresholds": {j.name: [None if t >= NEVER else round(float(t), 4) for t in t_]
                           for j, t_ in zip(cfg.judges, th)},
            "reach": {j.name: round(float(r), 4) for j, r in zip(cfg.judges, reach)},
            "cascade_accuracy_on_calib": round(cal_mod.accuracy(dec.grade[dec.grade >= 0], y[dec.grade >= 0]), 4),
            "cascade_score_on_calib": round(fit.accuracy, 4),
            "cascade_grade_recall_on_calib": grade_recall(cal_mod.confusion(dec.grade[dec.grade >= 0],
                                                                            y[dec.grade >= 0])),
            "decided_by": _counts([str(b) for b in dec.decided_by]),
            "ms_per_pair": {j.name: round(v, 2) for j, v in zip(cfg.judges, latency)},
        })
        cf = cascade_file(store.artifacts)
        cf.parent.mkdir(parents=True, exist_ok=True)
        cf.write_text(json.dumps({k: summary[k] for k in ("target_agreement", "target_source", "agreement_tolerance",
                                                          "target_met", "thresholds", "reach", "ms_per_pair",
                                                          "expected_ms_per_pair", "cascade_accuracy_on_calib",
                                                          "fitted_on")},
                                 indent=1))
        summary["cascade_sha"] = cascade_sha(cfg, store.artifacts)
        summary["run_id"] = run_id
        store.finish_run(run_id, summary)
    return summary


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
