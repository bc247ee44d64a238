"""`assay run`: the main job, every stage in order, skipping what is current and resuming what was cut off.

Steps: simulate -> ingest -> mine -> label-request (simulated answers; optional) -> teachers -> calibrate ->
annotate -> agreement -> curriculum -> train -> baselines -> export-index -> evaluate. Each step calls the same
stage ``run()`` as its command.

Currency: a step's key is a digest of four things: the config sections it reads, the code of the stage (a digest
of its source files, so an upgrade reruns what the new code would compute differently), a content fingerprint of
the ingested tables it reads first-hand (``Store.fingerprint``: a re-ingested catalog, query log or label file
with any row changed), and the keys of the steps whose output it reads (``Step.after``), so a change upstream
makes exactly the steps downstream of it stale. A re-ingested catalog re-mines, relabels the pairs whose texts
changed with the same judges (they depend on the human labels and the annotate and mining config, not on the
catalog), and rebuilds the curriculum, the models, the index and the evaluation. A
step's key is computed just before the step is considered, on the workspace as the steps before it left it, and
recorded as it stands after the step ran (label-request adds the human labels it reads). The workspace's ``meta``
row ``pipeline`` records the key, and its parts, of every step that finished. A step whose key is recorded is
skipped; any other step runs (the table says which part changed), and the stages that can resume do (mining by
batch, annotation by pair, training by its saved state), so a run that was cut off continues where it stopped.
``force`` names steps to run even when current (and so every step after them). ``until`` names the last step to
run: the steps after it are only reported (current, or what would make them run), and none of them is recorded.

``pipeline.simulate: false`` starts at mining, on a workspace the user has already filled with `assay ingest`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable, NamedTuple

from assay.config import AssayConfig
from assay.store import Store, utcnow
from assay.text import digest

log = logging.getLogger(__name__)

META_KEY = "pipeline"


# Where a step's work runs changes none of its results (tests/test_ray.py: the same grades and vectors on Ray as
# locally), so moving a step to Ray does not make it, or the steps after it, stale.
WHERE_IT_RUNS = {"mining": ("engine", "ray_encoders"), "annotate": ("engine", "ray", "signal_window"), "serve": ("engine", "ray_encoders")}


def _sections(cfg: AssayConfig, *names: str) -> str:
    """The config a step reads, as its key's text: whole sections, or one key of a section ("pipeline.baselines"),
    so that changing which baselines train does not make the label requests stale; less ``WHERE_IT_RUNS``."""
    def part(n: str):
        sec, _, key = n.partition(".")
        d = {k: v for k, v in cfg.section_dict(sec).items() if k not in WHERE_IT_RUNS.get(sec, ())}
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


class AnnotationIncomplete(RuntimeError):
    """The annotate step ended with pairs that failed ``annotate.max_attempts`` times (left ``failed``)."""


def _annotate(cfg, store, progress):
    """Label every pending pair: launches repeat while ``annotate.max_pairs`` caps one, a pair that fails is retried
    in later launches up to ``annotate.max_attempts`` tries in all, and pairs still failing then end the step with
    an error that says how many and why (they stay ``failed``; `assay annotate` retries them)."""
    from assay.annotate import batches
    from assay.annotate.fit import prepare_judges

    if cfg.annotate.engine == "ray":  # plan -> Ray -> commit; each launch plans what is pending, failed pairs too
        from assay.scale import run as scale_run

        out = scale_run.run(cfg.annotate, store, progress=progress)
        launches = 1  # a Ray launch retries every failed pair: max_attempts launches in all while pairs fail
        while out["annotated"] and (out["after"]["pending"] > out["after"]["failed"] or
                                    (out["after"]["failed"] and launches < cfg.annotate.max_attempts)):
            out = scale_run.run(cfg.annotate, store, progress=progress)
            launches += 1
    else:
        judges = prepare_judges(cfg.annotate, store)
        tries: dict[tuple[str, str], int] = {}
        exhausted: set[tuple[str, str]] = set()
        while True:
            out = batches.run(cfg.annotate, store, progress=progress, judges=judges, skip=exhausted)
            for k in out.pop("failed_pairs"):
                tries[k] = tries.get(k, 0) + 1
                if tries[k] >= cfg.annotate.max_attempts:
                    exhausted.add(k)
            if out["annotated"] == 0 or out["after"]["pending"] <= len(exhausted):
                break
    failed = out["after"]["failed"]
    if failed:
        from assay.annotate.pairs import failure_reasons

        why = "; ".join(f"{r['judge']} {r['status']}: {r['pairs']:,}" + (f" (e.g. {r['example']!r})"
                                                                          if r["example"] else "")
                        for r in failure_reasons(store, out["cascade_sha"])[:4])
        raise AnnotationIncomplete(
            f"annotate: {failed:,} of {out['after']['work']:,} mined pairs failed after {cfg.annotate.max_attempts} "
            f"tries each and are left `failed` ({why}). Fix the cause, then `assay annotate` retries them (or run "
            "`assay run` again)")
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
    if cfg.serve.checkpoint == "best" and not store.exec("SELECT 1 FROM checkpoints WHERE kept"):
        log.warning("neither the curriculum nor a baseline improved on the base encoder in validation: nothing to "
                    "serve")
        return {"skipped": "no kept checkpoint"}
    return export(cfg, store, progress=progress)


def _evaluate(cfg, store, progress):
    from assay.eval.run import run

    return run(cfg, store, progress=progress)


class Step(NamedTuple):
    name: str
    sections: tuple[str, ...]  # config sections (or "section.key") in its key
    fn: Callable
    enabled: Callable[[AssayConfig], bool]
    after: tuple[str, ...] = ()  # the steps whose output it reads (their keys are in its key)
    inputs: tuple[str, ...] = ()  # ingested tables it reads first-hand (their content is in its key)
    code: tuple[str, ...] = ()  # its source, relative to the assay package (files or folders)


_DENSE = ("encode.py", "inference.py", "models.py", "text.py", "spell.py")
# The judges depend on the human labels, the annotate config and the mining config (the features judge learns from
# mining signals), not on the catalog: a re-ingested catalog re-mines and relabels the pairs whose texts changed
# with the same cascade, instead of retraining the judges and relabeling everything. Label requests are bought
# once per simulated world and label_request config (`--force label-request` asks for another round).
STEPS: list[Step] = [
    Step("simulate", ("simulate",), _simulate, lambda c: c.pipeline.simulate, code=("data/simulate",)),
    Step("ingest", ("ingest",), _ingest, lambda c: c.pipeline.simulate, ("simulate",),
         code=("data/ingest.py", "data/readers.py")),
    Step("mine", ("mining", "models"), _mine, lambda c: True, ("ingest",),
         inputs=("products", "queries", "engagement"), code=("mining",) + _DENSE),
    Step("label-request", ("label_request", "pipeline.label_requests"), _label_request,
         lambda c: c.pipeline.simulate and c.pipeline.label_requests > 0, ("ingest",),
         code=("annotate/requests.py", "data/judgments.py")),
    Step("teachers", ("annotate", "mining", "models"), _with_store(_teachers), lambda c: True,
         ("ingest", "label-request"), inputs=("human_labels",), code=("annotate", "models.py", "text.py")),
    Step("calibrate", ("annotate",), _with_store(_calibrate), lambda c: True, ("teachers",), code=("annotate",)),
    Step("annotate", ("annotate",), _with_store(_annotate), lambda c: True, ("mine", "calibrate"),
         code=("annotate",)),
    Step("agreement", ("annotate",), _with_store(_agreement), lambda c: True, ("annotate",),
         code=("annotate", "reporting.py")),
    Step("curriculum", ("curriculum",), _with_store(_curriculum), lambda c: True, ("annotate",),
         inputs=("human_labels",), code=("curriculum",)),
    Step("train", ("train", "models", "spell"), _with_store(_train), lambda c: True, ("curriculum",),
         code=("trainer",) + _DENSE),
    Step("baselines", ("train", "pipeline.baselines"), _with_store(_baselines), lambda c: bool(c.pipeline.baselines),
         ("curriculum",), code=("trainer",) + _DENSE),
    Step("export-index", ("serve",), _with_store(_export), lambda c: c.pipeline.export_index,
         ("train", "baselines"), code=("serving", "dense.py") + _DENSE),
    Step("evaluate", ("mining", "evaluate"), _with_store(_evaluate), lambda c: True,
         ("mine", "train", "baselines", "export-index"), inputs=("truth_items", "truth_queries"),
         code=("eval", "dense.py", "report.py", "reporting.py") + _DENSE),
]
STEP_NAMES = [s.name for s in STEPS]


@functools.lru_cache(maxsize=None)
def code_digest(paths: tuple[str, ...]) -> str:
    """A digest of the source files under ``paths`` (relative to the assay package): the stage's code version."""
    root = Path(__file__).resolve().parent
    files = sorted({f for p in paths for f in ((root / p).rglob("*.py") if (root / p).is_dir() else [root / p])
                    if f.exists()})
    return digest([f.relative_to(root).as_posix().encode() + b"\x00" + f.read_bytes() for f in files])


def step_parts(step: Step, cfg: AssayConfig, keys: dict[str, str], fingerprints: dict[str, str]) -> dict:
    """What a step's key is made of: its config, its code, its inputs' fingerprints and the keys of the steps it
    reads (``keys``: the key of every step this run has considered so far; a disabled one has none)."""
    return {"config": digest([_sections(cfg, *step.sections)]), "code": code_digest(step.code),
            "inputs": {t: fingerprints[t] for t in step.inputs},
            "after": {d: keys[d] for d in step.after if keys.get(d)}}


def step_key(name: str, parts: dict) -> str:
    return digest([name, parts["config"], parts["code"], json.dumps(parts["inputs"], sort_keys=True),
                   json.dumps(parts["after"], sort_keys=True)])


def why_stale(recorded: dict | None, parts: dict) -> str:
    """Which part of a step's key changed since it last finished, in words."""
    if not recorded or "parts" not in recorded:
        return "never finished" if not recorded else "recorded by an older assay"
    old = recorded["parts"]
    changed = [k for k in ("config", "code") if old.get(k) != parts[k]]
    changed += [f"input {t}" for t in parts["inputs"] if old.get("inputs", {}).get(t) != parts["inputs"][t]]
    changed += [f"step {d}" for d in sorted(set(parts["after"]) | set(old.get("after", {})))
                if old.get("after", {}).get(d) != parts["after"].get(d)]
    return ", ".join(changed) + " changed" if changed else "changed"


def _fingerprints(store: Store, tables: tuple[str, ...]) -> dict[str, str]:
    return {t: store.fingerprint(t) for t in tables}


def _parts_now(step: Step, cfg: AssayConfig, keys: dict[str, str], workspace: Path) -> dict:
    if not step.inputs:
        return step_parts(step, cfg, keys, {})
    with Store.open(workspace, read_only=True) as store:
        return step_parts(step, cfg, keys, _fingerprints(store, step.inputs))


def plan(cfg: AssayConfig, done: dict, store: Store | None = None) -> list[dict]:
    """Each step's key and whether it is current (recorded as finished with that key), on the workspace as it is
    now (``store``; None = inputs taken as unchanged since they were recorded, for a config-only question)."""
    out, keys = [], {}
    for st in STEPS:
        if not st.enabled(cfg):
            out.append({"step": st.name, "key": None, "status": "disabled"})
            continue
        rec = done.get(st.name)
        fps = _fingerprints(store, st.inputs) if store is not None else \
            {t: (rec or {}).get("parts", {}).get("inputs", {}).get(t, "") for t in st.inputs}
        parts = step_parts(st, cfg, keys, fps)
        keys[st.name] = key = step_key(st.name, parts)
        current = (rec or {}).get("key") == key
        out.append({"step": st.name, "key": key, "parts": parts, "status": "current" if current else "run",
                    **({} if current else {"why": why_stale(rec, parts)})})
    return out


def run(cfg: AssayConfig, workspace: Path, *, force: list[str] | None = None, until: str | None = None,
        progress: bool = True, on_step: Callable[[str, str], None] | None = None) -> dict:
    """Run the main job on ``workspace``, up to and including the step ``until`` (None = every step); returns the
    per-step table and the evaluation summary (the newest one where evaluate is current; None where it is stale
    and ``until`` stopped before it)."""
    for f in (force or []) + ([until] if until is not None else []):
        if f not in STEP_NAMES:
            raise ValueError(f"unknown step {f!r}; steps are {STEP_NAMES}")
    last = STEP_NAMES.index(until) if until is not None else len(STEP_NAMES) - 1
    if any(STEP_NAMES.index(f) > last for f in force or []):
        raise ValueError(f"--force {', '.join(force or [])} names a step after --until {until}")
    workspace = Path(workspace)
    with Store.open(workspace) as store:
        done: dict = store.get_meta(META_KEY) or {}
    forced = False
    results: dict = {}
    table = []
    keys: dict[str, str] = {}
    for n, st in enumerate(STEPS):
        name = st.name
        if not st.enabled(cfg):
            table.append({"step": name, "status": "skipped (disabled)", "seconds": 0.0})
            if on_step:
                on_step(name, table[-1]["status"])
            continue
        parts = _parts_now(st, cfg, keys, workspace)  # the inputs as the steps before this one left them
        key = step_key(name, parts)
        forced = forced or name in (force or [])
        if done.get(name, {}).get("key") == key and not forced:
            table.append({"step": name, "status": "skipped (current)", "seconds": 0.0})
            if on_step:
                on_step(name, table[-1]["status"])
            keys[name] = key
            continue
        # --force runs the step and every step after it, current or not
        why = "forced" if forced and done.get(name, {}).get("key") == key else why_stale(done.get(name), parts)
        if n > last:  # after --until: say what would run it; run and record nothing
            table.append({"step": name, "status": f"not run (--until {until})", "why": why, "seconds": 0.0})
            if on_step:
                on_step(name, f"{table[-1]['status']}: {why}")
            keys[name] = key
            continue
        if on_step:
            on_step(name, f"running ({why})")
        t0 = time.perf_counter()
        results[name] = st.fn(cfg, workspace, progress)
        secs = round(time.perf_counter() - t0, 1)
        if st.inputs:  # recorded as the step left its inputs (label-request adds the human labels it reads)
            parts = _parts_now(st, cfg, keys, workspace)
            key = step_key(name, parts)
        done[name] = {"key": key, "parts": parts, "finished_at": utcnow().isoformat(timespec="seconds"),
                      "seconds": secs}
        with Store.open(workspace) as store:
            store.set_meta(META_KEY, done)
        table.append({"step": name, "status": "ran", "why": why, "seconds": secs})
        log.info("pipeline: %s done in %.1fs", name, secs)
        keys[name] = key
    out = {"workspace": str(workspace), "steps": table}
    ev = results.get("evaluate")
    if ev is None and next(r["status"] for r in table if r["step"] == "evaluate") == "skipped (current)":
        # evaluation was current: report the newest one (not one that --until left stale)
        with Store.open(workspace, read_only=True) as store:
            row = store.exec("SELECT summary FROM runs WHERE stage = 'evaluate' AND status = 'ok' "
                             "ORDER BY ended_at DESC LIMIT 1")
        ev = json.loads(row[0][0]) if row else None
    out["evaluate"] = ev
    return out
