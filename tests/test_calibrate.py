"""Per-class isotonic calibration and the agreement metrics (assay.annotate.calibrate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from assay.annotate.calibrate import IsotonicCalibrator, accuracy, confusion, ece, quadratic_kappa


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A judge that is right ~60% of the time but puts ~95% on its top class."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(5, size=n, p=[0.4, 0.12, 0.1, 0.13, 0.25])
    pred = np.where(rng.random(n) < 0.6, truth, rng.integers(0, 5, n))
    logits = rng.normal(0, 0.5, (n, 5))
    logits[np.arange(n), pred] += 4.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, truth


def test_isotonic_lowers_ece_on_held_out_data():
    p_fit, g_fit = _overconfident(2000, seed=1)
    p_new, g_new = _overconfident(2000, seed=2)
    cal = IsotonicCalibrator().fit(p_fit, g_fit)
    before, after = ece(p_new, g_new), ece(cal.transform(p_new), g_new)
    assert before > 0.2
    assert after < before / 3
    q = cal.transform(p_new)
    assert q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
    # calibration reshapes confidence but keeps most decisions
    assert accuracy(q, g_new) > accuracy(p_new, g_new) - 0.05


def test_json_round_trip_is_exact(tmp_path):
    p, g = _overconfident(500, seed=3)
    cal = IsotonicCalibrator().fit(p, g)
    obj = json.loads(json.dumps(cal.to_json()))
    again = IsotonicCalibrator.from_json(obj)
    p_new, _ = _overconfident(300, seed=4)
    np.testing.assert_array_equal(cal.transform(p_new), again.transform(p_new))
    path = cal.save(tmp_path / "teachers" / "j" / "calibrator.json")
    np.testing.assert_array_equal(cal.transform(p_new), IsotonicCalibrator.load(path).transform(p_new))
    assert b"\x80" not in path.read_bytes()  # plain JSON, no pickle
    with pytest.raises(ValueError, match="not an isotonic calibrator"):
        IsotonicCalibrator.from_json({"format": "pickle"})


def test_nan_rows_stay_nan_and_all_zero_rows_fall_back():
    # grade 4 never seen, grades 0-3 only where their prob is high: inputs below the fitted range map
    # to 0 in every column
    probs = np.array([[0.9, 0.025, 0.025, 0.025, 0.025], [0.025, 0.9, 0.025, 0.025, 0.025],
                      [0.025, 0.025, 0.9, 0.025, 0.025], [0.025, 0.025, 0.025, 0.9, 0.025]] * 5)
    grades = np.array([0, 1, 2, 3] * 5)
    cal = IsotonicCalibrator().fit(probs, grades)
    new = np.array([[0.01, 0.01, 0.01, 0.01, 0.96], [np.nan] * 5, [0.9, 0.025, 0.025, 0.025, 0.025]])
    out = cal.transform(new)
    np.testing.assert_allclose(out[0], new[0], atol=1e-6)  # all-zero after isotonic: raw probs kept
    assert np.isnan(out[1]).all()
    np.testing.assert_allclose(out[2], [1, 0, 0, 0, 0], atol=1e-6)


def test_fit_validates_its_input():
    with pytest.raises(ValueError, match=r"shape \(n, 5\)"):
        IsotonicCalibrator().fit(np.zeros((4, 3)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="integers 0-4"):
        IsotonicCalibrator().fit(np.full((4, 5), 0.2), np.array([0, 1, 7, 2]))
    with pytest.raises(RuntimeError, match="not fitted"):
        IsotonicCalibrator().transform(np.full((1, 5), 0.2))


def test_kappa_and_confusion_match_sklearn():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 5, 400)
    pred = np.clip(truth + rng.choice([-2, -1, 0, 0, 0, 1], 400), 0, 4)
    labels = list(range(5))
    assert quadratic_kappa(pred, truth) == pytest.approx(
        cohen_kappa_score(truth, pred, weights="quadratic", labels=labels), abs=1e-12)
    np.testing.assert_array_equal(confusion(pred, truth), confusion_matrix(truth, pred, labels=labels))
    assert quadratic_kappa(truth, truth) == pytest.approx(1.0)
    assert accuracy(pred, truth) == pytest.approx((pred == truth).mean())
    # failed pairs (-1) are left out of every metric
    assert accuracy(np.r_[pred, -1], np.r_[truth, 0]) == pytest.approx((pred == truth).mean())


def test_ece_of_a_perfectly_calibrated_judge_is_small():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(5), 20000)
    grades = np.array([rng.choice(5, p=row) for row in probs])
    assert ece(probs, grades) < 0.02


@pytest.mark.slow
def test_trained_judges_calibrators_lower_ece_on_pairs_they_did_not_see(calibrated_master, tmp_path):
    """`assay calibrate` fitted each real judge's calibrator on the human calib split (388 pairs); on the eval split
    (377 pairs of other queries, never shown to the calibrator) the calibrated top-class probability, the number the
    cascade's thresholds read, must be better calibrated (lower top-label ECE) than the raw one. On its fitting pairs
    isotonic regression lowers the error by construction, so only held-out pairs can tell a calibrator that
    generalises from one that memorised its fitting set (or a no-op, which leaves ECE where it was).

    Measured here: ECE 0.104 -> 0.089 (ce-fast) and 0.104 -> 0.074 (ce-full) on the eval pairs. The multi-class Brier
    score, which test_teachers_and_calibration sees fall on the fitting pairs, does NOT fall on these held-out pairs
    (0.683 -> 0.686, 0.600 -> 0.617): per-class isotonic fitted on a few hundred pairs overfits the non-top classes,
    so it is printed, not asserted."""
    from assay.annotate.calibrate import brier
    from assay.annotate.fit import prepare_judges
    from assay.annotate.pairs import human_pairs
    from assay.annotate.runtime import load_cascade
    from assay.store import Store

    from conftest import annotate_cfg, copy_ws

    ws = copy_ws(calibrated_master[0], tmp_path / "ws")  # loading judges may write export guards: not the master
    cfg = annotate_cfg()
    with Store.open(ws) as s:
        pairs, y = human_pairs(s, "eval")
        calib_pairs, _ = human_pairs(s, "calib")
        cascade = load_cascade(cfg, s.artifacts, judges=prepare_judges(cfg, s))
    seen = {(p.query_id, p.item_id) for p in calib_pairs}
    assert len(pairs) > 100 and not any((p.query_id, p.item_id) in seen for p in pairs)
    for j, name in enumerate(cascade.names):
        raw = cascade.judges[j].predict(pairs).probs
        cp = cascade.calibrate(j, raw)
        before, after = brier(raw, y), brier(cp, y)
        print(f"\n{name}: eval Brier {before:.4f} raw -> {after:.4f} calibrated "
              f"(calib: {calibrated_master[2]['judges'][name]['brier_before']} -> "
              f"{calibrated_master[2]['judges'][name]['brier_after']}), ECE {ece(raw, y):.4f} -> {ece(cp, y):.4f}")
        assert ece(cp, y) < ece(raw, y), (name, ece(raw, y), ece(cp, y))
