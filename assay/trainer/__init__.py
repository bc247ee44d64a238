"""Trainer (planned; ARCHITECTURE.md "Model"): reads `examples`, writes checkpoints under
artifacts/checkpoints/ and rows in `checkpoints`."""
