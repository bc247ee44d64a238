"""ONNX Runtime backends (assay.inference): the export round trip against PyTorch, the export cache and its key,
the int8 accuracy guard (refusal, and auto's fall back), and clear errors for what cannot run.

Real models throughout: the packaged MiniLM, exported with torch.onnx and run by onnxruntime, on the tiny
world's catalog and queries."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from assay.config import ModelsConfig

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def texts(tiny_workspace_master, tmp_path_factory):
    """(500 catalog item texts, 60 query texts) of the tiny world. (The int8 top-10 agreement was checked on 1,000
    items until the suite's time was cut: each of the three full encodings below costs about 7 s per 500 items on
    one CPU thread.)"""
    from conftest import copy_ws

    from assay.mining.run import load_catalog, load_queries
    from assay.store import Store

    ws = copy_ws(tiny_workspace_master, tmp_path_factory.mktemp("inf") / "ws")
    with Store.open(ws) as s:
        items, queries = load_catalog(s).texts, load_queries(s).texts
    return items[:500], queries[:60]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("inf_artifacts")


def _top10(q: np.ndarray, items: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ items.T), axis=1, kind="stable")[:, :10]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))


def test_encoder_exports_agree_with_torch_and_are_cached_by_sha_and_backend(texts, artifacts, caplog):
    from assay.encode import Encoder, open_encoder

    items, queries = texts
    enc = open_encoder(MODEL, ModelsConfig(backend="onnx-int8"), artifacts, items)
    assert enc.backend == "onnx-int8" and enc.guard["n"] == 256 and enc.guard["mean_cosine"] >= 0.98
    folder = enc.runner.folder
    assert folder.name == f"encoder-{enc.sha[:16]}-onnx-int8"

    ref_i, ref_q = enc.encode_torch(items), enc.encode_torch(queries)
    got_i, got_q = enc.encode(items), enc.encode(queries)
    assert got_i.shape == ref_i.shape and np.allclose(np.linalg.norm(got_i, axis=1), 1, atol=1e-5)
    # the int8 model retrieves nearly the same top 10 for sample queries; fp32 ONNX is the same model
    assert _overlap(_top10(ref_q, ref_i), _top10(got_q, got_i)) >= 0.8
    fp = open_encoder(MODEL, ModelsConfig(backend="onnx"), artifacts, items)
    fp_i = fp.encode(items)
    assert fp.backend == "onnx" and np.abs(fp_i - ref_i).max() < 1e-4
    assert (_top10(fp.encode(queries), fp_i) == _top10(ref_q, ref_i)).mean() > 0.99

    # vectors of different backends never share an embedding cache
    torch_enc = Encoder(MODEL)
    assert len({enc.cache_key, fp.cache_key, torch_enc.cache_key}) == 3

    # the second open reuses the export and its stored guard result
    before = (folder / "model.onnx").stat().st_mtime_ns
    again = open_encoder(MODEL, ModelsConfig(backend="auto"), artifacts, items)
    assert again.backend == "onnx-int8" and again.guard == enc.guard
    assert (folder / "model.onnx").stat().st_mtime_ns == before

    # a cached export whose file no longer matches its recorded sha is rebuilt, and the log says so. (int8 dynamic
    # quantization scales activations per batch, so a text's vector depends a little on its batch: compare alike.)
    first = again.encode(items[:50])
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"corrupt")
    with caplog.at_level(logging.WARNING, logger="assay.inference"):
        rebuilt = open_encoder(MODEL, ModelsConfig(backend="onnx-int8"), artifacts, items)
    assert "rebuilding" in caplog.text
    assert np.abs(rebuilt.encode(items[:50]) - first).max() < 1e-5


def test_int8_guard_refuses_with_numbers_and_auto_falls_back_to_fp32(texts, artifacts):
    from assay.encode import open_encoder
    from assay.inference import GuardFailed

    items, _ = texts
    strict = ModelsConfig(backend="onnx-int8", guard_min_cosine=0.9999)
    with pytest.raises(GuardFailed, match=r"mean_cosine 0\.9\d+ \(under the limit 0\.9999, models\.guard_min_cosine\)"):
        open_encoder(MODEL, strict, artifacts, items)
    auto = open_encoder(MODEL, strict.model_copy(update={"backend": "auto"}), artifacts, items)
    assert auto.backend == "onnx" and auto.guard["fell_back"] and auto.guard["backend_tried"] == "onnx-int8"
    # no sample, no guard: an explicit backend is used as asked
    assert open_encoder(MODEL, ModelsConfig(backend="onnx-int8", guard_sample=0), artifacts, items).guard == \
        {"backend": "onnx-int8"}


def test_what_cannot_run_says_which_setting_to_change(artifacts):
    import torch

    from assay import inference
    from assay.encode import Encoder
    from assay.models import load_sentence_transformer

    with pytest.raises(inference.BackendError, match="unknown inference backend 'tensorrt'"):
        inference.resolve("tensorrt")
    with pytest.raises(inference.BackendError, match="set the backend to torch"):
        inference.resolve("onnx-int8", "cuda:0")
    assert inference.resolve("auto", "cuda") == ["torch"] and inference.resolve("auto") == ["onnx-int8", "onnx"]

    class Broken(torch.nn.Module):
        def forward(self, feats):
            raise RuntimeError("this layer has no ONNX form")

    tok = load_sentence_transformer(MODEL).tokenizer
    with pytest.raises(inference.BackendError, match=r"could not export .*no ONNX form; set models\.backend: torch"):
        inference.ensure_export(Broken(), tok, artifacts=artifacts, what="broken", source_sha="0" * 16,
                                backend="onnx", output="sentence_embedding", max_length=16, setting="models.backend")
    assert not list((artifacts / "onnx").glob("broken-*"))  # nothing half-written is left to be reused

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(ValueError, match="no native bf16 matrix instructions"):
            Encoder(MODEL, precision="bf16")


@pytest.mark.parametrize("heads", [1, 2])
def test_two_tower_on_onnx_matches_torch(texts, artifacts, tmp_path, heads):
    import torch

    from assay.dense import item_vectors
    from assay.trainer.model import TwoTower

    items, queries = texts
    model = TwoTower.from_base(MODEL, heads=heads, projection_dim=128 if heads > 1 else None)
    model.save(tmp_path / "ckpt")
    model = TwoTower.load(tmp_path / "ckpt")
    with torch.inference_mode():
        ref_q, ref_i = model.encode_queries(queries).numpy(), model.encode_items(items[:200]).numpy()
        model.use_backend("onnx", artifacts)
        q, i = model.encode_queries(queries).numpy(), model.encode_items(items[:200]).numpy()
    assert q.shape == ref_q.shape and i.shape == ref_i.shape
    assert np.abs(q - ref_q).max() < 1e-4 and np.abs(i - ref_i).max() < 1e-4
    assert {p.name for p in (artifacts / "onnx").glob(f"twotower-*-{model.sha[:16]}-onnx")} == \
        {f"twotower-query-{model.sha[:16]}-onnx", f"twotower-item-{model.sha[:16]}-onnx"}
    # item vectors are cached per backend: switching back to torch encodes again rather than reusing
    v_onnx = item_vectors(model, items[:100], tmp_path, 64, False)
    model.use_backend("torch", artifacts)
    v_torch = item_vectors(model, items[:100], tmp_path, 64, False)
    assert len(list((tmp_path / "embeddings").iterdir())) == 2 and np.abs(v_onnx - v_torch).max() < 1e-4


def test_vectorized_per_channel_quantization_writes_onnx_runtimes_model(tmp_path):
    """assay's all-channels-at-once int8 weight quantization writes byte for byte the model that ONNX Runtime's
    own channel-by-channel code writes: weights of several shapes, an all-zero channel (scale 1.0), a channel of
    values under float32's tiny, and ties at .5 that round to even."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from assay import inference

    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.05, (32, 48)).astype(np.float32)
    w1[:, 5] = 0.0
    w1[:, 7] = 1e-39
    w1[:, 9] = np.float32(127 / 254) * np.arange(-16, 16, dtype=np.float32)  # exact halves after scaling
    w2 = rng.normal(0, 1.0, (48, 16)).astype(np.float32)
    emb = rng.normal(0, 0.1, (100, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 16])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (emb, "emb"))])
    src = tmp_path / "f.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    quantize_dynamic(str(src), str(tmp_path / "stock.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    inference._quantize(src, tmp_path / "ours.onnx")
    stock = onnx.load(tmp_path / "stock.onnx")
    assert {i.name for i in stock.graph.initializer} >= {"w1_quantized", "w1_scale", "w2_quantized"}
    assert (tmp_path / "ours.onnx").read_bytes() == (tmp_path / "stock.onnx").read_bytes()
    # and the patch is gone after the block: ONNX Runtime's code is what runs outside it
    from onnxruntime.quantization import base_quantizer

    assert base_quantizer.BaseQuantizer.quantize_weight_per_channel_impl.__module__ == base_quantizer.__name__
