"""Local backend: a GGUF model in process through llama-cpp-python (CPU).

- The model is ``assay.models.resolve(cfg.model)`` (a packaged alias such as ``smollm2-135m`` or a
  ``.gguf`` path), loaded with ``n_ctx=cfg.n_ctx``, ``logits_all=False`` and ``OMP_NUM_THREADS`` threads for
  prompts and generation alike (which ``assay`` sets to ``store.threads``, default 2). llama.cpp's threads spin
  while they wait for each other, so more threads than free cores is much slower, not a little: two 2-thread models
  on 2 cores took 68 s where two 1-thread models took 40 s (tests/test_annotate_server.py's killed-server test, run
  twice at once).
- Each prompt is the user message of a chat rendered with the model's own chat template; the answer
  is constrained by a grammar built from :data:`GRADE_SCHEMA` (so it is always
  ``{"grade": <0-4>, "confidence": <number>}`` unless ``max_tokens`` cuts it), temperature 0 and
  no repeat penalty (a grade digit seen in the prompt must not be penalised).
- Grade logprobs: llama-cpp-python only returns ``logprobs`` when the model was loaded with
  ``logits_all=True``, which computes the vocabulary logits of every prompt token (slow). Instead a
  logits processor reads the raw logits at each generated step; at the step right after
  ``"grade":`` it keeps the log-softmax of the five digit tokens "0".."4". That is the distribution
  the model had over grades where it chose one, before the grammar and greedy choice.
- Prefix reuse (``prefix_cache``): ``"off"`` re-evaluates every prompt from scratch; ``"kv"``
  (default) keeps llama.cpp's context between prompts, so the shared part of consecutive prompts (the
  rubric, and the query for pairs of one query) is not evaluated again; ``"ram"`` adds a
  ``LlamaRAMCache`` of past states, which only pays off when a long prefix comes back after other
  prompts (re-annotating the same pairs). Measured with SmolLM2-135M on 2 cores
  (benchmarks/bench_prompted.py, pairs grouped by query): off 1.0-1.2 pairs/s, kv 3.0-3.5, ram
  2.3-2.6 (saving the state after every prompt costs about 0.1 s), hence the default.
- One prompt at a time (a lock guards the model); a prompt that fails (too long for ``n_ctx``, say)
  returns ``Completion(error=...)`` and the others go on.
- :meth:`LocalBackend.loglik` (``scoring: likelihood``): the model is loaded with ``logits_all=True`` (the output
  layer runs at every prompt token), each context and
  continuation is evaluated once, and the continuation's logprobs are read off the rows before its tokens. The
  ``kv`` and ``ram`` modes keep the tokens a text shares with the one evaluated before it; ``off`` evaluates each
  from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

import numpy as np

from assay.annotate.backends import GRADE_SCHEMA, Completion, LogLik
from assay.store import redact_text

log = logging.getLogger(__name__)

_BEFORE_GRADE = re.compile(r"\"grade\"\s*:\s*$")
PREFIX_CACHE_MODES = ("off", "kv", "ram")


class LocalBackend:
    name = "local"

    def __init__(self, cfg, prefix_cache: str = "kv", cache_bytes: int = 256 << 20,
                 n_threads: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise ImportError("the 'local' backend needs llama-cpp-python: pip install llama-cpp-python "
                              "(it compiles; CMAKE_ARGS='-DGGML_NATIVE=OFF' on shared machines)") from None
        from assay.models import resolve

        if prefix_cache not in PREFIX_CACHE_MODES:
            raise ValueError(f"prefix_cache must be one of {PREFIX_CACHE_MODES}, got {prefix_cache!r}")
        r = resolve(cfg.model)
        if r.kind != "gguf":
            raise ValueError(f"the local backend runs GGUF models; {cfg.model!r} resolved to a {r.kind} model "
                             f"({r.path}). Use a packaged GGUF alias such as 'smollm2-135m' or a .gguf path.")
        self.cfg = cfg
        self.model_id = f"{cfg.model}@local"
        self.prefix_cache = prefix_cache
        self.logits_all = getattr(cfg, "scoring", "generate") == "likelihood"
        n_threads = n_threads or int(os.environ.get("OMP_NUM_THREADS") or 2)
        # n_threads_batch too: llama-cpp-python evaluates prompts on cpu_count() threads unless told otherwise
        self.llm = llama_cpp.Llama(model_path=r.path, n_ctx=cfg.n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                   logits_all=self.logits_all, verbose=False)
        if prefix_cache == "ram":
            self.llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=cache_bytes))
        self.grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(GRADE_SCHEMA), verbose=False)
        digit_ids = [self.llm.tokenize(str(g).encode(), add_bos=False, special=False) for g in range(5)]
        if not all(len(t) == 1 for t in digit_ids):  # pragma: no cover - every tokenizer we ship has digit tokens
            log.warning("grade digits are not single tokens for %s; grade logprobs disabled", cfg.model)
            self._digits = None
        else:
            self._digits = np.array([t[0] for t in digit_ids])
        self._lock = threading.Lock()

    def complete(self, prompts: list[str]) -> list[Completion]:
        return [self._one(p) for p in prompts]

    def loglik(self, items: list[tuple[str, str]]) -> list[LogLik]:
        """log P(continuation | context) for each (context, continuation), summed over the continuation's tokens
        (see the module docstring); a text that fails (longer than ``n_ctx``) comes back with ``error`` set."""
        return [self._loglik(c, x) for c, x in items]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def _one(self, prompt: str) -> Completion:
        with self._lock:
            t0 = time.perf_counter()
            capture: dict = {}
            try:
                if self.prefix_cache == "off":
                    self.llm.reset()
                resp = self.llm.create_chat_completion(
                    messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=self.cfg.max_tokens,
                    repeat_penalty=1.0, grammar=self.grammar, logits_processor=[self._processor(capture)])
            except Exception as e:  # the contract: a failed prompt is returned, never raised
                ms = (time.perf_counter() - t0) * 1e3
                log.warning("local completion failed: %s", redact_text(str(e)))
                return Completion(None, None, None, ms, f"{e.__class__.__name__}: {redact_text(str(e))[:300]}")
            ms = (time.perf_counter() - t0) * 1e3
        text = resp["choices"][0]["message"].get("content") or ""
        tokens = resp.get("usage", {}).get("total_tokens")
        return Completion(text, capture.get("logprobs"), tokens, ms, None)

    def _loglik(self, context: str, continuation: str) -> LogLik:
        with self._lock:
            t0 = time.perf_counter()
            try:
                if not self.logits_all:
                    raise RuntimeError("this local backend was loaded for generation; a judge with scoring: "
                                       "likelihood loads its model with logits_all")
                llm = self.llm
                a = llm.tokenize(context.encode(), add_bos=True, special=False)
                b = llm.tokenize(continuation.encode(), add_bos=False, special=False)
                toks = a + b
                if not b or len(toks) > llm.n_ctx():
                    raise ValueError(f"{len(toks)} tokens ({len(b)} to score) do not fit n_ctx {llm.n_ctx()}"
                                     if b else "nothing to score: the continuation has no tokens")
                keep = 0
                if self.prefix_cache != "off":  # reuse the states of the tokens shared with the last text
                    have = llm.input_ids[: llm.n_tokens].tolist()
                    while keep < min(len(have), len(toks) - 1) and have[keep] == toks[keep]:
                        keep += 1
                llm.n_tokens = keep  # eval drops the cached states after it
                llm.eval(toks[keep:])
                rows = np.asarray(llm.scores[len(a) - 1: len(toks) - 1], dtype=np.float64)  # row i predicts i + 1
                m = rows.max(axis=1)
                lse = m + np.log(np.exp(rows - m[:, None]).sum(axis=1))
                lp = float((rows[np.arange(len(b)), b] - lse).sum())
            except Exception as e:  # the contract: a failed text is returned, never raised
                ms = (time.perf_counter() - t0) * 1e3
                log.warning("local scoring failed: %s", redact_text(str(e)))
                return LogLik(None, None, ms, f"{e.__class__.__name__}: {redact_text(str(e))[:300]}")
        return LogLik(lp, len(b), (time.perf_counter() - t0) * 1e3, None)

    def _processor(self, capture: dict):
        """A logits processor that records the digit logprobs at the step after ``"grade":``."""
        llm, digits = self.llm, self._digits

        def proc(input_ids, scores):
            if digits is None or "done" in capture:
                return scores
            if "n_prompt" not in capture:  # first call: input_ids is the prompt
                capture["n_prompt"] = len(input_ids)
            gen = llm.detokenize([int(t) for t in input_ids[capture["n_prompt"]:]]).decode("utf-8", "ignore")
            if _BEFORE_GRADE.search(gen):
                sc = np.asarray(scores, dtype=np.float64)
                m = sc.max()
                lse = m + np.log(np.exp(sc - m).sum())
                capture["logprobs"] = {str(g): float(sc[d] - lse) for g, d in enumerate(digits)}
            elif "logprobs" in capture:
                capture["done"] = True  # the grade digit has been generated
            return scores

        return proc
