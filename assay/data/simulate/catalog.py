"""Brands and catalog items: structure (columnar), then text (titles, descriptions) in fixed-size chunks.

Reads: a :class:`~.taxonomy.Taxonomy` and a :class:`~.params.SimulateConfig`.
Gives: :class:`Brands` (names, department, Zipf popularity) and :class:`Catalog` (per item: type index, brand
index, one int16 code per attribute with -1 where the type has no such attribute, popularity); titles for all items;
descriptions chunk by chunk (:func:`describe_chunk`) so 1M descriptions never sit in memory at once.

Invariants: every item carries every attribute of its type's domain and none other; a brand sells only in its
department; the same seed gives the same catalog, independent of chunking by callers (chunks are fixed-size and
seeded by their index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .params import SimulateConfig
from .rng import rng_for
from .taxonomy import ATTRIBUTES, Taxonomy, title_case
from .taxonomy_data import FEATURES

CHUNK = 100_000  # fixed text-generation chunk (part of the determinism contract)

_ONSETS = ["b", "br", "c", "cl", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pr",
           "qu", "r", "s", "st", "t", "tr", "v", "w", "z", "sh", "th", "el", "or", "al", "ar"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ou", "y", "io"]
_CODAS = ["", "n", "r", "l", "x", "s", "th", "nd", "rk", "m", "st", "ck", "v", "lo", "ra", "na", "ton", "ley",
          "wick", "vale", "ford", "well", "by", "ix", "on", "ora", "ette", "ia"]
_SUFFIX = {"furniture": ["Home", "Living", "Furnishings", "Interiors"], "decor": ["Home", "Studio", "Design"],
           "bedding_bath": ["Linens", "Home", "Sleep"], "lighting": ["Lighting", "Lux", "Lamp Co"],
           "kitchen": ["Kitchen", "Cookware", "Home"], "appliances": ["Appliances", "Electric", "Home"],
           "electronics": ["Tech", "Audio", "Labs", "Electronics"], "apparel": ["Apparel", "Outfitters", "Wear"],
           "shoes": ["Footwear", "Athletics", "Shoe Co"], "tools": ["Tools", "Pro", "Works"],
           "outdoor": ["Outdoor", "Garden", "Patio"], "pets": ["Pet", "Paws", "Pet Co"],
           "baby": ["Baby", "Kids", "Little Ones"], "toys": ["Toys", "Play", "Kids"],
           "sports": ["Sports", "Fitness", "Athletics"], "office": ["Office", "Supply", "Works"],
           "beauty": ["Beauty", "Naturals", "Skin"], "grocery": ["Foods", "Farms", "Pantry", "Kitchen"]}


@dataclass
class Brands:
    names: list[str]
    department: np.ndarray  # int16 index into taxonomy department order
    popularity: np.ndarray  # float64, Zipf by a random rank, mean 1


@dataclass
class Catalog:
    type_idx: np.ndarray  # int16
    brand_idx: np.ndarray  # int32
    attrs: dict[str, np.ndarray]  # attribute -> int16 code (taxonomy.codes), -1 absent
    popularity: np.ndarray  # float64
    titles: list[str]

    def __len__(self) -> int:
        return len(self.type_idx)


def make_brands(tax: Taxonomy, cfg: SimulateConfig) -> Brands:
    rng = rng_for(cfg.seed, "brands")
    n = cfg.brands
    reserved = {w for t in tax.types for s in t.names for w in s.split()}
    reserved |= {w for vals in tax.vocab.values() for v in vals for w in v.split()}
    depts = list(tax.departments)
    seen: set[str] = set()
    stems: list[str] = []
    while len(stems) < n:
        k = n - len(stems)
        o = rng.integers(0, len(_ONSETS), size=(k, 2))
        v = rng.integers(0, len(_VOWELS), size=(k, 2))
        c = rng.integers(0, len(_CODAS), size=k)
        two = rng.random(k) < 0.55
        for i in range(k):
            s = _ONSETS[o[i, 0]] + _VOWELS[v[i, 0]]
            if two[i]:
                s += _ONSETS[o[i, 1]] + _VOWELS[v[i, 1]]
            s += _CODAS[c[i]]
            if len(s) < 4 or s in seen or s in reserved:
                continue
            seen.add(s)
            stems.append(s)
    stems = stems[:n]
    # department: the first 2 * n_departments brands round-robin (every department has brands), then by size
    sizes = np.array([sum(t.department == d for t in tax.types) for d in depts], dtype=float)
    dept = rng.choice(len(depts), size=n, p=sizes / sizes.sum())
    k = min(n, 2 * len(depts))
    dept[:k] = np.arange(k) % len(depts)
    suffix_draw = rng.random(n)
    suffix_pick = rng.integers(0, 16, size=n)
    names = []
    for i, s in enumerate(stems):
        name = s.capitalize()
        if suffix_draw[i] < 0.3:
            opts = _SUFFIX[depts[dept[i]]]
            name = f"{name} {opts[suffix_pick[i] % len(opts)]}"
        names.append(name)
    rank = rng.permutation(n) + 1.0
    pop = rank ** -cfg.brand_zipf
    pop = pop / pop.mean()
    return Brands(names=names, department=dept.astype(np.int16), popularity=pop)


def zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights over a random permutation of ``n`` ranks, summing to 1."""
    w = (rng.permutation(n) + 1.0) ** -s
    return w / w.sum()


def make_catalog(tax: Taxonomy, brands: Brands, cfg: SimulateConfig, type_weights: np.ndarray) -> Catalog:
    """Draw item structure (types, brands, attributes, popularity) and titles, all columnar."""
    rng = rng_for(cfg.seed, "items")
    n, nt = cfg.n_products, len(tax)
    p_type = (1 - cfg.type_uniform_share) * type_weights + cfg.type_uniform_share / nt
    type_idx = rng.choice(nt, size=n, p=p_type).astype(np.int16)
    # brands within the item's department, by brand popularity
    depts = list(tax.departments)
    type_dept = np.array([depts.index(t.department) for t in tax.types], dtype=np.int16)
    item_dept = type_dept[type_idx]
    brand_idx = np.empty(n, dtype=np.int32)
    for d in range(len(depts)):
        members = np.flatnonzero(brands.department == d)
        rows = np.flatnonzero(item_dept == d)
        if len(rows) == 0:
            continue
        p = brands.popularity[members] / brands.popularity[members].sum()
        brand_idx[rows] = members[rng.choice(len(members), size=len(rows), p=p)]
    # attributes: each type prefers some values (Dirichlet weights), items draw from those
    attrs = {a: np.full(n, -1, dtype=np.int16) for a in ATTRIBUTES}
    order = np.argsort(type_idx, kind="stable")
    bounds = np.searchsorted(type_idx[order], np.arange(nt + 1))
    for t_i, t in enumerate(tax.types):
        rows = order[bounds[t_i]:bounds[t_i + 1]]
        for a in ATTRIBUTES:  # fixed order keeps draws reproducible
            vals = t.attributes.get(a)
            if not vals:
                continue
            pref = rng.dirichlet(np.full(len(vals), 1.5))
            codes = np.array([tax.codes[a][v] for v in vals], dtype=np.int16)
            if len(rows):
                attrs[a][rows] = codes[rng.choice(len(vals), size=len(rows), p=pref)]
    popularity = np.exp(rng.normal(0.0, cfg.item_popularity_sigma, size=n)) * brands.popularity[brand_idx]
    popularity = np.round(popularity + 1e-4, 4)
    cat = Catalog(type_idx=type_idx, brand_idx=brand_idx, attrs=attrs, popularity=popularity, titles=[])
    cat.titles = make_titles(tax, brands, cat, cfg)
    return cat


# ---------------------------------------------------------------------------------------------------- text
_GENDER_WORD = {"men": "Men's", "women": "Women's", "unisex": "Unisex", "kids": "Kids'"}


def _attr_strings(tax: Taxonomy, cat: Catalog, a: str, rows: np.ndarray) -> list[str]:
    vocab = tax.vocab[a] + [""]
    codes = cat.attrs[a][rows]
    return [vocab[c] for c in codes.tolist()]  # -1 -> ""


def make_titles(tax: Taxonomy, brands: Brands, cat: Catalog, cfg: SimulateConfig) -> list[str]:
    titles: list[str] = []
    for start in range(0, len(cat), CHUNK):
        rows = np.arange(start, min(start + CHUNK, len(cat)))
        titles.extend(_titles_chunk(tax, brands, cat, cfg, rows, start // CHUNK))
    return titles


def _titles_chunk(tax, brands, cat, cfg, rows, chunk_no) -> list[str]:
    rng = rng_for(cfg.seed, "titles", chunk_no)
    k = len(rows)
    t_idx = cat.type_idx[rows]
    n_names = np.array([len(t.names) for t in tax.types])[t_idx]
    use_syn = (rng.random(k) < cfg.title_synonym_prob) & (n_names > 1)
    name_pick = np.where(use_syn, 1 + (rng.integers(0, 1 << 30, size=k) % np.maximum(n_names - 1, 1)), 0)
    show = {a: rng.random(k) < p for a, p in
            (("color", 0.85), ("material", 0.7), ("size", 0.8), ("style", 0.55), ("gender", 0.9))}
    template = rng.integers(0, 5, size=k)
    has_model = rng.random(k) < cfg.model_number_prob
    model_a = rng.integers(0, 26 * 26, size=k)
    model_n = rng.integers(100, 9999, size=k)
    is_pack = np.array([t.pack for t in tax.types])[t_idx] & (rng.random(k) < cfg.pack_prob)
    pack_n = np.array([2, 3, 4, 6, 8, 10, 12, 24])[rng.integers(0, 8, size=k)]
    pack_style = rng.integers(0, 3, size=k)
    vals = {a: _attr_strings(tax, cat, a, rows) for a in ATTRIBUTES}
    bnames = brands.names
    b_idx = cat.brand_idx[rows].tolist()
    out = []
    for j in range(k):
        t = tax.types[t_idx[j]]
        tname = title_case(t.names[name_pick[j]])
        col = title_case(vals["color"][j]) if show["color"][j] else ""
        mat = title_case(vals["material"][j]) if show["material"][j] else ""
        sty = title_case(vals["style"][j]) if show["style"][j] else ""
        size = title_case(vals["size"][j]) if show["size"][j] else ""
        g = _GENDER_WORD.get(vals["gender"][j], "") if show["gender"][j] else ""
        brand = bnames[b_idx[j]]
        model = f"{chr(65 + model_a[j] // 26)}{chr(65 + model_a[j] % 26)}-{model_n[j]}" if has_model[j] else ""
        pack = ""
        if is_pack[j]:
            pack = ("({}-Pack)", "Pack of {}", "Set of {}")[pack_style[j]].format(pack_n[j])
        tp = template[j]
        if tp == 0:
            parts = (brand, g, sty, col, mat, tname, size, pack)
        elif tp == 1:
            parts = (brand, model, g, tname, "-" if (col or mat) else "", col, mat, size and f", {size}", pack)
        elif tp == 2:
            parts = (sty, mat, g, tname, "by", brand, col and f", {col}", size and f", {size}")
        elif tp == 3:
            parts = (brand, model, g, tname, col and f", {col}", size and f", {size}", pack)
        else:
            parts = (col, g, tname, brand, mat, size, pack)
        s = " ".join(p for p in parts if p).replace(" ,", ",")
        out.append(s[:-2] if s.endswith(" -") else s)
    return out


def describe_chunk(tax: Taxonomy, brands: Brands, cat: Catalog, cfg: SimulateConfig, chunk_no: int) -> list[str]:
    """Descriptions of items ``[chunk_no * CHUNK, ...)``: attribute sentences, use context, filler, and sometimes
    a complement mention ('Pairs well with our phone case.') - a lexical trap for term matching."""
    rows = np.arange(chunk_no * CHUNK, min((chunk_no + 1) * CHUNK, len(cat)))
    rng = rng_for(cfg.seed, "descriptions", chunk_no)
    k = len(rows)
    t_idx = cat.type_idx[rows]
    vals = {a: _attr_strings(tax, cat, a, rows) for a in ATTRIBUTES}
    r = rng.integers(0, 1 << 30, size=(k, 8))
    mention = rng.random(k) < cfg.complement_mention_prob
    comps = [np.flatnonzero(tax.complement[i]) for i in range(len(tax))]
    ctxs = [t.contexts + tax.departments[t.department]["ctx"] for t in tax.types]
    feats = [FEATURES[t.department] for t in tax.types]
    bnames = brands.names
    b_idx = cat.brand_idx[rows].tolist()
    openers = ("This {x} from {b}", "The {b} {x}", "Our {x}", "Each {x} by {b}")
    comp_tpl = ("Pairs well with our {c}.", "Matching {c} sold separately.", "Try it with our {c}.",
                "Complete the look with our {c}.")
    out = []
    for j in range(k):
        ti = t_idx[j]
        t = tax.types[ti]
        rj = r[j]
        col, mat, size, sty, g = (vals[a][j] for a in ("color", "material", "size", "style", "gender"))
        x = t.names[rj[0] % len(t.names)]
        if sty:
            x = f"{sty} {x}"
        s = [openers[rj[1] % 4].format(x=x, b=bnames[b_idx[j]])]
        if mat and col:
            s[0] += f" is made of {mat} in {col}."
        elif mat:
            s[0] += f" is made of {mat}."
        elif col:
            s[0] += f" comes in {col}."
        else:
            s[0] += " is built for everyday use."
        if size:
            size = size.upper() if size in ("xs", "s", "m", "l", "xl", "xxl") else size
            s.append(("Size: {}.", "Available in {}.")[rj[2] % 2].format(size))
        if g:
            s.append(f"Designed for {g}." if g != "unisex" else "Unisex fit.")
        c = ctxs[ti]
        s.append(("Perfect {}.", "Great {}.", "Ideal {}.")[rj[3] % 3].format(c[rj[4] % len(c)]))
        f = feats[ti]
        s.append(f[rj[5] % len(f)])
        if mention[j] and len(comps[ti]):
            ct = tax.types[comps[ti][rj[6] % len(comps[ti])]]
            s.append(comp_tpl[rj[7] % 4].format(c=ct.name))
        out.append(" ".join(s))
    return out


def categories(tax: Taxonomy) -> list[str]:
    return [tax.category(i) for i in range(len(tax))]
