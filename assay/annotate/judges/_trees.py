"""A fitted gradient-boosted tree ensemble as plain numeric arrays: saved without pickle, loaded without running code.

Reads a fitted scikit-learn ``HistGradientBoostingClassifier`` (numeric features, no categorical splits) and writes
``trees.npz``: flat node arrays (feature, threshold, missing-goes-left, children, leaf value), one root per tree in
boosting order, the baseline raw prediction and the class labels. :func:`load` reads it back with
``np.load(allow_pickle=False)``, so a file holding Python objects is refused by numpy itself, and checks every index
before predicting.

Invariants:
- :meth:`Trees.predict_proba` gives the same probabilities as the fitted estimator's ``predict_proba`` (same float64
  comparisons, leaves summed in the same order, the same softmax or logistic link).
- A loaded file is only numbers: nothing in it is imported, called or unpickled, and a child index out of range, a
  cycle or a missing array is refused with :class:`TreesFormatError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMAT = "assay-trees/1"
_ARRAYS = {"feature": np.int32, "threshold": np.float64, "missing_left": np.bool_, "left": np.int32,
           "right": np.int32, "value": np.float64, "roots": np.int32, "baseline": np.float64, "classes": np.int64,
           "shape": np.int64}


class TreesFormatError(ValueError):
    """The tree file is not a valid ``assay-trees/1`` array file."""


class Trees:
    """Boosted trees over float features, predicted with numpy: all trees of a batch descend one level per step."""

    def __init__(self, feature, threshold, missing_left, left, right, value, roots, baseline, classes, n_features,
                 depth):
        self.feature, self.threshold, self.missing_left = feature, threshold, missing_left
        self.left, self.right, self.value = left, right, value
        self.roots, self.baseline, self.classes = roots, baseline, classes
        self.n_features, self.depth = int(n_features), int(depth)
        self.per_iteration = len(baseline)
        own = np.arange(len(left))
        self._leaf = (left == own) & (right == own)

    @property
    def n_iter(self) -> int:
        return len(self.roots) // self.per_iteration

    @classmethod
    def from_sklearn(cls, model) -> "Trees":
        """Flatten a fitted ``HistGradientBoostingClassifier``."""
        feature, threshold, missing_left, left, right, value, roots = [], [], [], [], [], [], []
        offset = 0
        for iteration in model._predictors:
            for predictor in iteration:
                nodes = predictor.nodes
                if nodes["is_categorical"].any():
                    raise ValueError("categorical splits are not supported by the array format")
                n = len(nodes)
                leaf = nodes["is_leaf"].astype(bool)
                own = np.arange(n, dtype=np.int64)
                # a leaf points at itself, so every sample can take the same number of steps
                left.append(np.where(leaf, own, nodes["left"].astype(np.int64)) + offset)
                right.append(np.where(leaf, own, nodes["right"].astype(np.int64)) + offset)
                feature.append(np.where(leaf, 0, nodes["feature_idx"].astype(np.int64)))
                threshold.append(np.where(leaf, 0.0, nodes["num_threshold"].astype(np.float64)))
                missing_left.append(nodes["missing_go_to_left"].astype(bool))
                value.append(np.where(leaf, nodes["value"].astype(np.float64), 0.0))
                roots.append(offset)
                offset += n
        cat = np.concatenate
        baseline = np.asarray(model._baseline_prediction, dtype=np.float64).reshape(-1)
        trees = cls(cat(feature).astype(np.int32), cat(threshold), cat(missing_left), cat(left).astype(np.int32),
                    cat(right).astype(np.int32), cat(value), np.asarray(roots, dtype=np.int32), baseline,
                    np.asarray(model.classes_, dtype=np.int64), model.n_features_in_, 0)
        trees.depth = trees._check()
        return trees

    def save(self, path: Path) -> None:
        arrays = {k: getattr(self, k) for k in _ARRAYS if k != "shape"}
        arrays["shape"] = np.asarray([self.n_features, self.depth], dtype=np.int64)
        with open(path, "wb") as fh:
            np.savez(fh, format=np.frombuffer(FORMAT.encode(), dtype=np.uint8), **arrays)

    def _check(self) -> int:
        """Validate the arrays; returns the depth of the deepest tree. Raises :class:`TreesFormatError`."""
        n = len(self.feature)
        if not n or any(len(a) != n for a in (self.threshold, self.missing_left, self.left, self.right, self.value)):
            raise TreesFormatError("node arrays are empty or of different lengths")
        if not len(self.baseline) or len(self.roots) % len(self.baseline):
            raise TreesFormatError("tree count is not a multiple of the trees per iteration")
        k = len(self.classes)
        if k < 2 or len(self.baseline) != (1 if k == 2 else k):
            raise TreesFormatError("baseline does not match the classes")
        for a in (self.left, self.right, self.roots):
            if a.min() < 0 or a.max() >= n:
                raise TreesFormatError("a node index is out of range")
        if self.feature.min() < 0 or self.feature.max() >= max(self.n_features, 1):
            raise TreesFormatError("a split names a feature out of range")
        # descend from every root until all paths reach a leaf (a node pointing at itself); a cycle never settles
        cur = self.roots.astype(np.int64)
        leaf = (self.left == np.arange(n)) & (self.right == np.arange(n))
        for depth in range(n + 1):
            if leaf[cur].all():
                return depth
            cur = np.unique(np.concatenate([self.left[cur], self.right[cur]]).astype(np.int64))
        raise TreesFormatError("the trees contain a cycle")

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Raw scores (n, trees per iteration): baseline plus each iteration's leaves, summed in boosting order."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected (n, {self.n_features}) features, got {x.shape}")
        n, n_trees = len(x), len(self.roots)
        # one entry per (sample, tree), sample-major; only the entries not yet at a leaf take the next step
        cur = np.tile(self.roots.astype(np.int64), n)
        base = np.repeat(np.arange(n, dtype=np.int64) * self.n_features, n_trees)
        flat = x.ravel()
        act = np.flatnonzero(~self._leaf[cur])
        for _ in range(self.depth):
            if not len(act):
                break
            c = cur[act]
            v = flat[base[act] + self.feature[c]]
            go_left = np.where(np.isnan(v), self.missing_left[c], v <= self.threshold[c])
            nxt = np.where(go_left, self.left[c], self.right[c])
            cur[act] = nxt
            act = act[~self._leaf[nxt]]
        leaves = self.value[cur].reshape(n, self.n_iter, self.per_iteration)
        out = np.zeros((n, self.per_iteration), dtype=np.float64)
        out += self.baseline
        for i in range(self.n_iter):
            out += leaves[:, i, :]
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(n, len(classes)) probabilities, columns in the order of :attr:`classes`."""
        raw = self.raw(x)
        if self.per_iteration == 1:  # binary: logistic link, as HalfBinomialLoss
            from scipy.special import expit

            p1 = expit(raw[:, 0])
            return np.stack([1.0 - p1, p1], axis=1)
        raw -= raw.max(axis=1, keepdims=True)  # softmax, as sklearn.utils.extmath.softmax
        np.exp(raw, out=raw)
        raw /= raw.sum(axis=1, keepdims=True)
        return raw


def load(path: Path) -> Trees:
    """Read ``trees.npz``; raises :class:`TreesFormatError` for anything that is not a valid array file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or bytes(z["format"].astype(np.uint8)).decode(errors="replace") != FORMAT:
                raise TreesFormatError(f"{path} is not an {FORMAT} file")
            missing = [k for k in _ARRAYS if k not in z.files]
            if missing:
                raise TreesFormatError(f"{path} lacks {missing}")
            a = {k: z[k] for k in _ARRAYS}
    except TreesFormatError:
        raise
    except Exception as e:  # zip errors, object arrays (allow_pickle=False), truncated files
        raise TreesFormatError(f"{path} is not a readable {FORMAT} file: {e}") from None
    for k, dt in _ARRAYS.items():
        if a[k].dtype != np.dtype(dt) or a[k].ndim != 1:
            raise TreesFormatError(f"{path}: array {k!r} is {a[k].dtype}{list(a[k].shape)}, expected 1-d {np.dtype(dt)}")
    if len(a["shape"]) != 2:
        raise TreesFormatError(f"{path}: array 'shape' must hold n_features and depth")
    n_features, depth = (int(v) for v in a.pop("shape"))
    trees = Trees(**a, n_features=n_features, depth=depth)
    if trees._check() != depth:
        raise TreesFormatError(f"{path}: stored depth {depth} does not match the trees")
    return trees
