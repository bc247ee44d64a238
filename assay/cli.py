"""The `assay` command line. Logging is set up here only; each command calls one stage `run()`.

Every command takes ``--workspace DIR`` (default ``$ASSAY_WORKSPACE`` or ``./workspace``),
``--config FILE`` (YAML, see assay.config) and ``--set section.key=value`` overrides, which
use the config model's own keys, so the flags and the config cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from assay.config import ConfigError, AssayConfig, dump_config, load_config
from assay.store import Store, WorkspaceLocked, WorkspaceMissing

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="assay: graded relevance training data for dense product search, without click labels.")
config_app = typer.Typer(no_args_is_help=True, help="Show or check configuration.")
app.add_typer(config_app, name="config")
teachers_app = typer.Typer(no_args_is_help=True, help="Train the cascade's classifier judges on human labels.")
app.add_typer(teachers_app, name="teachers")
audit_app = typer.Typer(no_args_is_help=True, help="Audit the labels: sample them for people, import their grades.")
app.add_typer(audit_app, name="audit")

console = Console()
err = Console(stderr=True, soft_wrap=True)

WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="workspace directory [env ASSAY_WORKSPACE; ./workspace]")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key: section.key=value (repeatable)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars, warnings only")
JsonOpt = typer.Option(False, "--json", help="print the result as JSON")


REMEMBERED_CONFIG = "config.yaml"  # in the workspace: the config of the newest command run on it with -c


class Ctx:
    """A command's workspace and config. Without ``-c`` a command uses the config the workspace remembers (the one
    the newest writing command with ``-c`` ran with, ``WORKSPACE/config.yaml``, secrets redacted) and says so in one
    line; a writing command with ``-c`` makes the workspace remember its config (with its ``--set`` overrides)."""

    def __init__(self, workspace: Optional[Path], config: Optional[Path], overrides: Optional[list[str]], quiet: bool):
        self.workspace = Path(workspace or os.environ.get("ASSAY_WORKSPACE") or "workspace")
        self.quiet = quiet
        self.config_path = config
        _setup_logging(quiet)
        remembered = self.workspace / REMEMBERED_CONFIG
        if config is None and remembered.exists():
            config = remembered
            if not quiet:
                err.print(f"using the config workspace {self.workspace} remembers ({remembered}); -c FILE uses "
                          "another", highlight=False)
        try:
            self.cfg: AssayConfig = load_config(config, overrides or [])
        except ConfigError as e:
            _fail(str(e))
        # torch, faiss and numba read these when first imported (below, lazily, per command):
        # one thread per core we were given, never more, or OpenMP spin-waits oversubscribe the CPU
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ.setdefault(var, str(self.cfg.store.threads))

    def open(self, read_only: bool = False) -> Store:
        try:
            store = Store.open(self.workspace, read_only=read_only, threads=self.cfg.store.threads,
                               memory_limit=self.cfg.store.memory_limit)
        except (WorkspaceLocked, WorkspaceMissing) as e:
            _fail(str(e))
        if not read_only:
            self.remember()
        return store

    def remember(self) -> None:
        """Make the workspace remember this command's config when it was given with -c (a writer holds the lock)."""
        if self.config_path is None:
            return
        from assay.store import redact

        self.workspace.mkdir(parents=True, exist_ok=True)
        tmp = self.workspace / (REMEMBERED_CONFIG + ".tmp")
        tmp.write_text(f"# remembered from {self.config_path}: the config of the newest command run with -c\n"
                       + yaml.safe_dump(redact(self.cfg.model_dump(mode="json")), sort_keys=False))
        tmp.replace(self.workspace / REMEMBERED_CONFIG)


STAGE_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, RuntimeError)


def _stage(ctx: "Ctx", fn, read_only: bool = False):
    """Open the workspace, run one stage function on it, and turn its errors into a clear exit."""
    with ctx.open(read_only=read_only) as store:
        try:
            return fn(store)
        except STAGE_ERRORS as e:
            _fail(str(e).strip("'\""))


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    from assay.store import RedactingFilter

    handler = RichHandler(console=err, show_path=False, show_time=False)
    handler.addFilter(RedactingFilter())  # secrets (URL credentials, api_key=, bearer tokens) never reach the terminal
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers", "transformers", "numba", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str, code: int = 2) -> None:
    from assay.store import redact_text

    err.print(f"[bold red]error:[/] {redact_text(msg)}", highlight=False)
    raise typer.Exit(code)


def _emit(summary: Any, as_json: bool, render) -> None:
    from assay.store import redact

    summary = redact(summary)  # what is printed is what runs records: no credentials
    if as_json:
        console.print_json(json.dumps(summary, default=str))
    else:
        render(summary)


# --------------------------------------------------------------------------- simulate
@app.command()
def simulate(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory [WORKSPACE/world]"),
    workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt,
) -> None:
    """Write a simulated e-commerce world (catalog, queries, engagement log, human labels, truth) as generic files."""
    from assay.data.simulate import simulate as run_simulate

    ctx = Ctx(workspace, config, set_, quiet)
    out = out or ctx.workspace / "world"
    with ctx.open() as store, store.run("simulate", {"simulate": ctx.cfg.simulate.model_dump(mode="json"),
                                                     "out": str(out)}) as run_id:
        summary = {"out": str(out), **run_simulate(ctx.cfg.simulate, out, progress=not quiet)}
        store.finish_run(run_id, summary)
    _emit(summary, as_json, lambda s: _kv_table(f"simulated world -> {out}", s))
    if not as_json:
        console.print(f"next: assay ingest {out} --workspace {ctx.workspace}")


# --------------------------------------------------------------------------- ingest
@app.command()
def ingest(
    path: Optional[Path] = typer.Argument(None, help="directory: a simulated world, WANDS, ESCI or generic files"),
    fmt: str = typer.Option("auto", "--format", "-f", help="auto, sim, wands, esci or generic"),
    products: Optional[Path] = typer.Option(None, help="generic products file (.csv/.tsv/.jsonl/.parquet)"),
    queries: Optional[Path] = typer.Option(None, help="generic queries file"),
    engagement: Optional[Path] = typer.Option(None, help="generic engagement file"),
    labels: Optional[Path] = typer.Option(None, help="generic human labels file"),
    map_: Optional[list[str]] = typer.Option(None, "--map", help="column map: table.target=source, e.g. products.title=name"),
    workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt,
) -> None:
    """Load files into the workspace; unusable rows go to `rejects` with file, line and reason."""
    from assay.data import ingest as ingest_mod

    ctx = Ctx(workspace, config, set_, quiet)
    files = {k: v for k, v in {"products": products, "queries": queries, "engagement": engagement,
                               "human_labels": labels}.items() if v is not None}
    colmap: dict[str, dict[str, str]] = {}
    for m in map_ or []:
        try:
            lhs, src = m.split("=", 1)
            table, target = lhs.split(".", 1)
        except ValueError:
            _fail(f"--map {m!r} must look like table.target=source (e.g. products.title=product_name)")
        colmap.setdefault(table, {})[target] = src
    summary = _stage(ctx, lambda store: ingest_mod.run(ctx.cfg.ingest, store, path=path, files=files or None, fmt=fmt,
                                                         column_map=colmap, progress=not quiet))
    _emit(summary, as_json, _render_ingest)


def _render_ingest(s: dict) -> None:
    t = Table(title=f"ingest {s['run_id']} ({s['format']})")
    for c in ("table", "read", "accepted", "new", "replaced", "collapsed", "skipped", "rejected"):
        t.add_column(c, justify="left" if c == "table" else "right")
    reasons = Table(title="rejected rows by reason (details: assay rejects)")
    for c in ("table", "reason", "rows"):
        reasons.add_column(c, justify="right" if c == "rows" else "left")
    for name, r in s["tables"].items():
        t.add_row(name, f"{r['read']:,}", f"{r['accepted']:,}", f"{r['inserted']:,}", f"{r['replaced']:,}",
                  f"{r['duplicates_collapsed']:,}", f"{r['skipped']:,}", f"{r['rejected']:,}")
        for reason, n in sorted(r["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
            reasons.add_row(name, reason, f"{n:,}")
    console.print(t)
    if reasons.row_count:
        console.print(reasons)
    if "truth" in s:
        console.print(f"simulated-world truth loaded: {s['truth']}")


# --------------------------------------------------------------------------- mine
@app.command()
def mine(workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
         set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Mine candidates from the BM25, ANN and click channels, federate them, and mine negatives.
    Interrupted runs resume from their last finished batch."""
    from assay.mining import run as run_mining

    ctx = Ctx(workspace, config, set_, quiet)
    summary = _stage(ctx, lambda store: run_mining(ctx.cfg.mining, store, ctx.cfg.models, progress=not quiet))
    _emit(summary, as_json, _render_mine)


def _render_mine(s: dict) -> None:
    rep = s["report"]
    console.print(f"mined {s['candidates']:,} candidates and {s['negatives']:,} negatives for {s['queries']:,} queries "
                  f"over {s['items']:,} items (run {s['run_id']}, resumed batches: {s['resumed_batches']})")
    t = Table(title="channels")
    for c in ("channel", "hits", "queries", "hits/query"):
        t.add_column(c, justify="right" if c != "channel" else "left")
    for c, r in rep["channels"].items():
        t.add_row(c, f"{r['hits']:,}", f"{r['queries']:,}", str(r["hits_per_query"]))
    console.print(t)
    t = Table(title="pairwise overlap")
    for c in ("pair", "overlap |A&B|/min", "jaccard"):
        t.add_column(c)
    for pair, r in rep["overlap"].items():
        t.add_row(pair, f"{r['overlap']:.1%}", f"{r['jaccard']:.1%}")
    console.print(t)
    cpq = rep["candidates_per_query"]
    console.print(f"candidates per query: mean {cpq['mean']}, median {cpq['p50']:.0f}, p90 {cpq['p90']:.0f}, "
                  f"min {cpq['min']}, max {cpq['max']}; items by channel count: {rep['n_channels']}")
    rec = rep.get("recall")
    if rec:
        chans = [c for c in rep["channels"]] + ["union"]
        t = Table(title=f"recall of grade>=3 items (micro / macro; judgments: {rec['source']})")
        t.add_column("queries")
        t.add_column("n", justify="right")
        for c in chans:
            t.add_column(c, justify="right")
        has_extra = "ann_not_bm25" in rec["all"]
        if has_extra:
            t.add_column("ann-only rel.", justify="right")
        rows = [("all", rec["all"])] + [(f"kind={k}", v) for k, v in rec.get("by_kind", {}).items()] + \
               [(f"segment={k}", v) for k, v in rec.get("by_segment", {}).items()]
        for name, b in rows:
            extra = [f"{b['ann_not_bm25']:,}"] if has_extra else []
            t.add_row(name, str(b["queries"]), *[f"{b[c]['micro']:.2f}/{b[c]['macro']:.2f}" for c in chans], *extra)
        console.print(t)
    if rep.get("click_coverage"):
        t = Table(title="click channel coverage")
        for c in ("segment", "own engagement", "queries", "with click candidates"):
            t.add_column(c)
        for r in rep["click_coverage"]:
            t.add_row(str(r["segment"]), str(r["own_engagement"]), str(r["queries"]), str(r["with_click_candidates"]))
        console.print(t)
    console.print(f"timings: {s['timings']}")


# --------------------------------------------------------------------------- annotate
@teachers_app.command("train")
def teachers_train(judge: Optional[list[str]] = typer.Option(None, "--judge", help="train only this judge (repeatable)"),
                   workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                   set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Train the features judge and fine-tune the classifier judges (cross-encoder, LLM classifier) on the human
    train split (annotate.train_on: seed pairs, mined pairs or both)."""
    from assay.annotate import teachers

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: teachers.run(ctx.cfg.annotate, store, only=judge, progress=not quiet))
    _emit(s, as_json, lambda s: _kv_table(
        f"teachers trained on {s['train_pairs']:,} pairs ({s['seed_pairs']:,} seed, {s['mined_pairs']:,} mined; "
        f"grades 0-4: {s['grade_counts']})", s["judges"]))


@app.command()
def calibrate(from_audit: bool = typer.Option(False, "--from-audit", help="fit on the calib split plus the grades "
                                                                          "imported by `assay audit import`"),
              workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
              set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Fit per-class isotonic calibrators and the cascade thresholds on the human calib split."""
    from assay.annotate import fit

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: fit.run(ctx.cfg.annotate, store, progress=not quiet, with_audit=from_audit,
                                          audit_weights=ctx.cfg.audit.calibration_weights))

    def render(s: dict) -> None:
        t = Table(title=f"calibration on {s['calib_pairs']:,} pairs (target agreement {s['target_agreement']:.3f}, "
                        f"{s['target_source']})")
        for c in ("judge", "graded", "accuracy", "recall per grade 0-4", "ECE before", "ECE after", "ms/pair", "reach",
                  "thresholds 0-4"):
            t.add_column(c)
        for name, j in s["judges"].items():
            th = " ".join("-" if x is None else f"{x:.2f}" for x in s["thresholds"][name])
            rec = " ".join("-" if x is None else f"{x:.2f}" for x in j["grade_recall"])
            t.add_row(name, str(j["graded"]), f"{j['accuracy']:.3f}", rec, f"{j['ece_before']:.3f}",
                      f"{j['ece_after']:.3f}", f"{j['ms_per_pair']:.2f}", f"{s['reach'][name]:.1%}", th)
        console.print(t)
        f = s["fitted_on"]
        console.print(f"fitted on the {f['split']} split, pool {f['pool']}: {f['seed_pairs']:,} seed pairs, "
                      f"{f['mined_pairs']:,} mined pairs and {f.get('audit_pairs', 0):,} audited pairs; "
                      f"metric {f['metric']}")
        console.print(f"cascade on calib: accuracy {s['cascade_accuracy_on_calib']:.3f} (target "
                      f"{s['target_agreement']:.3f} - {s['agreement_tolerance']}, {s['target_source']}"
                      f"{'' if s['target_met'] else ', NOT met: kept the most accurate thresholds'}), "
                      f"{s['expected_ms_per_pair']:.1f} judge-ms per pair, decided by {s['decided_by']}")
    _emit(s, as_json, render)


@app.command()
def annotate(dry_run: bool = typer.Option(False, "--dry-run", help="print the cost estimate only"),
             engine: Optional[str] = typer.Option(None, "--engine", help="local (default: annotate.engine) or ray: "
                                                  "plan shards, execute them on Ray Data, commit (docs/scale.md)"),
             address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (else "
                                                   "annotate.ray.address, RAY_ADDRESS, or a local Ray)"),
             workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
             set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Label mined pairs with the calibrated cascade, in resumable batches (or shards on Ray: --engine ray)."""
    from assay.annotate import batches

    ctx = Ctx(workspace, config, set_, quiet)
    if engine is not None:
        if engine not in ("local", "ray"):
            _fail(f"--engine must be local or ray, got {engine!r}")
        ctx.cfg.annotate.engine = engine
    if ctx.cfg.annotate.engine == "ray" and not dry_run:
        from assay.scale import run as scale_run

        s = _stage(ctx, lambda store: scale_run.run(ctx.cfg.annotate, store, progress=not quiet, address=address))
    else:
        s = _stage(ctx, lambda store: batches.run(ctx.cfg.annotate, store, progress=not quiet, dry_run=dry_run),
                   read_only=dry_run)
    s.pop("failed_pairs", None)

    def render(s: dict) -> None:
        if s.get("dry_run"):
            stale = f", {s['stale']:,} of them stale: their texts changed" if s.get("stale") else ""
            t = Table(title=f"annotate --dry-run: {s['to_annotate']:,} pairs to annotate "
                            f"({s['labeled']:,} of {s['work']:,} done{stale}; {s['estimate_source']})")
            for c in ("judge", "kind", "reach", "expected calls", "expected seconds"):
                t.add_column(c)
            for name, j in s["judges"].items():
                t.add_row(name, j["kind"], f"{j['reach']:.1%}", f"{j['expected_calls']:,}",
                          "?" if j["expected_seconds"] is None else f"{j['expected_seconds']:,.0f}")
            console.print(t)
            return
        keys = ("cascade_sha", "decided_share", "failed", "judge_seconds", "after", "run_id")
        if s.get("engine") == "ray":
            keys = ("cascade_sha", "plan", "decided_share", "failed", "judge_calls", "after", "run_id")
        _kv_table(f"annotated {s['annotated']:,} pairs ({s['pairs_per_second']} pairs/s)", {k: s[k] for k in keys})
        for r in s.get("failure_reasons") or []:
            err.print(f"[yellow]failed:[/] {r['pairs']:,} pairs, {r['judge']} {r['status']}"
                      + (f" (e.g. {r['example']!r})" if r["example"] else "") + "; `assay annotate` retries them",
                      highlight=False)
    _emit(s, as_json, render)


@app.command()
def agreement(split: str = typer.Option("eval", "--split", help="eval: the held-out human split, judges replayed; "
                                                                  "audit: the written labels against `assay audit "
                                                                  "import` grades"),
              workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
              set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Agreement of each judge and of the cascade: held-out human eval split, its seed and mined pairs, and (simulated
    worlds) mined pairs and every written label against truth (HTML + PNG report); `--split audit`: the labels the
    cascade wrote against audit grades, per judge, per tier and per deciding judge."""
    from assay.annotate import agreement as agr

    ctx = Ctx(workspace, config, set_, quiet)
    if split == "audit":
        from assay.audit import loop

        s = _stage(ctx, lambda store: loop.agreement(store, cascade_sha=ctx.cfg.export.cascade), read_only=True)
        _emit(s, as_json, _render_audit_agreement)
        return
    if split != "eval":
        _fail(f"--split must be eval or audit, got {split!r}")
    s = _stage(ctx, lambda store: agr.run(ctx.cfg.annotate, store, progress=not quiet))
    def render(s: dict) -> None:
        t = Table(title=f"agreement with held-out human labels ({s['pairs']:,} eval pairs)")
        for c in ("judge", "accuracy", "QWK", "judge-seconds", "decided share", "accuracy on share"):
            t.add_column(c)
        cov = s["cascade"]["coverage"]
        for name, j in s["judges"].items():
            cv = cov.get(name, {})
            t.add_row(name, f"{j['accuracy']:.3f}", f"{j['qwk']:.3f}", f"{j['judge_seconds']:.1f}",
                      f"{cv.get('share', 0):.1%}", f"{cv['accuracy']:.3f}" if cv else "-")
        c = s["cascade"]
        if "vote" in cov:
            t.add_row("(vote)", "", "", "", f"{cov['vote']['share']:.1%}", f"{cov['vote']['accuracy']:.3f}")
        t.add_row("cascade", f"{c['accuracy']:.3f}", f"{c['qwk']:.3f}", f"{c['judge_seconds']:.1f}", "100%", "")
        console.print(t)
        console.print(f"cascade vs best judge ({s['best_judge']}): {c['accuracy_minus_best_judge_points']:+.2f} points, "
                      f"compute {c['compute_vs_best_judge']:.1%} of it (vs last judge: {c['compute_vs_last_judge']:.1%})")
        d = Table(title="by distribution (cascade; recall per grade 0/1/2/3/4)")
        for col in ("distribution", "pairs", "accuracy", "QWK", "recall per grade", "best judge", "its accuracy",
                    "compute vs best"):
            d.add_column(col)
        rec = lambda r: " ".join("-" if x is None else f"{x:.2f}" for x in r)  # noqa: E731
        for key, b in s["distributions"].items():
            cb = b["cascade"]
            d.add_row(key, f"{b['pairs']:,}", f"{cb['accuracy']:.3f}", f"{cb['qwk']:.3f}", rec(cb["grade_recall"]),
                      b["best_judge"], f"{b['judges'][b['best_judge']]['accuracy']:.3f}",
                      f"{cb['compute_vs_best_judge']:.1%}")
        lvt = s.get("labels_vs_truth")
        if lvt:
            d.add_row("labels vs truth", f"{lvt['pairs']:,}", f"{lvt['accuracy']:.3f}", f"{lvt['qwk']:.3f}",
                      rec(lvt["grade_recall"]), "-", "-", "-")
        console.print(d)
        console.print(f"thresholds fitted on: {s.get('thresholds_fitted_on')}")
        console.print(f"report: {s['report']}")
    _emit(s, as_json, render)


@app.command("label-request")
def label_request(out: Path = typer.Option(..., "--out", "-o", help="request file to write (.csv, .jsonl or .parquet)"),
                  n: Optional[int] = typer.Option(None, "--n", help="pairs to request [label_request.n]"),
                  workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                  set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Choose mined pairs for people to grade (strata of channel agreement and rank, plus the cascade's least
    certain pairs); load the answers with `assay ingest --labels FILE`."""
    from assay.annotate import requests

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: requests.run(ctx.cfg.label_request, store, out, n=n))

    def render(s: dict) -> None:
        console.print(f"requested {s['requested']:,} pairs over {s['queries']:,} queries (pool {s['pool']:,}) -> "
                      f"{s['file']}")
        _kv_table("by stratum", s["by_stratum"])
        _kv_table("by reason / split", {**s["by_reason"], **{f"split {k}": v for k, v in s["by_split"].items()}})
        console.print(f"fill grade (0-4) and annotator, then: assay ingest --labels {s['file']}")
    _emit(s, as_json, render)


@app.command("label-answer")
def label_answer(request: Path = typer.Argument(..., help="a file written by `assay label-request`"),
                 out: Path = typer.Option(..., "--out", "-o", help="answered file (same columns, grade filled)"),
                 workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                 set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Simulated worlds only: the world's noisy annotators answer a label request."""
    from assay.annotate import requests

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: requests.answer_simulated(store, request, out), read_only=True)
    _emit(s, as_json, lambda s: console.print(
        f"answered {s['answered']:,} pairs -> {s['file']} (annotator accuracy {s['annotator_accuracy']}); "
        f"load them: assay ingest --labels {s['file']}"))


# --------------------------------------------------------------------------- export / audit
def _filters(tier, grade, judge, min_conf, max_conf, segment, run) -> dict:
    return {"tier": tier, "grade": grade, "decided_by": judge, "min_confidence": min_conf,
            "max_confidence": max_conf, "segment": segment, "run": run}


@app.command("export")
def export_labels(out: Path = typer.Option(..., "--out", "-o", help="file (a folder for hf) to write"),
                  fmt: Optional[str] = typer.Option(None, "--format", "-f", help="parquet, jsonl, csv, hf or "
                                                    "labelstudio [from the --out suffix]"),
                  tier: Optional[list[int]] = typer.Option(None, "--tier", help="curriculum tier 1-5 (repeatable)"),
                  grade: Optional[list[int]] = typer.Option(None, "--grade", help="cascade grade 0-4 (repeatable)"),
                  judge: Optional[list[str]] = typer.Option(None, "--judge", help="deciding judge (repeatable)"),
                  min_conf: Optional[float] = typer.Option(None, "--min-confidence"),
                  max_conf: Optional[float] = typer.Option(None, "--max-confidence"),
                  segment: Optional[list[str]] = typer.Option(None, "--segment", help="head, torso, tail, unknown"),
                  run: Optional[str] = typer.Option(None, "--run", help="rows written by this mine, annotate or "
                                                                       "curriculum run id"),
                  workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                  set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Export the labeled dataset with its lineage (channel ranks, probabilities, each judge's vote, tier, target,
    run ids), streamed, for audit or for training elsewhere."""
    from assay.audit import export as ex

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: ex.run(ctx.cfg.export, store, out, fmt=fmt, progress=not quiet,
                                         filters=_filters(tier, grade, judge, min_conf, max_conf, segment, run)))
    _emit(s, as_json, lambda s: console.print(
        f"exported {s['rows']:,} labels of cascade {s['cascade_sha']} -> {s['out']} ({s['format']})"
        + (f"; Label Studio labeling config: {s['label_config']}" if s.get("label_config") else "")))


@audit_app.command("sample")
def audit_sample(out: Path = typer.Option(..., "--out", "-o", help="file to write (any export format)"),
                 n: Optional[int] = typer.Option(None, "--n", help="pairs [audit.n]"),
                 fmt: Optional[str] = typer.Option(None, "--format", "-f", help="parquet, jsonl, csv, hf or "
                                                   "labelstudio [from the --out suffix]"),
                 seed: Optional[int] = typer.Option(None, "--seed", help="[audit.seed]"),
                 workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                 set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """A stratified sample of the cascade's labels (tier x grade x deciding judge, low confidence oversampled) for
    people to grade; fill audit_grade (or annotate in Label Studio), then `assay audit import FILE`."""
    from assay.audit import loop

    ctx = Ctx(workspace, config, set_, quiet)
    acfg = ctx.cfg.audit if seed is None else ctx.cfg.audit.model_copy(update={"seed": seed})
    s = _stage(ctx, lambda store: loop.sample(acfg, ctx.cfg.export, store, out, n=n, fmt=fmt, progress=not quiet))

    def render(s: dict) -> None:
        console.print(f"audit sample: {s['rows']:,} labels of cascade {s['cascade_sha']} over {s['strata']} strata "
                      f"({s['low_confidence']:,} low-confidence) -> {s['out']}")
        _kv_table("by stratum (tier / grade / deciding judge)", s["by_stratum"])
        console.print(f"grade them (audit_grade 0-4, annotator), then: assay audit import {s['out']}")
    _emit(s, as_json, render)


@audit_app.command("import")
def audit_import(file: Path = typer.Argument(..., help="graded audit file: .csv/.tsv/.jsonl/.parquet with "
                                                       "audit_grade (or grade), or a Label Studio .json export"),
                 workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                 set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Load people's audit grades into human_labels (split audit); then `assay agreement --split audit` and
    `assay calibrate --from-audit`."""
    from assay.audit import loop

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: loop.import_grades(store, file, progress=not quiet))
    _emit(s, as_json, lambda s: console.print(
        f"audit grades from {s['file']}: {s['accepted']:,} accepted, {s['rejected']:,} rejected "
        f"({s['rejected_by_reason']}; see `assay rejects`), {s['ungraded']:,} rows left ungraded; next: "
        "assay agreement --split audit"))


def _render_audit_agreement(s: dict) -> None:
    rec = lambda r: " ".join("-" if x is None else f"{x:.2f}" for x in r)  # noqa: E731
    t = Table(title=f"audit: cascade {s['cascade_sha']} against people on {s['pairs']:,} pairs")
    for c in ("", "pairs", "accuracy", "QWK", "within one", "recall per grade 0-4"):
        t.add_column(c)

    def add(name: str, m: dict) -> None:
        t.add_row(name, f"{m['n']:,}", f"{m['accuracy']:.3f}", f"{m['qwk']:.3f}", f"{m['within_one']:.3f}",
                  rec(m["grade_recall"]))
    add("cascade (written labels)", s["cascade"])
    for n, m in s["judges"].items():
        add(f"judge {n} (own vote)", m)
    for n, m in s["by_decided_by"].items():
        add(f"decided by {n}", m)
    for n, m in s["by_tier"].items():
        add(f"tier {n}", m)
    console.print(t)
    console.print(f"report: {s['report']}")


# --------------------------------------------------------------------------- curriculum / train
@app.command()
def curriculum(workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
               set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Sort the labeled mined pairs into five difficulty tiers with graded targets (the examples table)."""
    from assay.curriculum import run as run_curriculum

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: run_curriculum(ctx.cfg.curriculum, store))
    def render(s: dict) -> None:
        t = Table(title=f"examples: {s['examples']:,} from {s['labeled']:,} labeled of {s['pairs']:,} mined pairs "
                        f"(run {s['run_id']})")
        tiers = list(s["by_tier"])
        t.add_column("segment")
        for name in tiers:
            t.add_column(name, justify="right")
        for seg, row in s["by_segment"].items():
            t.add_row(seg, *[f"{row[n]:,}" for n in tiers])
        t.add_row("all", *[f"{s['by_tier'][n]:,}" for n in tiers])
        t.add_row("mean target", *[str(s["target_mean_by_tier"].get(n, "-")) for n in tiers])
        console.print(t)
        console.print(f"grades: {s['by_grade']}; split (examples): {s['by_split']}; queries: {s['queries']}; "
                      f"{s['in_no_tier']:,} labeled pairs in no tier ({s['unsure_positives']:,} positives the "
                      f"cascade was unsure of, curriculum.tiers.min_pos_prob), {s['capped']:,} over the per-query "
                      f"caps, {s['human_graded']:,} graded by humans")
        for w in s["warnings"]:
            console.print(f"[yellow]warning:[/] {w}")
    _emit(s, as_json, render)


@app.command()
def train(stage: Optional[int] = typer.Option(None, "--stage", help="train only this curriculum stage (1-3)"),
          baseline: Optional[str] = typer.Option(None, "--baseline", help="train a baseline instead: click, binary, "
                                                                          "graded or mixed-bce"),
          workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
          set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Train the two-tower model through the curriculum stages (or one baseline); resumes a killed run.
    Under `torchrun --nproc-per-node N` it trains data-parallel with in-batch negatives gathered across ranks."""
    from assay.trainer import run_cli
    from assay.trainer.run import gain_text, val_cells

    ctx = Ctx(workspace, config, set_, quiet)
    try:
        s = run_cli(ctx.cfg, ctx.workspace, stage=stage, baseline=baseline, progress=not quiet)
    except (WorkspaceLocked, WorkspaceMissing, *STAGE_ERRORS) as e:
        _fail(str(e).strip("'\""))
    if s is None:  # ranks > 0 of a distributed run print nothing
        return
    def render(s: dict) -> None:
        t = Table(title=f"train {s['run_id']} (world size {s['world_size']}; {s['data']['train_examples']:,} train "
                        f"examples, {s['data']['val_queries']} validation queries)")
        for c in ("phase", "loss", "queries", "steps", "start val", "best val", "best step", "kept", "examples/s"):
            t.add_column(c)
        for name, p in s["phases"].items():
            t.add_row(name, p["loss"], f"{p['train_queries']:,}", str(p["steps"]), f"{p['start_val']:.4f}",
                      f"{p['best_val']:.4f}",
                      str(p["best_step"]), "yes" if p["improved"] else "[yellow]skipped[/]",
                      f"{p['examples_per_second']:.1f}")
        console.print(t)
        a = Table(title=f"ablation: validation NDCG@10 (cascade labels of validation queries; {s.get('val_metric')} "
                        "selects); gain: a stage's best minus where it started, a baseline's minus the base encoder "
                        "[paired bootstrap interval] P(better); rerank: each query's labeled pool re-ranked; "
                        "retrieval, emb@10, judged@10: its top 10 of the validation catalog")
        for c in ("model", "val NDCG@10", "steps", "gain", "rerank", "retrieval", "emb@10", "judged@10"):
            a.add_column(c)
        for r in s["ablation"]:
            a.add_row(r["model"], f"{r['val_ndcg10']:.4f}", str(r["steps"]), gain_text(r.get("gain")) or "-",
                      *val_cells(r))
        console.print(a)
        if s["skipped_stages"]:
            console.print(f"[yellow]skipped (no validation gain):[/] {s['skipped_stages']}")
        console.print(f"final checkpoint: {s['final_checkpoint'] or '(none kept)'}; report: {s['report']}")
    _emit(s, as_json, render)


@app.command()
def evaluate(split: str = typer.Option("test", help="held-out queries: test (default) or val"),
             checkpoint: Optional[list[str]] = typer.Option(None, "--checkpoint", help="extra system NAME=PATH "
                                                                                       "(repeatable)"),
             qrels: Optional[str] = typer.Option(None, "--qrels", help="judgments file: TREC qrels (query_id 0 "
                                                 "item_id grade) or CSV query_id,item_id,grade [truth, else labels]"),
             workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
             set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """BM25, the base encoder, the curriculum model and the baselines retrieving from the whole catalog for
    held-out queries: NDCG@10, recall, embarrassing rate, by segment (HTML + PNG report)."""
    from assay.eval import run as run_eval

    ctx = Ctx(workspace, config, set_, quiet)
    extra = {}
    for c in checkpoint or []:
        if "=" not in c:
            _fail(f"--checkpoint {c!r} must look like NAME=PATH")
        name, path = c.split("=", 1)
        extra[name] = path
    s = _stage(ctx, lambda store: run_eval(ctx.cfg, store, split=split, checkpoints=extra, progress=not quiet,
                                           qrels=qrels))
    _emit(s, as_json, _render_evaluation)


def _render_evaluation(s: dict) -> None:
    """`assay evaluate`'s tables, comparisons and the served system."""
    segs = ["all"] + list(s["segments"])
    for m in ("ndcg@10", "embarrassing@10", "recall@100"):
        t = Table(title=f"{m} on {s['queries']} {s['split']} queries ({s['judgments']} judgments; "
                        f"segments {s['segments']})")
        t.add_column("system")
        for g in segs:
            t.add_column(g, justify="right")
        for name, r in s["systems"].items():
            t.add_row(name, *[f"{r.get(g, {}).get(m, float('nan')):.4f}" for g in segs])
        console.print(t)
    _render_comparisons(s)
    if s.get("backend_note"):
        console.print(f"[yellow]warning:[/yellow] {s['backend_note']}")
    if s.get("served"):
        from assay.eval.run import served_line

        console.print(served_line(s["served"]))
    console.print(f"report: {s['report']} (per-segment comparisons there; per-query values: {s['per_query']})")


def _render_comparisons(ev: dict) -> None:
    """The reference system minus every other on all queries, with the paired bootstrap interval."""
    if not ev.get("comparisons"):
        return
    from assay.eval.run import p_better

    t = Table(title=f"{ev['reference']} minus each system, same queries: difference [{ev.get('confidence', 0.95):.0%} "
                    f"paired bootstrap interval] P({ev['reference']} better)")
    t.add_column("system")
    metrics = ("ndcg@10", "embarrassing@10")
    for m in metrics:
        t.add_column(m, justify="right", no_wrap=True)
    for name, by_seg in ev["comparisons"].items():
        cells = []
        for m in metrics:
            c = by_seg["all"][m]
            cells.append(f"{c['delta']:+.3f} [{c['lo']:+.3f},{c['hi']:+.3f}] {p_better(m, c):.2f}")
        t.add_row(name, *cells)
    console.print(t)


# --------------------------------------------------------------------------- inspection
# --------------------------------------------------------------------------- serving
@app.command("export-index")
def export_index(checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="checkpoint folder, or "
                                                          "'best' (the best-validated of the newest training folder) "
                                                          "[serve.checkpoint: best]"),
                 workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                 set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Encode the catalog with the item tower and build a FAISS index bound to the checkpoint by its manifest."""
    from assay.serving import index as serving

    ctx = Ctx(workspace, config, set_, quiet)
    s = _stage(ctx, lambda store: serving.export(ctx.cfg, store, checkpoint=checkpoint, progress=not quiet))
    _emit(s, as_json, lambda s: _kv_table(f"index {s['index_id']} -> {s['path']}", {
        k: s.get(k) for k in ("checkpoint_id", "checkpoint_sha", "kind", "factory", "n_items", "dim", "recall@100",
                              "recall_queries", "encode_seconds", "build_seconds")}))


@app.command()
def search(query: str = typer.Argument(..., help="the search query"),
           k: int = typer.Option(10, "-k", help="results (1-1000)"),
           mode: str = typer.Option("dense", help="dense, or hybrid (BM25 and dense fused by reciprocal rank)"),
           index_id: Optional[str] = typer.Option(None, "--index", help="index id [the newest export]"),
           workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
           set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Search the exported index: the top-k items with title, score and source."""
    from assay.serving.index import Served

    ctx = Ctx(workspace, config, set_, quiet)
    searched: list[str] = []

    def go(store) -> list[dict]:
        served = Served(ctx.cfg, store, index_id)
        searched.append(served.correct(query.strip()))
        return [h.__dict__ for h in served.search(query, k, mode)]
    hits = _stage(ctx, go, read_only=True)

    def render(rows: list[dict]) -> None:
        fixed = f" (searched as {searched[0]!r})" if searched and searched[0] != query.strip() else ""
        t = Table(title=f"{query!r}{fixed}: top {len(rows)} ({mode})")
        for c in ("rank", "item_id", "title", "score", "source"):
            t.add_column(c)
        for r, h in enumerate(rows, 1):
            t.add_row(str(r), h["item_id"], h["title"], f"{h['score']:.4f}", h["source"])
        console.print(t)
    _emit(hits, as_json, render)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="interface to bind (loopback unless told otherwise)"),
          port: int = typer.Option(8080, help="TCP port"),
          index_id: Optional[str] = typer.Option(None, "--index", help="index id [the newest export]"),
          workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
          set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt) -> None:
    """The search API (POST /search, GET /health, GET /manifest) and a search page (GET /) comparing BM25, the
    base encoder and the trained model."""
    from assay.serving.app import serve as run_server

    ctx = Ctx(workspace, config, set_, quiet)
    if not quiet:
        err.print(f"assay serve: http://{host}:{port}/ (Ctrl-C to stop)")
    _stage(ctx, lambda store: run_server(ctx.cfg, store, host=host, port=port, index_id=index_id), read_only=True)


# --------------------------------------------------------------------------- the main job
@app.command("run")
def run_pipeline(force: Optional[list[str]] = typer.Option(None, "--force", help="run this step even if current "
                                                                                "(and every step after it)"),
                 until: Optional[str] = typer.Option(None, "--until", help="stop after this step; the steps after "
                                                                            "it are listed with what would run them"),
                 workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                 set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """The main job: simulate -> ingest -> mine -> teachers -> calibrate -> annotate -> agreement -> curriculum ->
    train -> baselines -> export-index -> evaluate, skipping steps that are current and resuming one cut off."""
    from assay import pipeline

    ctx = Ctx(workspace, config, set_, quiet)
    t0 = __import__("time").perf_counter()
    try:
        ctx.remember()
        s = pipeline.run(ctx.cfg, ctx.workspace, force=force, until=until, progress=not quiet,
                         on_step=None if quiet or as_json else lambda n, st: err.print(f"[bold]{n}[/bold]: {st}"))
    except (WorkspaceLocked, WorkspaceMissing, *STAGE_ERRORS) as e:
        _fail(str(e).strip("'\""))
    s["seconds"] = round(__import__("time").perf_counter() - t0, 1)

    def render(s: dict) -> None:
        t = Table(title=f"assay run: {s['workspace']} ({s['seconds']:.0f} s)")
        for c in ("step", "status", "seconds"):
            t.add_column(c)
        for r in s["steps"]:
            t.add_row(r["step"], r["status"] + (f" ({r['why']})" if r.get("why") else ""), f"{r['seconds']:.1f}")
        console.print(t)
        ev = s.get("evaluate")
        if ev:
            _render_headline(ev)
    _emit(s, as_json, render)


def _render_headline(ev: dict) -> None:
    segs = ["all"] + list(ev["segments"])
    t = Table(title=f"NDCG@10 / embarrassing@10 on {ev['queries']} held-out {ev['split']} queries "
                    f"({ev['judgments']} judgments)")
    t.add_column("system")
    for sg in segs:
        t.add_column(sg)
    for name, m in ev["systems"].items():
        t.add_row(name, *[f"{m[sg]['ndcg@10']:.4f} / {m[sg]['embarrassing@10']:.4f}" if sg in m else "-"
                          for sg in segs])
    console.print(t)
    _render_comparisons(ev)
    console.print(f"report: {ev['report']}")


@app.command()
def summary(workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
            set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """A summary table of the workspace: catalog, queries by segment, engagement, labels, rejects, runs."""
    from assay.report import workspace_summary

    ctx = Ctx(workspace, config, set_, quiet)
    with ctx.open(read_only=True) as store:
        s = workspace_summary(store)
    _emit(s, as_json, _render_summary)


def _render_summary(s: dict) -> None:
    t = Table(title=f"workspace {s['workspace']} (schema v{s['schema_version']})")
    t.add_column("table")
    t.add_column("rows", justify="right")
    t.add_column("details")
    for name, info in s["tables"].items():
        t.add_row(name, f"{info['rows']:,}", info.get("details", ""))
    console.print(t)


@app.command()
def doctor(fix: bool = typer.Option(False, "--fix", help="delete the orphan rows found (one transaction)"),
           workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
           set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Check the workspace: writer lock, schema version, runs cut off, annotation left to do, orphan rows, missing
    checkpoints and indexes that no longer match their checkpoint; prints the command that fixes each."""
    from assay import doctor as doc

    ctx = Ctx(workspace, config, set_, quiet)
    try:
        s = doc.run(ctx.workspace, fix=fix)
    except STAGE_ERRORS as e:
        _fail(str(e))

    def render(s: dict) -> None:
        t = Table(title=f"assay doctor {s['workspace']}: {s['status']}")
        for c in ("check", "status", "found", "fix"):
            t.add_column(c)
        colour = {"ok": "green", "warn": "yellow", "error": "red"}
        for f in s["findings"]:
            t.add_row(f["check"], f"[{colour[f['status']]}]{f['status']}[/]", f["detail"], f["fix"])
        console.print(t)
        if s["fixed"]:
            _kv_table("deleted orphan rows", s["fixed"])
    _emit(s, as_json, render)
    if s["status"] == "error":
        raise typer.Exit(1)


@app.command()
def rejects(limit: int = typer.Option(20, help="rows to show"), run: Optional[str] = typer.Option(None, help="one run_id"),
            workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
            set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Show rejected rows with their file, line and reason."""
    ctx = Ctx(workspace, config, set_, quiet)
    with ctx.open(read_only=True) as store:
        where = "WHERE run_id = ?" if run else ""
        rows = store.query(f"SELECT run_id, target, file, line, reason, raw FROM rejects {where} "
                           f"ORDER BY created_at, file, line LIMIT {int(limit)}", [run] if run else []).to_pylist()
    def render(rows: list[dict]) -> None:
        t = Table(title="rejects")
        for c in ("target", "file", "line", "reason", "raw"):
            t.add_column(c, overflow="fold")
        for r in rows:
            t.add_row(r["target"], Path(r["file"] or "").name, str(r["line"]), r["reason"], (r["raw"] or "")[:60])
        console.print(t)
    _emit(rows, as_json, render)


@app.command()
def runs(limit: int = typer.Option(20), workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
         set_: Optional[list[str]] = SetOpt, quiet: bool = QuietOpt, as_json: bool = JsonOpt) -> None:
    """Show recorded runs (lineage): stage, status, code version, start and end."""
    ctx = Ctx(workspace, config, set_, quiet)
    with ctx.open(read_only=True) as store:
        rows = store.query(f"SELECT run_id, stage, status, code_version, started_at, ended_at FROM runs "
                           f"ORDER BY started_at DESC LIMIT {int(limit)}").to_pylist()
    def render(rows: list[dict]) -> None:
        t = Table(title="runs")
        for c in ("run_id", "stage", "status", "code_version", "started_at", "ended_at"):
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(r[c]) for c in ("run_id", "stage", "status", "code_version", "started_at", "ended_at")])
        console.print(t)
    _emit(rows, as_json, render)


@config_app.command("show")
def config_show(workspace: Optional[Path] = WorkspaceOpt, config: Optional[Path] = ConfigOpt,
                set_: Optional[list[str]] = SetOpt) -> None:
    """Print the effective config (defaults + file + overrides) as YAML, secrets redacted (as in `runs`)."""
    ctx = Ctx(workspace, config, set_, True)
    sys.stdout.write(dump_config(ctx.cfg, redacted=True))


def _kv_table(title: str, d: dict) -> None:
    t = Table(title=title)
    t.add_column("key")
    t.add_column("value", overflow="fold")
    for k, v in d.items():
        t.add_row(str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    console.print(t)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
