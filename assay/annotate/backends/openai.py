"""OpenAI-compatible backend: OpenAI, ``vllm serve``, ``llama_cpp.server`` through the ``openai`` client.

Each prompt is one chat request (user message), temperature 0, ``max_tokens=cfg.max_tokens``,
``logprobs=True, top_logprobs=5``, and structured output. At most ``cfg.concurrency`` requests are
in flight (an ``asyncio.Semaphore``); each has a hard limit of ``cfg.timeout_s``.

Retries: 429, 408/409, 5xx, timeouts, connection errors and malformed 200 answers (a body cut off, an empty
body, no choices) are retried up to ``cfg.max_retries``
times with exponential backoff and full jitter (``backoff_s * 2**attempt``, capped at ``max_backoff_s``,
at least a ``Retry-After`` the server sends). The client's own retries are off, so the retries counted
are ours. A prompt that still fails returns ``Completion(text=None, error=...)``; nothing is raised.

Request options are stepped down when a server rejects them (400/422, or a 5xx whose message names
``response_format`` or ``logprobs``, as ``llama_cpp.server`` sends): first ``logprobs`` when the
error names them, else the response format, from ``json_schema`` to ``json_object`` with the schema
(the llama.cpp / Anyscale extension), to plain ``json_object``, to none; the level that worked is
remembered for the next requests. An error that persists at every level (a prompt too long for the
context, say) fails that prompt only and changes nothing.

The API key is read from the environment variable ``cfg.api_key_env`` (``sk-no-key`` when unset, for
local servers). It is passed to the client only; it is never logged or stored: error texts (which servers
may fill with the request's URL or headers) and the logged ``base_url`` go through ``assay.store.redact_text``.

:meth:`OpenAIBackend.loglik` (``scoring: likelihood``) sends each context + continuation to ``/v1/completions``
with ``echo=True, logprobs=1, max_tokens=1`` and sums the prompt logprobs of the tokens that start inside the
continuation (``text_offset``). ``vllm serve`` answers it. ``llama_cpp.server`` answers with each prompt token's
logprob one position late (abetlen/llama-cpp-python#1983), so its scores are wrong; llama.cpp's ``llama-server``
sends no prompt logprobs (those pairs fail, saying so); OpenAI's own API refuses echo for its chat models (the 400
fails those pairs with its message). The same retries apply.

:meth:`OpenAIBackend.complete` is synchronous: it runs :meth:`acomplete` in a fresh event loop with
``asyncio.run``; called from a thread that already runs a loop (a notebook, an async app) it runs
that loop in a worker thread and blocks until done. Async callers use ``await backend.acomplete(...)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import time

from assay.annotate.backends import GRADE_SCHEMA, Completion, LogLik
from assay.annotate.parse import grade_token_logprobs
from assay.store import redact_text

log = logging.getLogger(__name__)

# response_format levels, strictest first
FORMATS = ("json_schema", "json_object_schema", "json_object", "none")
TOP_LOGPROBS = 5
_RETRY_STATUS = {408, 409, 429}


def _response_format(level: str) -> dict | None:
    if level == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "grade", "strict": True, "schema": GRADE_SCHEMA}}
    if level == "json_object_schema":
        return {"type": "json_object", "schema": GRADE_SCHEMA}
    if level == "json_object":
        return {"type": "json_object"}
    return None


class _Fatal(Exception):
    """A non-retryable error at every option level."""


class MalformedResponse(RuntimeError):
    """A 200 answer that is not a usable chat completion (retried like a transient error)."""


class OpenAIBackend:
    name = "openai"

    def __init__(self, cfg, backoff_s: float = 0.5, max_backoff_s: float = 20.0, top_logprobs: int = TOP_LOGPROBS):
        try:
            import openai  # noqa: F401
        except ImportError:
            raise ImportError("the 'openai' backend needs the openai client: pip install openai") from None
        self.cfg = cfg
        self.model = cfg.model
        self.model_id = f"{cfg.model}@openai"
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.top_logprobs = top_logprobs
        self._format_level = 0  # index into FORMATS; only ever goes down (up the index)
        self._logprobs = True
        self.stats = {"requests": 0, "retries": 0, "failed": 0, "downgrades": 0}
        self._key = ""  # the API key of the client in use, redacted from every error text

    # -- public ---------------------------------------------------------------------------------------
    def complete(self, prompts: list[str]) -> list[Completion]:
        """One Completion per prompt, in order. Synchronous; see the module docstring."""
        return _run_sync(self.acomplete(prompts)) if prompts else []

    def loglik(self, items: list[tuple[str, str]]) -> list[LogLik]:
        """One LogLik per (context, continuation), in order (see the module docstring). Synchronous."""
        return _run_sync(self.aloglik(items)) if items else []

    async def acomplete(self, prompts: list[str]) -> list[Completion]:
        return await self._each(prompts, self._one)

    async def aloglik(self, items: list[tuple[str, str]]) -> list[LogLik]:
        return await self._each(items, self._one_loglik)

    async def _each(self, items: list, one) -> list:
        """``one(client, sem, item, key)`` for every item, at most ``cfg.concurrency`` in flight, in order."""
        import openai

        key = os.environ.get(self.cfg.api_key_env) or "sk-no-key"
        self._key = key
        client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=key, max_retries=0,
                                    timeout=self.cfg.timeout_s)
        sem = asyncio.Semaphore(self.cfg.concurrency)
        try:
            return list(await asyncio.gather(*(one(client, sem, x, key) for x in items)))
        finally:
            await client.close()

    def close(self) -> None:
        """Nothing held between calls (each ``complete`` opens and closes its client)."""

    # -- one prompt -----------------------------------------------------------------------------------
    async def _one(self, client, sem, prompt: str, key: str) -> Completion:
        async with sem:
            t0 = time.perf_counter()
            try:
                resp = await self._with_retries(lambda: self._with_fallbacks(client, prompt))
            except Exception as e:  # the contract: a failed prompt is returned, never raised
                self.stats["failed"] += 1
                err = _describe(e, key)
                log.warning("prompt failed after retries: %s", err)
                return Completion(None, None, None, (time.perf_counter() - t0) * 1e3, err)
            ms = (time.perf_counter() - t0) * 1e3
        choice = resp.choices[0] if resp.choices else None
        text = choice.message.content if choice is not None and choice.message is not None else None
        usage = getattr(resp, "usage", None)
        tokens = getattr(usage, "total_tokens", None) if usage is not None else None
        return Completion(text if text is not None else "", _logprobs_of(choice), tokens, ms, None)

    async def _one_loglik(self, client, sem, item: tuple[str, str], key: str) -> LogLik:
        context, continuation = item
        text = context + continuation
        async with sem:
            t0 = time.perf_counter()
            try:
                resp = await self._with_retries(lambda: self._score_request(client, text))
                lp, n = _continuation_logprob(resp.choices[0], len(context), len(text))
            except Exception as e:  # the contract: a failed text is returned, never raised
                self.stats["failed"] += 1
                err = _describe(e, key)
                log.warning("scoring failed after retries: %s", err)
                return LogLik(None, None, (time.perf_counter() - t0) * 1e3, err)
        return LogLik(lp, n, (time.perf_counter() - t0) * 1e3, None)

    async def _score_request(self, client, text: str):
        self.stats["requests"] += 1
        return await asyncio.wait_for(
            client.completions.create(model=self.model, prompt=text, max_tokens=1, temperature=0, echo=True,
                                      logprobs=1, timeout=self.cfg.timeout_s), timeout=self.cfg.timeout_s)

    async def _with_retries(self, attempt_once):
        """``await attempt_once()`` (one request) until it answers, retrying what the module docstring lists."""
        import openai

        attempt = 0
        while True:
            try:
                resp = await attempt_once()
                if not getattr(resp, "choices", None):
                    raise MalformedResponse("the server answered 200 without any choices")
                return resp
            except (openai.APIConnectionError, asyncio.TimeoutError) as e:  # APITimeoutError included
                retry_after = None
                err: Exception = e
            except (json.JSONDecodeError, openai.APIResponseValidationError, MalformedResponse) as e:
                retry_after = None  # a body cut off, empty or not shaped like a completion: ask again
                err = e
            except openai.APIStatusError as e:
                if not (e.status_code in _RETRY_STATUS or e.status_code >= 500):
                    raise
                retry_after = _retry_after(e)
                err = e
            if attempt >= self.cfg.max_retries:
                raise err
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.max_backoff_s))
            attempt += 1
            self.stats["retries"] += 1
            log.debug("retry %d/%d in %.2fs after %s", attempt, self.cfg.max_retries, delay,
                      _describe(err, self._key))
            await asyncio.sleep(delay)

    async def _with_fallbacks(self, client, prompt: str):
        """One attempt; on a 400/422 that names our options, step them down and try again."""
        import openai

        level, logprobs = self._format_level, self._logprobs
        first_error = None
        while True:
            try:
                resp = await self._request(client, prompt, FORMATS[level], logprobs)
            except openai.APIStatusError as e:
                if not _rejects_option(e):
                    raise
                first_error = first_error or e
                msg = _describe(e).lower()
                if logprobs and ("logprob" in msg or level == len(FORMATS) - 1):
                    logprobs = False
                elif level < len(FORMATS) - 1:
                    level += 1
                else:
                    raise first_error
                continue
            if (level, logprobs) != (self._format_level, self._logprobs):
                if level > self._format_level or logprobs != self._logprobs:
                    self.stats["downgrades"] += 1
                    log.info("server %s rejected %s; using response_format=%s, logprobs=%s",
                             redact_text(self.cfg.base_url or "api.openai.com"), _describe(first_error, self._key),
                             FORMATS[level], logprobs)
                self._format_level = max(self._format_level, level)
                self._logprobs = self._logprobs and logprobs
            return resp

    async def _request(self, client, prompt: str, fmt: str, logprobs: bool):
        kwargs: dict = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                        "temperature": 0, "max_tokens": self.cfg.max_tokens}
        rf = _response_format(fmt)
        if rf is not None:
            kwargs["response_format"] = rf
        if logprobs:
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)
        self.stats["requests"] += 1
        return await asyncio.wait_for(client.chat.completions.create(**kwargs, timeout=self.cfg.timeout_s),
                                      timeout=self.cfg.timeout_s)


def _run_sync(coro):
    """Run ``coro`` to its end from synchronous code, also when the calling thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:  # called from inside a running loop
        return ex.submit(asyncio.run, coro).result()


def _continuation_logprob(choice, start: int, end: int) -> tuple[float, int]:
    """(summed logprob, tokens) of the echoed prompt tokens that start at or after character ``start`` and before
    ``end`` (the generated token after the prompt is left out)."""
    lp = getattr(choice, "logprobs", None)
    offsets, values = getattr(lp, "text_offset", None), getattr(lp, "token_logprobs", None)
    if not offsets or values is None or len(offsets) != len(values):
        raise MalformedResponse("the server returned no prompt logprobs (it must support echo with logprobs on "
                                "/v1/completions)")
    picked = [v for o, v in zip(offsets, values) if start <= o < end]
    if not picked or any(v is None for v in picked):
        raise MalformedResponse(f"no logprob for the continuation's tokens (offsets {offsets[:3]}...)")
    return float(sum(picked)), len(picked)


def _logprobs_of(choice) -> dict[str, float] | None:
    lp = getattr(choice, "logprobs", None) if choice is not None else None
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        return None
    seq = [(t.token, t.logprob, {x.token: x.logprob for x in (t.top_logprobs or [])}) for t in content]
    return grade_token_logprobs(seq)


def _rejects_option(e) -> bool:
    """A 400/422, or a 5xx whose message names our options (llama_cpp.server answers its request
    validation errors with 500)."""
    if e.status_code in (400, 422):
        return True
    msg = str(e).lower()
    return e.status_code >= 500 and any(k in msg for k in ("response_format", "json_schema", "logprob"))


def _retry_after(e) -> float | None:
    try:
        v = e.response.headers.get("retry-after")
        return float(v) if v is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _describe(e: BaseException | None, key: str = "") -> str:
    """One line for an error, safe to log and store: the API key (servers echo it back) and anything
    :func:`assay.store.redact_text` finds (URL credentials, ``api_key=``/``token=`` values, bearer strings) are
    replaced by ***; redacted before it is cut to 300 characters, so a cut cannot leave half a secret."""
    if e is None:
        return ""
    if isinstance(e, asyncio.TimeoutError):
        return "TimeoutError: no answer within the timeout"
    status = getattr(e, "status_code", None)
    msg = str(e) or e.__class__.__name__
    if key and key != "sk-no-key":
        msg = msg.replace(key, "***")
    return f"{e.__class__.__name__}{f' ({status})' if status else ''}: {redact_text(msg)[:300]}"
