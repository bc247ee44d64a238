"""LLM-classifier judge: a decoder LLM with a 5-class head, LoRA fine-tuned on human labels.

The middle judge of the cascade (Walmart used a 2B LLM with LoRA; the default here is the packaged
SmolLM2-135M-Instruct). Its input is ``prompts/llm_classifier_input.j2``: a compact instruction,
the pair, and a fixed suffix, so the last token, which the head reads, summarises the pair. Over-long
inputs keep their last 16 tokens (the suffix) and lose the middle (the description).

The base model loads from a GGUF file (``resolve('smollm2-135m')``) through transformers, which
dequantises it to fp32 and needs the ``gguf`` package; a normal HF directory or hub id works too.
The first GGUF load on a machine takes about 12 s on one thread (converted once, then kept in the user cache; see
:func:`load_base`), so each base is loaded once per process and kept in a module-level cache keyed by its path;
every judge works on its own copy.

LoRA (peft) adapts the attention projections, and the head is trained in full
(``modules_to_save``). Writes ``teacher_dir(artifacts, cfg.name)/model/``: the adapter and head
only (a few MB, safetensors), plus ``manifest.json``. Loading it means base (cached) + adapter.

This module runs on CPU (or a CUDA device) through transformers only; the vLLM path lives in
the backends and is never imported here.

>>> from assay.config import JudgeConfig
>>> cfg = JudgeConfig(name="smollm2-cls", kind="llm_classifier", model="smollm2-135m", max_length=128)
>>> LLMClassifierJudge.train(cfg, pairs, grades, artifacts)   # doctest: +SKIP
>>> LLMClassifierJudge.load(cfg, artifacts).predict(pairs)    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path

import torch

from assay.annotate.judges._classifier import GRADE_NAMES, TRAIN_COMMAND, ClassifierJudge, JudgeNotReady

__all__ = ["LLMClassifierJudge", "JudgeNotReady", "load_base", "lora_targets"]

log = logging.getLogger(__name__)

# attention projection names, by architecture family (first family found in the model wins)
_ATTENTION_TARGETS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("query_key_value", "dense"), ("c_attn", "c_proj"),
                      ("Wqkv", "out_proj"))
_BASES: dict[tuple[str, str | None], tuple[torch.nn.Module, object]] = {}


def load_base(resolved) -> tuple[torch.nn.Module, object]:
    """The base (model with a fresh 5-class head, tokenizer) of a resolved model, loaded once per
    process. Callers must copy the model before changing it (LoRA injects into it). Loading draws nothing from
    torch's random generator (the caller seeds the head it trains, whatever this process loaded before).

    A GGUF model is read once per machine: transformers parses and dequantizes the GGUF in Python (measured for
    SmolLM2-135M on one thread: 26 s for config, tokenizer and weights, 12 s since :func:`_parse_gguf_once` keeps
    transformers from parsing the file four times), so its float32 weights (less the head) and its tokenizer are
    kept in the user cache (``gguf_cache_dir``) and later processes load those (measured: 4 s)."""
    key = (resolved.path, resolved.gguf_file)
    if key in _BASES:
        return _BASES[key]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = {"id2label": dict(enumerate(GRADE_NAMES)), "label2id": {n: i for i, n in enumerate(GRADE_NAMES)}}
    t0 = time.perf_counter()
    cached = gguf_cache_dir(resolved) if resolved.kind == "gguf" else None
    if cached is not None and (cached / "done.json").exists():
        src = {"pretrained_model_name_or_path": str(cached), "local_files_only": True}
    elif resolved.kind == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:  # pragma: no cover - gguf is a dependency of the llm_classifier path
            raise ImportError("loading a GGUF model with transformers needs the 'gguf' package: pip install gguf") from None
        src = {"pretrained_model_name_or_path": resolved.local_dir, "gguf_file": resolved.gguf_file,
               "local_files_only": True}
    else:
        src = {"pretrained_model_name_or_path": resolved.path, "local_files_only": resolved.is_local}
    with torch.random.fork_rng(), (_parse_gguf_once() if "gguf_file" in src else contextlib.nullcontext()):
        tokenizer = AutoTokenizer.from_pretrained(**src)
        model = AutoModelForSequenceClassification.from_pretrained(**src, num_labels=len(GRADE_NAMES),
                                                                   dtype=torch.float32, **labels)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if cached is not None and "gguf_file" in src:
        _keep_converted(model, tokenizer, cached)
    log.info("loaded base %s%s in %.1fs", resolved.path, f" ({resolved.gguf_file})" if resolved.gguf_file else "",
             time.perf_counter() - t0)
    _BASES[key] = (model, tokenizer)
    return _BASES[key]


@contextlib.contextmanager
def _parse_gguf_once():
    """Within one GGUF load, parse the file once and build gguf's tensor-name map once.

    transformers opens a new ``gguf.GGUFReader`` for each thing it reads from the file (the tokenizer, the config and
    twice for the weights), and builds ``gguf.get_tensor_name_map(arch, n_blocks)`` again for every module it maps.
    Profiled on the packaged SmolLM2-135M (one thread): 4 parses of its metadata at 6.6 s each and 397 name maps
    (8 s) made 40 s of a 41 s first load. Both are pure functions of their arguments and only read, so the first
    result is kept for the rest of the load (restored afterwards). Where a transformers version no longer calls
    them through the ``gguf`` module, nothing changes but the time."""
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    maps: dict = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    def name_map(*args):
        if args not in maps:
            maps[args] = real_map(*args)
        return maps[args]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def gguf_cache_dir(resolved) -> Path:
    """Where a GGUF model's transformers form is kept: ``$ASSAY_CACHE_DIR`` (default ``$XDG_CACHE_HOME/assay``, or
    ``~/.cache/assay``) ``/gguf-hf/<sha of the GGUF file>``."""
    from assay.models import model_sha

    root = os.environ.get("ASSAY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "assay")
    return Path(root) / "gguf-hf" / model_sha(resolved)


def _keep_converted(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Write the converted base to ``folder`` (written aside, then renamed; another process's copy wins). The head
    is left out, so a load from the cache initialises it as a load from the GGUF does. A cache that cannot be
    written (read-only home) only costs the next process the GGUF parse again, and the log says so."""
    import json
    import shutil

    import transformers
    from safetensors.torch import save_file

    head = _head_name(model)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tokenizer.save_pretrained(tmp)
        # (save_pretrained refuses a model transformers loaded from a GGUF: its weights are written here directly)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                   if not k.startswith(head + ".")}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "done.json").write_text(json.dumps({"transformers": transformers.__version__}))
        if not folder.exists():
            tmp.rename(folder)
    except OSError as e:
        if (folder / "done.json").exists():  # another process renamed its copy first
            return
        log.warning("could not keep the converted GGUF model in %s (%s); the next process parses the GGUF again",
                    folder, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The attention projection module names of ``model`` that LoRA adapts."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for family in _ATTENTION_TARGETS:
        found = [t for t in family if t in names]
        if found:
            return found
    raise ValueError(f"no known attention projections in {type(model).__name__}; linear layers are {sorted(names)}")


def _head_name(model: torch.nn.Module) -> str:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no 'score' or 'classifier' head")


class LLMClassifierJudge(ClassifierJudge):
    kind = "llm_classifier"
    # Measured on the demo world (4,179 train pairs, SmolLM2-135M, LoRA r=8): 2e-4 for 1 epoch reached
    # 0.41 held-out accuracy (loss 1.46); 1e-3 for 1.5 epochs reached 0.62 (loss 0.84).
    default_lr = 1e-3
    keep_tail = 16
    extra_train_fields = ("lora_r", "lora_alpha", "lora_dropout")

    @classmethod
    def _fresh_base(cls, resolved) -> tuple[torch.nn.Module, object]:
        base, tokenizer = load_base(resolved)
        return copy.deepcopy(base), tokenizer

    @classmethod
    def _build(cls, cfg, resolved):
        from peft import LoraConfig, TaskType, get_peft_model

        model, tokenizer = cls._fresh_base(resolved)
        head = _head_name(model)
        module = getattr(model, head)
        # a seeded head (torch is seeded by the caller), the same init transformers uses
        torch.nn.init.normal_(module.weight, std=getattr(model.config, "initializer_range", 0.02))
        if getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)
        lcfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=lora_targets(model), modules_to_save=[head])
        model = get_peft_model(model, lcfg)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("LoRA on %s: %d of %d parameters trainable (%.2f%%)", lcfg.target_modules, n_train, n_all,
                 100 * n_train / n_all)
        return model, tokenizer

    @classmethod
    def _save(cls, model, tokenizer, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    @classmethod
    def _restore(cls, cfg, resolved, model_dir: Path):
        from peft import PeftModel

        if not (Path(model_dir) / "adapter_model.safetensors").exists():  # peft would fall back to a pickled .bin
            raise JudgeNotReady(f"judge {cfg.name!r}: no adapter_model.safetensors in {model_dir} (other weight files "
                                f"are not loaded); run {TRAIN_COMMAND}")
        base, tokenizer = cls._fresh_base(resolved)
        model = PeftModel.from_pretrained(base, model_dir, is_trainable=False)
        model.eval()
        return model, tokenizer
