"""Search intents and their query texts.

An *intent* is either a product type with 0-3 attribute constraints (sometimes also a brand), or a brand alone.
Most intents are read off a catalog item (so at least one exact match exists); the rest draw attribute values from
the type's domain, and may have no exact item, as real tail queries often do.

Each intent is rendered once, with a surface-form ``kind``:
- ``canonical``   the type's canonical name:              "blue velvet sofa"
- ``synonym``     another surface form:                   "blue velvet couch"
- ``typo``        one character edit on one word:         "blue velvet coutch"
- ``shuffle``     word order shuffled:                    "sofa blue velvet"
- ``descriptive`` a need, with a context phrase:          "comfy couch for a small apartment"
- ``brand``       a brand-only intent:                    "norvale"

Queries with the same text are merged (the first intent keeps the text and the higher rank score), so there is one
query per distinct text. Frequencies follow a Zipf law over a latent rank score (popular types, few constraints and
clean forms rank higher, plus Gumbel noise), scaled so they sum to the configured number of sessions, each >= 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .catalog import Brands, Catalog
from .params import SimulateConfig
from .rng import rng_for
from .taxonomy import ATTRIBUTES, Taxonomy

log = logging.getLogger(__name__)

KINDS = ("canonical", "synonym", "typo", "shuffle", "descriptive", "brand")

_VALUE_FORMS = {
    ("gender", "men"): ["men", "mens", "men's"],
    ("gender", "women"): ["women", "womens", "women's", "ladies"],
    ("gender", "kids"): ["kids", "kid", "children's"],
    ("gender", "unisex"): ["unisex"],
    ("size", "xs"): ["xs", "extra small"],
    ("size", "s"): ["small", "size s"],
    ("size", "m"): ["medium", "size m"],
    ("size", "l"): ["large", "size l"],
    ("size", "xl"): ["xl", "extra large"],
    ("size", "xxl"): ["xxl", "2xl"],
    ("size", "queen"): ["queen", "queen size"],
    ("size", "king"): ["king", "king size"],
    ("size", "twin"): ["twin", "twin size"],
    ("size", "full"): ["full", "full size"],
}
_PRE_ORDER = ("gender", "style", "color", "material")


@dataclass
class QuerySet:
    ids: list[str]
    text: list[str]
    kind: list[str]
    type_idx: np.ndarray  # int16, -1 for brand-only
    brand_idx: np.ndarray  # int32, -1 when no brand is stated
    attrs: dict[str, np.ndarray]  # int16 codes, -1 when not constrained
    frequency: np.ndarray  # int64, >= 1

    def __len__(self) -> int:
        return len(self.ids)


def _typo(word: str, r: np.ndarray) -> str:
    i = int(r[1] % (len(word) - 1))
    letter = "abcdefghijklmnopqrstuvwxyz"[r[2] % 26]
    op = r[0] % 4
    if op == 0:
        return word[:i] + word[i + 1:]  # deletion
    if op == 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # transposition
    if op == 2:
        return word[:i] + letter + word[i + 1:]  # substitution
    return word[:i] + word[i] + word[i:]  # duplication


def make_queries(tax: Taxonomy, brands: Brands, cat: Catalog, cfg: SimulateConfig,
                 type_weights: np.ndarray) -> QuerySet:
    rng = rng_for(cfg.seed, "queries")
    n_items, n_q = len(cat), cfg.n_queries
    item_cdf = np.cumsum(np.sqrt(cat.popularity))
    item_cdf /= item_cdf[-1]
    type_cdf = np.cumsum(type_weights)
    brand_items = np.bincount(cat.brand_idx, minlength=len(brands.names))
    brand_w = np.where(brand_items > 0, brands.popularity, 0.0)
    brand_cdf = np.cumsum(brand_w) / brand_w.sum()
    mix = cfg.surface_mix.model_dump()
    form_names = list(mix)
    form_p = np.array([mix[k] for k in form_names], dtype=float)
    form_p /= form_p.sum()
    kcw = np.asarray(cfg.constraint_count_weights, dtype=float)
    kcw_cdf = np.cumsum(kcw / kcw.sum())
    form_cdf = np.cumsum(form_p)
    vocab = tax.vocab
    tw_log = np.log(type_weights)
    bw_log = np.log(np.maximum(brand_w / brand_w.sum(), 1e-300))

    seen: dict[str, int] = {}
    texts: list[str] = []
    kinds: list[str] = []
    q_type: list[int] = []
    q_brand: list[int] = []
    q_attr: list[dict[str, int]] = []
    score: list[float] = []
    batch = max(64, n_q // 2)
    for _round in range(200):
        if len(texts) >= n_q:
            break
        u = rng.random((batch, 12))
        r = rng.integers(0, 1 << 30, size=(batch, 16))
        gumbel = rng.gumbel(size=batch) * cfg.query_rank_noise
        for j in range(batch):
            uj, rj = u[j], r[j]
            attrs: dict[str, int] = {}
            brand = -1
            if uj[0] < cfg.brand_only_share:
                b = int(np.searchsorted(brand_cdf, uj[1], side="right"))
                text, kind, t = brands.names[b].lower(), "brand", -1
                if rj[0] % 5 == 0:  # a few brand queries carry a typo
                    words = text.split()
                    w = max(range(len(words)), key=lambda x: len(words[x]))
                    if len(words[w]) >= 4:
                        words[w] = _typo(words[w], rj[1:4])
                        text, kind = " ".join(words), "typo"
                brand = b
                s = bw_log[b] + cfg.form_log_weight.get(kind, 0.0)
            else:
                k = min(int(np.searchsorted(kcw_cdf, uj[2], side="right")), 3)
                if uj[3] < cfg.intent_from_item_share:
                    item = min(int(np.searchsorted(item_cdf, uj[4], side="right")), n_items - 1)
                    t = int(cat.type_idx[item])
                    have = [a for a in ATTRIBUTES if cat.attrs[a][item] >= 0]
                    pick = [have[x] for x in rng.permutation(len(have))[:k]]
                    attrs = {a: int(cat.attrs[a][item]) for a in pick}
                    if uj[5] < cfg.brand_constraint_prob:
                        brand = int(cat.brand_idx[item])
                else:
                    t = min(int(np.searchsorted(type_cdf, uj[4], side="right")), len(tax) - 1)
                    dom = tax.types[t].attributes
                    have = [a for a in ATTRIBUTES if dom.get(a)]
                    pick = [have[x] for x in rng.permutation(len(have))[:k]]
                    attrs = {a: tax.codes[a][dom[a][rj[8 + i] % len(dom[a])]] for i, a in enumerate(pick)}
                    if uj[5] < cfg.brand_constraint_prob:
                        cands = np.flatnonzero((brands.department == list(tax.departments).index(
                            tax.types[t].department)) & (brand_items > 0))
                        brand = int(cands[rj[9] % len(cands)]) if len(cands) else -1
                kind = form_names[min(int(np.searchsorted(form_cdf, uj[6], side="right")), len(form_names) - 1)]
                text, kind = _render(tax, brands, t, attrs, brand, kind, uj, rj)
                s = tw_log[t] - cfg.constraint_penalty * (len(attrs) + (brand >= 0)) + cfg.form_log_weight.get(kind, 0.0)
            s += gumbel[j]
            if text in seen:
                q = seen[text]
                score[q] = max(score[q], float(s))
                continue
            seen[text] = len(texts)
            texts.append(text)
            kinds.append(kind)
            q_type.append(t)
            q_brand.append(brand)
            q_attr.append(attrs)
            score.append(float(s))
    if len(texts) < n_q:
        log.warning("only %d distinct query texts could be generated (asked for %d)", len(texts), n_q)
    n = min(n_q, len(texts))
    order = np.argsort(-np.asarray(score[:n]), kind="stable")  # rank 0 = most frequent
    w = (np.arange(n) + 1.0) ** -cfg.query_zipf
    sessions = max(cfg.sessions, n)
    freq = 1 + rng.multinomial(sessions - n, w / w.sum())
    attr_cols = {a: np.array([q_attr[i].get(a, -1) for i in order], dtype=np.int16) for a in ATTRIBUTES}
    return QuerySet(
        ids=[f"q{r + 1:06d}" for r in range(n)],
        text=[texts[i] for i in order],
        kind=[kinds[i] for i in order],
        type_idx=np.array([q_type[i] for i in order], dtype=np.int16),
        brand_idx=np.array([q_brand[i] for i in order], dtype=np.int32),
        attrs=attr_cols,
        frequency=freq.astype(np.int64),
    )


def _value_text(a: str, v: str, r: int) -> str:
    forms = _VALUE_FORMS.get((a, v))
    if forms:
        return forms[r % len(forms)]
    if a == "size" and v.isdigit():
        return (f"size {v}", v)[r % 2]
    return v


def _render(tax: Taxonomy, brands: Brands, t: int, attrs: dict[str, int], brand: int, kind: str,
            u: np.ndarray, r: np.ndarray) -> tuple[str, str]:
    """Text of a type intent in the requested surface form; returns (text, kind actually used)."""
    pt = tax.types[t]
    if kind == "synonym" and len(pt.names) < 2:
        kind = "canonical"
    if kind == "descriptive" and not attrs and brand < 0 and pt.descriptive and u[7] < 0.5:
        return pt.descriptive[r[4] % len(pt.descriptive)], kind
    if kind in ("synonym", "typo", "shuffle", "descriptive") and len(pt.names) > 1 and (kind == "synonym" or u[8] < 0.4):
        name = pt.names[1 + r[5] % (len(pt.names) - 1)]
    else:
        name = pt.names[0]
    vals = {a: _value_text(a, tax.vocab[a][c], int(r[10 + i])) for i, (a, c) in enumerate(sorted(attrs.items()))}
    pre = [vals[a] for a in _PRE_ORDER if a in vals]
    if len(pre) > 1 and u[9] < 0.2:
        pre = pre[::-1]
    words = pre + [name]
    if "size" in vals:
        words = [vals["size"]] + words if u[10] < 0.4 else words + [vals["size"]]
    if kind == "descriptive":
        dept = tax.departments[pt.department]
        ctx = pt.contexts + dept["ctx"]
        if u[11] < 0.5:
            words = [dept["adj"][r[6] % len(dept["adj"])]] + words
        words = words + [ctx[r[7] % len(ctx)]]
    if brand >= 0:
        b = brands.names[brand].lower()
        pos = r[3] % 10
        words = [b] + words if pos < 7 else (words + ["by", b] if pos < 9 else words + [b])
    text = " ".join(words)
    if kind == "typo":
        toks = text.split()
        long_ = [i for i, w in enumerate(toks) if len(w) >= 4 and w.isalpha()]
        if not long_:
            return text, "canonical" if name == pt.names[0] else "synonym"
        i = long_[r[8] % len(long_)]
        for attempt in range(3):
            new = _typo(toks[i], r[1 + 3 * attempt:4 + 3 * attempt])
            if new != toks[i]:
                toks[i] = new
                return " ".join(toks), "typo"
        return text, "canonical" if name == pt.names[0] else "synonym"
    if kind == "shuffle":
        toks = text.split()
        if len(toks) < 2:
            return text, "canonical" if name == pt.names[0] else "synonym"
        perm = np.random.default_rng(int(r[13])).permutation(len(toks))
        if (perm == np.arange(len(toks))).all():
            perm = np.roll(perm, 1)
        return " ".join(toks[p] for p in perm), "shuffle"
    return text, kind
