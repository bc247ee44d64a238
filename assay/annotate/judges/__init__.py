"""Judge registry: one file per judge kind. `get_judge("x")` names the valid kinds on error.

Each judge class provides ``load(cfg, artifacts) -> Judge``; classifier kinds also provide
``train(cfg, pairs, grades, artifacts, progress) -> dict``. Trained weights, the manifest and
the calibrator of a judge live in ``artifacts/teachers/<judge name>/``.
"""

from __future__ import annotations

from pathlib import Path

from assay.annotate.base import load_registered

_KINDS = {
    "features": ("assay.annotate.judges.features", "FeaturesJudge"),
    "cross_encoder": ("assay.annotate.judges.cross_encoder", "CrossEncoderJudge"),
    "llm_classifier": ("assay.annotate.judges.llm_classifier", "LLMClassifierJudge"),
    "prompted": ("assay.annotate.judges.prompted", "PromptedJudge"),
}


def get_judge(kind: str):
    return load_registered(_KINDS, kind, "judge")


def teacher_dir(artifacts: Path, name: str) -> Path:
    return Path(artifacts) / "teachers" / name


def load_judge(cfg, artifacts: Path):
    """Instantiate the judge described by a JudgeConfig (trained weights from artifacts)."""
    return get_judge(cfg.kind).load(cfg, Path(artifacts))
