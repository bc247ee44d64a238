"""A loaded cascade: judges, their calibrators, thresholds, and the cascade's identity.

Files under ``artifacts/teachers/``:
- ``<judge>/model/``: trained weights and manifest (classifier judges, `assay teachers train`);
- ``<judge>/calibrator.json``: per-class isotonic calibrator (`assay calibrate`);
- ``cascade.json``: fitted thresholds, the agreement target, and each judge's measured reach
  and latency on the calibration split (used by ``annotate --dry-run``).

``cascade_sha`` identifies everything that decides a label: each judge's config, template
sha, trained-model manifest and calibrator, plus the thresholds in force. Labels are keyed by
(query_id, item_id, cascade_sha), so annotating twice with the same cascade is idempotent and
a changed cascade labels afresh.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from assay.annotate.calibrate import IsotonicCalibrator
from assay.annotate.cascade import NEVER
from assay.annotate.judges import load_judge, teacher_dir
from assay.annotate.prompts import template_sha
from assay.config import AnnotateConfig, JudgeConfig
from assay.text import digest

log = logging.getLogger(__name__)


def cascade_file(artifacts: Path) -> Path:
    return Path(artifacts) / "teachers" / "cascade.json"


def calibrator_file(artifacts: Path, name: str) -> Path:
    return teacher_dir(artifacts, name) / "calibrator.json"


def _file_text(p: Path) -> str:
    return p.read_text() if p.exists() else ""


def judge_identity(cfg: JudgeConfig, artifacts: Path) -> str:
    manifest = teacher_dir(artifacts, cfg.name) / "model" / "manifest.json"
    return digest([cfg.model_dump_json(exclude={"batch_size", "concurrency", "timeout_s", "max_retries"}),
                   # the features judge renders no template; its manifest holds its feature list's sha
                   template_sha(cfg.template_name) if cfg.kind != "features" else "", _file_text(manifest),
                   _file_text(calibrator_file(artifacts, cfg.name))])


def thresholds_in_force(cfg: AnnotateConfig, artifacts: Path) -> tuple[list[np.ndarray], str]:
    """Per judge: config thresholds, else fitted ones from cascade.json, else default_threshold."""
    fitted = {}
    cf = cascade_file(artifacts)
    if cf.exists():
        fitted = json.loads(cf.read_text()).get("thresholds", {})
    out, sources = [], []
    for j in cfg.judges:
        if j.name in cfg.thresholds:
            out.append(np.array(cfg.thresholds[j.name], dtype=np.float64))
            sources.append("config")
        elif j.name in fitted:
            out.append(np.array([NEVER if t is None else t for t in fitted[j.name]], dtype=np.float64))
            sources.append("fitted")
        else:
            out.append(np.full(5, cfg.default_threshold))
            sources.append("default")
    return out, ",".join(sorted(set(sources)))


def cascade_sha(cfg: AnnotateConfig, artifacts: Path) -> str:
    th, _ = thresholds_in_force(cfg, artifacts)
    return digest([judge_identity(j, artifacts) for j in cfg.judges] + [json.dumps([t.tolist() for t in th])])


@dataclass
class Cascade:
    cfg: AnnotateConfig
    judges: list
    calibrators: list[IsotonicCalibrator | None]
    thresholds: list[np.ndarray]
    sha: str
    threshold_source: str
    names: list[str] = field(default_factory=list)

    def calibrate(self, j: int, probs: np.ndarray) -> np.ndarray:
        cal = self.calibrators[j]
        return cal.transform(probs) if cal is not None else probs


def load_cascade(cfg: AnnotateConfig, artifacts: Path, *, require_calibration: bool = True,
                 judges: list | None = None) -> Cascade:
    """Load every judge (trained weights) and its calibrator. `judges` reuses loaded judges."""
    artifacts = Path(artifacts)
    cals: list[IsotonicCalibrator | None] = []
    for j in cfg.judges:
        f = calibrator_file(artifacts, j.name)
        if f.exists():
            cals.append(IsotonicCalibrator.load(f))
        elif require_calibration:
            raise FileNotFoundError(f"judge {j.name!r} has no calibrator ({f}); run `assay calibrate` first")
        else:
            cals.append(None)
    loaded = judges or [load_judge(j, artifacts) for j in cfg.judges]
    th, src = thresholds_in_force(cfg, artifacts)
    return Cascade(cfg, loaded, cals, th, cascade_sha(cfg, artifacts), src, [j.name for j in cfg.judges])
