"""Load, validate and index the product taxonomy (:mod:`.taxonomy_data`).

Reads: ``taxonomy_data.POOLS / DEPARTMENTS / TYPES``.
Gives: a :class:`Taxonomy` with types in a fixed order (index = position), symmetric substitute and complement
relations as boolean matrices, per-attribute value vocabularies, and lexical-trap types (types that share a word
with another type's surface forms but are neither the same, a substitute nor a complement).
``to_json()`` is what the world writes to ``truth/taxonomy.json``; :meth:`Taxonomy.from_json` reads it back.

Invariants (checked on load): unique type ids, every relation points to a known type, no self relations, a type is
never both a substitute and a complement of another, every attribute pool exists, and no surface form belongs to
two types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import taxonomy_data as data

ATTRIBUTES: tuple[str, ...] = ("color", "material", "size", "style", "gender")
FORMAT = "assay-sim-taxonomy/1"

_UPPER = {"tv", "hdmi", "led", "usb", "rc", "bbq", "sd", "4k", "pjs", "hepa", "xs", "s", "m", "l", "xl", "xxl", "2xl"}


def title_case(s: str) -> str:
    """Title case that keeps acronyms and units readable ('tv stand' -> 'TV Stand', '64gb' -> '64GB')."""
    return " ".join(w.upper() if (w in _UPPER or w.endswith("gb")) else w.capitalize() for w in s.split())


@dataclass
class ProductType:
    id: str
    department: str
    names: list[str]  # first = canonical
    attributes: dict[str, list[str]]
    substitutes: list[str] = field(default_factory=list)
    complements: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    descriptive: list[str] = field(default_factory=list)
    pack: bool = False

    @property
    def name(self) -> str:
        return self.names[0]


class Taxonomy:
    """Indexed taxonomy. ``types[i]`` has index ``i``; relation matrices are ``[n_types, n_types]`` booleans."""

    def __init__(self, departments: dict[str, dict], types: list[ProductType], grading: dict | None = None):
        self.departments = departments
        self.types = types
        self.grading = dict(grading or {})
        self.index = {t.id: i for i, t in enumerate(types)}
        if len(self.index) != len(types):
            dup = sorted({t.id for t in types if sum(u.id == t.id for u in types) > 1})
            raise ValueError(f"duplicate type ids in taxonomy: {dup}")
        n = len(types)
        self.substitute = np.zeros((n, n), dtype=bool)
        self.complement = np.zeros((n, n), dtype=bool)
        for i, t in enumerate(types):
            if t.department not in departments:
                raise ValueError(f"type {t.id!r} names unknown department {t.department!r}")
            for rel, mat in ((t.substitutes, self.substitute), (t.complements, self.complement)):
                for other in rel:
                    if other not in self.index:
                        raise ValueError(f"type {t.id!r} relates to unknown type {other!r}")
                    j = self.index[other]
                    if j == i:
                        raise ValueError(f"type {t.id!r} relates to itself")
                    mat[i, j] = mat[j, i] = True
        both = self.substitute & self.complement
        if both.any():
            i, j = np.argwhere(both)[0]
            raise ValueError(f"{types[i].id!r} and {types[j].id!r} are both substitutes and complements")
        owner: dict[str, str] = {}
        for t in types:
            for s in t.names:
                if s in owner and owner[s] != t.id:
                    raise ValueError(f"surface form {s!r} belongs to both {owner[s]!r} and {t.id!r}")
                owner[s] = t.id
        # symmetric lists, in taxonomy order
        for i, t in enumerate(types):
            t.substitutes = [types[j].id for j in np.flatnonzero(self.substitute[i])]
            t.complements = [types[j].id for j in np.flatnonzero(self.complement[i])]
        # attribute vocabularies (value -> code), sorted for stability
        self.vocab: dict[str, list[str]] = {}
        for a in ATTRIBUTES:
            vals = sorted({v for t in types for v in t.attributes.get(a, [])})
            self.vocab[a] = vals
        self.codes = {a: {v: k for k, v in enumerate(vals)} for a, vals in self.vocab.items()}
        self.trap = self._traps()

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls, grading: dict | None = None) -> "Taxonomy":
        types = []
        for tid, dept, names, attrs, subs, comps, extra in data.TYPES:
            attributes = {}
            for spec in attrs.split():
                a, pool = spec.split("=")
                if a not in ATTRIBUTES:
                    raise ValueError(f"type {tid!r}: unknown attribute {a!r}; valid: {list(ATTRIBUTES)}")
                if pool not in data.POOLS:
                    raise ValueError(f"type {tid!r}: unknown pool {pool!r}")
                attributes[a] = list(data.POOLS[pool])
            types.append(ProductType(
                id=tid, department=dept, names=names.split("|"), attributes=attributes,
                substitutes=subs.split(), complements=comps.split(),
                contexts=[c for c in extra.get("ctx", "").split("|") if c],
                descriptive=[c for c in extra.get("desc", "").split("|") if c],
                pack=bool(extra.get("pack", False))))
        departments = {k: dict(v) for k, v in data.DEPARTMENTS.items()}
        return cls(departments, types, grading)

    def _traps(self) -> np.ndarray:
        """``trap[i, j]``: type j shares a content word with type i's surface forms but is unrelated to i."""
        n = len(self.types)
        stop = {"and", "for", "with", "the"}
        words = [set(w for s in t.names for w in s.split() if len(w) > 2 and w not in stop) for t in self.types]
        trap = np.zeros((n, n), dtype=bool)
        for i in range(n):
            for j in range(n):
                if i != j and words[i] & words[j]:
                    trap[i, j] = True
        trap &= ~self.substitute & ~self.complement
        return trap

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.types)

    def category(self, i: int) -> str:
        t = self.types[i]
        return f"{self.departments[t.department]['name']} > {title_case(t.name)}"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "attributes": list(ATTRIBUTES),
            "grading": self.grading,
            "departments": self.departments,
            "types": [
                {"id": t.id, "department": t.department, "name": t.name, "surface_forms": t.names,
                 "attributes": t.attributes, "substitutes": t.substitutes, "complements": t.complements,
                 "contexts": t.contexts, "descriptive": t.descriptive, "pack": t.pack}
                for t in self.types
            ],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "Taxonomy":
        if obj.get("format") != FORMAT:
            raise ValueError(f"taxonomy format {obj.get('format')!r} is not {FORMAT!r}; regenerate the world")
        types = [ProductType(id=t["id"], department=t["department"], names=list(t["surface_forms"]),
                             attributes={a: list(v) for a, v in t["attributes"].items()},
                             substitutes=list(t["substitutes"]), complements=list(t["complements"]),
                             contexts=list(t["contexts"]), descriptive=list(t["descriptive"]), pack=bool(t["pack"]))
                 for t in obj["types"]]
        return cls(obj["departments"], types, obj.get("grading"))
