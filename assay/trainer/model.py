"""The two-tower retriever (docs/architecture.md, "Model"): a query tower and an item tower built from a
sentence-transformers encoder (default all-MiniLM-L6-v2, packaged offline).

Each tower is a plain ``SentenceTransformer``: Transformer -> mean Pooling -> [Dense projection] -> [Normalize].

- ``shared_towers``: the two towers share the Transformer (and the projection when the query has one head);
  otherwise the item tower is a copy that trains on its own.
- ``projection_dim``: a linear projection after pooling (for example 384 -> 256), initialised semi-orthogonal so
  the base encoder's cosines survive the cut at step 0.
- ``query_heads`` > 1: the DPSR multi-head query tower. The query's Dense layer emits ``heads`` vectors; each is
  normalised, and a query scores an item with soft-dot attention ``sum_h softmax_h(beta * s_h) * s_h`` over the
  heads' cosines ``s_h``. The saved query tower has no Normalize module (it emits the heads concatenated); the
  manifest records ``heads`` and ``beta`` so that serving splits and normalises them the same way.

Item text is :func:`assay.text.item_text`, the template mining, indexing and serving use. A checkpoint folder holds
``query/`` and ``item/`` (each loads with ``sentence_transformers.SentenceTransformer``) and ``twotower.json``
(text template version, dimension, heads, beta, max lengths, base model and its sha, shared or not).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from assay import models
from assay.text import TEXT_TEMPLATE_VERSION, digest

log = logging.getLogger(__name__)

MANIFEST = "twotower.json"


def _modules():
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling
    except ImportError:  # pragma: no cover - older releases
        from sentence_transformers.models import Dense, Normalize, Pooling
    return Dense, Normalize, Pooling


def _semi_orthogonal(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(out_features, in_features), min(out_features, in_features), generator=g)
    q, _ = torch.linalg.qr(a)
    w = q if out_features >= in_features else q.T
    if out_features == in_features:
        return torch.eye(out_features)
    return w[:out_features, :in_features].contiguous()


def _dense(in_features: int, out_features: int, heads: int, seed: int):
    Dense, _, _ = _modules()
    if out_features == in_features:
        base = torch.eye(in_features)
    else:
        base = _semi_orthogonal(out_features, in_features, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # heads start as the same projection plus a little noise, so they can specialise
    w = torch.cat([base + (0.02 * torch.randn(base.shape, generator=g) if h else 0) for h in range(heads)])
    return Dense(in_features, out_features * heads, bias=False, activation_function=nn.Identity(), init_weight=w)


class TwoTower(nn.Module):
    """Query and item towers. ``encode_queries`` gives (B, d) or (B, H, d) unit vectors, ``encode_items`` (N, d);
    ``score`` gives the (B, N) similarity the losses consume."""

    def __init__(self, query_tower, item_tower, *, info: dict):
        super().__init__()
        self.query_tower = query_tower
        self.item_tower = item_tower
        self.info = info
        self.heads = int(info["heads"])
        self.beta = float(info["beta"])
        self.dim = int(info["dim"])
        self.query_max_length = int(info["query_max_length"])
        self.item_max_length = int(info["item_max_length"])
        self.sha: str | None = None  # set by save() / load()
        self.backend = "torch"
        self._runners: dict = {}  # "query"/"item" -> assay.inference.OnnxRunner, set by use_backend()
        self.same_as_encoder = False  # set by from_base

    # ------------------------------------------------------------------ build / save / load
    @classmethod
    def from_base(cls, base_model: str, *, shared: bool = True, projection_dim: int | None = None, heads: int = 1,
                  beta: float = 10.0, query_max_length: int = 32, item_max_length: int = 64, device: str = "cpu",
                  seed: int = 13) -> "TwoTower":
        from sentence_transformers import SentenceTransformer

        _, Normalize, Pooling = _modules()
        resolved = models.resolve(base_model)
        base = models.load_sentence_transformer(base_model, device="cpu")
        transformer = base[0]
        width = int((getattr(transformer, 'get_embedding_dimension', None) or transformer.get_word_embedding_dimension)())
        dim = projection_dim or width
        q_trans = transformer
        i_trans = transformer if shared else copy.deepcopy(transformer)
        q_pool = Pooling(width, pooling_mode="mean")
        i_pool = q_pool if shared else Pooling(width, pooling_mode="mean")
        i_mods = [i_trans, i_pool]
        q_mods = [q_trans, q_pool]
        if projection_dim:
            item_dense = _dense(width, dim, 1, seed)
            i_mods.append(item_dense)
        if heads > 1:
            q_mods.append(_dense(width, dim, heads, seed))
        elif projection_dim:
            q_mods.append(item_dense if shared else _dense(width, dim, 1, seed))
        if heads == 1:
            q_mods.append(Normalize())
        i_mods.append(Normalize())
        query = SentenceTransformer(modules=q_mods, device=device)
        item = SentenceTransformer(modules=i_mods, device=device)
        info = {"format": "assay-twotower/1", "text_template": TEXT_TEMPLATE_VERSION, "dim": dim, "heads": heads,
                "beta": beta, "shared": shared, "projection_dim": projection_dim, "base_model": base_model,
                "base_model_sha": models.model_sha(resolved), "query_max_length": query_max_length,
                "item_max_length": item_max_length, "pooling": "mean"}
        model = cls(query, item, info=info).to(device).eval()  # inference mode until a training loop says train()
        # the item tower computes what the published sentence-transformers model computes (its transformer, then
        # mean pooling and unit length, as the model's own pipeline): see assay.dense.item_cache_key
        mods = list(base)
        model.same_as_encoder = (not projection_dim and 2 <= len(mods) <= 3 and not base.default_prompt_name
                                 and getattr(mods[1], "pooling_mode", None) in ("mean", ["mean"], ("mean",))
                                 and all(type(m).__name__ == "Normalize" for m in mods[2:]))
        return model

    def save(self, path: str | Path) -> str:
        """Write query/, item/ and twotower.json; returns the checkpoint sha (content hash of the weights)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, tower, L in (("query", self.query_tower, self.query_max_length),
                               ("item", self.item_tower, self.item_max_length)):
            tower.max_seq_length = L
            tower.save(str(path / name))
        sha = self.sha = checkpoint_sha(path)
        (path / MANIFEST).write_text(json.dumps({**self.info, "sha": sha}, indent=1))
        return sha

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "TwoTower":
        from sentence_transformers import SentenceTransformer

        path = Path(path)
        man = path / MANIFEST
        if not man.exists():
            raise FileNotFoundError(f"{path} is not a two-tower checkpoint (no {MANIFEST}); train one with `assay train`")
        info = json.loads(man.read_text())
        if info.get("text_template") != TEXT_TEMPLATE_VERSION:
            raise ValueError(f"checkpoint {path} was trained on item text {info.get('text_template')!r}, but this "
                             f"assay renders {TEXT_TEMPLATE_VERSION!r}; retrain it")
        query = SentenceTransformer(str(path / "query"), device=device, local_files_only=True)
        item = SentenceTransformer(str(path / "item"), device=device, local_files_only=True)
        if info.get("shared"):  # tie the towers again (saved as two copies of the same weights)
            tied = 3 if info.get("projection_dim") and info["heads"] == 1 else 2  # transformer, pooling[, dense]
            for i in range(tied):
                item[i] = query[i]
        model = cls(query, item, info={k: v for k, v in info.items() if k != "sha"}).to(device)
        model.sha = info.get("sha") or checkpoint_sha(path)
        # A loaded checkpoint is for inference: without this the root module stays in training mode, and anything
        # that restores the mode (validate) switches dropout on in the towers for every later PyTorch encode.
        return model.eval()

    # ------------------------------------------------------------------ inference backend
    @property
    def source_sha(self) -> str:
        """What an export of these towers is keyed by: the checkpoint sha, or for an untrained model from
        ``from_base`` its base weights and settings."""
        return self.sha or digest(["base", json.dumps(self.info, sort_keys=True, default=str)])

    def use_backend(self, backend: str, artifacts: str | Path) -> None:
        """Run ``encode_queries``/``encode_items`` on text lists through an ONNX Runtime export of each tower
        (``onnx`` or ``onnx-int8``, built once under ``artifacts/onnx/``), or on PyTorch again (``torch``).
        Tokenized inputs (training) always take the PyTorch path."""
        from assay import inference

        self._runners = {}
        if backend != "torch":
            for name, tower, L in (("query", self.query_tower, self.query_max_length),
                                   ("item", self.item_tower, self.item_max_length)):
                folder = inference.ensure_export(tower, tower.tokenizer, artifacts=Path(artifacts),
                                                 what=f"twotower-{name}", source_sha=self.source_sha, backend=backend,
                                                 output="sentence_embedding", max_length=L, setting="models.backend")
                self._runners[name] = inference.OnnxRunner(folder, tower.tokenizer, L)
        self.backend = backend

    # ------------------------------------------------------------------ encode / score
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: list[str], max_length: int) -> dict:
        tok = self.query_tower[0].tokenizer
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def encode_queries(self, texts: list[str] | dict) -> torch.Tensor:
        if self._runners and not isinstance(texts, dict):
            emb = torch.from_numpy(self._runners["query"](texts, 128))
        else:
            feats = texts if isinstance(texts, dict) else self.tokenize(texts, self.query_max_length)
            emb = self.query_tower(dict(feats))["sentence_embedding"]
        if self.heads > 1:
            emb = nn.functional.normalize(emb.view(emb.shape[0], self.heads, self.dim), dim=-1)
        return emb

    def encode_items(self, texts: list[str] | dict) -> torch.Tensor:
        if self._runners and not isinstance(texts, dict):
            return torch.from_numpy(self._runners["item"](texts, 128))
        feats = texts if isinstance(texts, dict) else self.tokenize(texts, self.item_max_length)
        return self.item_tower(dict(feats))["sentence_embedding"]

    def score(self, q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, N) similarity: cosine, or soft-dot attention over query heads."""
        return soft_dot(q, items, self.beta)


def soft_dot(q: torch.Tensor, items: torch.Tensor, beta: float) -> torch.Tensor:
    """Cosine for (B, d) queries; for (B, H, d) the DPSR soft-dot ``sum_h softmax_h(beta*s_h) * s_h``."""
    if q.dim() == 2:
        return q @ items.T
    s = torch.einsum("bhd,nd->bhn", q, items)
    return (torch.softmax(beta * s, dim=1) * s).sum(dim=1)


def pair_scores(q: torch.Tensor, items: torch.Tensor, beta: float) -> torch.Tensor:
    """(P,) similarity of P (query, item) pairs given row by row: the diagonal of :func:`soft_dot`."""
    if q.dim() == 2:
        return (q * items).sum(-1)
    h = torch.einsum("phd,pd->ph", q, items)
    return (torch.softmax(beta * h, dim=1) * h).sum(dim=1)


def checkpoint_sha(path: str | Path) -> str:
    """Content hash of a checkpoint's weight files (query and item towers)."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))
    h = [str(f.relative_to(path)).encode() + b"\x00" + f.read_bytes() for f in files]
    return digest(h)
