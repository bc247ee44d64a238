"""Read grades out of prompted-LLM outputs; turn them into class probabilities over grades 0-4.

Contract:
- :func:`parse_grade` takes any model text and returns ``(grade, confidence)``; either is ``None``
  when it cannot be read. It never raises (STYLE: an LLM output parses to ``grade | None``; the
  caller counts and stores the failures).
- :func:`grade_token_logprobs` finds, in a generated token sequence, the token where the grade digit
  was produced and returns the top logprobs at that position.
- :func:`probs_from_logprobs` turns those logprobs into a probability vector (grades absent from
  the top-k get 0); :func:`probs_from_json` turns a stated grade and confidence into one.

Every vector returned sums to 1, has ``N_GRADES`` entries and is float32.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Iterable

import numpy as np

from assay.annotate.base import N_GRADES

log = logging.getLogger(__name__)

GRADE_KEYS = ("grade", "relevance", "relevance_grade", "label", "score", "rating")
CONF_KEYS = ("confidence", "conf", "probability", "certainty")
GRADE_NAMES = {"exact": 4, "close": 3, "substitute": 2, "complement": 1, "embarrassing": 0, "irrelevant": 0}
DEFAULT_CONFIDENCE = 0.6  # used by probs_from_json when the model stated none

_DECODER = json.JSONDecoder()
# a lone digit 0-4 after a "grade" word: "Grade: 3", "I'd grade it 2", "'grade': 4", "grade = 1/4"
_GRADE_WORD = re.compile(r"\bgrad(?:e|ed|ing)\b[^0-9{}\n]{0,24}?(?<![\d.])([0-4])(?![\d]|\.\d)", re.IGNORECASE)
_CONF_WORD = re.compile(r"\bconfidence\b[^0-9\n]{0,6}?(\d*\.?\d+)(?![\d.])(%?)", re.IGNORECASE)
_LONE_DIGIT = re.compile(r"^\W*([0-4])\W*$")
_RANGE = re.compile(r"\(?\b[0-4]\s*(?:-|\u2013|to)\s*[0-4]\b\)?")  # "(0-4)", "0 to 4": a scale, not a grade
# text generated before the grade digit, in a JSON answer: `{"grade": ` or `{'grade': "`
_BEFORE_GRADE = re.compile(r"[\"']?grade[\"']?\s*:\s*[\"']?\s*$", re.IGNORECASE)
_TOKEN_JUNK = " \t\n\r\u2581\u0120\"'"  # whitespace and the SentencePiece / GPT-2 space markers


def _as_grade(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        if isinstance(v, float) and (not math.isfinite(v) or v != int(v)):
            return None
        g = int(v)
        return g if 0 <= g < N_GRADES else None
    if isinstance(v, str):
        s = v.strip().lower()
        if s in GRADE_NAMES:
            return GRADE_NAMES[s]
        try:
            return _as_grade(float(s)) if s else None
        except ValueError:
            return None
    return None


def _as_conf(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        s = v.strip().rstrip("%")
        try:
            f = float(s) / (100.0 if v.strip().endswith("%") else 1.0)
        except ValueError:
            return None
    elif isinstance(v, (int, float)):
        f = float(v)
    else:
        return None
    return float(min(1.0, max(0.0, f))) if math.isfinite(f) else None


def _get(obj: dict, keys: tuple[str, ...]) -> tuple[bool, Any]:
    low = {str(k).strip().lower(): v for k, v in obj.items()}
    for k in keys:
        if k in low:
            return True, low[k]
    return False, None


def _json_objects(text: str) -> Iterable[dict]:
    """Every JSON object that decodes, left to right (nested ones are found inside their parent)."""
    i = text.find("{")
    while i != -1:
        try:
            obj, end = _DECODER.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            yield obj
            for v in obj.values():  # {"answer": {"grade": 3}}
                if isinstance(v, dict):
                    yield v
        i = text.find("{", end)


def _parse(text: str) -> tuple[int | None, float | None]:
    for obj in _json_objects(text):
        has, gv = _get(obj, GRADE_KEYS)
        if not has:
            continue
        grade = _as_grade(gv)
        _, cv = _get(obj, CONF_KEYS)
        return (grade, _as_conf(cv) if grade is not None else None)
    m = _GRADE_WORD.search(_RANGE.sub(" ", text))
    if m is None:
        m = _LONE_DIGIT.match(text)
    if m is None:
        return None, None
    conf = None
    c = _CONF_WORD.search(text)
    if c is not None:
        conf = _as_conf(c.group(1) + c.group(2))
    return int(m.group(1)), conf


def parse_grade(text: str | None) -> tuple[int | None, float | None]:
    """``(grade 0-4 | None, confidence in [0, 1] | None)`` from a model's answer. Never raises.

    Order: the first JSON object holding a grade key (``grade``, also ``relevance``, ``label``,
    ``score``...; the grade may be an int, an integral float, a numeric string or a grade name such
    as "exact"); a grade outside 0-4 there gives ``None``. Otherwise a lone digit 0-4 after a
    "grade" word ("Grade: 3", ``'grade': 2`` in truncated or single-quoted JSON), or an answer that is
    only a digit. Confidence is optional, numeric or a percent string, clipped to [0, 1].
    """
    if not text or not isinstance(text, str):
        return None, None
    try:
        return _parse(text)
    except Exception as e:  # a parser bug must not stop a batch; the pair is stored as UNPARSED
        log.warning("parse_grade failed on %r: %s", text[:200], e)
        return None, None


def _grade_of_token(tok: str) -> int | None:
    t = tok.strip(_TOKEN_JUNK)
    return int(t) if len(t) == 1 and t in "01234" else None


def probs_from_logprobs(top_logprobs: dict[str, float] | None) -> np.ndarray | None:
    """Class probabilities from the logprobs of the grade tokens at the grade position.

    Keys are tokens as the backend reports them ("3", " 3", "▁3", "Ġ3" all mean grade 3; variants
    of one grade are summed). Only grade tokens count; their probabilities are renormalised to 1, so a
    grade missing from the top-k gets 0. ``None`` when no grade token is present.
    """
    if not top_logprobs:
        return None
    p = np.zeros(N_GRADES, dtype=np.float64)
    for tok, lp in top_logprobs.items():
        g = _grade_of_token(str(tok))
        if g is None or lp is None or math.isnan(float(lp)):
            continue
        p[g] += math.exp(float(lp))
    s = p.sum()
    if not s > 0:
        return None
    return (p / s).astype(np.float32)


def probs_from_json(grade: int, confidence: float | None) -> np.ndarray:
    """A probability vector from a stated grade and confidence.

    Rule: the stated grade gets ``c`` (``DEFAULT_CONFIDENCE`` = 0.6 when none was stated); the rest,
    ``1 - c``, is spread over the other grades with weight ``2 ** -(d - 1)`` at distance ``d`` from
    the stated grade (neighbours 1, then 1/2, 1/4, 1/8), normalised. ``c`` is raised where needed so
    the stated grade stays the argmax: ``c >= s / (1 + s) + 0.01`` with ``s`` the largest share of
    the rest, so ``c`` is at least 0.26 (grade 2) to 0.36 (grades 0 and 4). Example: grade 3,
    c = 0.8 gives ``[0.018, 0.036, 0.073, 0.8, 0.073]``.
    """
    g = int(grade)
    if not 0 <= g < N_GRADES:
        raise ValueError(f"grade must be an integer 0-{N_GRADES - 1}, got {grade!r}")
    c = DEFAULT_CONFIDENCE if confidence is None or not math.isfinite(float(confidence)) else float(confidence)
    d = np.abs(np.arange(N_GRADES) - g).astype(np.float64)
    w = np.where(d > 0, 2.0 ** -(d - 1), 0.0)
    w /= w.sum()
    s = w.max()
    c = min(1.0, max(c, s / (1 + s) + 0.01))
    p = w * (1.0 - c)
    p[g] = c
    return (p / p.sum()).astype(np.float32)


def grade_token_logprobs(tokens: Iterable[tuple[str, float, dict[str, float] | None]]) -> dict[str, float] | None:
    """The top logprobs at the position where the grade digit was generated.

    ``tokens`` is the generated sequence as ``(token_text, logprob, top_logprobs)``. The grade position
    is the first token that is a digit 0-4 right after ``"grade":`` in the text generated so far;
    failing that, ``None`` (the caller falls back to the parsed JSON). The chosen token is added to the
    returned dict when the server left it out of its top-k.
    """
    text = ""
    for tok, lp, top in tokens:
        tok = tok or ""
        if _grade_of_token(tok) is not None and _BEFORE_GRADE.search(text):
            out = dict(top or {})
            if tok not in out and lp is not None:
                out[tok] = float(lp)
            return out
        text += tok
    return None


def probs_from_pmi(pmi: float, cutpoints) -> np.ndarray:
    """Grade probabilities from a query-likelihood score (``scoring: likelihood``: PMI in nats per query token): an
    ordered logit of slope 1, ``P(grade >= k) = sigmoid(pmi - cutpoints[k - 1])`` for k = 1..4, so a higher score
    moves mass to higher grades and never the other way. ``cutpoints`` must increase. Example: cutpoints
    ``[0, 1, 2, 3]`` and a PMI of 2.5 give ``[0.076, 0.107, 0.195, 0.245, 0.378]``."""
    c = np.asarray(cutpoints, dtype=np.float64)
    if c.shape != (N_GRADES - 1,) or (np.diff(c) <= 0).any():
        raise ValueError(f"cutpoints must be {N_GRADES - 1} increasing numbers, got {list(c)}")
    at_least = np.concatenate([[1.0], 1.0 / (1.0 + np.exp(-(float(pmi) - c))), [0.0]])
    return (at_least[:-1] - at_least[1:]).astype(np.float32)

