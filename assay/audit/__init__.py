"""Audit export and the audit loop: `assay export`, `assay audit sample`, `assay audit import`."""
