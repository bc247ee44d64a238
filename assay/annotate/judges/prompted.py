"""Prompted LLM judge: a template plus a structured-output backend.

Reads: a JudgeConfig of kind ``prompted`` (``backend``, ``model``, ``template_name``...) and the
pairs to grade. Writes nothing; :meth:`PromptedJudge.predict` returns a JudgeOutput where, per pair:

| parse_status | probs | raw |
|---|---|---|
| OK | from the logprobs of the grade tokens at the grade position (:func:`probs_from_logprobs`) | model text |
| OK_JSON | from the stated grade and confidence (:func:`probs_from_json`) | model text |
| UNPARSED | NaN (no grade could be read) | model text |
| FAILED | NaN (the call failed after the backend's retries) | the error text |

Each prompt is ``cfg.template_name`` rendered through :func:`assay.annotate.prompts.render` with the
pair's fields and the few-shot ``examples`` set by :meth:`PromptedJudge.set_examples` (none by
default); ``prompt_sha`` is the template's content hash. ``extra`` holds the stated grade and
confidence per pair and the count of each parse status.

``scoring: likelihood`` asks the model nothing. Per pair it scores the query's own tokens twice through the
backend's ``loglik``: after the product's context (``judge_likelihood.j2``) and after the same template without a
product (once per query text). The score is the pointwise mutual information per query token, ``(log P(query |
product) - log P(query)) / tokens``: how much the product makes the query likelier, so a query that is likely
anyway (short, common words) gains nothing from it. Probabilities come from :func:`probs_from_pmi` (an ordered
logit over ``likelihood_cutpoints``; the calibrator corrects it per grade); ``parse_status`` is OK, or FAILED with
the error as ``raw``; ``raw`` holds the score and both logprobs; ``extra["pmi"]`` the scores.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from assay.annotate.backends import Backend, get_backend
from assay.annotate.base import FAILED, N_GRADES, OK, OK_JSON, UNPARSED, JudgeOutput, Pair
from assay.annotate.parse import parse_grade, probs_from_json, probs_from_logprobs, probs_from_pmi
from assay.annotate.prompts import render, template_sha, untrusted

log = logging.getLogger(__name__)


class PromptedJudge:
    kind = "prompted"

    def __init__(self, cfg, backend: Backend | None = None):
        if cfg.kind != "prompted":
            raise ValueError(f"PromptedJudge needs a judge config of kind 'prompted', got {cfg.kind!r}")
        self.cfg = cfg
        self.name = cfg.name
        self.template = cfg.template_name
        self.prompt_sha = template_sha(self.template)  # also checks the template exists
        self.backend = backend if backend is not None else get_backend(cfg)
        self.model_id = self.backend.model_id
        self.examples: list[dict] = []

    @classmethod
    def load(cls, cfg, artifacts: Path | None = None) -> "PromptedJudge":
        """Build the judge and its backend; a prompted judge has no trained artifacts."""
        return cls(cfg)

    def set_examples(self, examples: list) -> None:
        """Few-shot examples: dicts (or objects) with ``query``, ``title`` and ``grade`` 0-4.
        With ``cfg.few_shot > 0`` at most that many are used (the first ones)."""
        out = []
        for i, ex in enumerate(examples or []):
            get = ex.get if isinstance(ex, dict) else (lambda k, _ex=ex: getattr(_ex, k, None))
            q, t, g = get("query"), get("title"), get("grade")
            if not q or not t or isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 0 <= g < N_GRADES:
                raise ValueError(f"few-shot example {i} must have a non-empty query and title and an integer grade "
                                 f"0-4; got query={q!r}, title={t!r}, grade={g!r}")
            out.append({"query": str(q), "title": str(t), "grade": int(g)})
        if self.cfg.few_shot and len(out) > self.cfg.few_shot:
            out = out[: self.cfg.few_shot]
        self.examples = out

    def prompt(self, pair: Pair) -> str:
        """The exact text sent to the model for one pair."""
        return render(self.template, examples=self.examples, **pair.context())

    def predict(self, pairs: list[Pair], progress: bool = False) -> JudgeOutput:
        if self.cfg.scoring == "likelihood":
            return self._predict_likelihood(pairs, progress)
        n = len(pairs)
        probs, raw, status, latency, tokens = _blank_outputs(n)
        stated = np.full(n, -1, dtype=np.int8)
        conf = np.full(n, np.nan, dtype=np.float32)
        bs = max(1, self.cfg.batch_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"judge {self.name}", unit="pair")
        for start in range(0, n, bs):
            chunk = pairs[start:start + bs]
            outs = self.backend.complete([self.prompt(p) for p in chunk])
            for j, c in enumerate(outs):
                i = start + j
                latency[i] = c.latency_ms
                tokens[i] = c.tokens or 0
                if c.error is not None or c.text is None:
                    raw[i], status[i] = c.error or "no text returned", FAILED
                    continue
                raw[i] = c.text
                g, cf = parse_grade(c.text)
                if g is not None:
                    stated[i] = g
                    conf[i] = np.nan if cf is None else cf
                p = probs_from_logprobs(c.grade_logprobs) if c.grade_logprobs else None
                if p is not None:
                    probs[i], status[i] = p, OK
                elif g is not None:
                    probs[i], status[i] = probs_from_json(g, cf), OK_JSON
                else:
                    status[i] = UNPARSED
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        counts = Counter(status)
        if counts[UNPARSED] or counts[FAILED]:
            log.info("judge %s: %d pairs, %d unparsed, %d failed", self.name, n, counts[UNPARSED], counts[FAILED])
        return JudgeOutput(probs, raw, status, latency, tokens,
                           extra={"stated_grade": stated, "stated_confidence": conf, "status_counts": dict(counts)})

    def _predict_likelihood(self, pairs: list[Pair], progress: bool) -> JudgeOutput:
        if not hasattr(self.backend, "loglik"):
            raise ValueError(f"judge {self.name}: scoring: likelihood needs a backend that scores text (local, "
                             f"openai); {self.backend.name!r} does not")
        n = len(pairs)
        probs, raw, status, latency, tokens = _blank_outputs(n)
        pmi = np.full(n, np.nan, dtype=np.float32)
        neutral_ctx = render(self.template, **{k: "" for k in Pair("", "", "", "").context()})
        neutral: dict = {}  # query continuation -> its LogLik without a product (successes only)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"judge {self.name}", unit="pair")
        bs = max(1, self.cfg.batch_size)
        for start in range(0, n, bs):
            chunk = pairs[start:start + bs]
            conts = [" " + untrusted(p.query, 200) for p in chunk]
            need = [c for c in dict.fromkeys(conts) if c not in neutral]
            fresh = dict(zip(need, self.backend.loglik([(neutral_ctx, c) for c in need])))
            neutral.update({c: r for c, r in fresh.items() if r.error is None})
            outs = self.backend.loglik([(self.prompt(p), c) for p, c in zip(chunk, conts)])
            for j, (r, c) in enumerate(zip(outs, conts)):
                i, u = start + j, neutral.get(c) or fresh[c]
                latency[i], tokens[i] = r.latency_ms, r.tokens or 0
                if r.error is not None or u.error is not None or not r.tokens:
                    raw[i] = r.error or (f"the query alone: {u.error}" if u.error else "no query tokens")
                    continue
                pmi[i] = (r.logprob - u.logprob) / r.tokens
                raw[i] = (f"pmi/token {pmi[i]:.4f} (log P(query) {r.logprob:.3f} after the product, {u.logprob:.3f} "
                          f"without it; {r.tokens} tokens)")
                probs[i], status[i] = probs_from_pmi(float(pmi[i]), self.cfg.likelihood_cutpoints), OK
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        counts = Counter(status)
        if counts[FAILED]:
            log.info("judge %s: %d pairs, %d failed", self.name, n, counts[FAILED])
        return JudgeOutput(probs, raw, status, latency, tokens, extra={"pmi": pmi, "status_counts": dict(counts)})

    def close(self) -> None:
        self.backend.close()


def _blank_outputs(n: int) -> tuple:
    """(probs NaN, raw None, status FAILED, latency 0, tokens 0) for ``n`` pairs: what a pair keeps until graded."""
    return (np.full((n, N_GRADES), np.nan, dtype=np.float32), [None] * n, [FAILED] * n, np.zeros(n, dtype=np.float64),
            np.zeros(n, dtype=np.int64))

