"""Serving: `assay export-index` builds a FAISS index bound to a two-tower checkpoint by its manifest
(``indexes`` table, ``artifacts/index/``); `assay search` answers dense or hybrid queries from it
(assay.serving.index); `assay serve` runs the HTTP API and the search page (assay.serving.app)."""
