"""Reproducible random streams: one independent generator per (seed, component, chunk) key.

Seeding by name (not by call order) means adding a draw in one component never shifts the draws of another.
"""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, name: str, *index: int) -> np.random.Generator:
    """Generator for component ``name`` (and optional chunk ``index``) under master ``seed``."""
    key = [int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))] + [int(i) for i in index]
    return np.random.default_rng(np.random.SeedSequence(key))
