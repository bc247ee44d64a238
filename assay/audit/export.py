"""`assay export`: the labeled dataset, one row per cascade label, with the lineage people need to audit it.

Reads ``labels`` (one cascade: the newest unless ``export.cascade`` names one; ``ok`` labels whose texts are
unchanged: a stale label is skipped and counted in the summary), ``label_votes``,
``candidates``, ``negatives``, ``examples``, ``human_labels``, ``queries`` and ``products``. Every row carries:

- the pair: query id and text, segment, item id, title and the item text the judges read (``assay.text``);
- mining: each channel's rank and score, n_channels, the prior, the negative kind and similarity;
- the label: grade, the five calibrated probabilities, decided_by, confidence, cascade sha, batch;
- ``votes``: each judge's grade and probabilities with its model id, template sha and parse status;
- the curriculum: tier, stage, target, split and where its grade came from (cascade or human);
- people: the median human grade and how many people graded the pair, when any did;
- run ids: the mining, annotation and curriculum runs that wrote the row.

Formats: ``parquet``, ``jsonl``, ``csv`` (lists as JSON text), ``hf`` (a Hugging Face ``datasets`` folder, ``load_from_disk``) and
``labelstudio`` (Label Studio tasks with the cascade's grade as a prediction, plus the labeling config to import
them with). Rows stream from DuckDB in record batches, so memory does not grow with the export. Filters: tier,
grade, decided_by (judge), a confidence range, segment, and run (any of the row's run ids).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from assay.annotate.pairs import HUMAN_GRADE_SQL, count_stale, current_labels_sql
from assay.config import ExportConfig
from assay.store import Store

FORMATS = ("parquet", "jsonl", "csv", "hf", "labelstudio")
GRADE_HINTS = ("0 irrelevant", "1 related but wrong", "2 partly relevant", "3 relevant", "4 exact match")

LABEL_CONFIG = """<View>
  <Header value="Query: $query"/>
  <Text name="item" value="$item_text"/>
  <Choices name="grade" toName="item" choice="single-radio" showInline="true" required="true">
    <Choice value="0" hint="irrelevant"/>
    <Choice value="1" hint="related but wrong"/>
    <Choice value="2" hint="partly relevant"/>
    <Choice value="3" hint="relevant"/>
    <Choice value="4" hint="exact match"/>
  </Choices>
</View>
"""


def newest_cascade(store: Store) -> str:
    row = store.exec("""SELECT cascade_sha FROM labels WHERE status = 'ok' GROUP BY cascade_sha
                        ORDER BY max(created_at) DESC LIMIT 1""")
    if not row:
        raise ValueError("the workspace holds no cascade labels; run `assay annotate` first")
    return row[0][0]


def lineage_sql(cascade_sha: str, filters: dict | None = None) -> tuple[str, list]:
    """The export's SELECT (one row per ok label of ``cascade_sha``) and its parameters, with ``filters``:
    tier, grade, decided_by (lists), min_confidence, max_confidence, segment (list), run (a run id)."""
    f = filters or {}
    where, params = ["l.status = 'ok'", "l.cascade_sha = ?"], [cascade_sha]

    def in_list(col: str, values) -> None:
        if values:
            where.append(f"{col} IN ({', '.join('?' for _ in values)})")
            params.extend(values)

    in_list("e.tier", f.get("tier"))
    in_list("l.grade", f.get("grade"))
    in_list("l.decided_by", f.get("decided_by"))
    in_list("coalesce(q.segment, 'unknown')", f.get("segment"))
    if f.get("min_confidence") is not None:
        where.append("l.confidence >= ?")
        params.append(f["min_confidence"])
    if f.get("max_confidence") is not None:
        where.append("l.confidence <= ?")
        params.append(f["max_confidence"])
    if f.get("run"):
        where.append("? IN (c.run_id, n.run_id, l.run_id, e.run_id)")
        params.append(f["run"])
    sql = f"""
    WITH v AS (
        SELECT query_id, item_id,
               list(struct_pack(judge := judge, model := model, prompt_sha := prompt_sha, grade := grade,
                                probs := calibrated, parse_status := parse_status) ORDER BY judge) AS votes
        FROM label_votes WHERE cascade_sha = ? GROUP BY query_id, item_id),
    e AS (SELECT * FROM examples QUALIFY row_number() OVER (PARTITION BY query_id, item_id ORDER BY stage) = 1),
    h AS (SELECT query_id, item_id, {HUMAN_GRADE_SQL} AS human_grade,
                 count(*) AS human_votes, any_value(split) AS human_split
          FROM human_labels GROUP BY query_id, item_id)
    SELECT l.query_id, q.text AS query, coalesce(q.segment, 'unknown') AS segment, l.item_id, p.title, p.brand,
           p.category, p.attributes,
           c.rank_bm25, c.rank_ann, c.rank_click, c.score_bm25, c.score_ann, c.score_click,
           coalesce(c.n_channels, 0)::TINYINT AS n_channels, c.prior, n.kind AS negative_kind,
           n.similarity AS negative_similarity,
           l.grade, l.probs, l.decided_by, l.confidence, l.cascade_sha, l.batch_id, v.votes,
           e.tier, e.stage, e.target, e.split, e.grade_source, h.human_grade, h.human_votes, h.human_split,
           coalesce(c.run_id, n.run_id) AS mine_run_id, l.run_id AS annotate_run_id, e.run_id AS curriculum_run_id
    FROM {current_labels_sql()} l
    JOIN queries q USING (query_id)
    JOIN products p USING (item_id)
    LEFT JOIN candidates c USING (query_id, item_id)
    LEFT JOIN negatives n USING (query_id, item_id)
    LEFT JOIN v USING (query_id, item_id)
    LEFT JOIN e USING (query_id, item_id)
    LEFT JOIN h USING (query_id, item_id)
    WHERE {' AND '.join(where)}
    ORDER BY l.query_id, l.item_id"""
    return sql, [cascade_sha] + params


def with_item_text(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Replace brand, category and attributes by the item text the judges and towers read."""
    from assay.text import item_texts

    tbl = pa.Table.from_batches([batch])
    texts = item_texts(tbl)
    tbl = tbl.drop_columns(["brand", "category", "attributes"])
    tbl = tbl.add_column(tbl.column_names.index("title") + 1, "item_text", pa.array(texts, pa.string()))
    return tbl.combine_chunks().to_batches()[0] if tbl.num_rows else pa.RecordBatch.from_pylist([], tbl.schema)


def rows(store: Store, cascade_sha: str, filters: dict | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    sql, params = lineage_sql(cascade_sha, filters)
    for batch in store.iter_batches(sql, params, batch_size=batch_rows):
        if batch.num_rows:
            yield with_item_text(batch)


def count(store: Store, cascade_sha: str, filters: dict | None) -> int:
    sql, params = lineage_sql(cascade_sha, filters)
    return int(store.exec(f"SELECT count(*) FROM ({sql})", params)[0][0])


def labelstudio_task(row: dict) -> dict:
    """One Label Studio task: what the annotator sees in ``data`` (with the lineage), the cascade's grade as a
    prediction."""
    data = {k: v for k, v in row.items() if k not in ("votes", "probs")}
    data["probs"] = row.get("probs")
    data["votes"] = json.dumps(row.get("votes"), default=str)
    task = {"data": data}
    if row.get("grade") is not None:
        task["predictions"] = [{
            "model_version": f"assay-cascade-{row['cascade_sha'][:12]}",
            "score": None if row.get("confidence") is None else float(row["confidence"]),
            "result": [{"from_name": "grade", "to_name": "item", "type": "choices",
                        "value": {"choices": [str(int(row["grade"]))]}}],
        }]
    return task


def write_batches(batches: Iterator[pa.RecordBatch], out: Path, fmt: str, bar=None) -> int:
    """Stream record batches to ``out`` in ``fmt``; returns rows written. The file (folder for hf) is written
    under a temporary name and renamed when complete, so a cut-off export leaves nothing half-written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {list(FORMATS)}")
    check_dependencies(fmt)  # before a single row is read or written
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    try:
        return _write(batches, out, tmp, fmt, bar)
    except BaseException:
        _remove_partials(tmp)  # nothing half-written is left where the user asked for output
        raise


def check_dependencies(fmt: str) -> None:
    """Raise, naming what to install, when ``fmt`` needs a package this environment lacks."""
    if fmt == "hf":
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ValueError("--format hf needs the Hugging Face `datasets` package: pip install 'assay[export]' "
                             "(or export parquet, which `datasets.load_dataset('parquet', ...)` reads)") from None


def _remove_partials(tmp: Path) -> None:
    for p in (tmp, tmp.with_name(tmp.name + ".parquet"), tmp.with_name(tmp.name + ".cache")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _write(batches: Iterator[pa.RecordBatch], out: Path, tmp: Path, fmt: str, bar) -> int:
    _remove_partials(tmp)
    n = 0
    if fmt in ("parquet", "hf"):
        import pyarrow.parquet as pq

        target = tmp if fmt == "parquet" else tmp.with_name(tmp.name + ".parquet")
        writer = None
        for b in batches:
            if writer is None:
                writer = pq.ParquetWriter(target, b.schema)
            writer.write_batch(b)
            n += b.num_rows
            bar and bar.update(b.num_rows)
        if writer is None:
            raise ValueError("no rows match this export's filters; nothing was written")
        writer.close()
        if fmt == "hf":
            _to_hf(target, tmp)
            target.unlink()
    else:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            if fmt == "labelstudio":
                fh.write("[\n")
            table_writer = None
            for b in batches:
                if fmt == "csv" and table_writer is None:
                    table_writer = csv.DictWriter(fh, fieldnames=b.schema.names)
                    table_writer.writeheader()
                for row in b.to_pylist():
                    if fmt == "csv":  # lists (probabilities, votes) as JSON text in their cell
                        table_writer.writerow({k: json.dumps(v, default=str) if isinstance(v, (list, dict)) else v
                                               for k, v in row.items()})
                    elif fmt == "jsonl":
                        fh.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
                    else:
                        fh.write(("" if n == 0 else ",\n") + json.dumps(labelstudio_task(row), default=str,
                                                                        ensure_ascii=False))
                    n += 1
                bar and bar.update(b.num_rows)
            if fmt == "labelstudio":
                fh.write("\n]\n")
        if n == 0:
            tmp.unlink()
            raise ValueError("no rows match this export's filters; nothing was written")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    if fmt == "labelstudio":
        out.with_name(out.stem + ".label_config.xml").write_text(LABEL_CONFIG)
    return n


def _to_hf(parquet: Path, folder: Path) -> None:
    try:
        import datasets
    except ImportError:
        raise ValueError("--format hf needs the Hugging Face `datasets` package: pip install 'assay[export]'") \
            from None
    cache = folder.with_name(folder.name + ".cache")
    try:
        ds = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(cache))
        ds.save_to_disk(str(folder))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(cfg: ExportConfig, store: Store, out: Path, *, fmt: str | None = None, filters: dict | None = None,
        progress: bool = True) -> dict:
    """Export the labeled dataset to ``out``; records the run (filters, rows, path) in ``runs``."""
    from tqdm.auto import tqdm

    fmt = fmt or _format_of(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {list(FORMATS)}")
    check_dependencies(fmt)
    sha = cfg.cascade or newest_cascade(store)
    filters = {k: v for k, v in (filters or {}).items() if v not in (None, [], ())}
    total = count(store, sha, filters)
    with store.run("export", {"export": cfg.model_dump(mode="json"), "format": fmt, "out": str(out),
                              "filters": filters, "cascade_sha": sha}) as run_id:
        with tqdm(total=total, desc=f"export {fmt}", unit=" rows", disable=not progress) as bar:
            n = write_batches(rows(store, sha, filters, cfg.batch_rows), out, fmt, bar)
        summary = {"run_id": run_id, "rows": n, "format": fmt, "out": str(out), "cascade_sha": sha,
                   "filters": filters, "stale_skipped": count_stale(store, sha)}
        if fmt == "labelstudio":
            summary["label_config"] = str(out.with_name(out.stem + ".label_config.xml"))
        store.finish_run(run_id, summary)
    return summary


def _format_of(out: Path) -> str:
    s = Path(out).suffix.lower()
    return {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv", ".json": "labelstudio", "": "hf"}.get(
        s, s.lstrip("."))
