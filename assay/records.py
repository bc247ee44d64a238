"""Table schemas of the workspace, in one place.

Every table that a stage reads or writes is declared here as an ordered list of
(column, DuckDB type) pairs. The store creates tables from these declarations
through numbered migrations, and the typed read/write helpers check Arrow
batches against them, so a stage cannot write a column the schema does not know.

Conventions:
- ids are VARCHAR everywhere (WANDS uses integers, ESCI uses ASINs);
- grades are TINYINT on the 0-4 scale of docs/architecture.md;
- every row written by a stage carries the `run_id` of the run that wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass

GRADE_NAMES = {4: "exact", 3: "close", 2: "substitute", 1: "complement", 0: "embarrassing"}
RELEVANT_MIN_GRADE = 3  # grades 3 and 4 count as relevant for binary metrics and engagement gating
SEGMENTS = ("head", "torso", "tail", "unknown")


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...] = ()
    doc: str = ""

    @property
    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def ddl(self) -> str:
        cols = ",\n  ".join(f"{c} {t}" for c, t in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {cols}\n)"


def _t(name: str, cols: list[tuple[str, str]], key: tuple[str, ...] = (), doc: str = "") -> TableSchema:
    return TableSchema(name, tuple(cols), key, doc)


PRODUCTS = _t(
    "products",
    [
        ("item_id", "VARCHAR NOT NULL"),
        ("title", "VARCHAR NOT NULL"),
        ("description", "VARCHAR"),
        ("brand", "VARCHAR"),
        ("category", "VARCHAR"),
        ("attributes", "JSON"),
        ("popularity", "DOUBLE"),
        ("source", "VARCHAR"),
        ("run_id", "VARCHAR"),
    ],
    key=("item_id",),
    doc="The catalog. attributes is a JSON object of attribute name to value.",
)

QUERIES = _t(
    "queries",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("text", "VARCHAR NOT NULL"),
        ("frequency", "BIGINT"),
        ("segment", "VARCHAR"),
        ("source", "VARCHAR"),
        ("run_id", "VARCHAR"),
    ],
    key=("query_id",),
    doc="Search queries. segment is head/torso/tail by cumulative traffic share, unknown without frequency.",
)

ENGAGEMENT = _t(
    "engagement",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("impressions", "BIGINT"),
        ("clicks", "BIGINT"),
        ("add_to_carts", "BIGINT"),
        ("orders", "BIGINT"),
        ("position", "DOUBLE"),
        ("source", "VARCHAR"),
        ("run_id", "VARCHAR"),
    ],
    key=("query_id", "item_id", "position"),
    doc="Aggregated engagement per (query, item, position shown).",
)

HUMAN_LABELS = _t(
    "human_labels",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("grade", "TINYINT NOT NULL"),
        ("annotator", "VARCHAR NOT NULL"),
        ("split", "VARCHAR"),
        ("source", "VARCHAR"),
        ("run_id", "VARCHAR"),
    ],
    key=("query_id", "item_id", "annotator"),
    doc="Human relevance labels, 0-4. split is train/calib/eval (assigned by query when absent).",
)

REJECTS = _t(
    "rejects",
    [
        ("run_id", "VARCHAR"),
        ("target", "VARCHAR"),
        ("file", "VARCHAR"),
        ("line", "BIGINT"),
        ("reason", "VARCHAR"),
        ("raw", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    doc="Rows that could not be used, with the file, 1-based line (row number for Parquet) and reason.",
)

RUNS = _t(
    "runs",
    [
        ("run_id", "VARCHAR NOT NULL"),
        ("stage", "VARCHAR NOT NULL"),
        ("config", "JSON"),
        ("code_version", "VARCHAR"),
        ("models", "JSON"),
        ("started_at", "TIMESTAMP"),
        ("ended_at", "TIMESTAMP"),
        ("status", "VARCHAR"),
        ("summary", "JSON"),
        ("pid", "INTEGER"),
    ],
    key=("run_id",),
    doc="One row per stage run: its config, code version, models and timing (lineage).",
)

META = _t(
    "meta",
    [("key", "VARCHAR NOT NULL"), ("value", "JSON")],
    key=("key",),
    doc="Workspace facts (for example the simulated world's manifest and taxonomy).",
)

TRUTH_ITEMS = _t(
    "truth_items",
    [
        ("item_id", "VARCHAR NOT NULL"),
        ("type_id", "VARCHAR"),
        ("brand", "VARCHAR"),
        ("color", "VARCHAR"),
        ("material", "VARCHAR"),
        ("size", "VARCHAR"),
        ("style", "VARCHAR"),
        ("gender", "VARCHAR"),
    ],
    key=("item_id",),
    doc="Simulated worlds only: the structured item behind each product.",
)

TRUTH_QUERIES = _t(
    "truth_queries",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("text", "VARCHAR"),
        ("kind", "VARCHAR"),
        ("type_id", "VARCHAR"),
        ("brand", "VARCHAR"),
        ("color", "VARCHAR"),
        ("material", "VARCHAR"),
        ("size", "VARCHAR"),
        ("style", "VARCHAR"),
        ("gender", "VARCHAR"),
    ],
    key=("query_id",),
    doc="Simulated worlds only: the structured intent behind each query.",
)

# ---- mining -----------------------------------------------------------------
CANDIDATES = _t(
    "candidates",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("rank_bm25", "INTEGER"),
        ("rank_ann", "INTEGER"),
        ("rank_click", "INTEGER"),
        ("score_bm25", "FLOAT"),
        ("score_ann", "FLOAT"),
        ("score_click", "FLOAT"),
        ("n_channels", "TINYINT NOT NULL"),
        ("prior", "FLOAT NOT NULL"),
        ("run_id", "VARCHAR NOT NULL"),
    ],
    key=("query_id", "item_id"),
    doc="Federated candidates: a null rank means that channel did not retrieve the item.",
)

NEGATIVES = _t(
    "negatives",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("kind", "VARCHAR NOT NULL"),  # token_sim | random
        ("similarity", "FLOAT"),  # TF-IDF cosine to the query
        ("run_id", "VARCHAR NOT NULL"),
    ],
    key=("query_id", "item_id"),
    doc="Mined negatives retrieved by no channel, with the similarity used to pick them.",
)

MINING_PROGRESS = _t(
    "mining_progress",
    [
        ("run_key", "VARCHAR NOT NULL"),
        ("channel", "VARCHAR NOT NULL"),
        ("batch", "INTEGER NOT NULL"),
        ("run_id", "VARCHAR"),
        ("done_at", "TIMESTAMP"),
    ],
    key=("run_key", "channel", "batch"),
    doc="Checkpoints of a mining run: which query batches of which channel are written (resume).",
)

CHANNEL_HITS = _t(
    "channel_hits",
    [
        ("run_key", "VARCHAR NOT NULL"),
        ("channel", "VARCHAR NOT NULL"),
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("rank", "INTEGER NOT NULL"),
        ("score", "FLOAT"),
    ],
    key=("run_key", "channel", "query_id", "item_id"),
    doc="Per-channel top-K hits before federation (resumable intermediate of `assay mine`).",
)

# ---- annotation -------------------------------------------------------------
LABELS = _t(
    "labels",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("cascade_sha", "VARCHAR NOT NULL"),
        ("grade", "TINYINT"),
        ("probs", "FLOAT[5]"),
        ("decided_by", "VARCHAR"),
        ("confidence", "FLOAT"),
        ("status", "VARCHAR NOT NULL"),  # ok | failed
        ("batch_id", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
        ("text_sha", "VARCHAR"),  # digest of the query and item texts the judges read (assay.text.pair_text_sha_sql)
    ],
    key=("query_id", "item_id", "cascade_sha"),
    doc="Cascade labels, one per (query, item, cascade config sha), bound to the texts they judged (text_sha).",
)

LABEL_VOTES = _t(
    "label_votes",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("cascade_sha", "VARCHAR NOT NULL"),
        ("judge", "VARCHAR NOT NULL"),
        ("model", "VARCHAR"),
        ("prompt_sha", "VARCHAR"),
        ("grade", "TINYINT"),
        ("probs", "FLOAT[5]"),
        ("calibrated", "FLOAT[5]"),
        ("raw", "VARCHAR"),
        ("parse_status", "VARCHAR"),
        ("latency_ms", "FLOAT"),
        ("tokens", "INTEGER"),
        ("batch_id", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("text_sha", "VARCHAR"),  # the texts this vote judged (as labels.text_sha)
    ],
    key=("query_id", "item_id", "cascade_sha", "judge"),
    doc="Every judge's vote on every pair it saw, with its raw output and parse status.",
)

WORK_SHARDS = _t(
    "work_shards",
    [
        ("plan_id", "VARCHAR NOT NULL"),
        ("shard_id", "VARCHAR NOT NULL"),
        ("cascade_sha", "VARCHAR NOT NULL"),
        ("path", "VARCHAR NOT NULL"),  # the input Parquet shard (pending pairs, sorted by query)
        ("rows", "BIGINT NOT NULL"),
        ("sha256", "VARCHAR NOT NULL"),  # of the input shard file
        ("first_query", "VARCHAR"),
        ("last_query", "VARCHAR"),
        ("state", "VARCHAR NOT NULL"),  # planned | committed (running and finished are read from the files)
        ("attempt", "VARCHAR"),  # the output attempt committed
        ("failed", "BIGINT"),  # failed rows committed (picked up by the next plan)
        ("note", "VARCHAR"),  # why the last commit refused the shard
        ("run_id", "VARCHAR"),  # the run that planned it
        ("created_at", "TIMESTAMP"),
        ("committed_at", "TIMESTAMP"),
    ],
    key=("plan_id", "shard_id"),
    doc="Shards of pending pairs planned for `assay annotate --engine ray` and their state (assay.scale).",
)

LABEL_REQUESTS = _t(
    "label_requests",
    [
        ("request_id", "VARCHAR NOT NULL"),
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("stratum", "VARCHAR"),  # n_channels / best-rank bucket, or neg:<kind>
        ("reason", "VARCHAR"),  # stratified | uncertain
        ("split", "VARCHAR"),  # train | calib | eval (by query)
        ("confidence", "FLOAT"),  # the cascade's confidence when the pair was requested (null: not labeled yet)
        ("run_id", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    key=("query_id", "item_id"),
    doc="Mined pairs sent to people for grading (`assay label-request`); their answers land in human_labels.",
)

AUDIT_SAMPLES = _t(
    "audit_samples",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("stratum", "VARCHAR"),  # tier x grade x decided_by
        ("low_confidence", "BOOLEAN"),  # drawn `audit.oversample` times as often inside its stratum
        ("inclusion", "DOUBLE"),  # the pair's probability of being drawn
        ("design_weight", "DOUBLE"),  # 1 / inclusion: how many labels of the population the pair stands for
        ("cascade_sha", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("created_at", "TIMESTAMP"),
    ],
    key=("query_id", "item_id"),
    doc="Pairs drawn by `assay audit sample` with their design weights (newest draw per pair), so that audit "
        "grades are read back as the population they were sampled from (agreement, `calibrate --from-audit`).",
)

# ---- curriculum / training / serving ------------------------------------------
EXAMPLES = _t(
    "examples",
    [
        ("query_id", "VARCHAR NOT NULL"),
        ("item_id", "VARCHAR NOT NULL"),
        ("tier", "TINYINT NOT NULL"),
        ("stage", "TINYINT NOT NULL"),
        ("target", "FLOAT NOT NULL"),
        ("weight", "FLOAT NOT NULL"),
        ("split", "VARCHAR"),
        ("run_id", "VARCHAR NOT NULL"),
        ("grade", "TINYINT"),
        ("grade_source", "VARCHAR"),  # cascade | human
    ],
    key=("query_id", "item_id", "stage"),
    doc="Curriculum examples: tier 1-5, stage 1-3, graded target in [0, 1], split train/val/test by query hash.",
)

CHECKPOINTS = _t(
    "checkpoints",
    [
        ("checkpoint_id", "VARCHAR NOT NULL"),
        ("stage", "TINYINT"),
        ("path", "VARCHAR NOT NULL"),
        ("sha", "VARCHAR"),
        ("val_ndcg10", "DOUBLE"),
        ("kept", "BOOLEAN"),
        ("run_id", "VARCHAR"),
        ("name", "VARCHAR"),  # curriculum | baseline-click | baseline-binary | baseline-graded
        ("step", "INTEGER"),
        ("created_at", "TIMESTAMP"),
    ],
    key=("checkpoint_id",),
    doc="Trained two-tower checkpoints under artifacts/, with their validation score.",
)

INDEXES = _t(
    "indexes",
    [
        ("index_id", "VARCHAR NOT NULL"),
        ("checkpoint_sha", "VARCHAR"),
        ("path", "VARCHAR NOT NULL"),
        ("kind", "VARCHAR"),
        ("n_items", "BIGINT"),
        ("run_id", "VARCHAR"),
    ],
    key=("index_id",),
    doc="Serving indexes under artifacts/, bound to a checkpoint by its manifest.",
)

ALL_TABLES: dict[str, TableSchema] = {
    t.name: t
    for t in [
        PRODUCTS, QUERIES, ENGAGEMENT, HUMAN_LABELS, REJECTS, RUNS, META, TRUTH_ITEMS, TRUTH_QUERIES,
        CANDIDATES, NEGATIVES, MINING_PROGRESS, CHANNEL_HITS, LABELS, LABEL_VOTES, LABEL_REQUESTS, AUDIT_SAMPLES,
        WORK_SHARDS,
        EXAMPLES, CHECKPOINTS, INDEXES,
    ]
}


def get_schema(name: str) -> TableSchema:
    try:
        return ALL_TABLES[name]
    except KeyError:
        raise KeyError(f"Unknown table {name!r}. Available: {sorted(ALL_TABLES)}") from None
