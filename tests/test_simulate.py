"""Tests of the simulated e-commerce world (assay.data.simulate). Small worlds; the whole file runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from assay.data.simulate import SimulateConfig, TruthOracle, simulate
from assay.data.simulate.taxonomy import ATTRIBUTES, Taxonomy, title_case

CSVS = ("products.csv", "queries.csv", "engagement.csv", "human_labels.csv")


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    cfg = SimulateConfig(n_products=4000, n_queries=500, label_queries=0.3, seed=7)
    simulate(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def oracle(world) -> TruthOracle:
    return TruthOracle.from_dir(world)


def _csv(world: Path, name: str) -> pa.Table:
    return pacsv.read_csv(world / name)


@pytest.fixture(scope="session")
def tax_json() -> dict:
    return Taxonomy.default({"minor_attributes": ["color", "size"], "substitute_max_violation": 1.0}).to_json()


# ---------------------------------------------------------------------------------------------------- taxonomy
def test_taxonomy_is_large_symmetric_and_unambiguous():
    tax = Taxonomy.default()
    assert len(tax) >= 150
    assert len(tax.departments) == 18
    assert {t.department for t in tax.types} == set(tax.departments)
    assert (tax.substitute == tax.substitute.T).all() and (tax.complement == tax.complement.T).all()
    assert not (tax.substitute & tax.complement).any()
    forms = [s for t in tax.types for s in t.names]
    assert len(forms) == len(set(forms)), "a surface form belongs to two types"
    assert sum(len(t.names) > 1 for t in tax.types) / len(tax) > 0.9  # nearly every type has synonyms
    i = tax.index
    assert tax.trap[i["coffee_maker"], i["coffee_table"]]
    assert tax.trap[i["bed_frame"], i["dog_bed"]]
    assert tax.complement[i["smartphone"], i["phone_case"]]
    assert tax.substitute[i["sofa"], i["loveseat"]]


def test_taxonomy_rejects_bad_relations():
    tax = Taxonomy.default()
    tax.types[0].substitutes = ["no_such_type"]
    with pytest.raises(ValueError, match="unknown type 'no_such_type'"):
        Taxonomy(tax.departments, tax.types)


# ---------------------------------------------------------------------------------------------------- grading
def _items(rows: list[dict]) -> pa.Table:
    cols = {c: [r.get(c) for r in rows] for c in ("item_id", "type_id", "brand", *ATTRIBUTES)}
    return pa.table({c: pa.array(v, type=pa.string()) for c, v in cols.items()})


def _queries(rows: list[dict]) -> pa.Table:
    cols = {c: [r.get(c) for r in rows] for c in ("query_id", "text", "kind", "type_id", "brand", *ATTRIBUTES)}
    return pa.table({c: pa.array(v, type=pa.string()) for c, v in cols.items()})


@pytest.fixture(scope="session")
def toy_oracle(tax_json) -> TruthOracle:
    items = _items([
        dict(item_id="p1", type_id="coffee_maker", brand="Acme", color="black", size="12 cup"),
        dict(item_id="p2", type_id="coffee_maker", brand="Acme", color="red", size="12 cup"),
        dict(item_id="p3", type_id="coffee_table", brand="Oakly", color="black", material="oak"),
        dict(item_id="p4", type_id="coffee_filters", brand="Acme"),
        dict(item_id="p5", type_id="espresso_machine", brand="Brewco", color="black"),
        dict(item_id="p6", type_id="coffee_beans", brand="Brewco"),
        dict(item_id="p7", type_id="coffee_maker", brand="Brewco", color="red", size="4 cup"),
        dict(item_id="p8", type_id="sofa", brand="Oakly", color="blue", material="velvet"),
        dict(item_id="p9", type_id="sofa", brand="Oakly", color="blue", material="leather"),
        dict(item_id="p10", type_id="loveseat", brand="Oakly", color="gray", material="velvet"),
        dict(item_id="p11", type_id="loveseat", brand="Oakly", color="gray", material="linen"),
        dict(item_id="p12", type_id="dog_bed", brand="Pawz", color="blue"),
        dict(item_id="p13", type_id="bed_frame", brand="Oakly", size="queen"),
        dict(item_id="p14", type_id="mattress", brand="Oakly", size="queen"),
        dict(item_id="p15", type_id="hoodie", brand="Acme", gender="unisex", size="m"),
        dict(item_id="p16", type_id="hoodie", brand="Acme", gender="women", size="m"),
        dict(item_id="p17", type_id="phone_case", brand="Acme"),
        dict(item_id="p18", type_id="smartphone", brand="Acme"),
        dict(item_id="p19", type_id="wine_rack", brand="Oakly"),
        dict(item_id="p20", type_id="dryer", brand="Brewco"),
        dict(item_id="p21", type_id="table_lamp", brand="Oakly"),
    ])
    queries = _queries([
        dict(query_id="q1", text="black coffee maker 12 cup", kind="canonical", type_id="coffee_maker",
             color="black", size="12 cup"),
        dict(query_id="q2", text="blue velvet couch", kind="synonym", type_id="sofa", color="blue", material="velvet"),
        dict(query_id="q3", text="queen bed", kind="canonical", type_id="bed_frame", size="queen"),
        dict(query_id="q4", text="mens hoodie", kind="canonical", type_id="hoodie", gender="men"),
        dict(query_id="q5", text="acme", kind="brand", brand="Acme"),
        dict(query_id="q6", text="phone", kind="canonical", type_id="smartphone"),
        dict(query_id="q7", text="wine glass", kind="canonical", type_id="wine_glass"),
        dict(query_id="q8", text="hair dryer", kind="canonical", type_id="hair_dryer"),
        dict(query_id="q9", text="dining table", kind="canonical", type_id="dining_table"),
        dict(query_id="q10", text="brewco coffee maker", kind="canonical", type_id="coffee_maker", brand="Brewco"),
    ])
    return TruthOracle(tax_json, items, queries)


def _g(oracle, q, items):
    return oracle.grade(np.array([q] * len(items)), np.array(items)).tolist()


def test_grades_follow_the_documented_rules(toy_oracle):
    o = toy_oracle
    # exact, minor (color) off, lexical trap, complement, substitute, complement (grocery), two minors off
    assert _g(o, "q1", ["p1", "p2", "p3", "p4", "p5", "p6", "p7"]) == [4, 3, 0, 1, 2, 1, 2]
    # sofa: exact, major (material) off -> 2; loveseat with a minor off -> 2; with minor + major off -> 0
    assert _g(o, "q2", ["p8", "p9", "p10", "p11"]) == [4, 2, 2, 0]
    # "bed": dog bed is a trap (0), mattress a complement (1)
    assert _g(o, "q3", ["p13", "p12", "p14"]) == [4, 0, 1]
    # unisex satisfies men; women does not (major) -> 2
    assert _g(o, "q4", ["p15", "p16"]) == [4, 2]
    # brand-only: that brand's items are exact, the rest 0
    assert _g(o, "q5", ["p1", "p17", "p3", "p5"]) == [4, 4, 0, 0]
    assert _g(o, "q6", ["p18", "p17", "p19"]) == [4, 1, 0]
    assert _g(o, "q7", ["p19"]) == [0]  # wine rack for "wine glass"
    assert _g(o, "q8", ["p20"]) == [0]  # dryer for "hair dryer"
    assert _g(o, "q9", ["p21"]) == [0]  # table lamp for "dining table"
    # stated brand is a major constraint
    assert _g(o, "q10", ["p7", "p1"]) == [4, 2]


def test_grade_is_vectorised_and_names_unknown_ids(toy_oracle):
    g = toy_oracle.grade(np.array(["q1", "q2", "q5"]), np.array(["p1", "p8", "p17"]))
    assert g.dtype == np.int8 and g.tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="unknown item ids.*p999"):
        toy_oracle.grade(np.array(["q1"]), np.array(["p999"]))
    with pytest.raises(ValueError, match="unknown query ids.*qX"):
        toy_oracle.grade(np.array(["qX", "q1"]), np.array(["p1", "p1"]))
    with pytest.raises(ValueError, match="unknown query_id"):
        toy_oracle.relevant("nope")


def test_relevant_matches_brute_force(oracle):
    all_items = oracle.item_ids
    rng = np.random.default_rng(0)
    for q in rng.choice(oracle.query_ids, size=15, replace=False):
        g = oracle.grade(np.array([q] * len(all_items)), all_items)
        for m in (4, 3, 2, 1):
            assert set(oracle.relevant(str(q), m)) == set(all_items[g >= m]), (q, m)


# ---------------------------------------------------------------------------------------------------- world
def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    cfg = SimulateConfig(n_products=800, n_queries=80, seed=3)
    simulate(cfg, tmp_path / "a", progress=False)
    simulate(cfg, tmp_path / "b", progress=False)
    simulate(cfg.model_copy(update={"seed": 4}), tmp_path / "c", progress=False)
    for f in CSVS:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "products.csv").read_bytes() != (tmp_path / "c" / "products.csv").read_bytes()


def test_manifest_and_files(world):
    m = json.loads((world / "world.json").read_text())
    assert m["format"] == "assay-sim/1" and m["seed"] == 7
    assert SimulateConfig(**m["config"]).n_products == 4000
    for f in m["files"].values():
        assert (world / f).exists(), f
    p = _csv(world, "products.csv")
    assert p.column_names == ["item_id", "title", "description", "brand", "category", "attributes", "popularity"]
    assert p.num_rows == 4000 and p["item_id"][0].as_py() == "p0000001"
    assert _csv(world, "queries.csv").column_names == ["query_id", "text", "frequency"]
    assert _csv(world, "engagement.csv").column_names == [
        "query_id", "item_id", "impressions", "clicks", "add_to_carts", "orders", "position"]
    assert _csv(world, "human_labels.csv").column_names == ["query_id", "item_id", "grade", "annotator", "split"]


def test_products_match_truth(world):
    p = _csv(world, "products.csv")
    t = pq.read_table(world / "truth" / "items.parquet")
    assert p["item_id"].to_pylist() == t["item_id"].to_pylist()
    assert p["brand"].to_pylist() == t["brand"].to_pylist()
    tax = json.loads((world / "truth" / "taxonomy.json").read_text())
    types = {x["id"]: x for x in tax["types"]}
    rows = t.to_pylist()
    for k in range(0, 4000, 37):
        attrs = json.loads(p["attributes"][k].as_py())
        truth = {a: rows[k][a] for a in ATTRIBUTES if rows[k][a] is not None}
        assert attrs == truth
        typ = types[rows[k]["type_id"]]
        assert set(attrs) == set(typ["attributes"])  # an item carries exactly its type's attributes
        assert p["category"][k].as_py().endswith("> " + title_case(typ["name"]))
    # descriptions sometimes name a complement type (a lexical trap for term matching)
    desc = p["description"].to_pylist()
    assert sum(("Pairs well with our" in d) or ("sold separately" in d) for d in desc) > 200
    assert (np.asarray(p["popularity"]) > 0).all()


def test_queries_unique_with_all_kinds_and_synonyms_map_to_type(world, tax_json):
    q = pq.read_table(world / "truth" / "queries.parquet").to_pylist()
    texts = [r["text"] for r in q]
    assert len(texts) == len(set(texts)) == 500
    kinds = {r["kind"] for r in q}
    assert kinds == {"canonical", "synonym", "typo", "shuffle", "descriptive", "brand"}
    forms = {t["id"]: t["surface_forms"] for t in tax_json["types"]}
    syn = [r for r in q if r["kind"] == "synonym"]
    assert len(syn) > 30
    for r in syn:
        assert any(f in r["text"] for f in forms[r["type_id"]][1:]), r
    for r in q:
        if r["kind"] == "brand":
            assert r["type_id"] is None and r["brand"].lower() == r["text"]
        elif r["kind"] == "canonical":
            assert forms[r["type_id"]][0] in r["text"], r
    freq = _csv(world, "queries.csv")["frequency"].to_numpy()
    assert freq.min() >= 1 and freq.sum() == 500 * 100
    assert freq[:50].sum() > 3 * freq[-250:].sum()  # Zipf: 10% of queries carry far more traffic than the tail half


def test_exact_items_exist_for_most_queries(oracle):
    has = [len(oracle.relevant(str(q), 4)) > 0 for q in oracle.query_ids]
    assert np.mean(has) > 0.8


def test_human_labels_grades_agreement_and_splits(world, oracle):
    h = _csv(world, "human_labels.csv")
    grade = h["grade"].to_numpy()
    truth = oracle.grade(h["query_id"].to_numpy(zero_copy_only=False), h["item_id"].to_numpy(zero_copy_only=False))
    assert set(np.unique(grade)) == {0, 1, 2, 3, 4}
    assert set(np.unique(truth)) == {0, 1, 2, 3, 4}
    agree = (grade == truth).mean()
    assert 0.85 <= agree <= 0.93, agree
    wrong = grade != truth
    assert (np.abs(grade[wrong].astype(int) - truth[wrong]) == 1).mean() > 0.7  # mistakes are mostly +-1
    assert len(set(h["annotator"].to_pylist())) >= 3
    qid = np.asarray(h["query_id"].to_pylist())
    split = np.asarray(h["split"].to_pylist())
    per_q = {s: set(qid[split == s]) for s in ("train", "calib", "eval")}
    assert not (per_q["train"] & per_q["calib"]) and not (per_q["train"] & per_q["eval"])
    assert not (per_q["calib"] & per_q["eval"])
    n = sum(len(v) for v in per_q.values())
    assert n == 150 and abs(len(per_q["train"]) / n - 0.6) < 0.05
    pairs = list(zip(qid, h["item_id"].to_pylist()))
    assert len(pairs) == len(set(pairs))
    per_query = np.unique(qid, return_counts=True)[1]
    assert 15 <= np.median(per_query) <= 30


def test_engagement_counts_position_bias_and_popularity(world, oracle):
    e = _csv(world, "engagement.csv")
    imp, clk = e["impressions"].to_numpy(), e["clicks"].to_numpy()
    atc, orders = e["add_to_carts"].to_numpy(), e["orders"].to_numpy()
    pos = e["position"].to_numpy()
    assert (clk <= imp).all() and (atc <= clk).all() and (orders <= atc).all() and (imp > 0).all()
    assert pos.min() >= 1 and pos.max() <= 20
    qid = e["query_id"].to_numpy(zero_copy_only=False)
    iid = e["item_id"].to_numpy(zero_copy_only=False)
    g = oracle.grade(qid, iid)
    # position bias: same grade, CTR at the top slot beats CTR at slot ~10
    for grade in (0, 4):
        top = (g == grade) & (pos < 1.5)
        mid = (g == grade) & (np.abs(pos - 10) < 1.5)
        assert top.sum() > 10 and mid.sum() > 10
        assert clk[top].sum() / imp[top].sum() > 1.5 * clk[mid].sum() / imp[mid].sum()
    # relevance matters too
    assert clk[g == 4].sum() / imp[g == 4].sum() > 2 * clk[g == 0].sum() / imp[g == 0].sum()
    # popular but embarrassing items still collect clicks
    p = _csv(world, "products.csv")
    popularity = dict(zip(p["item_id"].to_pylist(), p["popularity"].to_pylist()))
    thresh = np.quantile(np.asarray(p["popularity"]), 0.9)
    pop0 = (g == 0) & (np.array([popularity[i] for i in iid]) >= thresh)
    assert pop0.sum() > 0 and clk[pop0].sum() > 0
    # tail queries get fewer impressions than head queries
    q = _csv(world, "queries.csv")
    freq = dict(zip(q["query_id"].to_pylist(), q["frequency"].to_pylist()))
    imp_per_q: dict[str, int] = {}
    for k, v in zip(qid, imp):
        imp_per_q[k] = imp_per_q.get(k, 0) + int(v)
    order = sorted(imp_per_q, key=lambda k: -freq[k])
    head, tail = order[:50], order[-200:]
    assert np.mean([imp_per_q[k] for k in head]) > 10 * np.mean([imp_per_q[k] for k in tail])


def test_engagement_ranker_is_lexical(world, oracle):
    """The BM25 ranker falls for lexical traps: some shown items are grade-0 items sharing a word."""
    e = _csv(world, "engagement.csv")
    g = oracle.grade(e["query_id"].to_numpy(zero_copy_only=False), e["item_id"].to_numpy(zero_copy_only=False))
    share0 = (g == 0).mean()
    assert 0.05 < share0 < 0.9
    assert (g >= 3).mean() > 0.1


# ---------------------------------------------------------------------------------------------------- config
def test_config_validation():
    with pytest.raises(ValidationError, match="extra"):
        SimulateConfig(n_product=10)
    with pytest.raises(ValidationError, match="split_fractions must sum to 1"):
        SimulateConfig(split_fractions={"train": 0.5, "calib": 0.2, "eval": 0.2})
    with pytest.raises(ValidationError, match="label_pair_mix has unknown sources"):
        SimulateConfig(label_pair_mix={"bogus": 1.0})
    assert SimulateConfig(n_products=100_000).brands == 2000
    assert SimulateConfig(n_products=1000).brands == 40
    assert SimulateConfig(n_products=10_000_000).brands == 5000
    assert SimulateConfig().sessions == 200_000


def test_label_queries_as_count(tmp_path):
    s = simulate(SimulateConfig(n_products=600, n_queries=60, label_queries=12, seed=1), tmp_path, progress=False)
    assert s["label_queries"] == 12
