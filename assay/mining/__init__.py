"""Mining: BM25, ANN and click channels federated into `candidates`, plus mined `negatives`."""

from assay.mining.federate import PRIORS, get_prior
from assay.mining.run import run

__all__ = ["PRIORS", "get_prior", "run"]
