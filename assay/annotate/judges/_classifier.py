"""Shared machinery of the classifier judges (cross-encoder and LLM classifier).

One training loop, one batched predict and one manifest writer/reader serve both kinds; a
judge kind only says how to build, save and reload its model (:class:`ClassifierJudge`).

Reads:
- a :class:`~assay.config.JudgeConfig`;
- pairs and their human grades (training), or pairs (prediction).

Writes ``teacher_dir(artifacts, cfg.name)/model/``:
- the weights as safetensors (and the tokenizer where the kind saves one);
- ``manifest.json``: kind, base model and its sha, template and its sha, the training config and
  its digest, n_train, grade counts, train seconds and final train loss.

Invariants:
- Input text always comes from ``prompts.render(cfg.template_name, **pair.context())``, so
  training and inference see the same text.
- A saved model is bound to the training-relevant config fields, the template's sha and the base
  weights' sha. :meth:`ClassifierJudge.load` refuses a model when any of them changed, and the
  error says to run ``assay teachers train``.
- Training is deterministic given ``cfg.seed``: the head is initialised after seeding torch, and
  the epoch order is drawn from ``(seed, epoch)``. Same data and thread count give the same weights.
- ``predict`` never reorders its output: rows follow the input pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from assay.annotate.base import N_GRADES, OK, JudgeOutput, Pair
from assay.annotate.judges import teacher_dir
from assay.annotate.prompts import render, template_sha
from assay.annotate.stuffing import stuffed_copies

log = logging.getLogger(__name__)

GRADE_NAMES = ["embarrassing", "complement", "substitute", "close", "exact"]
MANIFEST = "manifest.json"
MODEL_SUBDIR = "model"
TRAIN_COMMAND = "`assay teachers train`"

# JudgeConfig fields that change the trained weights (learning_rate is stored resolved).
TRAIN_FIELDS = ("kind", "model", "template_name", "max_length", "epochs", "learning_rate", "train_batch_size",
                "max_train_pairs", "class_weight", "stuffed_negatives", "seed")
WARMUP_SHARE = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


class JudgeNotReady(RuntimeError):
    """A classifier judge has no trained model, or its model no longer matches its config."""


def render_inputs(template: str, pairs: Sequence[Pair]) -> list[str]:
    """The classifier input text of each pair, through the one shared renderer."""
    return [render(template, **p.context()) for p in pairs]


def config_digest(train_config: dict) -> str:
    blob = json.dumps(train_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def files_sha(folder: Path, suffix: str = ".safetensors") -> str:
    """sha256 (first 16 hex) over the weight files of a saved model: its identity in labels."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob(f"*{suffix}")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# tokenisation


def tokenize(tokenizer, texts: Sequence[str], max_length: int, keep_tail: int = 0) -> list[list[int]]:
    """Token ids per text, at most ``max_length`` each, unpadded.

    ``keep_tail == 0`` truncates from the right with the tokenizer's own rule (which keeps an
    encoder's closing special token). ``keep_tail > 0`` keeps the first ``max_length - keep_tail``
    and the last ``keep_tail`` tokens, so a decoder's fixed prompt suffix (the token the head
    reads) survives truncation.
    """
    if keep_tail <= 0:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if keep_tail >= max_length:
        raise ValueError(f"keep_tail ({keep_tail}) must be smaller than max_length ({max_length})")
    ids = tokenizer(list(texts), truncation=False)["input_ids"]
    head = max_length - keep_tail
    return [x if len(x) <= max_length else x[:head] + x[-keep_tail:] for x in ids]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of id lists; returns input_ids and attention_mask tensors."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# training


def class_weights(grades: np.ndarray, mode: str) -> np.ndarray | None:
    """Loss weight per grade from its share of the training labels (``JudgeConfig.class_weight``).

    ``none``: None (plain cross-entropy). ``balanced``: 1 / share. ``sqrt``: 1 / sqrt(share). Grades absent from
    the labels get weight 0; the weights are scaled so the mean weight over the training pairs is 1, which keeps
    the learning rate's meaning."""
    if mode == "none":
        return None
    if mode not in ("sqrt", "balanced"):
        raise ValueError(f"class_weight must be none, sqrt or balanced, got {mode!r}")
    counts = np.bincount(np.asarray(grades, dtype=np.int64), minlength=N_GRADES).astype(np.float64)
    share = counts / max(counts.sum(), 1.0)
    w = np.zeros(N_GRADES)
    has = share > 0
    w[has] = share[has] ** (-1.0 if mode == "balanced" else -0.5)
    return w / float((w * share).sum())


def train_loop(model, tokenizer, texts: Sequence[str], grades: np.ndarray, *, max_length: int, epochs: float,
               batch_size: int, learning_rate: float, seed: int, keep_tail: int = 0, progress: bool = True,
               desc: str = "train classifier", class_weight: str = "none") -> dict:
    """Fine-tune ``model`` (a sequence classifier over 5 grades) in place with cross-entropy, weighted per
    grade by :func:`class_weights`.

    AdamW over the trainable parameters, linear warmup (10% of steps) then linear decay to 0,
    gradient norm clipped at 1. ``epochs`` may be fractional: training stops after
    ``ceil(epochs * batches_per_epoch)`` steps. Each epoch's order is a permutation drawn from
    ``(seed, epoch)``. Returns steps, the first and final loss (mean of the last 10 steps) and seconds.
    """
    from transformers import get_linear_schedule_with_warmup

    n = len(texts)
    ids = tokenize(tokenizer, texts, max_length, keep_tail)
    y = torch.as_tensor(np.asarray(grades), dtype=torch.long)
    cw = class_weights(np.asarray(grades), class_weight)
    weight = None if cw is None else torch.as_tensor(cw, dtype=torch.float32, device=_device(model))
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(epochs * per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    sched = get_linear_schedule_with_warmup(opt, int(WARMUP_SHARE * total), total)
    dev = _device(model)
    pad_id = tokenizer.pad_token_id
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step")
    step, epoch = 0, 0
    while step < total:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n, batch_size):
            if step >= total:
                break
            idx = order[start:start + batch_size]
            batch = {k: v.to(dev) for k, v in collate([ids[i] for i in idx], pad_id).items()}
            logits = model(**batch).logits.float()
            loss = torch.nn.functional.cross_entropy(logits, y[idx].to(dev), weight=weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        epoch += 1
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    log.info("%s: %d steps over %d pairs in %.1fs, final loss %.4f", desc, total, n, seconds,
             float(np.mean(losses[-10:])))
    return {"steps": total, "epochs_run": epoch, "first_train_loss": round(losses[0], 6),
            "final_train_loss": round(float(np.mean(losses[-10:])), 6), "train_seconds": round(seconds, 3)}


def cap_train_pairs(cfg, pairs: Sequence[Pair], grades: np.ndarray) -> tuple[list[Pair], np.ndarray]:
    """At most ``cfg.max_train_pairs`` pairs, drawn (seeded by ``cfg.seed``) without changing their order."""
    pairs = list(pairs)
    if cfg.max_train_pairs is None or len(pairs) <= cfg.max_train_pairs:
        return pairs, grades
    keep = np.sort(np.random.default_rng([cfg.seed, 1]).choice(len(pairs), cfg.max_train_pairs, replace=False))
    return [pairs[i] for i in keep], grades[keep]


# ---------------------------------------------------------------------------------------------
# prediction


@torch.inference_mode()
def predict_probs(model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int,
                  precision: str = "fp32", keep_tail: int = 0, progress: bool = False,
                  desc: str = "classify", runner=None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (n, 5) float32 and per-pair latency in ms (batch time / batch size).

    Batches are formed over pairs sorted by token length (less padding); the output follows the
    input order. ``precision='bf16'`` runs the forward pass under bf16 autocast; the softmax is
    taken in fp32. ``runner`` (an assay.inference.OnnxRunner) runs the same batches through ONNX Runtime.
    """
    n = len(texts)
    probs = np.zeros((n, N_GRADES), dtype=np.float32)
    latency = np.zeros(n, dtype=np.float64)
    if n == 0:
        return probs, latency
    model.eval()
    ids = tokenize(tokenizer, texts, max_length, keep_tail)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    dev = _device(model)
    pad_id = tokenizer.pad_token_id
    bf16 = precision == "bf16"
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        idx = order[start:start + batch_size]
        t0 = time.perf_counter()
        batch = collate([ids[i] for i in idx], pad_id)
        if runner is not None:
            logits = torch.from_numpy(runner.run_tokens(batch))
        else:
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits
        probs[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        latency[idx] = (time.perf_counter() - t0) * 1000.0 / len(idx)
    return probs, latency


# ---------------------------------------------------------------------------------------------
# manifest


def write_manifest(model_dir: Path, manifest: dict) -> Path:
    path = Path(model_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_manifest(model_dir: Path, judge_name: str) -> dict:
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise JudgeNotReady(f"judge {judge_name!r} is not trained: no {MANIFEST} in {model_dir}; "
                            f"run {TRAIN_COMMAND}")
    return json.loads(path.read_text())


def check_manifest(manifest: dict, expected: dict, judge_name: str) -> None:
    """Raise :class:`JudgeNotReady` naming every field where the saved model and the current setup differ."""
    diffs = []
    for key, want in expected.items():
        have = manifest.get(key)
        if key == "config":
            keys = sorted(set(want) | set(have or {}))
            diffs += [f"{k}: trained with {(have or {}).get(k)!r}, config now {want.get(k)!r}" for k in keys
                      if (have or {}).get(k) != want.get(k)]
        elif have != want:
            diffs.append(f"{key}: trained with {have!r}, now {want!r}")
    if diffs:
        raise JudgeNotReady(f"judge {judge_name!r} was trained with a different setup ({'; '.join(diffs)}); "
                            f"retrain it: run {TRAIN_COMMAND}")


# ---------------------------------------------------------------------------------------------
# the judge base class


class ClassifierJudge:
    """A fine-tuned 5-class sequence classifier used as a judge.

    Subclasses set ``kind``, ``default_lr``, ``keep_tail`` and ``extra_train_fields`` and implement
    :meth:`_build`, :meth:`_save` and :meth:`_restore`.
    """

    kind: str = ""
    exportable: bool = False  # can run through ONNX Runtime (assay.inference)
    default_lr: float = 5e-5
    keep_tail: int = 0
    extra_train_fields: tuple[str, ...] = ()

    def __init__(self, cfg, model, tokenizer, manifest: dict):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.name: str = cfg.name
        self.prompt_sha: str = manifest["template_sha"]
        self.model_id: str = f"{cfg.model}+{cfg.name}@{manifest['weights_sha']}"
        self.backend = "torch"
        self.runner = None
        self.guard: dict = {}

    def use_backend(self, backend: str, artifacts: Path) -> None:
        """Predict through an ONNX Runtime export of the model (``onnx`` or ``onnx-int8``, built once under
        ``artifacts/onnx/``), or on PyTorch (``torch``). The label's model id names a non-torch backend."""
        from assay import inference

        setting = f"the inference of judge {self.name!r}"
        if backend != "torch" and not self.exportable:
            raise inference.BackendError(f"judge {self.name!r} (kind {self.kind}) runs on torch only; set its "
                                         "inference to torch or auto")
        self.runner = None
        if backend != "torch":
            folder = inference.ensure_export(self.model, self.tokenizer, artifacts=Path(artifacts),
                                             what=f"judge-{self.name}", source_sha=self.manifest["weights_sha"],
                                             backend=backend, output="logits", max_length=self.cfg.max_length,
                                             setting=setting)
            self.runner = inference.OnnxRunner(folder, self.tokenizer, self.cfg.max_length)
        self.backend = backend
        base = self.model_id.split("/")[0]
        self.model_id = base if backend == "torch" else f"{base}/{backend}"

    # -- what a kind provides -----------------------------------------------------------------

    @classmethod
    def _resolve(cls, cfg):
        from assay.models import resolve

        return resolve(cfg.model)

    @classmethod
    def _build(cls, cfg, resolved):  # pragma: no cover - abstract
        """A fresh trainable (model, tokenizer) with a 5-class head; torch is already seeded."""
        raise NotImplementedError

    @classmethod
    def _save(cls, model, tokenizer, out_dir: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _restore(cls, cfg, resolved, model_dir: Path):  # pragma: no cover - abstract
        """(model, tokenizer) from a saved model directory, in eval mode."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------

    @classmethod
    def train_config(cls, cfg) -> dict:
        """The training-relevant config fields, with the learning rate resolved."""
        out: dict[str, Any] = {}
        for f in TRAIN_FIELDS + cls.extra_train_fields:
            out[f] = getattr(cfg, f)
        out["learning_rate"] = cfg.learning_rate or cls.default_lr
        return out

    @classmethod
    def model_dir(cls, cfg, artifacts: Path) -> Path:
        return teacher_dir(Path(artifacts), cfg.name) / MODEL_SUBDIR

    @classmethod
    def _check_inputs(cls, cfg, pairs: Sequence[Pair], grades) -> np.ndarray:
        if cfg.kind != cls.kind:
            raise ValueError(f"judge {cfg.name!r} has kind {cfg.kind!r}; {cls.__name__} trains kind {cls.kind!r}")
        g = np.asarray(grades)
        if len(pairs) == 0:
            raise ValueError(f"no training pairs for judge {cfg.name!r}: ingest human labels first")
        if len(g) != len(pairs):
            raise ValueError(f"got {len(pairs)} pairs but {len(g)} grades; pass one grade per pair")
        if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer) or g.min() < 0 or g.max() >= N_GRADES:
            raise ValueError(f"grades must be integers 0-{N_GRADES - 1} (see docs/architecture.md, 'Relevance grades')")
        return g.astype(np.int64)

    @classmethod
    def fit(cls, cfg, pairs: Sequence[Pair], grades, artifacts: Path, progress: bool = True):
        """Train, save to ``teacher_dir(artifacts, cfg.name)/model/`` and return ``(judge, summary)``.

        The returned judge holds the in-memory model that was saved (no reload needed)."""
        from assay.models import model_sha

        pairs, g = cap_train_pairs(cfg, pairs, cls._check_inputs(cfg, pairs, grades))
        n_human = len(pairs)
        pairs, g = stuffed_copies(pairs, g, cfg.stuffed_negatives, cfg.seed)
        tcfg = cls.train_config(cfg)
        resolved = cls._resolve(cfg)
        texts = render_inputs(cfg.template_name, pairs)

        torch.manual_seed(cfg.seed)
        model, tokenizer = cls._build(cfg, resolved)
        stats = train_loop(model, tokenizer, texts, g, max_length=cfg.max_length, epochs=cfg.epochs,
                           batch_size=cfg.train_batch_size, learning_rate=tcfg["learning_rate"], seed=cfg.seed,
                           keep_tail=cls.keep_tail, progress=progress, desc=f"train {cfg.name}",
                           class_weight=cfg.class_weight)

        final = cls.model_dir(cfg, artifacts)
        tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cls._save(model, tokenizer, tmp)
        import transformers

        manifest = {
            "kind": cls.kind,
            "name": cfg.name,
            "base_model": cfg.model,
            "base_model_path": resolved.path,
            "base_model_sha": model_sha(resolved),
            "template": cfg.template_name,
            "template_sha": template_sha(cfg.template_name),
            "config": tcfg,
            "config_digest": config_digest(tcfg),
            "n_train": n_human,
            "n_stuffed": len(pairs) - n_human,
            "grade_counts": np.bincount(g, minlength=N_GRADES).tolist(),
            "weights_sha": files_sha(tmp),
            "files": sorted(p.name for p in tmp.iterdir()),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "torch_threads": torch.get_num_threads(),
            **stats,
        }
        write_manifest(tmp, manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        log.info("trained judge %s (%s) on %d pairs -> %s", cfg.name, cls.kind, len(pairs), final)
        summary = {k: manifest[k] for k in ("name", "kind", "base_model", "n_train", "n_stuffed", "grade_counts", "steps",
                                            "train_seconds", "first_train_loss", "final_train_loss",
                                            "config_digest", "template_sha", "weights_sha")}
        summary["path"] = str(final)
        return cls(cfg, model, tokenizer, manifest), summary

    @classmethod
    def train(cls, cfg, pairs: Sequence[Pair], grades, artifacts: Path, progress: bool = True, store=None) -> dict:
        """Fine-tune on human-labelled pairs and save the model; returns the training summary (``store`` is
        unused: a classifier reads only the pair text)."""
        return cls.fit(cfg, pairs, grades, artifacts, progress)[1]

    @classmethod
    def load(cls, cfg, artifacts: Path) -> "ClassifierJudge":
        """The trained judge; raises :class:`JudgeNotReady` when it is untrained or stale."""
        from assay.models import model_sha

        model_dir = cls.model_dir(cfg, artifacts)
        manifest = read_manifest(model_dir, cfg.name)
        resolved = cls._resolve(cfg)
        tcfg = cls.train_config(cfg)
        check_manifest(manifest, {"kind": cls.kind, "config": tcfg, "template_sha": template_sha(cfg.template_name),
                                  "base_model_sha": model_sha(resolved)}, cfg.name)
        model, tokenizer = cls._restore(cfg, resolved, model_dir)
        return cls(cfg, model, tokenizer, manifest)

    @classmethod
    def from_base(cls, cfg) -> "ClassifierJudge":
        """A judge whose head is freshly initialised (seeded by ``cfg.seed``), nothing saved.

        Its probabilities mean nothing; it exists for throughput benchmarks and smoke tests,
        and its ``model_id`` says ``untrained``."""
        resolved = cls._resolve(cfg)
        torch.manual_seed(cfg.seed)
        model, tokenizer = cls._build(cfg, resolved)
        model.eval()
        manifest = {"kind": cls.kind, "template_sha": template_sha(cfg.template_name), "weights_sha": "untrained"}
        return cls(cfg, model, tokenizer, manifest)

    def predict_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Grade probabilities (n, 5) of already rendered input texts (benchmarks)."""
        return predict_probs(self.model, self.tokenizer, texts, max_length=self.cfg.max_length,
                             batch_size=self.cfg.batch_size, precision=self.cfg.precision, keep_tail=self.keep_tail,
                             runner=self.runner)[0]

    def predict(self, pairs: Sequence[Pair], progress: bool = False) -> JudgeOutput:
        texts = render_inputs(self.cfg.template_name, pairs)
        probs, latency = predict_probs(self.model, self.tokenizer, texts, max_length=self.cfg.max_length,
                                       batch_size=self.cfg.batch_size, precision=self.cfg.precision,
                                       keep_tail=self.keep_tail, progress=progress, desc=f"judge {self.name}",
                                       runner=self.runner)
        return JudgeOutput(probs=probs, raw=[None] * len(texts), parse_status=[OK] * len(texts), latency_ms=latency)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model_id={self.model_id!r}, prompt_sha={self.prompt_sha!r})"
