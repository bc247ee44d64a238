"""Curriculum: five difficulty tiers over labeled mined pairs, graded targets, the examples table."""

from assay.curriculum.run import build_examples, run
from assay.curriculum.targets import graded_targets, normalise_per_query
from assay.curriculum.tiers import TIER_NAMES, assign_tiers, cap_per_query, split_of

__all__ = ["run", "build_examples", "graded_targets", "normalise_per_query", "TIER_NAMES", "assign_tiers",
           "cap_per_query", "split_of"]
