from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assay.config import IngestConfig
from assay.data import ingest
from assay.store import Store

P_HEADER = ["product_id", "product_name", "product_class", "category hierarchy", "product_description",
            "product_features", "rating_count", "average_rating", "review_count"]


def _write_lines(path: Path, lines: list[str | bytes]) -> None:
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else line.encode())
            fh.write(b"\n")


@pytest.fixture()
def wands_dir(tmp_path) -> Path:
    d = tmp_path / "wands"
    d.mkdir()
    _write_lines(d / "product.csv", [
        "\t".join(P_HEADER),                                                                           # line 1
        "0\tsolid wood platform bed\tBeds\tFurniture / Bedroom / Beds\ta sturdy bed\tcolor:brown|material:oak\t15\t4.5\t15",
        "1\tblue velvet sofa\tSofas\tFurniture / Living Room / Sofas\tsoft sofa, 3\" legs\tcolor:blue\t3\t4.0\t3",
        "2\t\tRugs\tDecor / Rugs\tan item with no title\t\t1\t5\t1",                                  # line 4: empty title
        "3\tcoffee table\tTables\tFurniture / Tables\ttoo\tmany\ttabs\there\t1\t2\t3",                   # line 5: bad tabs
        b"4\tbroken \xff\xfe name\tRugs\tDecor\tx\t\t1\t1\t1",                                         # line 6: bad encoding
        "5\tround area rug\tRugs\tDecor / Rugs\t\"quoted\" start\tcolor:red\t\t\t",                    # line 7: ok, quote
    ])
    _write_lines(d / "query.csv", [
        "query_id\tquery\tquery_class",
        "0\tplatform bed\tBeds",
        "1\tvelvet couch\tSofas",
        "2\t\tRugs",                                                                                   # line 4: empty text
    ])
    _write_lines(d / "label.csv", [
        "id\tquery_id\tproduct_id\tlabel",
        "0\t0\t0\tExact",
        "1\t0\t1\tIrrelevant",
        "2\t1\t1\tPartial",
        "3\t1\t99\tExact",                                                                             # line 5: unknown product
        "4\t1\t5\tPerfect",                                                                            # line 6: off the scale
        "5\t1\t0",                                                                                     # line 7: bad tabs
        "6\t0\t5\tIrrelevant",
    ])
    return d


def _rejects(store: Store) -> list[dict]:
    return store.query("SELECT target, file, line, reason FROM rejects ORDER BY target, line").to_pylist()


def test_wands_ingest_keeps_good_rows_and_rejects_bad_ones_with_lines(tmp_path, wands_dir):
    with Store.open(tmp_path / "ws") as store:
        s = ingest.run(IngestConfig(), store, path=wands_dir, progress=False)
        assert s["format"] == "wands"
        assert sorted(store.query("SELECT item_id FROM products").column(0).to_pylist()) == ["0", "1", "5"]
        assert store.count("queries") == 2
        labels = store.query("SELECT query_id, item_id, grade FROM human_labels ORDER BY query_id, item_id").to_pylist()
        assert [(r["query_id"], r["item_id"], r["grade"]) for r in labels] == [
            ("0", "0", 4), ("0", "1", 0), ("0", "5", 0), ("1", "1", 2)]
        rej = {(Path(r["file"]).name, r["line"]): r["reason"] for r in _rejects(store)}
        assert set(rej) == {("product.csv", 4), ("product.csv", 5), ("product.csv", 6), ("query.csv", 4),
                            ("label.csv", 5), ("label.csv", 6), ("label.csv", 7)}
        assert "missing title" in rej[("product.csv", 4)]
        assert "expected 9 tab-separated fields" in rej[("product.csv", 5)]
        assert "bad encoding" in rej[("product.csv", 6)]
        assert "unknown item id 99" in rej[("label.csv", 5)]
        assert "'Perfect' is not Exact, Partial or Irrelevant" in rej[("label.csv", 6)]
        attrs = json.loads(store.scalar("SELECT attributes FROM products WHERE item_id = '0'"))
        assert attrs == {"color": "brown", "material": "oak", "product_class": "Beds"}
        assert store.scalar("SELECT description FROM products WHERE item_id = '5'") == '"quoted" start'
        # every record is accounted for: read = accepted + rejected (+ collapsed + skipped)
        for t in s["tables"].values():
            assert t["read"] == t["accepted"] + t["rejected"] + t["duplicates_collapsed"] + t["skipped"]
        # labels got a split by query, all labels of a query share it
        assert store.scalar("SELECT count(*) FROM (SELECT query_id FROM human_labels GROUP BY query_id "
                            "HAVING count(DISTINCT split) > 1)") == 0
        assert store.scalar("SELECT count(*) FROM human_labels WHERE split IS NULL") == 0


def test_generic_csv_rejects_and_duplicate_rule(tmp_path):
    d = tmp_path
    _write_lines(d / "products.csv", [
        "item_id,title,description,brand,category,attributes,popularity",
        'a,Red chair,"a chair,\nwith a two-line description",Acme,Furniture,"{""color"": ""red""}",1.5',  # lines 2-3
        'b,Blue lamp,,Lumo,Lighting,{not json},2',                                                       # line 4
        'c,Green rug,,Rugco,Decor,"[1, 2]",3',                                                           # line 5
        'd,Desk,,Acme,Furniture,,lots',                                                                  # line 6
        'a,Red chair v2,,Acme,Furniture,,1.5',                                                           # line 7: dup of a
        'e,Same,,X,Y,,1',
        'e,Same,,X,Y,,1',                                                                                # identical dup
    ])
    _write_lines(d / "queries.csv", ["query_id,text,frequency", "q1,red chair,10", "q2,lamp,-3", "q3,rug,2.5"])
    _write_lines(d / "labels.csv", [
        "query_id,item_id,grade,annotator",
        "q1,a,4,ann1", "q1,e,7,ann1", "q9,a,3,ann1", "q1,e,,ann1", "q1,e,1,ann2"])
    with Store.open(d / "ws") as store:
        s = ingest.run(IngestConfig(), store, files={"products": d / "products.csv", "queries": d / "queries.csv",
                                                     "human_labels": d / "labels.csv"}, progress=False)
        assert store.scalar("SELECT title FROM products WHERE item_id = 'a'") == "Red chair v2"
        assert sorted(store.query("SELECT item_id FROM products").column(0).to_pylist()) == ["a", "e"]
        rej = {(Path(r["file"]).name, r["line"]): r["reason"] for r in _rejects(store)}
        assert "broken JSON" in rej[("products.csv", 4)]
        assert "must be a JSON object" in rej[("products.csv", 5)]
        assert "popularity 'lots' is not a number" in rej[("products.csv", 6)]
        assert "duplicate key (a); superseded by" in rej[("products.csv", 2)] and rej[("products.csv", 2)].endswith(":7")
        assert "frequency -3 is negative" in rej[("queries.csv", 3)]
        assert "not a whole number" in rej[("queries.csv", 4)]
        assert "grade 7 is outside the 0-4 scale" in rej[("labels.csv", 3)]
        assert "unknown query id q9" in rej[("labels.csv", 4)]
        assert "missing grade" in rej[("labels.csv", 5)]
        assert s["tables"]["products"]["duplicates_collapsed"] == 1
        assert store.count("human_labels") == 2


def test_reingest_upserts_and_reports_replaced(tmp_path):
    f = tmp_path / "products.jsonl"
    f.write_text("\n".join(json.dumps({"item_id": f"i{i}", "title": f"t{i}", "attributes": {"k": i}}) for i in range(5))
                 + "\n{broken\n")
    with Store.open(tmp_path / "ws") as store:
        s1 = ingest.run(IngestConfig(), store, files={"products": f}, progress=False)
        s2 = ingest.run(IngestConfig(), store, files={"products": f}, progress=False)
        assert store.count("products") == 5
        assert s1["tables"]["products"]["inserted"] == 5 and s2["tables"]["products"]["replaced"] == 5
        assert json.loads(store.scalar("SELECT attributes FROM products WHERE item_id = 'i3'")) == {"k": 3}
        assert store.count("rejects", "reason LIKE 'broken JSON%' AND line = 6") == 2


def test_column_map_and_parquet(tmp_path):
    pq.write_table(pa.table({"sku": ["x1", "x2", None], "name": ["Lamp", "Sofa", "Nameless"]}), tmp_path / "cat.parquet")
    cfg = IngestConfig(columns={"products": {"item_id": "sku"}})
    with Store.open(tmp_path / "ws") as store:
        ingest.run(cfg, store, files={"products": tmp_path / "cat.parquet"},
                   column_map={"products": {"title": "name"}}, progress=False)
        assert store.count("products") == 2
        assert store.query("SELECT line, reason FROM rejects").to_pylist() == [
            {"line": 3, "reason": "missing item id (column 'sku')"}]
    with pytest.raises(ValueError, match="unknown target column"):
        with Store.open(tmp_path / "ws2") as store:
            ingest.run(cfg, store, files={"products": tmp_path / "cat.parquet"},
                       column_map={"products": {"titel": "name"}}, progress=False)


def test_esci_parquet(tmp_path):
    d = tmp_path / "esci"
    d.mkdir()
    pq.write_table(pa.table({
        "example_id": [1, 2, 3, 4, 5], "query": ["usb cable", "usb cable", "usb cable", "cable jp", "usb cable"],
        "query_id": [10, 10, 10, 11, 10], "product_id": ["A", "B", "C", "D", "Z"],
        "product_locale": ["us", "us", "us", "jp", "us"], "esci_label": ["E", "S", "X", "E", "C"],
        "small_version": [1] * 5, "large_version": [1] * 5, "split": ["train", "train", "test", "test", "test"],
    }), d / "shopping_queries_dataset_examples.parquet")
    pq.write_table(pa.table({
        "product_id": ["A", "B", "C", "D"], "product_title": ["USB-C cable", "Lightning cable", "Charger", "JP"],
        "product_description": [None, "desc", None, None], "product_bullet_point": ["fast", None, None, None],
        "product_brand": ["Anker", "Apple", None, None], "product_color": ["black", None, None, None],
        "product_locale": ["us", "us", "us", "jp"],
    }), d / "shopping_queries_dataset_products.parquet")
    with Store.open(tmp_path / "ws") as store:
        s = ingest.run(IngestConfig(), store, path=d, progress=False)
        assert s["format"] == "esci"
        assert store.count("products") == 3 and store.count("queries") == 1
        grades = dict(store.exec("SELECT item_id, grade FROM human_labels"))
        assert grades == {"A": 4, "B": 2}
        rej = store.query("SELECT line, reason FROM rejects ORDER BY line").to_pylist()
        assert rej == [{"line": 3, "reason": "ESCI label 'X' is not E, S, C or I"},
                       {"line": 5, "reason": "unknown item id Z"}]
        assert s["tables"]["queries"]["duplicates_collapsed"] == 3  # one query row per example, collapsed
        assert s["tables"]["products"]["skipped"] == 1  # the jp product, outside esci_locale


def test_segments_follow_cumulative_traffic(tmp_path):
    rows = ["query_id,text,frequency"] + [f"q{i},query {i},{f}" for i, f in enumerate([500, 200, 100, 80, 60, 30, 20, 10])] \
        + ["qx,no frequency,"]
    _write_lines(tmp_path / "queries.csv", rows)
    with Store.open(tmp_path / "ws") as store:
        ingest.run(IngestConfig(), store, files={"queries": tmp_path / "queries.csv"}, progress=False)
        seg = dict(store.exec("SELECT query_id, segment FROM queries"))
    # total 1000: q0 starts at 0 (<500: head); q1 at 500 (<800: torso); q2 at 700 torso; q3 at 800 tail
    assert seg["q0"] == "head" and seg["q1"] == "torso" and seg["q2"] == "torso"
    assert all(seg[f"q{i}"] == "tail" for i in range(3, 8))
    assert seg["qx"] == "unknown"


def test_bad_directory_errors_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with Store.open(tmp_path / "ws") as store:
        with pytest.raises(ValueError, match="cannot tell the format"):
            ingest.run(IngestConfig(), store, path=tmp_path / "empty", progress=False)
        with pytest.raises(ValueError, match="unknown format 'xml'"):
            ingest.run(IngestConfig(), store, path=tmp_path / "empty", fmt="xml", progress=False)
        with pytest.raises(FileNotFoundError, match="not a WANDS directory"):
            ingest.run(IngestConfig(), store, path=tmp_path / "empty", fmt="wands", progress=False)
        # a failed ingest leaves no partial rows and records the failed run
        assert store.count("products") == 0
