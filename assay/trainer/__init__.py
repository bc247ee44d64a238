"""Trainer: the two-tower model, its losses, the seeded batch sampler and the curriculum / baseline loop."""

from __future__ import annotations

import os
from pathlib import Path

from assay.trainer.losses import LOSSES, get_loss
from assay.trainer.model import TwoTower

__all__ = ["TwoTower", "LOSSES", "get_loss", "run", "run_cli"]


def run(cfg, store, models_cfg, **kw):
    from assay.trainer.run import run as _run

    return _run(cfg, store, models_cfg, **kw)


def run_cli(cfg, workspace: Path, *, stage: int | None = None, baseline: str | None = None,
            progress: bool = True) -> dict | None:
    """`assay train`: one process, or every rank of a torchrun launch. Under torchrun all ranks load the training
    data read-only first; then rank 0 alone opens the workspace for writing and records the run."""
    import torch

    from assay.store import Store
    from assay.trainer.loop import init_dist
    from assay.trainer.run import load_data, run as _run

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or cfg.store.threads))
    dist = init_dist()
    if not dist.enabled:
        with Store.open(workspace, threads=cfg.store.threads, memory_limit=cfg.store.memory_limit) as store:
            return _run(cfg.train, store, cfg.models, stage=stage, baseline=baseline, progress=progress)
    with Store.open(workspace, read_only=True, threads=cfg.store.threads) as ro:
        data = load_data(cfg.train, ro, with_clicks=baseline == "click")
    dist.barrier()
    try:
        if dist.main:
            with Store.open(workspace, threads=cfg.store.threads, memory_limit=cfg.store.memory_limit) as store:
                return _run(cfg.train, store, cfg.models, stage=stage, baseline=baseline, progress=progress,
                            data=data, dist=dist)
        _run(cfg.train, None, cfg.models, stage=stage, baseline=baseline, progress=False, data=data, dist=dist,
             workspace=workspace)
        return None
    finally:
        torch.distributed.destroy_process_group()
