"""CPU inference backends: PyTorch, ONNX Runtime fp32, and ONNX Runtime with int8 dynamic quantization.

Every encoder and cross-encoder forward pass that is not training can run through ONNX Runtime:
the mining encoder, the cross-encoder and features judges, the two-tower item tower in
`assay export-index` and `assay evaluate`, and the query tower in `assay serve`/`assay search`.
Training stays on PyTorch; a checkpoint is exported when something first encodes with it.

Backends (``models.backend``, and ``inference`` per judge):

| backend | what |
|---|---|
| ``torch`` | the PyTorch module itself |
| ``onnx`` | the same forward pass exported to ONNX (fp32), run by ONNX Runtime |
| ``onnx-int8`` | that export with its MatMul/Gather weights quantized to int8 per channel (dynamic quantization) |
| ``auto`` | CPU: ``onnx-int8`` when it passes the accuracy guard, else ``onnx``; CUDA: ``torch`` |

An export lives in ``artifacts/onnx/<what>-<source sha>-<backend>/`` (``model.onnx`` and ``export.json``), keyed
by the sha of the weights it came from and the backend. ``export.json`` records the source sha, the sha of
``model.onnx``, the opset and library versions, and each accuracy-guard result; a folder whose source sha or model
sha does not match is rebuilt (and the log says so), never reused.

Accuracy guard (before an int8 model is used): the caller measures the int8 model against its fp32 PyTorch
source on a sample it has (mean cosine of embeddings; NDCG@10 on labeled pairs; judge accuracy on the calib
split). :func:`check_guard` raises :class:`GuardFailed` with the numbers when a loss passes its limit; under
``auto`` the caller falls back to ``onnx`` (fp32, exact to ~1e-6) and records that it did.

Reads: a torch module, its tokenizer, the artifacts folder. Writes: ``artifacts/onnx/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from assay.text import file_sha256

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
EXPORT_FORMAT = "assay-onnx/1"
OPSET = 17


class BackendError(RuntimeError):
    """An inference backend cannot be used as configured; the message names the setting to change."""


class GuardFailed(BackendError):
    """An int8 model lost more accuracy against its fp32 source than the configured limit allows."""


def resolve(backend: str, device: str = "cpu") -> list[str]:
    """The backends to try in order: ``auto`` -> ``[onnx-int8, onnx]`` on CPU, ``[torch]`` on CUDA."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown inference backend {backend!r}; use one of {list(BACKENDS)}")
    if backend == "auto":
        return ["torch"] if not device.startswith("cpu") else ["onnx-int8", "onnx"]
    if backend != "torch" and not device.startswith("cpu"):
        raise BackendError(f"backend {backend!r} runs on the CPU, but the device is {device!r}; set the backend to "
                           "torch (or auto) for GPU inference")
    return [backend]


def require_onnxruntime(setting: str):
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendError(f"{setting} asks for ONNX Runtime, which is not installed ({e}); pip install onnxruntime, "
                           f"or set {setting}: torch") from e
    return ort


def file_sha(path: Path) -> str:
    return file_sha256(path)[:16]


def export_dir(artifacts: Path, what: str, source_sha: str, backend: str) -> Path:
    return Path(artifacts) / "onnx" / f"{what}-{source_sha[:16]}-{backend}"


class _Forward:
    """Wraps a module so ONNX export sees positional tensors and one output."""

    @staticmethod
    def make(module, input_names: Sequence[str], output: str):
        import torch

        class Forward(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, *tensors):
                feats = dict(zip(input_names, tensors))
                out = self.inner(feats) if output == "sentence_embedding" else self.inner(**feats)
                return out["sentence_embedding"] if output == "sentence_embedding" else out.logits

        return Forward().eval()


def _export(module, tokenizer, output: str, max_length: int, out_file: Path) -> None:
    import torch

    names = [n for n in tokenizer.model_input_names if n in ("input_ids", "attention_mask", "token_type_ids")]
    sample = tokenizer(["an example query", "a longer example product title, brand and colour"], padding=True,
                       truncation=True, max_length=max_length, return_tensors="pt")
    args = tuple(sample[n] for n in names)
    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    axes["output"] = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Forward.make(module, names, output), args, str(out_file), input_names=names,
                          output_names=["output"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def _quantize(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint at WARNING
    with vectorized_per_channel():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


@contextmanager
def vectorized_per_channel():
    """ONNX Runtime quantizes a per-channel weight one channel at a time in Python: profiled, 3.1 of the 4.2 s that
    one MiniLM tower's int8 export takes (36 weights, about 21,000 channels). Inside this block, the case assay asks
    for (int8, symmetric, no per-tensor overrides, no minimum real range, float32 weights) computes the same scales
    and int8 values for every channel at once with ONNX Runtime's own formulas; any other case goes to ONNX
    Runtime's code. test_inference checks that both write the identical model."""
    import onnx
    from onnxruntime.quantization import base_quantizer as bq
    from onnxruntime.quantization.quant_utils import (TENSOR_NAME_QUANT_SUFFIX, get_qmin_qmax_for_qType,
                                                      normalize_axis, tensor_proto_to_array)

    original = bq.BaseQuantizer.quantize_weight_per_channel_impl

    def impl(self, weight_name, weight_qType, channel_axis, reduce_range=True, keep_float_weight=False):  # noqa: N803
        init = bq.find_by_name(weight_name, self.model.initializer())
        over = self.tensor_quant_overrides.get_per_channel_overrides(weight_name, default_val=[{"axis": channel_axis}])
        w = tensor_proto_to_array(init) if init is not None else None
        valid, axis = normalize_axis(channel_axis, w.ndim) if w is not None else (False, 0)
        if (not valid or keep_float_weight or weight_qType != onnx.TensorProto.INT8 or w.dtype != np.float32
                or self.min_real_range is not None or not self.is_weight_symmetric(weight_qType)
                or len(over) != 1 or set(over[0]) != {"axis"}):
            return original(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
        # compute_scale_zp (symmetric): the range always holds 0, scale = 2 * absmax / (qmax - qmin) in float64,
        # stored as float32; a scale under float32's tiny is 1.0 with zero point 0
        qmin, qmax = get_qmin_qmax_for_qType(weight_qType, self.reduce_range and reduce_range, symmetric=True)
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        absmax = np.maximum(np.abs(np.minimum(rows.min(1), 0)), np.abs(np.maximum(rows.max(1), 0)))
        scale64 = (absmax.astype(np.float64) + absmax.astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
        tiny = scale64 < np.finfo(np.float32).tiny
        scale = np.where(tiny, np.float32(1.0), scale64.astype(np.float32))
        zp = np.where(tiny, 0, np.round((qmin + qmax) / np.float64(2.0))).astype(qmin.dtype)
        # quantize_nparray: round(w / scale) + zero point, clipped to the full int8 range
        lo, hi = get_qmin_qmax_for_qType(weight_qType, reduce_range=False, symmetric=False)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = (w / scale.reshape(shape)).round() + zp.reshape(shape)
        np.clip(q, lo, hi, out=q)
        q_name, zp_name, scale_name = weight_name + TENSOR_NAME_QUANT_SUFFIX, weight_name + "_zero_point", \
            weight_name + "_scale"
        n = [init.dims[axis]]
        self.model.initializer_extend([onnx.helper.make_tensor(scale_name, init.data_type, n, scale.tolist()),
                                       onnx.helper.make_tensor(zp_name, weight_qType, n, zp.tolist())])
        self.model.initializer_extend([onnx.numpy_helper.from_array(q.astype(np.int8).reshape(init.dims), q_name)])
        return q_name, zp_name, scale_name

    bq.BaseQuantizer.quantize_weight_per_channel_impl = impl
    try:
        yield
    finally:
        bq.BaseQuantizer.quantize_weight_per_channel_impl = original


def ensure_export(module, tokenizer, *, artifacts: Path, what: str, source_sha: str, backend: str, output: str,
                  max_length: int, setting: str) -> Path:
    """The export folder for (what, source_sha, backend), built when missing or stale. Returns the folder."""
    if backend not in ("onnx", "onnx-int8"):
        raise BackendError(f"{setting}: {backend!r} is not an ONNX backend")
    ort = require_onnxruntime(setting)
    final = export_dir(artifacts, what, source_sha, backend)
    info = read_export(final)
    if info is not None:
        if info.get("format") == EXPORT_FORMAT and info.get("source_sha") == source_sha and \
                info.get("backend") == backend and info.get("onnx_sha") == file_sha(final / "model.onnx"):
            return final
        log.warning("ONNX export %s does not match its source (source sha %s, backend %s, file sha %s); rebuilding",
                    final, info.get("source_sha"), info.get("backend"), info.get("onnx_sha"))
    import torch

    t0 = time.perf_counter()
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fp32 = tmp / ("model.onnx" if backend == "onnx" else "model.fp32.onnx")
        _export(module, tokenizer, output, max_length, fp32)
        if backend == "onnx-int8":
            _quantize(fp32, tmp / "model.onnx")
            fp32.unlink()
    except BackendError:
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BackendError(f"could not export {what} ({source_sha}) to ONNX for {setting} = {backend!r}: "
                           f"{type(e).__name__}: {e}; set {setting}: torch to run it on PyTorch") from e
    info = {"format": EXPORT_FORMAT, "what": what, "source_sha": source_sha, "backend": backend, "output": output,
            "onnx_sha": file_sha(tmp / "model.onnx"), "opset": OPSET, "export_seconds": round(time.perf_counter() - t0, 2),
            "bytes": (tmp / "model.onnx").stat().st_size, "guard": {},
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("exported %s to %s in %.1f s (%.0f MB)", what, final, info["export_seconds"], info["bytes"] / 1e6)
    return final


def read_export(folder: Path) -> dict | None:
    f = Path(folder) / "export.json"
    if not f.exists() or not (Path(folder) / "model.onnx").exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}


def record_guard(folder: Path, key: str, result: dict) -> None:
    """Store a guard result in ``export.json`` so the next run with the same sample need not measure again."""
    f = Path(folder) / "export.json"
    info = json.loads(f.read_text())
    info.setdefault("guard", {})[key] = result
    tmp = f.with_name(f"export.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, f)


def check_guard(result: dict, limits: dict, what: str, setting: str) -> None:
    """Raise :class:`GuardFailed` naming each measured loss over its limit.

    ``result`` holds measured values (``mean_cosine``, ``ndcg_drop``, ``accuracy_drop``); ``limits`` maps the same
    names to ``("min" | "max", limit, config field)``."""
    bad = []
    for name, (kind, limit, field) in limits.items():
        value = result.get(name)
        if value is None:
            continue
        if (kind == "min" and value < limit) or (kind == "max" and value > limit):
            bad.append(f"{name} {value:.4f} ({'under' if kind == 'min' else 'over'} the limit {limit}, {field})")
    if bad:
        raise GuardFailed(f"int8 {what} failed the accuracy guard against its fp32 source: {'; '.join(bad)}. "
                          f"Use {setting}: onnx (fp32, same results as torch) or auto, or loosen the limit")


def embedding_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Cosine of each row of ``got`` to the same row of ``ref`` (rows need not be normalised)."""
    a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    b = got / np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(axis=1)
    return {"mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6), "n": int(len(cos))}


def sample_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:16]


class OnnxRunner:
    """Runs an exported model with ONNX Runtime: tokenizes, batches texts of similar length together, returns
    the output rows (float32) in input order."""

    def __init__(self, folder: Path, tokenizer, max_length: int, threads: int | None = None):
        import torch

        ort = require_onnxruntime("the inference backend")
        self.folder = Path(folder)
        self.info = read_export(self.folder) or {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backend = self.info.get("backend", "onnx")

    def run_tokens(self, feats: dict) -> np.ndarray:
        """The output for already tokenized inputs (numpy or torch); token_type_ids default to zeros."""
        ids = np.asarray(feats["input_ids"], dtype=np.int64)
        return self.session.run(None, {n: (np.asarray(feats[n], dtype=np.int64) if n in feats else np.zeros_like(ids))
                                       for n in self.inputs})[0]

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = list(texts)
        if len(texts) <= batch_size:
            return self._batch(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        parts = [self._batch([texts[i] for i in order[lo:lo + batch_size]]) for lo in range(0, len(texts), batch_size)]
        out = np.empty((len(texts),) + parts[0].shape[1:], dtype=np.float32)
        out[order] = np.concatenate(parts)
        return out

    def _batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return self.run_tokens(enc).astype(np.float32, copy=False)


def choose(candidates: list[str], build: Callable[[str], object], measure: Callable[[object], dict] | None,
           limits: dict, what: str, setting: str) -> tuple[object, str, dict]:
    """Try each backend in order; int8 ones must pass the guard. Returns (runner, backend, guard result).

    With one candidate (an explicit setting) a failed guard raises; with several (``auto``) the next is tried
    and the failure is logged and returned in the guard result."""
    notes: dict = {}
    for i, backend in enumerate(candidates):
        runner = build(backend)
        if backend != "onnx-int8" or measure is None:
            return runner, backend, notes
        result = measure(runner)
        notes = {"backend_tried": backend, **result}
        try:
            check_guard(result, limits, what, setting)
            return runner, backend, notes
        except GuardFailed as e:
            if i == len(candidates) - 1:
                raise
            log.warning("%s; %s: auto uses %s instead", e, what, candidates[i + 1])
            notes["fell_back"] = True
    raise BackendError(f"no backend to try for {what}")  # pragma: no cover

