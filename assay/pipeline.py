"""`assay run`: the main job, every stage in order, skipping what is current and resuming what was cut off.

Steps: simulate -> ingest -> mine -> label-request (simulated answers; optional) -> teachers -> calibrate ->
annotate -> agreement -> curriculum -> train -> baselines -> export-index -> evaluate. Each step calls the same
stage ``run()`` as its command.

Currency: a step's key is a digest of the config sections it reads and the key of the step before it, so a change
upstream makes every later step stale. The workspace's ``meta`` row ``pipeline`` records the key of every step
that finished. A step whose key is recorded is skipped; any other step runs, and the stages that can resume do
(mining by batch, annotation by pair, training by its saved state), so a run that was cut off continues where it
stopped. ``force`` names steps to run even when current (and so every step after them).

``pipeline.simulate: false`` starts at mining, on a workspace the user has already filled with `assay ingest`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from assay.config import AssayConfig
from assay.store import Store, utcnow
from assay.text import digest

log = logging.getLogger(__name__)

META_KEY = "pipeline"


def _sections(cfg: AssayConfig, *names: str) -> str:
    """The config a step reads, as its key's text: whole sections, or one key of a section ("pipeline.baselines"),
    so that changing which baselines train does not make the label requests stale."""
    def part(n: str):
        sec, _, key = n.partition(".")
        d = cfg.section_dict(sec)
        return d[key] if key else d
    return json.dumps({n: part(n) for n in names}, sort_keys=True, default=str)


def _simulate(cfg: AssayConfig, ws: Path, progress: bool) -> dict:
    from assay.data.simulate import simulate

    with Store.open(ws) as store, store.run("simulate", {"simulate": cfg.simulate.model_dump(mode="json"),
                                                         "out": str(ws / "world")}) as run_id:
        s = {"out": str(ws / "world"), **simulate(cfg.simulate, ws / "world", progress=progress)}
        store.finish_run(run_id, s)
    return s


def _ingest(cfg: AssayConfig, ws: Path, progress: bool) -> dict:
    from assay.data import ingest

    with Store.open(ws) as store:
        return ingest.run(cfg.ingest, store, path=ws / "world", progress=progress)


def _mine(cfg: AssayConfig, ws: Path, progress: bool) -> dict:
    from assay.mining import run as mine

    with Store.open(ws) as store:
        return mine(cfg.mining, store, cfg.models, progress=progress)


def _label_request(cfg: AssayConfig, ws: Path, progress: bool) -> dict:
    from assay.annotate import requests
    from assay.data import ingest

    folder = ws / "label-requests"
    with Store.open(ws) as store:
        stamp = f"{utcnow():%Y%m%dT%H%M%S}"
        req = requests.run(cfg.label_request, store, folder / f"request-{stamp}.csv", n=cfg.pipeline.label_requests)
        ans = requests.answer_simulated(store, Path(req["file"]), folder / f"answers-{stamp}.csv")
        ing = ingest.run(cfg.ingest, store, files={"human_labels": ans["file"]}, progress=progress)
    return {"requested": req["requested"], "answered": ans["answered"],
            "ingested": ing["tables"]["human_labels"]["accepted"]}


def _with_store(fn: Callable) -> Callable:
    def step(cfg: AssayConfig, ws: Path, progress: bool) -> dict:
        with Store.open(ws) as store:
            return fn(cfg, store, progress)
    return step


def _teachers(cfg, store, progress):
    from assay.annotate import teachers

    return teachers.run(cfg.annotate, store, progress=progress)


def _calibrate(cfg, store, progress):
    from assay.annotate import fit

    return fit.run(cfg.annotate, store, progress=progress)


def _annotate(cfg, store, progress):
    from assay.annotate import batches

    out = {}
    while True:  # annotate.max_pairs caps one launch; the main job labels every pending pair
        out = batches.run(cfg.annotate, store, progress=progress)
        if out["after"]["pending"] == 0 or out["annotated"] == 0:
            return out


def _agreement(cfg, store, progress):
    from assay.annotate import agreement

    return agreement.run(cfg.annotate, store, progress=progress)


def _curriculum(cfg, store, progress):
    from assay.curriculum import run

    return run(cfg.curriculum, store)


def _train(cfg, store, progress):
    from assay.trainer.run import run

    return run(cfg.train, store, cfg.models, progress=progress, spell=cfg.spell)


def _baselines(cfg, store, progress):
    from assay.trainer.run import run

    return {b: run(cfg.train, store, cfg.models, baseline=b, progress=progress, spell=cfg.spell)["run_id"]
            for b in cfg.pipeline.baselines}


def _export(cfg, store, progress):
    from assay.serving.index import export

    if not cfg.serve.checkpoint and not store.exec("SELECT 1 FROM checkpoints WHERE kept AND name = 'curriculum'"):
        log.warning("no curriculum stage improved on the base encoder in validation: nothing to serve")
        return {"skipped": "no kept curriculum checkpoint"}
    return export(cfg, store, progress=progress)


def _evaluate(cfg, store, progress):
    from assay.eval.run import run

    return run(cfg, store, progress=progress)


# name, config sections in its key, the step, enabled(cfg)
STEPS: list[tuple[str, tuple[str, ...], Callable, Callable[[AssayConfig], bool]]] = [
    ("simulate", ("simulate",), _simulate, lambda c: c.pipeline.simulate),
    ("ingest", ("ingest",), _ingest, lambda c: c.pipeline.simulate),
    ("mine", ("mining", "models"), _mine, lambda c: True),
    ("label-request", ("label_request", "pipeline.label_requests"), _label_request,
     lambda c: c.pipeline.simulate and c.pipeline.label_requests > 0),
    ("teachers", ("annotate",), _with_store(_teachers), lambda c: True),
    ("calibrate", ("annotate",), _with_store(_calibrate), lambda c: True),
    ("annotate", ("annotate",), _with_store(_annotate), lambda c: True),
    ("agreement", ("annotate",), _with_store(_agreement), lambda c: True),
    ("curriculum", ("curriculum",), _with_store(_curriculum), lambda c: True),
    ("train", ("train", "models", "spell"), _with_store(_train), lambda c: True),
    ("baselines", ("train", "pipeline.baselines"), _with_store(_baselines), lambda c: bool(c.pipeline.baselines)),
    ("export-index", ("serve",), _with_store(_export), lambda c: c.pipeline.export_index),
    ("evaluate", ("mining", "evaluate"), _with_store(_evaluate), lambda c: True),
]
STEP_NAMES = [s[0] for s in STEPS]


# steps whose key once read the whole pipeline section: a key recorded that way, for the same config, is current
_LEGACY_SECTIONS = {"label-request": ("label_request", "pipeline"), "baselines": ("train", "pipeline")}


def plan(cfg: AssayConfig, done: dict) -> list[dict]:
    """Each step's key and whether it is current (recorded as finished with that key)."""
    out, prev = [], "start"
    for name, sections, _, enabled in STEPS:
        if not enabled(cfg):
            out.append({"step": name, "key": None, "status": "disabled"})
            continue
        key = digest([name, _sections(cfg, *sections), prev])
        rec = done.get(name, {}).get("key")
        if rec != key and name in _LEGACY_SECTIONS and rec == digest([name, _sections(cfg, *_LEGACY_SECTIONS[name]),
                                                                          prev]):
            key = rec  # the steps after it chain on the recorded key, so they stay current too
        out.append({"step": name, "key": key, "status": "current" if rec == key else "run"})
        prev = key
    return out


def run(cfg: AssayConfig, workspace: Path, *, force: list[str] | None = None, progress: bool = True,
        on_step: Callable[[str, str], None] | None = None) -> dict:
    """Run the main job on ``workspace``; returns the per-step table and the evaluation summary."""
    for f in force or []:
        if f not in STEP_NAMES:
            raise ValueError(f"unknown step {f!r}; steps are {STEP_NAMES}")
    workspace = Path(workspace)
    with Store.open(workspace) as store:
        done: dict = store.get_meta(META_KEY) or {}
    steps = plan(cfg, done)
    forced = False
    results: dict = {}
    table = []
    for (name, _, fn, _), st in zip(STEPS, steps):
        forced = forced or name in (force or [])
        if st["status"] == "disabled" or (st["status"] == "current" and not forced):
            table.append({"step": name, "status": "skipped (" + st["status"] + ")", "seconds": 0.0})
            if on_step:
                on_step(name, table[-1]["status"])
            continue
        forced = True if st["status"] == "run" else forced  # a stale step makes every later step run
        if on_step:
            on_step(name, "running")
        t0 = time.perf_counter()
        results[name] = fn(cfg, workspace, progress)
        secs = round(time.perf_counter() - t0, 1)
        done[name] = {"key": st["key"], "finished_at": utcnow().isoformat(timespec="seconds"), "seconds": secs}
        with Store.open(workspace) as store:
            store.set_meta(META_KEY, done)
        table.append({"step": name, "status": "ran", "seconds": secs})
        log.info("pipeline: %s done in %.1fs", name, secs)
    out = {"workspace": str(workspace), "steps": table}
    ev = results.get("evaluate")
    if ev is None:  # evaluation was current: report the newest one
        with Store.open(workspace, read_only=True) as store:
            row = store.exec("SELECT summary FROM runs WHERE stage = 'evaluate' AND status = 'ok' "
                             "ORDER BY ended_at DESC LIMIT 1")
        ev = json.loads(row[0][0]) if row else None
    out["evaluate"] = ev
    return out
