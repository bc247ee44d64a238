"""Cross-encoder judge: a transformers encoder with a 5-class head, fine-tuned on human labels.

The first and cheapest judge of the cascade (Walmart used a 184M cross-encoder; the default here
is the packaged MiniLM-L6, 22M). Its input is ``prompts/classifier_input.j2`` rendered for each
pair (query first, then the product fields), truncated from the right at ``cfg.max_length``.

>>> from assay.config import JudgeConfig
>>> cfg = JudgeConfig(name="ce-minilm", kind="cross_encoder", model="all-MiniLM-L6-v2", max_length=96)
>>> CrossEncoderJudge.train(cfg, pairs, grades, artifacts)   # doctest: +SKIP
>>> judge = CrossEncoderJudge.load(cfg, artifacts)           # doctest: +SKIP
>>> judge.predict(pairs).probs.shape                          # doctest: +SKIP
(n, 5)

Writes ``teacher_dir(artifacts, cfg.name)/model/``: the whole fine-tuned model (safetensors),
its tokenizer and ``manifest.json`` (see :mod:`assay.annotate.judges._classifier`).
"""

from __future__ import annotations

from pathlib import Path

from assay.annotate.judges._classifier import GRADE_NAMES, ClassifierJudge, JudgeNotReady

__all__ = ["CrossEncoderJudge", "JudgeNotReady"]


def _label_maps() -> dict:
    return {"id2label": dict(enumerate(GRADE_NAMES)), "label2id": {n: i for i, n in enumerate(GRADE_NAMES)}}


class CrossEncoderJudge(ClassifierJudge):
    kind = "cross_encoder"
    exportable = True
    default_lr = 2e-4
    keep_tail = 0

    @classmethod
    def _build(cls, cfg, resolved):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if resolved.kind == "gguf":
            raise ValueError(f"judge {cfg.name!r}: {cfg.model!r} is a GGUF LLM; a cross_encoder needs an encoder "
                             "such as all-MiniLM-L6-v2 (use kind: llm_classifier for LLMs)")
        local = resolved.is_local
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=local)
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved.path, num_labels=len(GRADE_NAMES), local_files_only=local, problem_type="single_label_classification",
            **_label_maps())
        return model, tokenizer

    @classmethod
    def _save(cls, model, tokenizer, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)

    @classmethod
    def _restore(cls, cfg, resolved, model_dir: Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # a workspace folder: safetensors weights only (never a pickled .bin), no code from the folder
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True,
                                                                   use_safetensors=True, trust_remote_code=False)
        model.eval()
        return model, tokenizer
