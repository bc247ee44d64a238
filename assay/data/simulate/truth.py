"""Ground-truth relevance grades (0-4) for any (query, item) pair of a simulated world, from structured intents.

Reads: ``truth/taxonomy.json`` (types, symmetric substitute/complement relations, grading rules),
``truth/items.parquet`` (item_id, type_id, brand, color, material, size, style, gender; null = attribute absent) and
``truth/queries.parquet`` (query_id, text, kind, type_id, brand, and one nullable column per attribute; a non-null
value is a stated constraint).

Rules, applied in this order (later rules override earlier ones):

Brand-only query (type_id null, brand set): 4 if the item's brand equals the query brand, else 0.

Type query with type T, stated attribute constraints C and an optional brand B. A constraint *holds* when the item
has the same value; for ``gender``, an item marked ``unisex`` also satisfies ``men``/``women``. The brand, when
stated, is a constraint too. Constraints on ``grading.minor_attributes`` (default color, size) are *minor*; all
other attributes and the brand are *major*.

- 0 embarrassing: everything not matched below (unrelated types, including lexical traps such as a coffee table
  for "coffee maker", a dog bed for "bed", a table lamp for "dining table").
- 1 complement: the item's type is a complement of T (phone case for "phone"; relations are symmetric).
- 2 substitute: the item's type is a substitute of T and its weighted violations (minor 0.5, major 1.0) are
  ``<= grading.substitute_max_violation`` (default 1.0). An attribute the substitute type does not have counts as
  holding (unknown, not contradicted). A substitute with more violations gets 0.
- same type T (always >= 2):
  - 4 exact: every stated constraint holds;
  - 3 close: exactly one constraint violated and it is minor;
  - 2: a major constraint violated, or two or more violated.

A type is never both a substitute and a complement of another (the taxonomy loader checks this).

Invariants: grades are int8 in 0..4; ``grade`` is pure and vectorised (no per-pair Python); unknown ids raise
``ValueError`` naming them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .taxonomy import ATTRIBUTES, Taxonomy

GRADE_NAMES = ("embarrassing", "complement", "substitute", "close", "exact")
DEFAULT_GRADING = {"minor_attributes": ["color", "size"], "substitute_max_violation": 1.0}


def _codes(col: pa.ChunkedArray | pa.Array, vocab: pa.Array) -> np.ndarray:
    """Index of each value in ``vocab``: -1 for null, -2 for a value not in the vocabulary."""
    idx = pc.index_in(col, value_set=vocab)
    out = idx.fill_null(-2).to_numpy(zero_copy_only=False).astype(np.int32)
    out[col.is_null().to_numpy(zero_copy_only=False)] = -1
    return out


class TruthOracle:
    """Grades any (query, item) pair of a world; see the module docstring for the exact rules."""

    def __init__(self, taxonomy: dict, items: pa.Table, queries: pa.Table):
        tax = Taxonomy.from_json(taxonomy)
        self.taxonomy = tax
        grading = {**DEFAULT_GRADING, **(tax.grading or {})}
        self.minor = set(grading["minor_attributes"])
        self.max_violation = float(grading["substitute_max_violation"])
        for name, table, cols in (("items", items, ("item_id", "type_id", "brand")),
                                  ("queries", queries, ("query_id", "type_id", "brand"))):
            missing = [c for c in cols if c not in table.column_names]
            if missing:
                raise ValueError(f"{name} table lacks columns {missing}; expected truth/{name}.parquet of a world")
        type_ids = pa.array([t.id for t in tax.types])
        self.item_ids = items["item_id"].to_numpy(zero_copy_only=False)
        self.query_ids = queries["query_id"].to_numpy(zero_copy_only=False)
        self._item_id_arr = pa.array(self.item_ids)
        self._query_id_arr = pa.array(self.query_ids)
        self.i_type = _codes(items["type_id"], type_ids)
        if (self.i_type < 0).any():
            bad = np.unique(items["type_id"].to_numpy(zero_copy_only=False)[self.i_type < 0].astype(str))[:10]
            raise ValueError(f"items have unknown or null type_id {list(bad)}; they must be taxonomy type ids")
        self.q_type = _codes(queries["type_id"], type_ids)
        if (self.q_type == -2).any():
            bad = np.unique(queries["type_id"].to_numpy(zero_copy_only=False)[self.q_type == -2].astype(str))[:10]
            raise ValueError(f"queries have unknown type_id {list(bad)}")
        brand_vocab = pc.unique(items["brand"].combine_chunks() if isinstance(items["brand"], pa.ChunkedArray)
                                else items["brand"]).drop_null()
        self.i_brand = _codes(items["brand"], brand_vocab)  # items' own brands: never -2
        self.q_brand = _codes(queries["brand"], brand_vocab)
        if ((self.q_type == -1) & (self.q_brand == -1)).any():
            raise ValueError("a query has neither type_id nor brand; every intent needs one of them")
        self.i_attr: dict[str, np.ndarray] = {}
        self.q_attr: dict[str, np.ndarray] = {}
        for a in ATTRIBUTES:
            vocab = pa.array(tax.vocab[a], type=pa.string())
            self.i_attr[a] = (_codes(items[a], vocab) if a in items.column_names
                              else np.full(len(items), -1, np.int32))
            self.i_attr[a][self.i_attr[a] == -2] = -3  # an unknown item value never equals an unknown query value
            self.q_attr[a] = (_codes(queries[a], vocab) if a in queries.column_names
                              else np.full(len(queries), -1, np.int32))
        self.unisex = tax.codes["gender"].get("unisex", -3)
        self.sub = tax.substitute
        self.comp = tax.complement
        # per-type and per-brand item indexes for relevant()
        self._by_type = np.argsort(self.i_type, kind="stable")
        self._type_bounds = np.searchsorted(self.i_type[self._by_type], np.arange(len(tax) + 1))
        self._by_brand = np.argsort(self.i_brand, kind="stable")
        self._brand_sorted = self.i_brand[self._by_brand]
        self._qpos: dict[str, int] | None = None

    @classmethod
    def from_dir(cls, world_dir: Path) -> "TruthOracle":
        """Load from a world written by :func:`assay.data.simulate.simulate` (reads ``world_dir/truth/``)."""
        d = Path(world_dir) / "truth"
        for f in ("taxonomy.json", "items.parquet", "queries.parquet"):
            if not (d / f).exists():
                raise FileNotFoundError(f"{d / f} not found; is {world_dir} a simulated world directory?")
        taxonomy = json.loads((d / "taxonomy.json").read_text())
        return cls(taxonomy, pq.read_table(d / "items.parquet"), pq.read_table(d / "queries.parquet"))

    # ------------------------------------------------------------------ public API
    def grade(self, query_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Grades (int8, 0..4) of pairs ``(query_ids[k], item_ids[k])``; arrays of equal length."""
        q = self._lookup(query_ids, self._query_id_arr, "query")
        i = self._lookup(item_ids, self._item_id_arr, "item")
        if len(q) != len(i):
            raise ValueError(f"query_ids and item_ids must have the same length, got {len(q)} and {len(i)}")
        return self.grade_idx(q, i)

    def relevant(self, query_id: str, min_grade: int = 3) -> np.ndarray:
        """Item ids whose grade for ``query_id`` is at least ``min_grade``, in catalog order."""
        if self._qpos is None:
            self._qpos = {str(x): k for k, x in enumerate(self.query_ids)}
        if query_id not in self._qpos:
            raise ValueError(f"unknown query_id {query_id!r}")
        q = self._qpos[query_id]
        if min_grade <= 0:
            cand = np.arange(len(self.item_ids))
        elif self.q_type[q] < 0:
            cand = np.sort(self.items_of_brand(int(self.q_brand[q])))
        else:
            t = self.q_type[q]
            types = [t]
            if min_grade <= 2:
                types += list(np.flatnonzero(self.sub[t]))
            if min_grade <= 1:
                types += list(np.flatnonzero(self.comp[t]))
            cand = np.sort(self.items_of_types(np.array(types)))
        g = self.grade_idx(np.full(len(cand), q), cand)
        return self.item_ids[cand[g >= min_grade]]

    def items_of_types(self, types: np.ndarray) -> np.ndarray:
        """Item indices (positions) of the given type indices, from the per-type index."""
        if len(types) == 0:
            return np.empty(0, np.int64)
        b = self._type_bounds
        return np.concatenate([self._by_type[b[t]:b[t + 1]] for t in types])

    def items_of_brand(self, brand: int) -> np.ndarray:
        """Item indices of a brand code (``-1``/``-2``: none)."""
        if brand < 0:
            return np.empty(0, np.int64)
        lo, hi = np.searchsorted(self._brand_sorted, [brand, brand + 1])
        return self._by_brand[lo:hi]

    # ------------------------------------------------------------------ internals
    def _lookup(self, ids, universe: pa.Array, what: str) -> np.ndarray:
        arr = pa.array(np.asarray(ids, dtype=object), type=pa.string())
        idx = pc.index_in(arr, value_set=universe)
        if idx.null_count:
            bad = np.asarray(ids, dtype=object)[idx.is_null().to_numpy(zero_copy_only=False)]
            uniq = list(dict.fromkeys(str(x) for x in bad))
            raise ValueError(f"unknown {what} ids ({len(uniq)}): {uniq[:10]}")
        return idx.to_numpy(zero_copy_only=False).astype(np.int64)

    def grade_idx(self, q: np.ndarray, i: np.ndarray) -> np.ndarray:
        """Grades for positional query indices ``q`` and item indices ``i`` (the vectorised core)."""
        q = np.asarray(q, dtype=np.int64)
        i = np.asarray(i, dtype=np.int64)
        qt, it = self.q_type[q], self.i_type[i]
        qb, ib = self.q_brand[q], self.i_brand[i]
        brand_only = qt < 0
        qt0 = np.where(brand_only, 0, qt)
        same = (it == qt) & ~brand_only
        sub = self.sub[qt0, it] & ~brand_only
        comp = self.comp[qt0, it] & ~brand_only
        minor = np.zeros(len(q), np.int16)  # violations, strict (same type)
        major = np.zeros(len(q), np.int16)
        minor_k = np.zeros(len(q), np.int16)  # violations among attributes the item has (substitutes)
        major_k = np.zeros(len(q), np.int16)
        for a in ATTRIBUTES:
            qa, ia = self.q_attr[a][q], self.i_attr[a][i]
            ok = ia == qa
            if a == "gender":
                ok |= (ia == self.unisex) & (qa >= 0)
            viol = (qa != -1) & ~ok
            known = viol & (ia >= 0)
            if a in self.minor:
                minor += viol
                minor_k += known
            else:
                major += viol
                major_k += known
        bviol = (qb != -1) & (ib != qb) & ~brand_only
        major += bviol
        major_k += bviol
        g = np.zeros(len(q), np.int8)
        g[comp] = 1
        g[sub & (0.5 * minor_k + major_k <= self.max_violation)] = 2
        total = minor + major
        g_same = np.where(total == 0, 4, np.where((major == 0) & (minor == 1), 3, 2)).astype(np.int8)
        g = np.where(same, g_same, g)
        g = np.where(brand_only, np.where((ib == qb) & (qb >= 0), 4, 0), g).astype(np.int8)
        return g
