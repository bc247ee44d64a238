"""The features judge: its model file cannot run code and is refused when it does not match (issue 27 item 2), and
it sees keyword stuffing (issue 26 item 3)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle

import numpy as np
import pytest

from assay.annotate.base import Pair
from assay.annotate.judges import _trees
from assay.annotate.judges._classifier import JudgeNotReady
from assay.annotate.judges.features import LEGACY_FILE, MODEL_FILE, FeaturesJudge
from assay.annotate.pairs import human_pairs
from assay.annotate.stuffing import STUFFING_FEATURES, measure, stuff, stuffing_features
from assay.config import JudgeConfig
from assay.store import Store

from conftest import copy_ws

# model: none skips the embedding cosine, so these tests need no encoder
CFG = dict(name="features", kind="features", model="none", class_weight="sqrt", trees=100)


class _Marker:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(mined_master, tmp_path_factory):
    """The mined tiny workspace with a features judge trained on its human train split; the fitted scikit-learn
    model is kept (in memory) for comparison."""
    ws = copy_ws(mined_master[0], tmp_path_factory.mktemp("features") / "ws")
    fitted = []
    real = _trees.Trees.from_sklearn

    def spy(model):
        fitted.append(model)
        return real(model)

    cfg = JudgeConfig(**CFG)
    with Store.open(ws) as s:
        pairs, grades = human_pairs(s, "train")
        _trees.Trees.from_sklearn = staticmethod(spy)
        try:
            FeaturesJudge.train(cfg, pairs, grades, s.artifacts, progress=False, store=s)
        finally:
            _trees.Trees.from_sklearn = real
    return ws, cfg, fitted[0]


def test_round_trip_gives_the_fitted_models_probabilities(trained):
    ws, cfg, model = trained
    with Store.open(ws, read_only=True) as s:
        judge = FeaturesJudge.load(cfg, s.artifacts)
        judge.bind(s)
        pairs, _ = human_pairs(s, "eval")
        out = judge.predict(pairs)
        want = np.zeros((len(pairs), 5))
        want[:, model.classes_] = model.predict_proba(judge.features(pairs))
    assert np.array_equal(out.probs, want.astype(np.float32))
    assert len(pairs) > 50 and len(set(out.grade.tolist())) > 1
    folder = FeaturesJudge.model_dir(cfg, ws / "artifacts")
    assert not list(folder.glob("*.pkl")) and (folder / MODEL_FILE).exists()
    with np.load(folder / MODEL_FILE, allow_pickle=False) as z:  # plain numeric arrays only
        assert all(z[k].dtype != object for k in z.files)


def _model_folder(trained, tmp_path):
    ws = copy_ws(trained[0], tmp_path / "ws")
    return ws, FeaturesJudge.model_dir(trained[1], ws / "artifacts")


def test_a_pickle_in_place_of_the_model_is_never_loaded(trained, tmp_path):
    """An attacker who can write the workspace replaces the model and fixes up the manifest's digests: whether the
    pickle sits under the new file name or as the old model.pkl, it is refused and never unpickled."""
    cfg = trained[1]
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(marker))
    # as the old format: model.pkl only, manifest digests rewritten to match it
    ws, folder = _model_folder(trained, tmp_path / "a")
    (folder / MODEL_FILE).unlink()
    (folder / LEGACY_FILE).write_bytes(payload)
    man = json.loads((folder / "manifest.json").read_text())
    sha = _sha256(folder / LEGACY_FILE)
    man.update(model_sha256=sha, weights_sha=hashlib.sha256(LEGACY_FILE.encode() + payload).hexdigest()[:16])
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(JudgeNotReady, match=rf"never loaded.*assay teachers train --judge {cfg.name}"):
        FeaturesJudge.load(cfg, ws / "artifacts")
    assert not marker.exists()
    # under the new name, with the manifest's sha256 rewritten to match
    ws, folder = _model_folder(trained, tmp_path / "b")
    (folder / MODEL_FILE).write_bytes(payload)
    man = json.loads((folder / "manifest.json").read_text())
    man["model_sha256"] = _sha256(folder / MODEL_FILE)
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(JudgeNotReady, match="assay teachers train"):
        FeaturesJudge.load(cfg, ws / "artifacts")
    assert not marker.exists()
    # an npz that hides a pickled object array
    with open(folder / MODEL_FILE, "wb") as fh:
        np.savez(fh, format=np.frombuffer(_trees.FORMAT.encode(), np.uint8),
                 value=np.array([_Marker(marker)], dtype=object))
    man["model_sha256"] = _sha256(folder / MODEL_FILE)
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(JudgeNotReady, match="assay teachers train"):
        FeaturesJudge.load(cfg, ws / "artifacts")
    assert not marker.exists()


def test_a_changed_model_file_is_refused(trained, tmp_path):
    cfg = trained[1]
    ws, folder = _model_folder(trained, tmp_path)
    FeaturesJudge.load(cfg, ws / "artifacts")  # intact: loads
    path = folder / MODEL_FILE
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(JudgeNotReady, match="does not match the sha256"):
        FeaturesJudge.load(cfg, ws / "artifacts")
    # a structurally broken file is refused by the format check even when the manifest is rewritten to match it
    arrays["left"][0] = len(arrays["left"]) + 5  # a child out of range
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    man = json.loads((folder / "manifest.json").read_text())
    man["model_sha256"] = _sha256(path)
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(JudgeNotReady, match="out of range"):
        FeaturesJudge.load(cfg, ws / "artifacts")


# --------------------------------------------------------------------------- keyword stuffing


def test_stuffing_features_move_when_the_query_is_appended():
    p = Pair("q1", "i1", "red running shoes", "Acme trail runner, mesh", brand="Acme", category="shoes",
             attributes=json.dumps({"color": "blue"}))
    clean, stuffed = stuffing_features([p, stuff(p)], {"shoes": 4.0})
    col = {n: k for k, n in enumerate(STUFFING_FEATURES)}
    assert clean[col["tail_query_run"]] == 0 and stuffed[col["tail_query_run"]] == 1
    assert clean[col["title_only_share"]] == 0 and stuffed[col["title_only_share"]] == pytest.approx(2 / 3)  # red, running
    assert clean[col["title_len_ratio"]] == 1 and stuffed[col["title_len_ratio"]] == pytest.approx(7 / 4)
    assert clean[col["query_repeats"]] == 0
    twice = dataclasses.replace(p, title="Acme running shoes")
    assert stuffing_features([stuff(twice)])[0, col["query_repeats"]] == 2  # running, shoes repeated
    assert np.isnan(stuffing_features([p])[0, col["title_len_ratio"]])  # category length unknown


@pytest.mark.slow
def test_stuffed_copies_teach_the_features_judge_to_resist_stuffing(mined_master, tmp_path):
    ws = copy_ws(mined_master[0], tmp_path / "ws")
    with Store.open(ws) as s:
        pairs, grades = human_pairs(s, "train")
        held, ref = human_pairs(s, "eval")
        rows = {}
        for name, extra in (("plain", {"stuffed_negatives": 0.0, "stuffing_features": False}),
                            ("defended", {"stuffed_negatives": 0.5, "stuffing_features": True})):
            cfg = JudgeConfig(**{**CFG, "name": name, **extra})
            summary = FeaturesJudge.train(cfg, pairs, grades, s.artifacts, progress=False, store=s)
            assert (summary["n_stuffed"] > 0) == (name == "defended")
            judge = FeaturesJudge.load(cfg, s.artifacts)
            judge.bind(s)
            rows[name] = measure(judge, held, ref)
    print(f"\nstuffed held-out pairs graded 0-1 ({rows['plain']['pairs']}): raised {rows['plain']['raised']:.1%} -> "
          f"{rows['defended']['raised']:.1%}, mean raise {rows['plain']['mean_raise']:+.2f} -> "
          f"{rows['defended']['mean_raise']:+.2f}")
    assert rows["defended"]["raised"] < rows["plain"]["raised"]
    assert rows["defended"]["mean_raise"] < rows["plain"]["mean_raise"]


def test_features_judge_defaults():
    cfg = JudgeConfig(**CFG)
    assert cfg.stuffing_features and cfg.stuffed_negatives == 0.5  # features kind: the defence is on by default
    assert JudgeConfig(**{**CFG, "stuffed_negatives": 0.0}).stuffed_negatives == 0.0
    ce = JudgeConfig(name="ce", kind="cross_encoder", model="all-MiniLM-L6-v2")
    assert ce.stuffed_negatives == 0.0  # classifier judges keep theirs off


def test_signals_read_once_for_a_window_equal_the_reads_per_batch(trained, monkeypatch):
    """`assay annotate` reads a features judge's mining signals once per window of pending pairs
    (annotate.signal_window), not once per batch, where the scans of the mined tables grew with pairs x pairs /
    batch size (the 100k-item world of bench_scale): the features are the same, no batch reads the workspace,
    and after the launch the judge reads the workspace again."""
    from types import SimpleNamespace

    import pyarrow as pa

    from assay.annotate.batches import read_signals_once
    from assay.annotate.judges import features as fmod

    ws, cfg, _ = trained
    with Store.open(ws, read_only=True) as s:
        judge = FeaturesJudge.load(cfg, s.artifacts)
        judge.bind(s)
        pairs = human_pairs(s, "eval")[0] + human_pairs(s, "train")[0][:100]
        direct = judge.features(pairs)
        assert np.isfinite(direct[:, 0]).sum() > 20  # some pairs were mined: their signals are values, not NaN
        part = pa.table({"query_id": [p.query_id for p in pairs], "item_id": [p.item_id for p in pairs]})
        read_signals_once(SimpleNamespace(judges=[judge]), s, part)
        with monkeypatch.context() as m:
            m.setattr(fmod, "read_signals", lambda *a: pytest.fail("a batch read the workspace"))
            windowed = np.concatenate([judge.features(pairs[i:i + 16]) for i in range(0, len(pairs), 16)])
        judge.clear_signals()
        assert np.array_equal(judge.features(pairs), direct, equal_nan=True)
    assert np.array_equal(windowed, direct, equal_nan=True)

