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
from rich.console import Console
from rich.table import Table

from assay.config import ConfigError, AssayConfig, dump_config, load_config
from assay.store import Store, WorkspaceLocked, WorkspaceMissing

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="assay: graded relevance training data for dense product search, without click labels.")
config_app = typer.Typer(no_args_is_help=True, help="Show or check configuration.")
app.add_typer(config_app, name="config")

console = Console()
err = Console(stderr=True)

WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="workspace directory [env ASSAY_WORKSPACE; ./workspace]")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key: section.key=value (repeatable)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars, warnings only")
JsonOpt = typer.Option(False, "--json", help="print the result as JSON")


class Ctx:
    def __init__(self, workspace: Optional[Path], config: Optional[Path], overrides: Optional[list[str]], quiet: bool):
        self.workspace = Path(workspace or os.environ.get("ASSAY_WORKSPACE") or "workspace")
        self.quiet = quiet
        _setup_logging(quiet)
        try:
            self.cfg: AssayConfig = load_config(config, overrides or [])
        except ConfigError as e:
            _fail(str(e))

    def open(self, read_only: bool = False) -> Store:
        try:
            return Store.open(self.workspace, read_only=read_only, threads=self.cfg.store.threads,
                              memory_limit=self.cfg.store.memory_limit)
        except (WorkspaceLocked, WorkspaceMissing) as e:
            _fail(str(e))


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers", "transformers", "numba", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def _emit(summary: Any, as_json: bool, render) -> None:
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
    summary = run_simulate(ctx.cfg.simulate, out, progress=not quiet)
    summary = {"out": str(out), **summary}
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
    store = ctx.open()
    try:
        summary = ingest_mod.run(ctx.cfg.ingest, store, path=path, files=files or None, fmt=fmt,
                                 column_map=colmap, progress=not quiet)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        _fail(str(e))
    finally:
        store.close()
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
    store = ctx.open()
    try:
        summary = run_mining(ctx.cfg.mining, store, ctx.cfg.models, progress=not quiet)
    except (ValueError, KeyError) as e:
        _fail(str(e))
    finally:
        store.close()
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


# --------------------------------------------------------------------------- inspection
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
    """Print the effective config (defaults + file + overrides) as YAML."""
    ctx = Ctx(workspace, config, set_, True)
    sys.stdout.write(dump_config(ctx.cfg))


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
