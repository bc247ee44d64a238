"""Per-class isotonic calibration of judge probabilities, and the metrics that check it.

Reads a judge's uncalibrated probabilities ``(n, 5)`` on held-out human labels (the ``calib``
split); writes a small JSON file of isotonic thresholds per grade, kept next to the judge in
``artifacts/teachers/<judge name>/``. No pickles: the fitted step functions are stored as their
X/Y breakpoints and applied with linear interpolation, exactly as scikit-learn's
``IsotonicRegression.predict`` does with ``out_of_bounds='clip'``.

Why isotonic: the cascade routes on thresholds of the calibrated top-class probability, so a
0.9 must mean "right 90% of the time" for every judge and every grade. Walmart compared Platt
scaling, temperature scaling and isotonic regression for their judges and chose isotonic. Its
monotone, non-parametric fit corrects the differently shaped miscalibration of each class,
which a single temperature cannot, and it needs only a few hundred held-out labels.

How it works, one-vs-rest per grade k:

1. Fit ``IsotonicRegression(out_of_bounds='clip')`` of the indicator ``grade == k`` on ``probs[:, k]``.
2. At transform time, map each column through its fitted function, then renormalise each row
   to sum to 1.
3. A row whose calibrated values are all zero falls back to its raw probabilities. This happens
   when every class's isotonic map is 0 at that row's scores, and the row cannot be normalised.
4. NaN rows are pairs the judge failed on. They stay NaN.

Invariants: ``transform`` returns float32 rows that sum to 1, except NaN rows, and
``from_json(to_json())`` transforms identically.

>>> cal = IsotonicCalibrator().fit(probs_calib, grades_calib)     # doctest: +SKIP
>>> cal.save(teacher_dir(artifacts, "ce-minilm") / "calibrator.json")  # doctest: +SKIP
>>> ece(cal.transform(probs_eval), grades_eval) < ece(probs_eval, grades_eval)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_GRADES = 5
FORMAT = "assay.isotonic/1"

__all__ = ["IsotonicCalibrator", "ece", "accuracy", "quadratic_kappa", "confusion"]


def _check_probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != N_GRADES:
        raise ValueError(f"probs must have shape (n, {N_GRADES}), got {p.shape}")
    return p


def _check_grades(grades, n: int | None = None, name: str = "grades") -> np.ndarray:
    g = np.asarray(grades)
    if g.ndim != 1 or (n is not None and len(g) != n):
        raise ValueError(f"{name} must be a 1-d array of {n if n is not None else 'n'} grades, got shape {g.shape}")
    if len(g) and (not np.issubdtype(g.dtype, np.integer) or g.max() >= N_GRADES or g.min() < -1):
        raise ValueError(f"{name} must be integers 0-{N_GRADES - 1} (or -1 for a failed pair)")
    return g.astype(np.int64)


class IsotonicCalibrator:
    """One isotonic map per grade (one-vs-rest), applied column-wise and renormalised."""

    def __init__(self) -> None:
        self.x_: list[np.ndarray] | None = None  # per grade: increasing probability breakpoints
        self.y_: list[np.ndarray] | None = None  # per grade: calibrated values at those breakpoints
        self.n_fit: int = 0

    @property
    def fitted(self) -> bool:
        return self.x_ is not None

    def fit(self, probs, grades, weight=None) -> "IsotonicCalibrator":
        """Fit on held-out probabilities (n, 5) and human grades (n,); NaN rows are ignored. ``weight``: one
        sampling weight per pair (an audit sample's design weights), None for equal weights."""
        from sklearn.isotonic import IsotonicRegression

        p = _check_probs(probs)
        g = _check_grades(grades, len(p))
        ok = ~np.isnan(p).any(axis=1) & (g >= 0)
        if ok.sum() < 2:
            raise ValueError(f"calibration needs at least 2 labelled pairs with probabilities, got {int(ok.sum())}")
        p, g = p[ok], g[ok]
        w = None if weight is None else np.asarray(weight, dtype=np.float64)[ok]
        self.x_, self.y_ = [], []
        for k in range(N_GRADES):
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            iso.fit(p[:, k], (g == k).astype(np.float64), sample_weight=w)
            self.x_.append(np.asarray(iso.X_thresholds_, dtype=np.float64))
            self.y_.append(np.asarray(iso.y_thresholds_, dtype=np.float64))
        self.n_fit = int(len(p))
        return self

    def transform(self, probs) -> np.ndarray:
        """Calibrated probabilities, float32, rows summing to 1; NaN rows stay NaN."""
        if not self.fitted:
            raise RuntimeError("IsotonicCalibrator is not fitted: call fit() or load() first")
        p = _check_probs(probs)
        out = np.full(p.shape, np.nan)
        ok = ~np.isnan(p).any(axis=1)
        raw = p[ok]
        cal = np.column_stack([np.interp(raw[:, k], self.x_[k], self.y_[k]) for k in range(N_GRADES)])
        s = cal.sum(axis=1)
        zero = s <= 0
        cal[zero] = raw[zero]  # fallback: nothing to normalise, keep the judge's own probabilities
        s[zero] = raw[zero].sum(axis=1)
        out[ok] = cal / np.where(s > 0, s, 1.0)[:, None]
        return out.astype(np.float32)

    def fit_transform(self, probs, grades) -> np.ndarray:
        return self.fit(probs, grades).transform(probs)

    def to_json(self) -> dict:
        if not self.fitted:
            raise RuntimeError("IsotonicCalibrator is not fitted: nothing to serialise")
        return {"format": FORMAT, "n_grades": N_GRADES, "n_fit": self.n_fit,
                "x": [x.tolist() for x in self.x_], "y": [y.tolist() for y in self.y_]}

    @classmethod
    def from_json(cls, obj: dict) -> "IsotonicCalibrator":
        if obj.get("format") != FORMAT:
            raise ValueError(f"not an isotonic calibrator (format {obj.get('format')!r}, expected {FORMAT!r})")
        if len(obj["x"]) != N_GRADES or len(obj["y"]) != N_GRADES:
            raise ValueError(f"calibrator must hold {N_GRADES} per-grade maps")
        cal = cls()
        cal.x_ = [np.asarray(x, dtype=np.float64) for x in obj["x"]]
        cal.y_ = [np.asarray(y, dtype=np.float64) for y in obj["y"]]
        for x, y in zip(cal.x_, cal.y_):
            if len(x) != len(y) or len(x) == 0:
                raise ValueError("each per-grade map needs as many x as y breakpoints (at least one)")
        cal.n_fit = int(obj.get("n_fit", 0))
        return cal

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "IsotonicCalibrator":
        return cls.from_json(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------
# metrics; rows without a prediction (NaN probabilities, grade -1) are left out of every one


def _as_pred(pred) -> np.ndarray:
    a = np.asarray(pred)
    if a.ndim == 2:
        a = _check_probs(a)
        g = np.full(len(a), -1, dtype=np.int64)
        ok = ~np.isnan(a).any(axis=1)
        g[ok] = a[ok].argmax(axis=1)
        return g
    return _check_grades(a, name="pred")


def _pair_up(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    p = _as_pred(pred)
    t = _check_grades(truth, len(p), "truth")
    ok = (p >= 0) & (t >= 0)
    return p[ok], t[ok]


def ece(probs, grades, n_bins: int = 15) -> float:
    """Top-label expected calibration error: the share-weighted mean, over equal-width confidence
    bins, of |accuracy - mean confidence| of the top class."""
    p = _check_probs(probs)
    g = _check_grades(grades, len(p))
    ok = ~np.isnan(p).any(axis=1) & (g >= 0)
    p, g = p[ok], g[ok]
    if len(p) == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == g).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (lo, hi] bins, 0 in the first
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / len(p))


def brier(probs, grades) -> float:
    """Multi-class Brier score: mean squared distance between the probability vector and the
    one-hot human grade (lower is better; per-class isotonic minimises its per-class terms)."""
    p = _check_probs(probs)
    g = _check_grades(grades, len(p))
    ok = ~np.isnan(p).any(axis=1) & (g >= 0)
    if not ok.any():
        return float("nan")
    onehot = np.eye(N_GRADES)[g[ok]]
    return float(((p[ok] - onehot) ** 2).sum(axis=1).mean())


def accuracy(pred, truth) -> float:
    """Share of exact grade matches; ``pred`` is grades (n,) or probabilities (n, 5)."""
    p, t = _pair_up(pred, truth)
    return float((p == t).mean()) if len(p) else float("nan")


def confusion(pred, truth) -> np.ndarray:
    """(5, 5) counts; rows are the true grade, columns the predicted one (scikit-learn's layout)."""
    p, t = _pair_up(pred, truth)
    m = np.zeros((N_GRADES, N_GRADES), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def quadratic_kappa(pred, truth) -> float:
    """Quadratic-weighted Cohen's kappa between predicted and true grades (1 = perfect, 0 = chance)."""
    o = confusion(pred, truth).astype(np.float64)
    n = o.sum()
    if n == 0:
        return float("nan")
    idx = np.arange(N_GRADES)
    w = (idx[:, None] - idx[None, :]) ** 2 / (N_GRADES - 1) ** 2
    e = np.outer(o.sum(axis=1), o.sum(axis=0)) / n
    denom = (w * e).sum()
    if denom == 0:
        return 1.0 if (w * o).sum() == 0 else 0.0
    return float(1.0 - (w * o).sum() / denom)
