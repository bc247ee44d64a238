"""Build a simulated e-commerce world and write it to a directory.

Writes into ``out_dir``:

- ``products.csv``      item_id,title,description,brand,category,attributes,popularity
                        (attributes: JSON object string; category: "Department > Type name")
- ``queries.csv``       query_id,text,frequency
- ``engagement.csv``    query_id,item_id,impressions,clicks,add_to_carts,orders,position
- ``human_labels.csv``  query_id,item_id,grade,annotator,split
- ``truth/items.parquet``    item_id,type_id,brand,color,material,size,style,gender (null = absent)
- ``truth/queries.parquet``  query_id,text,kind,type_id,brand,color,material,size,style,gender (null = unconstrained)
- ``truth/taxonomy.json``    taxonomy + grading rules (read by :class:`~.truth.TruthOracle`)
- ``world.json``             manifest: format "assay-sim/1", seed, config, counts, files

Invariants: the same config gives byte-identical CSVs (every random stream is keyed by seed and component name,
text and engagement are produced in fixed-size chunks); ids are strings ("p0000001", "q000001"); query ids are in
decreasing frequency order; one query per distinct text; engagement and labels only reference existing ids.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .catalog import CHUNK, Brands, Catalog, categories, describe_chunk, make_brands, make_catalog, zipf_weights
from .engagement import bm25_candidates, simulate_engagement
from .labels import sample_labels
from .params import SimulateConfig
from .queries import QuerySet, make_queries
from .rng import rng_for
from .taxonomy import ATTRIBUTES, Taxonomy
from .truth import TruthOracle

log = logging.getLogger(__name__)

FORMAT = "assay-sim/1"
FILES = {"products": "products.csv", "queries": "queries.csv", "engagement": "engagement.csv",
         "human_labels": "human_labels.csv", "truth_items": "truth/items.parquet",
         "truth_queries": "truth/queries.parquet", "taxonomy": "truth/taxonomy.json", "manifest": "world.json"}
_CSV = pacsv.WriteOptions(quoting_style="needed")


def _ids(prefix: str, n: int, width: int) -> pa.Array:
    return pa.array([f"{prefix}{k + 1:0{width}d}" for k in range(n)], type=pa.string())


def _decode(codes: np.ndarray, vocab: list[str]) -> pa.Array:
    idx = pa.array(codes.astype(np.int32), mask=codes < 0)
    return pa.DictionaryArray.from_arrays(idx, pa.array(vocab, type=pa.string())).dictionary_decode()


def item_truth_table(tax: Taxonomy, brands: Brands, cat: Catalog, item_ids: pa.Array) -> pa.Table:
    cols = {"item_id": item_ids,
            "type_id": _decode(cat.type_idx, [t.id for t in tax.types]),
            "brand": _decode(cat.brand_idx, brands.names)}
    for a in ATTRIBUTES:
        cols[a] = _decode(cat.attrs[a], tax.vocab[a])
    return pa.table(cols)


def query_truth_table(tax: Taxonomy, brands: Brands, qs: QuerySet) -> pa.Table:
    cols = {"query_id": pa.array(qs.ids, type=pa.string()), "text": pa.array(qs.text, type=pa.string()),
            "kind": pa.array(qs.kind, type=pa.string()),
            "type_id": _decode(qs.type_idx, [t.id for t in tax.types]),
            "brand": _decode(qs.brand_idx, brands.names)}
    for a in ATTRIBUTES:
        cols[a] = _decode(qs.attrs[a], tax.vocab[a])
    return pa.table(cols)


def simulate(cfg: SimulateConfig, out_dir: Path, progress: bool = True) -> dict:
    """Simulate a world from ``cfg`` into ``out_dir`` (created if needed); returns summary counts."""
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    stages = tqdm(total=7, desc="simulate world", disable=not progress)

    def done(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 3)
        log.info("%s done in %.2fs", name, timings[name])
        stages.set_postfix_str(name)
        stages.update(1)
        return time.perf_counter()

    t = time.perf_counter()
    grading = {"minor_attributes": list(cfg.minor_attributes),
               "substitute_max_violation": cfg.substitute_max_violation}
    tax = Taxonomy.default(grading)
    type_weights = zipf_weights(len(tax), cfg.type_zipf, rng_for(cfg.seed, "types"))
    brands = make_brands(tax, cfg)
    cat = make_catalog(tax, brands, cfg, type_weights)
    n = len(cat)
    item_ids = _ids("p", n, max(7, len(str(n))))
    t = done("catalog", t)

    qs = make_queries(tax, brands, cat, cfg, type_weights)
    t = done("queries", t)

    items_truth = item_truth_table(tax, brands, cat, item_ids)
    queries_truth = query_truth_table(tax, brands, qs)
    tax_json = tax.to_json()
    oracle = TruthOracle(tax_json, items_truth, queries_truth)
    cats = categories(tax)
    docs = [f"{title} {brands.names[b]} {cats[ti]}"
            for title, b, ti in zip(cat.titles, cat.brand_idx.tolist(), cat.type_idx.tolist())]
    ranked = bm25_candidates(docs, qs.text, cfg, progress)
    del docs
    t = done("bm25", t)

    nq, K = ranked.docs.shape
    cand_grades = oracle.grade_idx(np.repeat(np.arange(nq), K), np.maximum(ranked.docs, 0).ravel()).reshape(nq, K)
    order = np.argsort(cat.popularity, kind="stable")
    pop_pct = np.empty(n)
    pop_pct[order] = np.arange(n) / max(n - 1, 1)
    eng = simulate_engagement(ranked, cand_grades, pop_pct, qs.frequency, cfg, progress)
    t = done("engagement", t)

    labels = sample_labels(tax, oracle, eng.top, cfg)
    t = done("labels", t)

    # ------------------------------------------------------------------ write
    q_ids = pa.array(qs.ids, type=pa.string())
    _write_products(out / FILES["products"], tax, brands, cat, cfg, item_ids, cats, progress)
    pacsv.write_csv(pa.table({"query_id": q_ids, "text": pa.array(qs.text, type=pa.string()),
                              "frequency": pa.array(qs.frequency)}), out / FILES["queries"], _CSV)
    pacsv.write_csv(pa.table({
        "query_id": q_ids.take(pa.array(eng.q)), "item_id": item_ids.take(pa.array(eng.item)),
        "impressions": pa.array(eng.impressions), "clicks": pa.array(eng.clicks),
        "add_to_carts": pa.array(eng.add_to_carts), "orders": pa.array(eng.orders),
        "position": pa.array(eng.position)}), out / FILES["engagement"], _CSV)
    pacsv.write_csv(pa.table({
        "query_id": q_ids.take(pa.array(labels.q)), "item_id": item_ids.take(pa.array(labels.item)),
        "grade": pa.array(labels.grade), "annotator": pa.array(labels.annotator, type=pa.string()),
        "split": pa.array(labels.split, type=pa.string())}), out / FILES["human_labels"], _CSV)
    pq.write_table(items_truth, out / FILES["truth_items"])
    pq.write_table(queries_truth, out / FILES["truth_queries"])
    (out / FILES["taxonomy"]).write_text(json.dumps(tax_json, indent=1))

    label_dist = np.bincount(labels.grade, minlength=5)
    truth_dist = np.bincount(labels.truth, minlength=5)
    kinds, kind_counts = np.unique(np.asarray(qs.kind), return_counts=True)
    counts = {
        "products": n, "brands": len(brands.names), "types": len(tax), "queries": len(qs),
        "sessions": int(qs.frequency.sum()), "engagement_rows": len(eng.q),
        "impressions": int(eng.impressions.sum()), "clicks": int(eng.clicks.sum()),
        "add_to_carts": int(eng.add_to_carts.sum()), "orders": int(eng.orders.sum()),
        "label_queries": int(len(np.unique(labels.q))), "labels": len(labels.q),
        "label_grade_counts": label_dist.tolist(), "label_truth_grade_counts": truth_dist.tolist(),
        "annotator_agreement": round(float((labels.grade == labels.truth).mean()), 4),
        "query_kinds": {str(k): int(c) for k, c in zip(kinds, kind_counts)},
        "splits": {s: int(len(np.unique(labels.q[np.asarray(labels.split) == s]))) for s in cfg.split_fractions},
    }
    manifest = {"format": FORMAT, "seed": cfg.seed, "config": cfg.model_dump(mode="json"), "counts": counts,
                "files": FILES}
    (out / FILES["manifest"]).write_text(json.dumps(manifest, indent=1))
    done("write", t)
    stages.close()
    return {**counts, "out_dir": str(out), "seconds": timings}


def _write_products(path: Path, tax: Taxonomy, brands: Brands, cat: Catalog, cfg: SimulateConfig,
                    item_ids: pa.Array, cats: list[str], progress: bool) -> None:
    schema = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("description", pa.string()),
                        ("brand", pa.string()), ("category", pa.string()), ("attributes", pa.string()),
                        ("popularity", pa.float64())])
    n = len(cat)
    vocab = {a: tax.vocab[a] for a in ATTRIBUTES}
    with pacsv.CSVWriter(path, schema, write_options=_CSV) as w:
        for c in tqdm(range((n + CHUNK - 1) // CHUNK), desc="write products", disable=not progress):
            lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
            codes = {a: cat.attrs[a][lo:hi].tolist() for a in ATTRIBUTES}
            attrs = [json.dumps({a: vocab[a][codes[a][j]] for a in ATTRIBUTES if codes[a][j] >= 0})
                     for j in range(hi - lo)]
            w.write_table(pa.table({
                "item_id": item_ids[lo:hi], "title": pa.array(cat.titles[lo:hi], type=pa.string()),
                "description": pa.array(describe_chunk(tax, brands, cat, cfg, c), type=pa.string()),
                "brand": pa.array([brands.names[b] for b in cat.brand_idx[lo:hi].tolist()], type=pa.string()),
                "category": pa.array([cats[t] for t in cat.type_idx[lo:hi].tolist()], type=pa.string()),
                "attributes": pa.array(attrs, type=pa.string()),
                "popularity": pa.array(cat.popularity[lo:hi])}, schema=schema))
