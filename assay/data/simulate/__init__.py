"""A simulated e-commerce world: taxonomy, brands, catalog, queries, engagement log, human labels and exact
ground-truth grades for any (query, item) pair.

>>> from assay.data.simulate import SimulateConfig, simulate, TruthOracle
>>> summary = simulate(SimulateConfig(n_products=2000, n_queries=200), out_dir, progress=False)  # doctest: +SKIP
>>> oracle = TruthOracle.from_dir(out_dir)  # doctest: +SKIP
"""

from .params import SimulateConfig
from .truth import TruthOracle
from .world import simulate

__all__ = ["SimulateConfig", "simulate", "TruthOracle"]
