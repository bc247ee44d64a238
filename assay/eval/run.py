"""`assay evaluate`: BM25, the base encoder, the curriculum model and the trained baselines on held-out queries.

Reads ``checkpoints`` (the newest kept curriculum checkpoint, whose stage is the highest, and the newest of each
baseline), the ``test`` (or ``val``) queries of ``examples``, and the judgments described in
:mod:`assay.eval.retrieval`. Writes ``artifacts/reports/eval-<time>/`` (report.json, report.html, PNGs) and
records the run. Checkpoint selection never reads the simulator's truth; this report is where truth is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from assay.config import AssayConfig
from assay.eval.retrieval import evaluate
from assay.reporting import bar_png, img, table_html, write_report
from assay.store import Store, utcnow

METRICS = ("ndcg@10", "recall@10", "recall@100", "embarrassing@10", "judged@10")


def default_systems(store: Store) -> dict[str, str]:
    systems = {"bm25": "bm25", "base encoder": "base"}
    rows = store.exec("""SELECT name, path FROM checkpoints WHERE kept AND name IS NOT NULL
                         QUALIFY row_number() OVER (PARTITION BY name ORDER BY created_at DESC, stage DESC) = 1
                         ORDER BY name DESC""")
    for name, path in rows:
        if Path(path).exists():
            systems[name] = path
    return systems


def run(cfg: AssayConfig, store: Store, *, split: str = "test", checkpoints: dict[str, str] | None = None,
        progress: bool = True, qrels: str | None = None) -> dict:
    """Every system on the held-out queries, plus ``hybrid``: BM25 fused with the curriculum model (the base
    encoder when no curriculum checkpoint exists). Judgments: ``qrels`` when given, else truth, else labels."""
    systems = default_systems(store)
    systems.update(checkpoints or {})
    dense = "curriculum" if "curriculum" in systems else "base encoder"
    with store.run("evaluate", {"split": split, "systems": systems, "qrels": qrels}) as run_id:
        res = evaluate(store, systems, split=split, bm25=cfg.mining.bm25,
                       base_model=cfg.train.base_model or cfg.models.embedder, device=cfg.models.device,
                       progress=progress, hybrid=("bm25", dense), qrels=Path(qrels) if qrels else None)
        res["run_id"] = run_id
        folder = store.artifacts / "reports" / f"eval-{utcnow():%Y%m%dT%H%M%S}"
        res["report"] = str(_report(folder, res))
        (folder / "metrics.json").write_text(json.dumps({k: res[k] for k in ("split", "queries", "judgments",
                                                                            "segments", "systems")}, indent=1))
        store.finish_run(run_id, res)
    return res


def _report(folder: Path, res: dict) -> Path:
    names = list(res["systems"])
    segs = ["all"] + [s for s in res["segments"]]
    sections = []
    for m in METRICS:
        rows = [[n] + [res["systems"][n].get(s, {}).get(m, float("nan")) for s in segs] for n in names]
        sections.append((f"{m} ({res['judgments']} judgments, {res['split']} queries)", table_html(["system"] + segs, rows)))
    bar_png(names, [res["systems"][n]["all"]["ndcg@10"] for n in names], folder / "ndcg10.png",
            f"NDCG@10 on {res['queries']} {res['split']} queries ({res['judgments']})", "NDCG@10")
    bar_png(names, [res["systems"][n]["all"]["embarrassing@10"] for n in names], folder / "embarrassing10.png",
            "embarrassing rate@10", "grade-0 share of judged top 10")
    sections.append(("Charts", img("ndcg10.png") + img("embarrassing10.png")))
    return write_report(folder, "assay evaluate", res, sections)
