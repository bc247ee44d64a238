"""Backends of the prompted judge: rendered prompts in, completions out.

A backend sends each prompt as the user message of a chat, asks for the JSON answer
``{"grade": 0-4, "confidence": 0-1}`` (constrained by :data:`GRADE_SCHEMA` where the engine can),
and reads the logprobs at the grade token where it can. Contract of ``complete(prompts)``:

- returns one :class:`Completion` per prompt, in order;
- never raises for one failed prompt: a call that still fails after the retries comes back with
  ``error`` set and ``text`` None, and the other prompts are unaffected;
- ``grade_logprobs`` maps tokens ("0".."4", possibly other tokens too) to logprobs at the position
  where the grade digit was generated, or is None where the engine gives none.

Backends that can score text (local, openai) also have ``loglik(items)`` for ``scoring: likelihood``: one
:class:`LogLik` per ``(context, continuation)``, the continuation's log-probability after the context summed over
its tokens, with the same contract (in order, a failed text comes back with ``error`` set, nothing raised).

Backends (registry :data:`BACKENDS`, chosen by ``JudgeConfig.backend``):

| name | runs | heavy dependency |
|---|---|---|
| openai | any OpenAI-compatible endpoint (OpenAI, vLLM serve, llama.cpp server) | ``openai`` |
| local | a GGUF model in process through llama-cpp-python | ``llama-cpp-python`` |
| vllm | an in-process ``vllm.LLM`` engine for batch work on a GPU | ``vllm`` (``pip install 'assay[gpu]'``) |

The heavy dependency is imported only by the backend that uses it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from assay.annotate.base import load_registered

GRADE_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "grade": {"type": "integer", "enum": [0, 1, 2, 3, 4]},
        "confidence": {"type": "number"},
    },
    "required": ["grade", "confidence"],
    "additionalProperties": False,
}


class Completion(NamedTuple):
    text: str | None  # the model's answer; None when the call failed
    grade_logprobs: dict[str, float] | None  # top logprobs at the grade token position, if available
    tokens: int | None  # prompt + completion tokens, where reported
    latency_ms: float  # wall time spent on this prompt (retries and backoff included)
    error: str | None  # why the call failed after retries; None on success


class LogLik(NamedTuple):
    logprob: float | None  # log P(continuation | context), summed over the continuation's tokens; None if failed
    tokens: int | None  # the continuation's tokens
    latency_ms: float
    error: str | None  # why scoring failed after retries; None on success


@runtime_checkable
class Backend(Protocol):
    name: str  # registry name
    model_id: str  # model name + backend, stored with each label

    def complete(self, prompts: list[str]) -> list[Completion]: ...

    def close(self) -> None: ...


BACKENDS = {
    "openai": ("assay.annotate.backends.openai", "OpenAIBackend"),
    "local": ("assay.annotate.backends.local", "LocalBackend"),
    "vllm": ("assay.annotate.backends.vllm", "VLLMBackend"),
}


def backend_class(name: str):
    return load_registered(BACKENDS, name, "backend")


def get_backend(cfg, **kwargs) -> Backend:
    """Build the backend named by ``cfg.backend`` for a prompted JudgeConfig (kwargs go to its constructor)."""
    return backend_class(cfg.backend)(cfg, **kwargs)


__all__ = ["BACKENDS", "GRADE_SCHEMA", "Backend", "Completion", "LogLik", "backend_class", "get_backend"]
