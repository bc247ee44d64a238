"""assay: graded relevance training data for dense product-search retrievers, without click labels."""

__version__ = "0.1.0"
