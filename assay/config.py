"""Configuration: one pydantic model per stage, loaded from YAML.

A config file holds any subset of the sections below; missing keys take the documented
defaults (``assay config show`` prints them all). Unknown keys are errors, and every error
names the bad key and the values that are allowed::

    store:   {threads: 2}
    simulate: {n_products: 20000, n_queries: 2000, seed: 13}
    ingest:  {segments: {head_share: 0.5, torso_share: 0.3}}
    mining:  {k: 500}

Command-line overrides use the same dotted keys: ``--set mining.k=200``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from assay.data.simulate.params import SimulateConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StoreConfig(Section):
    threads: int = Field(2, ge=1, description="DuckDB threads (and default torch/faiss threads).")
    memory_limit: str | None = Field(None, description="DuckDB memory limit such as '8GB'; None = DuckDB default.")


class SegmentConfig(Section):
    """Head/torso/tail split by cumulative traffic: queries sorted by frequency, the ones that
    together make the first ``head_share`` of traffic are head, the next ``torso_share`` torso,
    the rest tail. Queries without a frequency are 'unknown'."""

    head_share: float = Field(0.5, gt=0, lt=1)
    torso_share: float = Field(0.3, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> "SegmentConfig":
        if self.head_share + self.torso_share >= 1:
            raise ValueError("head_share + torso_share must be < 1 (the rest is the tail)")
        return self


class IngestConfig(Section):
    """How files map onto the workspace tables.

    ``columns`` maps a target column to the source column per table, for example
    ``{products: {title: product_name}}``. Generic files use the documented column names
    by default."""

    columns: dict[Literal["products", "queries", "engagement", "human_labels"], dict[str, str]] = Field(
        default_factory=dict, description="target column -> source column, per table")
    delimiter: str | None = Field(None, description="CSV delimiter; None = by extension (.tsv tab, else comma)")
    chunk_rows: int = Field(100_000, ge=1_000, description="rows per streamed chunk")
    esci_locale: str | None = Field("us", description="ESCI product_locale to keep; None keeps all")
    split_fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train/calib/eval shares, by query, for human labels without a split column")
    split_seed: int = 13
    segments: SegmentConfig = Field(default_factory=SegmentConfig)

    @model_validator(mode="after")
    def _fractions(self) -> "IngestConfig":
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError("split_fractions must be three non-negative shares that sum to 1")
        return self


class ModelsConfig(Section):
    """Model names resolve through assay.models: a packaged alias, a local path or a hub id."""

    embedder: str = Field("all-MiniLM-L6-v2", description="bi-encoder for ANN mining and the base two-tower")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:0 ...")
    backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto", description="inference of the mining encoder and the two-tower model (export-index, evaluate, serve): "
                            "torch, onnx (ONNX Runtime fp32) or onnx-int8 (int8 dynamic quantization); auto = "
                            "onnx-int8 on CPU when it passes the accuracy guard, else onnx; torch on CUDA "
                            "(docs/inference.md)")
    guard_sample: int = Field(256, ge=0, description="texts (catalog items and queries) an int8 export is compared "
                                                     "on against its fp32 PyTorch source; 0 = no guard")
    guard_min_cosine: float = Field(0.98, ge=0, le=1, description="least mean cosine between int8 and fp32 "
                                                                  "embeddings of the guard sample (measured 0.992 "
                                                                  "for MiniLM-L6)")
    guard_max_ndcg_drop: float = Field(0.005, ge=0, description="most NDCG@10 a two-tower int8 export may lose "
                                                                "against fp32 on the validation queries' labeled "
                                                                "pairs (labels a user has)")


class BM25Config(Section):
    tokenizer: Literal["stem", "char3", "stem+char3"] = Field(
        "stem+char3", description="stems, character 3-grams, or both (typo tolerant); see bench_mining.py")
    k1: float = Field(1.5, gt=0)
    b: float = Field(0.75, ge=0, le=1)
    backend: Literal["auto", "numba", "numpy"] = Field("auto", description="bm25s backend; auto = numba if installed")


class AnnConfig(Section):
    model: str | None = Field(None, description="encoder; None = models.embedder")
    index: Literal["auto", "flat", "hnsw", "ivf"] = Field("auto", description="auto: flat up to exact_max_items, else hnsw")
    exact_max_items: int = Field(250_000, ge=1, description="largest catalog searched exactly under index=auto")
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(80, ge=8)
    ef_search: int = Field(256, ge=8, description="HNSW search depth; should be >= k")
    nprobe: int = Field(16, ge=1, description="IVF lists probed")
    max_seq_length: int = Field(64, ge=8, description="tokens per item text")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="torch backend only: bf16 autocast is fast only on CPUs with AVX512-BF16 or AMX; without "
                            "them PyTorch's bf16 matmul fallback was profiled 5.6x slower than fp32 and is refused "
                            "(docs/inference.md)")
    batch_size: int = Field(128, ge=1)
    recall_sample: int = Field(200, ge=0, description="queries used to measure an approximate index against exact")


class ClickConfig(Section):
    alpha: float = Field(1.0, gt=0, description="COEC smoothing strength towards 1")
    min_clicks: int = Field(1, ge=1, description="clicks a (query, item) needs to count as engaged")
    max_position: int = Field(50, ge=1, description="positions above this share one CTR bucket")
    n_neighbors: int = Field(10, ge=0, description="similar queries that lend their engaged items")
    min_similarity: float = Field(0.6, ge=0, le=1, description="least similarity of a lending query")
    neighbor_weight: float = Field(0.5, ge=0, le=1, description="discount of a lent item's score")
    neighbours: Literal["lexical", "embedding", "both"] = Field("both")


class NegativesConfig(Section):
    token_sim_min: float = Field(0.2, ge=0, le=1)
    token_sim_max: float = Field(0.6, ge=0, le=1)
    n_token_sim: int = Field(20, ge=0, description="token-similar negatives per query")
    n_random: int = Field(20, ge=0, description="random negatives per query")
    max_features: int | None = Field(500_000, description="TF-IDF vocabulary cap")

    @model_validator(mode="after")
    def _band(self) -> "NegativesConfig":
        if self.token_sim_min > self.token_sim_max:
            raise ValueError("token_sim_min must be <= token_sim_max")
        return self


class MiningConfig(Section):
    k: int = Field(500, ge=1, description="top-K kept per channel per query")
    channels: list[Literal["bm25", "ann", "click"]] = Field(["bm25", "ann", "click"])
    batch_queries: int = Field(256, ge=1, description="queries per resumable batch")
    prior: str = Field("rrf", description="retrieval prior: rrf (normalised per query) or rrf_global")
    rrf_k: float = Field(60.0, gt=0, description="RRF constant")
    seed: int = 13
    keep_channel_hits: bool = Field(False, description="keep per-channel hits after federation (audit)")
    engine: Literal["local", "ray"] = Field(
        "local", description="ray: the catalog's item vectors missing from the embedding cache are encoded by a Ray "
                             "Data actor pool (RAY_ADDRESS, else a local Ray) into the same cache, which the ANN "
                             "channel, the features judge and export-index read (docs/scale.md); not in the run key")
    ray_encoders: int = Field(1, ge=1, description="encoder actors (1 CPU each) when engine is ray")
    bm25: BM25Config = Field(default_factory=BM25Config)
    ann: AnnConfig = Field(default_factory=AnnConfig)
    click: ClickConfig = Field(default_factory=ClickConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)

    @model_validator(mode="after")
    def _channels(self) -> "MiningConfig":
        if not self.channels:
            raise ValueError("channels must name at least one of bm25, ann, click")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels must not repeat")
        return self


JudgeKind = Literal["features", "cross_encoder", "llm_classifier", "prompted"]
# the features judge's stuffed_negatives when the config does not set it (measured: docs/labels.md, section 6)
FEATURES_STUFFED_NEGATIVES = 0.5
DEFAULT_TEMPLATES = {"cross_encoder": "classifier_input.j2", "llm_classifier": "llm_classifier_input.j2",
                     "prompted": "judge_grade.j2", "features": "features"}
LIKELIHOOD_TEMPLATE = "judge_likelihood.j2"  # the prompted kind's default under scoring: likelihood


class JudgeConfig(Section):
    """One judge of the cascade. Classifier judges are trained by `assay teachers train`;
    prompted judges need no training."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="unique name, used in decided_by")
    kind: JudgeKind
    model: str = Field(..., description="alias, local path or hub id; for backend=openai the endpoint's model name")
    template: str | None = Field(None, description="prompts/ template; None = the kind's default")
    max_length: int = Field(128, ge=16, description="input tokens")
    batch_size: int = Field(32, ge=1, description="pairs per forward pass / per request wave")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="CPU inference autocast (see mining.ann.precision)")
    inference: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto", description="cross_encoder judges: where the forward pass runs (see models.backend); auto = "
                            "onnx-int8 on CPU when its accuracy on the calib split is within guard_max_accuracy_drop "
                            "of fp32, else onnx. features judges: the backend of the encoder behind the cosine "
                            "feature, fixed at training; auto = the one mining's newest run used for that encoder, so "
                            "the cosine reads mining's cached vectors. Other kinds run on torch")
    guard_max_accuracy_drop: float = Field(0.005, ge=0, le=1, description="most accuracy (share of calib pairs) an "
                                                                          "int8 judge may lose against fp32")
    # training (classifier kinds)
    epochs: float = Field(2.0, gt=0)
    learning_rate: float | None = Field(None, gt=0, description="None = 2e-4 (cross_encoder, measured: 5e-5 does not move a 5-class head off the majority grade on a few hundred pairs) or 1e-3 (LoRA of llm_classifier, measured: 2e-4 leaves SmolLM2-135M at 0.41 accuracy after an epoch of 4,179 pairs, 1e-3 reaches 0.62 in 1.5)")
    train_batch_size: int = Field(16, ge=1)
    max_train_pairs: int | None = Field(None, ge=1, description="cap on training pairs (None = all)")
    class_weight: Literal["none", "sqrt", "balanced"] = Field(
        "none", description="loss weight per grade from its share of the training labels: none, sqrt (inverse square "
                            "root of the share) or balanced (inverse share); rare grades (4 on a seed set) count more")
    stuffed_negatives: float = Field(
        0.0, ge=0, le=1, description="share of the training pairs graded 0-1 also trained as a keyword-stuffed copy "
                                     "(the query's words appended to the title, same grade), so repeating the query "
                                     "does not buy relevance; 0 = off. Classifier judges: default 0 (0.5 cut the "
                                     "pairs stuffing lifts from 75% to 8% but cost 5-7 points of clean accuracy); "
                                     "features judge: default FEATURES_STUFFED_NEGATIVES when not set "
                                     "(docs/labels.md, section 6)")
    stuffing_features: bool = Field(
        True, description="features judge: also read signals that see keyword stuffing (query words as a run at the "
                          "end of the title, repeated, in the title only, a title long for its category); "
                          "docs/labels.md, section 6")
    trees: int = Field(300, ge=1, description="features judge: boosting iterations (early-stopped on 10% of the "
                                              "training pairs)")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    seed: int = 13
    # prompted kind
    backend: Literal["local", "openai", "vllm"] = Field("local", description="where a prompted judge runs")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key (never stored)")
    concurrency: int = Field(8, ge=1, description="requests in flight (openai backend)")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0, description="retries on 429/5xx/timeouts, with exponential backoff")
    few_shot: int = Field(0, ge=0, description="few-shot examples drawn from human train labels")
    max_tokens: int = Field(48, ge=1)
    n_ctx: int = Field(2048, ge=256, description="context window of a local GGUF model")
    scoring: Literal["generate", "likelihood"] = Field(
        "generate", description="prompted kind: 'generate' asks for the grade as JSON and reads the grade digit's "
                                "logprobs; 'likelihood' asks nothing: it scores how much likelier the query is after "
                                "the product's text than without it (pointwise mutual information per query token, "
                                "the query-likelihood ranking of Sachan et al. 2022), and maps that to grades "
                                "through likelihood_cutpoints. Measured on the packaged SmolLM2-135M: generated "
                                "grades were at chance on mined pairs, likelihood ranked relevant above irrelevant "
                                "pairs with AUC 0.80 (docs/labels.md, prompted judges)")
    likelihood_cutpoints: list[float] = Field(
        [0.0, 1.0, 2.0, 3.0], min_length=4, max_length=4,
        description="scoring: likelihood: the PMI (nats per query token) at which grade k = 1..4 becomes likelier "
                    "than the grades below it (an ordered logit of slope 1). Round numbers that spread the grades; "
                    "the isotonic calibrator fitted on the calib split corrects them for each grade")

    @property
    def template_name(self) -> str:
        if self.template:
            return self.template
        return LIKELIHOOD_TEMPLATE if self.kind == "prompted" and self.scoring == "likelihood" else \
            DEFAULT_TEMPLATES[self.kind]

    @model_validator(mode="after")
    def _kind_defaults(self) -> "JudgeConfig":
        if self.kind == "features" and "stuffed_negatives" not in self.model_fields_set:
            object.__setattr__(self, "stuffed_negatives", FEATURES_STUFFED_NEGATIVES)
        if any(b <= a for a, b in zip(self.likelihood_cutpoints, self.likelihood_cutpoints[1:])):
            raise ValueError(f"likelihood_cutpoints must increase, got {self.likelihood_cutpoints}")
        if self.scoring == "likelihood" and self.backend == "vllm":
            raise ValueError("scoring: likelihood runs on the local and openai backends; for vLLM, serve the model "
                             "with `vllm serve` and use backend: openai (its /v1/completions returns prompt logprobs)")
        return self


def _default_judges() -> list[JudgeConfig]:
    return [
        JudgeConfig(name="ce-minilm", kind="cross_encoder", model="all-MiniLM-L6-v2", max_length=96, batch_size=64),
        JudgeConfig(name="smollm2-cls", kind="llm_classifier", model="smollm2-135m", max_length=128, batch_size=16,
                    epochs=1.5),
    ]


class RayJudgeConfig(Section):
    """Ray resources of one judge's actor pool (`annotate.engine: ray`; docs/scale.md). They do not enter the
    cascade sha: where a judge runs does not change its labels."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs each actor of this judge reserves")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each actor reserves (1 for a vLLM judge; 0 on CPU)")
    concurrency: int = Field(1, ge=1, description="actors in this judge's pool (each loads the judge once)")


class RayConfig(Section):
    """`assay annotate --engine ray` (docs/scale.md): plan -> execute on Ray Data -> commit."""

    address: str | None = Field(None, description="Ray cluster to join (host:port or ray://host:port); None = "
                                                  "RAY_ADDRESS, else a local Ray started on this machine")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (None = all); ignored on a cluster")
    object_store_mb: int | None = Field(None, ge=75, description="object store of the local Ray in MB (None = Ray's "
                                                                 "default); ignored on a cluster")
    connect_timeout_s: float = Field(10.0, gt=0, description="seconds a cluster address has to answer before "
                                                             "`annotate --engine ray` gives up, nothing written")
    shard_pairs: int = Field(50_000, ge=1, description="pending pairs per Parquet shard (sorted by query, so prompts "
                                                       "that share a query prefix batch together)")
    batch_rows: int = Field(1024, ge=1, description="rows per Ray Data batch handed to a judge's actor")
    root: str | None = Field(None, description="folder the plans, shards and outputs live in; None = "
                                               "<workspace>/artifacts/scale; on a cluster, shared storage every "
                                               "node mounts at the same path")
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a judge actor that died (then the job fails)")
    judges: dict[str, RayJudgeConfig] = Field(default_factory=dict,
                                              description="judge name -> its actor pool's resources")


class AnnotateConfig(Section):
    """The cascade: judges in order, cheapest first (docs/architecture.md, "Annotation cascade")."""

    engine: Literal["local", "ray"] = Field("local", description="local: batches in this process; ray: plan, execute "
                                                                 "on Ray Data, commit (docs/scale.md)")
    ray: RayConfig = Field(default_factory=RayConfig)

    judges: list[JudgeConfig] = Field(default_factory=_default_judges)
    thresholds: dict[str, list[float]] = Field(
        default_factory=dict,
        description="judge name -> 5 per-grade thresholds on the calibrated top-class probability; judges "
                    "missing here use the thresholds fitted by `assay calibrate`, else default_threshold")
    default_threshold: float = Field(0.9, ge=0, le=1)
    target_agreement: float | None = Field(
        None, gt=0, le=1, description="agreement with humans that `assay calibrate` fits thresholds for; None = the "
                                      "best single judge's calibrated accuracy on the calibration split")
    agreement_tolerance: float = Field(
        0.01, ge=0, le=1, description="how far below target_agreement the fitted cascade may land on the calibration "
                                      "split in exchange for less compute (0.01 = one point, the budget of Walmart's "
                                      "cascade: -0.7 points for -50% compute; the fit keeps the cheapest threshold "
                                      "combination within it; 0 = no accuracy traded)")
    min_support: int = Field(5, ge=1, description="calibration pairs a judge must accept for a grade before a threshold "
                                                  "for that grade is fitted")
    batch_size: int = Field(256, ge=1, description="pairs per resumable batch")
    signal_window: int = Field(100_000, ge=1, description="pending pairs whose mining signals a features judge reads "
                                                          "from the workspace in one query (rounded up to whole "
                                                          "batches); read once per batch instead, the scans of the "
                                                          "mined tables grew with pairs x pairs / batch_size")
    sources: list[Literal["candidates", "negatives"]] = Field(["candidates", "negatives"])
    max_pairs: int | None = Field(None, ge=1, description="annotate at most this many pending pairs per launch")
    max_attempts: int = Field(3, ge=1, description="tries `assay run` gives a pair that fails (no judge could grade it: "
                                                   "an unparseable answer, an endpoint down) before its annotate step "
                                                   "stops with the pair left failed, saying how many and why; `assay "
                                                   "annotate` retries failed pairs on every launch")
    agreement_metric: Literal["accuracy", "balanced"] = Field(
        "accuracy", description="what `assay calibrate` asks the cascade to keep within agreement_tolerance of its "
                                "best judge: accuracy, or balanced = the mean of accuracy and the mean per-grade "
                                "recall (a cascade that drops a rare grade is not cheaper for free)")
    train_on: Literal["all", "seed", "mined"] = Field(
        "all", description="which human train labels `assay teachers train` fits the judges on: all, seed pairs only, "
                           "or mined pairs only (answers to `assay label-request`)")
    calibrate_on: Literal["all", "seed", "mined"] = Field(
        "all", description="which human calib labels `assay calibrate` fits calibrators and thresholds on: all, "
                           "seed pairs only, or mined pairs only (answers to `assay label-request`)")
    agreement_sample: int = Field(2000, ge=10, description="mined pairs `assay agreement` grades with every judge "
                                                           "against the simulator's truth (simulated worlds)")

    @model_validator(mode="after")
    def _judges(self) -> "AnnotateConfig":
        names = [j.name for j in self.judges]
        if not names:
            raise ValueError("judges must list at least one judge")
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be unique, got {names}")
        for name in self.ray.judges:
            if name not in names:
                raise ValueError(f"ray.judges names judge {name!r}, which is not in judges {names}")
        for name, th in self.thresholds.items():
            if name not in names:
                raise ValueError(f"thresholds names judge {name!r}, which is not in judges {names}")
            if len(th) != 5 or not all(0 <= t <= 1 for t in th):
                raise ValueError(f"thresholds[{name!r}] must be 5 numbers in [0, 1] (one per grade 0-4)")
        return self

    def judge(self, name: str) -> JudgeConfig:
        for j in self.judges:
            if j.name == name:
                return j
        raise KeyError(f"Unknown judge {name!r}. Available: {[j.name for j in self.judges]}")


class LabelRequestConfig(Section):
    """`assay label-request`: which mined pairs people should grade. Mined pairs are not drawn like a seed set
    (more grade 3 and 4, harder negatives), so judges trained and calibrated on them label the training data better
    (docs/labels.md)."""

    n: int = Field(2000, ge=1, description="pairs per request")
    uncertainty_share: float = Field(
        0.3, ge=0, le=1, description="share of the request spent on pairs the cascade was least sure of (lowest "
                                     "confidence, judges disagreeing); the rest is stratified. Needs labels; without "
                                     "them the whole request is stratified")
    rank_buckets: list[int] = Field([10, 50], description="best-rank cut points of the strata (1-10, 11-50, 51+)")
    min_per_stratum: int = Field(5, ge=0, description="floor per stratum before proportional allocation")
    max_per_query: int = Field(20, ge=1, description="pairs per query at most (annotators read a query once)")
    split_fractions: dict[str, float] = Field(
        {"train": 0.6, "calib": 0.2, "eval": 0.2},
        description="split of requested pairs, by query (a query already in a human split keeps it)")
    seed: int = 7

    @model_validator(mode="after")
    def _check(self) -> "LabelRequestConfig":
        if set(self.split_fractions) - {"train", "calib", "eval"}:
            raise ValueError("split_fractions keys are train, calib and eval")
        if abs(sum(self.split_fractions.values()) - 1) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")
        if sorted(self.rank_buckets) != self.rank_buckets or any(b < 1 for b in self.rank_buckets):
            raise ValueError("rank_buckets must be increasing positive ranks")
        return self


class TierConfig(Section):
    """The five tiers (docs/architecture.md, "Five tiers, three stages"). A channel is *active* for a query when it
    retrieved at least one candidate for that query (a tail query without engagement has no click candidates, so
    easy_pos asks only for the channels that could have answered)."""

    easy_pos_grade: int = Field(4, ge=0, le=4, description="easy_pos: least grade; also retrieved by every active channel")
    hard_pos_grade: int = Field(3, ge=0, le=4, description="hard_pos: least grade")
    hard_pos_lexical_top: int = Field(50, ge=1, description="hard_pos: within BM25's top-N and not retrieved by ANN")
    hard_neg_grade: int = Field(1, ge=0, le=4, description="hard_neg: highest grade")
    hard_neg_top: int = Field(100, ge=1, description="hard_neg: within the top-N of a channel that retrieved it")
    hard_neg_max_channels: int = Field(
        1, ge=1, le=3, description="hard_neg: retrieved by at most this many channels (1: exactly one, the design's "
                                   "rule; 2-3 also keep the low-grade pairs that several channels agree on)")
    min_pos_prob: float = Field(
        0.5, ge=0, le=1, description="easy_pos / hard_pos: a cascade label also needs calibrated P(grade >= 3) of at "
                                     "least this (0.5: more likely relevant than not; 0 = off; human grades pass)")
    token_sim_neg_grade: int = Field(1, ge=0, le=4, description="token_sim_neg: highest grade (an unlabeled negative is no example)")
    random_neg_grade: int = Field(1, ge=0, le=4, description="random_neg: highest grade (an unlabeled negative is no example)")


class TargetConfig(Section):
    """Graded targets: ``target = clip(mu*rel + lam*eng*1[grade >= 3] + nu*prior, 0, 1)``.

    The defaults keep ``lam + nu`` below the gap between two grades (``mu/4``, less the expected-grade band), so
    engagement and the prior only order items that share a grade and never lift one past a higher grade."""

    mu: float = Field(0.85, ge=0, description="weight of relevance (grade / 4, or the expected grade / 4)")
    lam: float = Field(0.1, ge=0, description="weight of per-query normalised log engagement, on grade >= 3 only")
    nu: float = Field(0.05, ge=0, description="weight of the retrieval prior (in [0, 1])")
    relevance: Literal["grade", "expected"] = Field(
        "grade", description="rel = grade/4, or the calibrated expected grade sum(g*p_g)/4 kept within "
                             "expected_band of the decided grade")
    expected_band: float = Field(0.1, ge=0, lt=0.5, description="how far (in grades) the expected grade may move "
                                                                "rel away from the decided grade")
    engagement: Literal["clicks", "orders", "weighted"] = Field(
        "weighted", description="engagement signal: clicks, orders, or clicks + 3*add_to_carts + 5*orders")

    @model_validator(mode="after")
    def _order(self) -> "TargetConfig":
        band = self.expected_band if self.relevance == "expected" else 0.0
        gap = self.mu * (1 - 2 * band) / 4
        if self.lam + self.nu >= gap:
            raise ValueError(f"lam + nu ({self.lam + self.nu:g}) must be < mu*(1-2*band)/4 ({gap:g}), or engagement "
                             "and the prior could lift an item past one with a higher grade")
        return self


class CurriculumConfig(Section):
    """`assay curriculum`: candidates + labels + negatives -> the examples table."""

    tiers: TierConfig = Field(default_factory=TierConfig)
    targets: TargetConfig = Field(default_factory=TargetConfig)
    max_pos_per_query: int = Field(50, ge=1, description="positives (tiers 1-2) kept per query")
    max_neg_per_query: int = Field(50, ge=1, description="negatives (tiers 3-5) kept per query")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="queries held for validation (checkpoint selection)")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="queries held out of training and validation "
                                                              "(final evaluation only)")
    seed: int = Field(13, description="split hash salt and the seed of per-query caps")
    human_labels_override: bool = Field(True, description="a human grade (median over annotators) replaces the "
                                                          "cascade's grade on the same pair")

    @model_validator(mode="after")
    def _split(self) -> "CurriculumConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1 (the rest trains)")
        return self


class StageConfig(Section):
    """One curriculum stage: which tiers form its groups and which loss it trains."""

    pos_tiers: list[int] = Field(..., description="tiers whose items are a group's positive")
    neg_tiers: list[int] = Field(..., description="tiers whose items are a group's negatives")
    loss: Literal["bce", "mnr", "triplet", "mixed"]
    steps: int = Field(200, ge=0, description="step budget of the stage")
    replay: float = Field(0.25, ge=0, le=1, description="share of each batch drawn from earlier stages' tiers")
    learning_rate: float = Field(2e-5, gt=0)


def _default_stages() -> list[StageConfig]:
    """The schedule that measured best (docs/training.md, "Measured"): stage 2 pairs every positive tier with the
    hard negatives under the in-batch softmax with shared random negatives (DPSR mixed), stage 3 adds the
    token-similar negatives under the in-batch softmax. The three-loss schedule (BCE, MNR on hard_pos + hard_neg,
    triplet on token_sim_neg) scored lower on validation and on held-out queries; it stays one config away."""
    return [
        StageConfig(pos_tiers=[1], neg_tiers=[5], loss="bce", replay=0.0),
        StageConfig(pos_tiers=[1, 2], neg_tiers=[3], loss="mixed"),
        StageConfig(pos_tiers=[1, 2], neg_tiers=[3, 4], loss="mnr"),
    ]


class TrainConfig(Section):
    """`assay train`: the two-tower model, the three curriculum stages and the baselines."""

    base_model: str | None = Field(None, description="encoder to start from; None = models.embedder")
    shared_towers: bool = Field(True, description="one encoder for queries and items, or two")
    projection_dim: int | None = Field(None, ge=8, description="linear projection after pooling (e.g. 256); None = none")
    query_heads: int = Field(1, ge=1, description="query-tower heads (DPSR multi-head; 1 = a single vector)")
    head_beta: float = Field(10.0, gt=0, description="soft-dot attention temperature over query heads")
    stages: list[StageConfig] = Field(default_factory=_default_stages)
    schedule: Literal["stages", "paced"] = Field(
        "stages", description="stages: the stages one after another, each with its own optimizer, kept only if it "
                              "improves validation; paced: one run of the stages' summed steps, one optimizer and "
                              "one learning-rate schedule, whose batches move from the first stage's mix to every "
                              "tier (tiers 1-2 against 3-5) over pace_share of the steps (docs/training.md section 7)")
    pace: Literal["linear", "root"] = Field(
        "linear", description="paced schedule: the full mix's share of a batch's groups after a fraction f of "
                              "pace_share x steps is f (linear) or sqrt(f) (root: the full mix arrives sooner)")
    pace_share: float = Field(0.5, gt=0, le=1, description="paced schedule: share of the steps over which the "
                                                           "batches move to the full mix (then they stay there)")
    pace_loss: Literal["per_mix", "listwise"] = Field(
        "per_mix", description="paced schedule: per_mix = graded BCE (stage 1's loss) on the first stage's groups and "
                               "the in-batch softmax over graded targets on the full mix's; listwise = the in-batch "
                               "softmax on every group")
    pace_learning_rate: float | None = Field(None, gt=0, description="paced schedule: peak learning rate; None = "
                                                                     "the first stage's")
    batch_queries: int = Field(32, ge=2, description="queries per batch (one group each)")
    group_size: int = Field(4, ge=2, description="items per query group: 1 positive + group_size-1 negatives")
    random_negatives: int = Field(32, ge=0, description="random catalog items shared across a batch (mixed loss)")
    mix_alpha: float = Field(0.5, ge=0, le=1, description="DPSR share of negative mass on random items (mixed loss)")
    scale: float = Field(20.0, gt=0, description="softmax scale of the in-batch losses")
    listwise_min_grade: int = Field(1, ge=0, le=4, description="the in-batch softmax losses (mnr, mixed) give "
                                    "soft-target mass only to items graded at least this; a grade-0 item is a "
                                    "negative like the in-batch ones even when the mining prior lifts its target "
                                    "(0 = mass on every target above 0)")
    listwise_gain: Literal["linear", "exponential"] = Field(
        "linear", description="how the in-batch softmax losses (mnr, mixed) share a query's soft-target mass among its "
                              "own items: linear (in proportion to the target t) or exponential (to 2^(4t) - 1, "
                              "NDCG@10's gain of t read as a grade: a grade-1 item gets about a twelfth of a grade-4 "
                              "item's share instead of a quarter); binary targets are not affected")
    triplet_margin: float = Field(0.3, gt=0)
    bce_scale_init: float = Field(20.0, gt=0, description="initial learnable temperature of the BCE loss")
    query_max_length: int = Field(32, ge=4)
    item_max_length: int = Field(64, ge=8)
    item_chunk: int = Field(32, ge=0, description="items encoded per length-sorted chunk inside a batch (less "
                                                  "padding; 0 = one chunk)")
    freeze_word_embeddings: bool = Field(True, description="keep the token embedding matrix fixed (half of MiniLM's "
                                                           "weights; saves optimizer time and memory)")
    freeze_layers: int = Field(2, ge=0, description="also keep the embedding block and the lowest N transformer "
                                                   "layers fixed (the backward pass stops above them; 0 = train "
                                                   "all)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    eval_every: int = Field(50, ge=1, description="validate (and maybe keep a best checkpoint) every N steps")
    checkpoint_every: int = Field(50, ge=1, description="resumable state every N steps")
    min_improvement: float = Field(0.0, ge=0, description="validation NDCG@10 gain a stage needs to be kept")
    val_bootstrap: int = Field(1000, ge=0, description="paired bootstrap resamples of each phase's validation gain "
                                                       "over the validation queries (reported; 0 = off)")
    val_confidence: float = Field(0.95, gt=0, lt=1, description="interval of the reported validation gain")
    val_metric: Literal["rerank", "retrieval"] = Field(
        "rerank", description="validation NDCG@10 that picks checkpoints and keeps stages: rerank (each validation "
                              "query's labeled pool re-ranked) or retrieval (its top 10 of the validation catalog, "
                              "unlabeled items gaining 0; also reports the embarrassing rate there, for about 3x "
                              "the items encoded per validation)")
    val_catalog_random: int = Field(2000, ge=0, description="random catalog items added to the validation catalog "
                                                            "(val_metric retrieval) besides every labeled item of "
                                                            "the validation queries")
    val_max_queries: int = Field(200, ge=1, description="validation queries scored per evaluation")
    val_pool_per_query: int = Field(40, ge=2, description="labeled pairs re-ranked per validation query (a seeded "
                                                          "sample of its labeled mined pairs)")
    random_pool: int = Field(100_000, ge=0, description="catalog items sampled once as the random-negative pool")
    baseline_steps: int | None = Field(None, ge=1, description="step budget of a baseline; None = the sum of the "
                                                               "stages' steps (the same budget)")
    baseline_learning_rate: float = Field(2e-5, gt=0)
    click_min_clicks: int = Field(1, ge=1, description="click baseline: clicks that make a (query, item) positive")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA and on a CPU "
                                                                         "with native bf16 (AVX512-BF16 or AMX), fp32 "
                                                                         "elsewhere; bf16 is refused on a CPU without it")
    seed: int = 13

    @model_validator(mode="after")
    def _stages(self) -> "TrainConfig":
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        for i, st in enumerate(self.stages, 1):
            bad = [t for t in st.pos_tiers + st.neg_tiers if t not in range(1, 6)]
            if bad:
                raise ValueError(f"stages[{i}] names tiers {bad}; tiers are 1-5")
            if not st.pos_tiers or not st.neg_tiers:
                raise ValueError(f"stages[{i}] needs pos_tiers and neg_tiers")
        return self


class SpellConfig(Section):
    """Query spelling correction against the catalog's vocabulary (assay/spell.py; docs/serving.md): applied to
    every query of `assay train` (training and validation), `assay evaluate` (every system, BM25 included),
    `assay search` and `assay serve`, so all of them see the same text."""

    enabled: bool = Field(True, description="correct unknown query words to the closest catalog word")
    min_length: int = Field(4, ge=1, description="shorter words are never corrected")
    long_length: int = Field(8, ge=2, description="words this long may be 2 edits from their correction (else 1)")
    model_vocab: bool = Field(True, description="also treat whole words of the embedder's WordPiece vocabulary as "
                                                "known (never corrected)")


class ServeConfig(Section):
    """`assay export-index` and `assay search` (docs/serving.md): a FAISS index bound to one checkpoint."""

    checkpoint: str | None = Field("best", description="two-tower checkpoint to serve: 'best' (default) = the kept "
                                                       "checkpoint (curriculum, staged or paced, or baseline) of the "
                                                       "newest training folder with the highest validation NDCG@10; "
                                                       "None = the newest kept curriculum checkpoint in "
                                                       "`checkpoints`; or a checkpoint folder")
    index: Literal["auto", "flat", "hnsw", "ivfpq"] = Field(
        "auto", description="auto: flat (exact) up to flat_max_items items, hnsw above")
    flat_max_items: int = Field(200_000, ge=1, description="largest catalog served exactly under index=auto")
    hnsw_factory: str = Field("HNSW32", description="FAISS index_factory string of the hnsw kind")
    ivfpq_factory: str = Field("IVF{nlist},PQ{pq_m}", description="FAISS index_factory string of the ivfpq kind; "
                                                                   "{nlist} = 4*sqrt(items), {pq_m} = dim/8")
    ef_search: int = Field(128, ge=1, description="HNSW search depth")
    ef_construction: int = Field(80, ge=1, description="HNSW build depth")
    nprobe: int = Field(16, ge=1, description="IVF lists probed")
    recall_sample: int = Field(200, ge=0, description="workspace queries searched exactly and with the index to "
                                                      "measure recall@100 for the manifest")
    encode_chunk: int = Field(4096, ge=1, description="items encoded per resumable chunk (cached as they finish)")
    engine: Literal["local", "ray"] = Field(
        "local", description="ray: the catalog's item-tower vectors missing from the checkpoint's vector cache are "
                             "encoded by a Ray Data actor pool (annotate.ray.address, RAY_ADDRESS, else a local Ray) "
                             "into that cache, which export-index then reads (docs/scale.md)")
    ray_encoders: int = Field(1, ge=1, description="item-tower actors (1 CPU each) when engine is ray")
    max_query_chars: int = Field(512, ge=1, description="longest query accepted")
    rrf_k: int = Field(60, ge=1, description="hybrid mode: reciprocal-rank-fusion constant")
    api_token_env: str = Field("ASSAY_API_TOKEN", description="`assay serve`: the environment variable holding a "
                                                               "bearer token; when it is set, every endpoint but "
                                                               "/health needs `Authorization: Bearer <token>` (the "
                                                               "token itself is never stored or logged)")


class EvaluateConfig(Section):
    """`assay evaluate` (docs/training.md section 10): how the report compares systems on the same queries."""

    reference: str | None = Field(None, description="the system every other is compared with (paired bootstrap "
                                                    "over queries); None = curriculum, else the base encoder")
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples of the queries per comparison (0 = none)")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the reported confidence intervals")
    seed: int = 5


class ExportConfig(Section):
    """`assay export` and the files `assay audit sample` writes (docs/audit.md)."""

    cascade: str | None = Field(None, description="cascade sha whose labels are exported; None = the newest")
    batch_rows: int = Field(50_000, ge=1, description="rows per streamed batch (memory does not grow with the "
                                                      "export)")


class AuditConfig(Section):
    """`assay audit sample`: which labels people check (docs/audit.md)."""

    n: int = Field(500, ge=1, description="pairs per audit sample")
    min_per_stratum: int = Field(3, ge=0, description="floor per tier x grade x decided_by stratum before "
                                                      "proportional allocation")
    low_confidence: float = Field(0.2, ge=0, le=1, description="confidence quantile below which a label counts as "
                                                               "low-confidence")
    oversample: float = Field(3.0, ge=1, description="how many times as likely a low-confidence label is drawn "
                                                     "within its stratum")
    seed: int = 11
    calibration_weights: Literal["none", "design"] = Field(
        "design", description="how `assay calibrate --from-audit` weighs audited pairs: design (1 / inclusion "
                              "probability, scaled to mean 1, so the audit counts like the labels it was drawn from) "
                              "or none (each audited pair once, like a calib pair)")


class PipelineConfig(Section):
    """`assay run`, the main job (docs/pipeline.md)."""

    simulate: bool = Field(True, description="start by simulating and ingesting a world; false = the workspace already "
                                             "holds ingested data and the job starts at mining")
    label_requests: int = Field(0, ge=0, description="mined pairs to request and have the simulated annotators answer "
                                                     "before the judges train (simulated worlds; 0 = none)")
    baselines: list[Literal["click", "binary", "graded", "mixed-bce"]] = Field(
        ["click", "binary"], description="baselines trained with the curriculum's step budget (with serve.checkpoint "
                                         "best, the best-validated of them and the curriculum is served)")
    export_index: bool = Field(True, description="build the serving index of the curriculum model")


class AssayConfig(Section):
    store: StoreConfig = Field(default_factory=StoreConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    label_request: LabelRequestConfig = Field(default_factory=LabelRequestConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    spell: SpellConfig = Field(default_factory=SpellConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    def section_dict(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")


class ConfigError(ValueError):
    """A config problem, with the dotted key and what is allowed."""


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _submodel(model, e["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent else []
            lines.append(f"unknown key '{loc}'; allowed keys here: {allowed}")
        else:
            lines.append(f"bad value for '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _submodel(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = cur.model_fields[part].annotation
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _coerce(value: str) -> Any:
    """Parse an override value as YAML (so 200 is an int, [1,2] a list, null None)."""
    return yaml.safe_load(value) if value != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides onto a raw config dict."""
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        key, value = ov.split("=", 1)
        parts = key.strip().split(".")
        cur = data
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override {ov!r}: {p!r} is not a section")
        cur[parts[-1]] = _coerce(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AssayConfig:
    """Load a YAML config (or the defaults), apply overrides, validate."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return AssayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, AssayConfig)) from None


def dump_config(cfg: AssayConfig, redacted: bool = False) -> str:
    """The config as YAML; ``redacted`` puts it through assay.store.redact (credentials in URLs, secret keys)."""
    data = cfg.model_dump(mode="json")
    if redacted:
        from assay.store import redact

        data = redact(data)
    return yaml.safe_dump(data, sort_keys=False)
