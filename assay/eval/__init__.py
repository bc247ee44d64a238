"""Evaluation (planned; ARCHITECTURE.md "Evaluation"): metrics on judged pairs, split by query
segment, against baselines, written to artifacts/reports/."""
