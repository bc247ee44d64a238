"""Trainer: the two-tower model, its losses, the seeded batch sampler and the curriculum / baseline loop."""

from assay.trainer.losses import LOSSES, get_loss
from assay.trainer.model import TwoTower
from assay.trainer.run import run, run_cli

__all__ = ["TwoTower", "LOSSES", "get_loss", "run", "run_cli"]
