"""Prompt and classifier-input templates: the single place where judge text is rendered.

Templates are Jinja2 files in ``prompts/`` at the repository root, shipped in the wheel as
``assay/prompts``. Annotation, classifier training and evaluation all render through
:func:`render`, so training and inference see identical text. Every template is versioned by
the sha256 of its content (:func:`template_sha`), which is stored with each label.

Product text is untrusted input. :func:`untrusted` strips control characters, collapses
whitespace, truncates, and removes anything that looks like our delimiters, so a title cannot
close the ``<product>`` block it is placed in; the judge prompt tells the model that text inside
the block is data, never instructions. Small models still copy an answer written into the data
(measured with SmolLM2-135M: a literal ``{"grade": 4}`` in a title raised the expected grade of
irrelevant pairs by 0.55), so :func:`untrusted` also removes answer spoofing: JSON-like objects,
grade or score assignments (``grade: 4``, ``"relevance" = 3``, ``answer 4``), role prefixes
(``System:``) and "ignore the instructions" phrases. None of these occur in real product text
that a judge needs; the patterns are listed in ``_SPOOF`` and replaced by a space.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

_REPO_PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
_DELIMS = re.compile(r"</?\s*(product|query|data|system|user|assistant|instructions?)\s*>|<\|[^|>]{0,40}\|>|```",
                     re.IGNORECASE)
# answer spoofing (see the module docstring); order matters: objects first, then loose assignments
_SPOOF = re.compile(
    r"\{[^{}]{0,200}\}"                                                        # a JSON-like object
    r"|[{}]"                                                                    # stray braces
    r"|[\"']?\b(?:grade|score|rating|relevance|label|confidence|answer)\b[\"']?"
    r"\s*(?:[:=]|\bis\b|\bof\b|\bwith\b)?\s*[\"']?\d+(?:\.\d+)?\b[\"']?"           # "grade": 4, answer 4, score is 3
    r"|\b(?:ignore|disregard|forget|override)\b(?:\W+\w+){0,4}?\W+(?:instructions?|prompts?|rules?|rubric)\b"
    r"|\b(?:system|assistant|user|developer)\s*:",                              # role prefixes
    re.IGNORECASE)


def prompts_dir() -> Path:
    """The templates folder: the repository's prompts/ in a checkout, else the installed copy."""
    if _REPO_PROMPTS.is_dir():
        return _REPO_PROMPTS
    try:
        return Path(str(resources.files("assay") / "prompts"))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        raise FileNotFoundError("assay prompt templates not found (prompts/ or assay/prompts)") from None


@functools.lru_cache(maxsize=None)
def _env(root: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(root), undefined=jinja2.StrictUndefined,
                             autoescape=False, keep_trailing_newline=False, trim_blocks=True, lstrip_blocks=True)
    env.filters["untrusted"] = untrusted
    env.filters["attrs"] = format_attributes
    return env


def _path(name: str) -> Path:
    p = Path(name)
    if p.is_absolute() or p.exists() and p.is_file():
        return p.resolve()
    return prompts_dir() / name


def available() -> list[str]:
    return sorted(p.name for p in prompts_dir().glob("*.j2"))


def load(name: str) -> jinja2.Template:
    p = _path(name)
    if not p.exists():
        raise KeyError(f"Unknown template {name!r}. Available: {available()}")
    return _env(str(p.parent)).get_template(p.name)


def template_sha(name: str) -> str:
    """sha256 (first 16 hex) of the template file's content: its version."""
    p = _path(name)
    if not p.exists():
        raise KeyError(f"Unknown template {name!r}. Available: {available()}")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def render(name: str, **ctx: Any) -> str:
    return load(name).render(**ctx).strip()


def untrusted(text: Any, max_chars: int = 300) -> str:
    """Make catalog text safe to place inside a delimited block of a prompt."""
    if text is None:
        return ""
    s = str(text)
    s = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in s)
    s = _DELIMS.sub(" ", s)
    s = _SPOOF.sub(" ", s)
    s = re.sub(r"\s+", " ", s).strip()
    if len(s) > max_chars:
        s = s[:max_chars].rstrip() + "…"
    return s


def format_attributes(raw: Any, max_items: int = 8) -> str:
    """A JSON attributes object as 'k: v; k: v' (untrusted-cleaned)."""
    if raw is None or raw == "":
        return ""
    obj = raw
    if isinstance(raw, str):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return untrusted(raw, 200)
    if not isinstance(obj, dict):
        return untrusted(obj, 200)
    parts = [f"{untrusted(k, 40)}: {untrusted(v, 60)}" for k, v in list(obj.items())[:max_items]]
    return "; ".join(parts)
