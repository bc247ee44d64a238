"""The judge contract shared by every judge kind.

A judge maps a batch of (query, product) pairs to class probabilities over grades 0-4. It never
raises for one bad pair: a pair it could not grade (unparseable output, a failed call after
retries) gets a row of NaN probabilities, grade -1 and a parse status saying why, and the
batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

N_GRADES = 5

# parse_status values
OK = "ok"                  # classifier output, or LLM output read from grade-token logprobs
OK_JSON = "json"           # LLM output parsed from JSON (confidence stated by the model)
UNPARSED = "unparsed"      # the model answered, but no grade could be read
FAILED = "failed"          # the call failed after retries (timeout, 5xx, connection)


@dataclass
class Pair:
    query_id: str
    item_id: str
    query: str
    title: str
    description: str | None = None
    brand: str | None = None
    category: str | None = None
    attributes: str | None = None  # JSON object text
    text_sha: str | None = None  # digest of the texts above as the workspace holds them now (labels are bound to it)

    def context(self) -> dict:
        """Template variables for prompts/ templates."""
        return {"query": self.query, "title": self.title, "description": self.description, "brand": self.brand,
                "category": self.category, "attributes": self.attributes}


PAIR_COLUMNS = ["query_id", "item_id", "query", "title", "description", "brand", "category", "attributes"]


def pairs_from_arrow(tbl: pa.Table) -> list[Pair]:
    """Pairs from a table with PAIR_COLUMNS (and ``text_sha`` when the table has it)."""
    names = PAIR_COLUMNS + (["text_sha"] if "text_sha" in tbl.column_names else [])
    cols = {c: tbl.column(c).to_pylist() for c in names}
    return [Pair(*vals) for vals in zip(*(cols[c] for c in names))]


@dataclass
class JudgeOutput:
    probs: np.ndarray  # (n, 5) float32, uncalibrated; NaN rows where the pair failed
    raw: list[str | None]  # raw model text (LLMs); None for classifiers
    parse_status: list[str]
    latency_ms: np.ndarray  # (n,) wall time attributed to each pair
    tokens: np.ndarray | None = None  # (n,) tokens used, where the backend reports them
    extra: dict = field(default_factory=dict)

    @property
    def grade(self) -> np.ndarray:
        g = np.full(len(self.probs), -1, dtype=np.int8)
        ok = ~np.isnan(self.probs).any(axis=1)
        g[ok] = self.probs[ok].argmax(axis=1)
        return g

    @property
    def ok(self) -> np.ndarray:
        return ~np.isnan(self.probs).any(axis=1)

    @classmethod
    def concat(cls, outs: list["JudgeOutput"]) -> "JudgeOutput":
        tokens = None
        if outs and all(o.tokens is not None for o in outs):
            tokens = np.concatenate([o.tokens for o in outs])
        return cls(np.concatenate([o.probs for o in outs]) if outs else np.zeros((0, N_GRADES), np.float32),
                   [r for o in outs for r in o.raw], [s for o in outs for s in o.parse_status],
                   np.concatenate([o.latency_ms for o in outs]) if outs else np.zeros(0), tokens)


@runtime_checkable
class Judge(Protocol):
    name: str       # the judge's name in the cascade config
    kind: str       # cross_encoder | llm_classifier | prompted
    model_id: str   # the weights or endpoint model it runs
    prompt_sha: str  # sha of the template that renders its input

    def predict(self, pairs: list[Pair], progress: bool = False) -> JudgeOutput: ...


def load_registered(registry: dict[str, tuple[str, str]], name: str, what: str):
    """The class registered under ``name`` in a lazy registry of ``name -> (module, class)``; the
    module is imported only now, so optional dependencies load only when used."""
    import importlib

    try:
        module, cls = registry[name]
    except KeyError:
        raise KeyError(f"Unknown {what} {name!r}. Available: {sorted(registry)}") from None
    return getattr(importlib.import_module(module), cls)
