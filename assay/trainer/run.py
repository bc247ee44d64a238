"""`assay train`: the three-stage curriculum and the baselines, in one code path and one step budget.

Reads the ``examples`` table (`assay curriculum`), validation pools of labeled pairs, and ``engagement`` for the
click baseline. Writes checkpoints under ``artifacts/train/<key>/`` (``key`` = digest of the train config, the
examples run and the base model), one row per phase's best checkpoint in ``checkpoints``, and a report
(``artifacts/reports/train-<time>/``: ablation table, training curves PNG, report.json).

Phases:
- ``stage1`` .. ``stageN`` (``train.stages``): each starts from the best checkpoint so far (the base encoder
  before stage 1); its best step by validation NDCG@10 is kept only if it beats that starting point by
  ``min_improvement``; otherwise the stage is skipped and reported, and the next stage starts from the same
  weights;
- ``paced`` (``train.schedule: paced``, instead of the stages): one phase of the stages' summed steps whose
  batches move from the first stage's mix to every tier (``train.pace``, ``pace_share``); its best step by
  validation is kept if it beats the base encoder by ``min_improvement``;
- ``baseline-click`` (engaged items as positives, in-batch negatives), ``baseline-binary`` (every tier mixed,
  grade >= 3 positive, in-batch softmax), ``baseline-graded`` (every tier mixed, graded listwise targets) and
  ``baseline-mixed-bce`` (every tier mixed, the first stage's pointwise BCE on graded targets), each from the base
  encoder with ``baseline_steps`` (default: the stages' steps summed, the same budget).

Validation reads the cascade's labels (human grades where present) on the validation queries, never the
simulator's truth. A phase already finished is not trained again (its ``done.json`` is reused), so a killed
`assay train` resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from assay.config import ModelsConfig, SpellConfig, TrainConfig
from assay.reporting import img, table_html, write_report
from assay.store import Store, utcnow
from assay.text import digest
from assay.trainer import data as data_mod
from assay.trainer.data import ClickSampler, GroupSampler, GroupSpec, PacedSampler
from assay.trainer.loop import VAL_METRICS, Dist, PhaseSpec, as_list, metric_means, train_phase, validate_all
from assay.trainer.model import TwoTower

log = logging.getLogger(__name__)

BASELINES = ("click", "binary", "graded", "mixed-bce")
PACED = "paced"
_PACE_KEYS = ("pace", "pace_share", "pace_loss", "pace_learning_rate")
ALL_TIERS = (1, 2, 3, 4, 5)


def base_model_name(cfg: TrainConfig, models_cfg: ModelsConfig) -> str:
    return cfg.base_model or models_cfg.embedder


def run_key(cfg: TrainConfig, models_cfg: ModelsConfig, examples_run: str, spell: SpellConfig | None = None) -> str:
    from assay import models

    base = base_model_name(cfg, models_cfg)
    relevant = cfg.model_dump(mode="json")
    for k in ("eval_every", "checkpoint_every", "val_bootstrap", "val_confidence"):  # do not change what is trained
        relevant.pop(k)
    if cfg.val_metric == "rerank":  # the default selection: keys (and folders) as before these settings existed
        relevant.pop("val_metric")
        relevant.pop("val_catalog_random")
    if cfg.listwise_gain == "linear":  # likewise for the default soft-target shares
        relevant.pop("listwise_gain")
    if cfg.schedule == "stages":  # likewise for the staged schedule (the pacing settings do not apply)
        for k in ("schedule", *_PACE_KEYS):
            relevant.pop(k)
    parts = [json.dumps(relevant, sort_keys=True), examples_run, models.model_sha(models.resolve(base))]
    if spell is not None and spell.enabled:  # the query text the model learns from
        parts.append(json.dumps(spell.model_dump(mode="json"), sort_keys=True))
    return digest(parts)


def load_data(cfg: TrainConfig, store: Store, *, with_clicks: bool, spell: SpellConfig | None = None,
              models_cfg: ModelsConfig | None = None) -> data_mod.TrainData:
    from assay.spell import build

    name = base_model_name(cfg, models_cfg or ModelsConfig())
    return data_mod.load(store, val_max_queries=cfg.val_max_queries, val_pool_per_query=cfg.val_pool_per_query,
                         random_pool=cfg.random_pool, seed=cfg.seed, with_clicks=with_clicks,
                         click_min_clicks=cfg.click_min_clicks, speller=build(spell, name, store),
                         val_catalog_random=cfg.val_catalog_random if cfg.val_metric == "retrieval" else None)


def _new_model(cfg: TrainConfig, models_cfg: ModelsConfig) -> TwoTower:
    return TwoTower.from_base(base_model_name(cfg, models_cfg), shared=cfg.shared_towers,
                              projection_dim=cfg.projection_dim, heads=cfg.query_heads, beta=cfg.head_beta,
                              query_max_length=cfg.query_max_length, item_max_length=cfg.item_max_length,
                              device=models_cfg.device, seed=cfg.seed)


def run(cfg: TrainConfig, store: Store | None, models_cfg: ModelsConfig, *, stage: int | None = None,
        baseline: str | None = None, progress: bool = True, data: data_mod.TrainData | None = None,
        dist: Dist | None = None, workspace: Path | None = None, stop_after_steps: int | None = None,
        spell: SpellConfig | None = None) -> dict:
    """Train the curriculum (all stages, or ``stage``) or one baseline. ``store`` is None on ranks > 0 of a
    distributed run (they pass ``data`` and ``workspace``). ``spell``: training and validation queries pass
    through the catalog speller (assay/spell.py), as they do in evaluation and serving."""
    dist = dist or Dist()
    from assay.encode import check_bf16

    check_bf16(cfg.precision, models_cfg.device, "train.precision")
    if baseline is not None and baseline not in BASELINES:
        raise KeyError(f"Unknown baseline {baseline!r}. Available: {list(BASELINES)}")
    if stage is not None and cfg.schedule == PACED and baseline is None:
        raise ValueError("--stage picks one stage of train.schedule stages; the paced schedule is one run "
                         "(train it with `assay train`)")
    if stage is not None and not 1 <= stage <= len(cfg.stages):
        raise ValueError(f"--stage must be 1-{len(cfg.stages)} (train.stages has {len(cfg.stages)} stages)")
    if data is None:
        data = load_data(cfg, store, with_clicks=baseline == "click", spell=spell, models_cfg=models_cfg)
    root = Path(workspace or store.root) / "artifacts"
    key = run_key(cfg, models_cfg, data.examples_run_id, spell)
    folder = root / "train" / key
    record = store is not None and dist.main
    ctx = store.run("train", {"train": cfg.model_dump(mode="json"), "stage": stage, "baseline": baseline,
                              "world_size": dist.world, "spell": spell.model_dump(mode="json") if spell else None},
                    {"base_model": base_model_name(cfg, models_cfg)}) \
        if record else _NoRun()
    with ctx as run_id:
        model = _new_model(cfg, models_cfg)
        base_val, base_pq = _base_val(folder, model, data, dist, cfg)
        if baseline is not None:
            phases = [_train_baseline(cfg, baseline, model, data, folder, (base_val, base_pq), dist, progress,
                                      stop_after_steps)]
        else:
            phases = _train_curriculum(cfg, model, data, folder, (base_val, base_pq), stage, dist, progress,
                                       stop_after_steps)
        summary = {"run_id": run_id, "key": key, "folder": str(folder), "world_size": dist.world,
                   "data": data.summary(), "base_val_ndcg10": base_val,
                   "phases": {p["name"]: p for p in phases}}
        if record:
            kept = [p for p in phases if p.get("checkpoint")]
            for p in kept:
                _record_checkpoint(store, p, run_id)
            if kept:  # the run's model: its last kept phase (an earlier stage's weights are only a starting point)
                kept[-1]["exports"] = export_checkpoint(kept[-1]["checkpoint"], models_cfg, root)
            summary.update(ablation(folder, base_val, cfg))
            summary["report"] = str(write_train_report(root / "reports" / f"train-{utcnow():%Y%m%dT%H%M%S}",
                                                       summary, folder))
            store.finish_run(run_id, summary)
    return summary


def export_checkpoint(path: str, models_cfg: ModelsConfig, artifacts: Path) -> str:
    """Export the run's model (its last kept checkpoint) for the first ONNX backend ``models.backend`` names
    (training stays on PyTorch), so export-index, evaluate and serve find it built; returns that backend, or
    "torch" when the setting needs no export. The accuracy guard runs where the export is first used
    (assay.dense.open_backend); an earlier stage's checkpoint is exported where it is first used, if ever."""
    from assay import inference

    backend = inference.resolve(models_cfg.backend, models_cfg.device)[0]
    if backend != "torch":
        TwoTower.load(path).use_backend(backend, artifacts)
    return backend


class _NoRun:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _base_val(folder: Path, model: TwoTower, data, dist: Dist, cfg: TrainConfig) -> tuple[float, list | None]:
    """The base encoder's validation NDCG@10 (``train.val_metric``) and its per-query values (None for a folder
    from before they were kept), computed once per training folder; base.json also keeps every validation
    metric's mean (``metrics``)."""
    f = folder / "base.json"
    if f.exists():
        d = json.loads(f.read_text())
        return d["val_ndcg10"], d.get("per_query")
    vals = validate_all(model, data, precision=cfg.precision) if dist.main else {}
    val, pq = vals.get(cfg.val_metric, (0.0, None))
    val = dist.broadcast_float(val)
    per_query = as_list(pq)
    if dist.main:
        folder.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"val_ndcg10": val, "per_query": per_query, "metrics": metric_means(vals)}))
    return val, per_query


def _phase_out(res, folder: Path, model: TwoTower, dist: Dist, stage: int, name: str, loss: str,
               sampler) -> dict:
    out = {**res.to_dict(), "stage": stage, "family": name, "loss": loss, "train_queries": int(len(sampler.queries))}
    ck = folder / res.name / "best"
    if res.improved:
        if dist.main and not (ck / "twotower.json").exists():
            sha = model.save(ck)
        else:
            sha = json.loads((ck / "twotower.json").read_text())["sha"] if (ck / "twotower.json").exists() else None
        dist.barrier()
        out.update(checkpoint=str(ck), sha=sha)
    return out


def _train_curriculum(cfg: TrainConfig, model: TwoTower, data, folder: Path, base: tuple, only: int | None,
                      dist: Dist, progress: bool, stop_after_steps: int | None) -> list[dict]:
    """``base``: the base encoder's validation NDCG@10 and per-query values; each stage's gain is measured
    against the model it started from."""
    if cfg.schedule == PACED:
        return [_train_paced(cfg, model, data, folder, base, dist, progress, stop_after_steps)]
    specs = [GroupSpec(tuple(s.pos_tiers), tuple(s.neg_tiers)) for s in cfg.stages]
    last = only or len(cfg.stages)
    if only is not None:
        missing = [k for k in range(1, only) if not (folder / f"stage{k}" / "done.json").exists()]
        if missing:
            raise ValueError(f"stage {only} starts from stage {missing[-1]}'s best checkpoint, which is not trained "
                             f"yet; run `assay train --stage {missing[0]}` first (or `assay train` for all stages)")
    best, best_pq = base
    out = []
    for k in range(1, last + 1):
        st = cfg.stages[k - 1]
        sampler = GroupSampler(data, specs[k - 1], replay_specs=specs[:k - 1], replay=st.replay,
                               batch_queries=cfg.batch_queries, group_size=cfg.group_size, seed=cfg.seed, stage=k)
        spec = PhaseSpec(f"stage{k}", k, st.loss, st.steps, st.learning_rate, sampler, cfg.random_negatives)
        res = train_phase(model, data, spec, folder / f"stage{k}", cfg=cfg, start_val=best, dist=dist,
                          progress=progress, stop_after_steps=stop_after_steps, start_per_query=best_pq)
        if res.improved:
            best, best_pq = res.best_val, res.best_per_query
        else:
            log.warning("stage %d (%s) did not improve validation NDCG@10 over %.4f (its best step minus that: %s): "
                        "skipped, the next stage starts from the previous best", k, st.loss, best,
                        gain_text(res.gain) or "not measured")
        if only is None or k == only:
            out.append(_phase_out(res, folder, model, dist, k, "curriculum", st.loss, sampler))
    return out


def paced_mixes(cfg: TrainConfig) -> tuple[GroupSpec, GroupSpec]:
    """The paced schedule's two mixes: the first stage's tiers, and the full mix (every stage's positive tiers
    against every negative tier that is not also a positive one; with the default stages tiers 1-2 against 3-5)."""
    first = GroupSpec(tuple(cfg.stages[0].pos_tiers), tuple(cfg.stages[0].neg_tiers))
    pos = sorted({t for s in cfg.stages for t in s.pos_tiers})
    neg = sorted({t for s in cfg.stages for t in s.neg_tiers} - set(pos))
    return first, GroupSpec(tuple(pos), tuple(neg))


def _train_paced(cfg: TrainConfig, model: TwoTower, data, folder: Path, base: tuple, dist: Dist, progress: bool,
                 stop_after_steps: int | None) -> dict:
    """``train.schedule: paced``: one phase of the stages' summed steps, one optimizer and learning-rate schedule,
    batches paced from the first stage's mix to the full mix (:class:`PacedSampler`), the best validated step kept
    when it beats the base encoder by ``min_improvement`` (as a stage would be)."""
    best, best_pq = base
    first, full = paced_mixes(cfg)
    steps = sum(s.steps for s in cfg.stages)
    sampler = PacedSampler(data, first, full, steps=steps, share=cfg.pace_share, kind=cfg.pace,
                           batch_queries=cfg.batch_queries, group_size=cfg.group_size, seed=cfg.seed, stage=1)
    lr = cfg.pace_learning_rate or cfg.stages[0].learning_rate
    spec = PhaseSpec(PACED, 1, "paced", steps, lr, sampler)
    res = train_phase(model, data, spec, folder / PACED, cfg=cfg, start_val=best, dist=dist, progress=progress,
                      stop_after_steps=stop_after_steps, start_per_query=best_pq)
    if not res.improved:
        log.warning("the paced curriculum did not improve validation NDCG@10 over the base encoder's %.4f (its best "
                    "step minus that: %s): nothing kept", best, gain_text(res.gain) or "not measured")
    out = _phase_out(res, folder, model, dist, 1, "curriculum", f"paced ({cfg.pace}, {cfg.pace_loss})", sampler)
    out["pace"] = {"kind": cfg.pace, "share": cfg.pace_share, "loss": cfg.pace_loss, "first": [list(first.pos_tiers), list(first.neg_tiers)],
                   "full": [list(full.pos_tiers), list(full.neg_tiers)]}
    return out


def _train_baseline(cfg: TrainConfig, which: str, model: TwoTower, data, folder: Path, base: tuple, dist: Dist,
                    progress: bool, stop_after_steps: int | None) -> dict:
    """``base``: the base encoder's validation NDCG@10 and per-query values (the baseline's gain is against it)."""
    base_val, base_pq = base
    steps = cfg.baseline_steps or sum(s.steps for s in cfg.stages)
    if which == "click":
        sampler = ClickSampler(data, batch_queries=cfg.batch_queries, group_size=cfg.group_size, seed=cfg.seed)
    else:
        spec = GroupSpec((1, 2), (3, 4, 5), binary=which == "binary")
        sampler = GroupSampler(data, spec, batch_queries=cfg.batch_queries, group_size=cfg.group_size,
                               seed=cfg.seed, stage=0)
    name = f"baseline-{which}"
    # mixed-bce: every tier at once under the first stage's pointwise BCE with graded targets (the design paper's
    # "single-stage mixed training", as far as it describes it); the others: the in-batch softmax
    loss = "bce" if which == "mixed-bce" else "mnr"
    spec = PhaseSpec(name, 0, loss, steps, cfg.baseline_learning_rate, sampler)
    # a baseline keeps its best validated step whatever the base encoder scored (start_val -1)
    res = train_phase(model, data, spec, folder / name, cfg=cfg, start_val=-1.0, dist=dist, progress=progress,
                      stop_after_steps=stop_after_steps, start_per_query=base_pq)
    out = _phase_out(res, folder, model, dist, 0, name, loss, sampler)
    out["vs_base_encoder"] = round(res.best_val - base_val, 5)
    return out


def _record_checkpoint(store: Store, p: dict, run_id: str) -> None:
    import pyarrow as pa

    store.write("checkpoints", pa.table({
        "checkpoint_id": [f"{Path(p['checkpoint']).parent.parent.name}/{p['name']}"], "stage": pa.array([p["stage"]], pa.int8()),
        "path": [p["checkpoint"]], "sha": [p.get("sha")], "val_ndcg10": [p["best_val"]], "kept": [bool(p["improved"])],
        "run_id": [run_id], "name": [p["family"]], "step": pa.array([p["best_step"]], pa.int32()),
        "created_at": [utcnow()]}), mode="upsert")


def final_checkpoint(folder: Path, n_stages: int) -> Path | None:
    """The curriculum's model: the paced run's best checkpoint (a folder of ``train.schedule: paced``), else the
    best checkpoint of the last kept stage."""
    done = folder / PACED / "done.json"
    if done.exists():
        return folder / PACED / "best" if json.loads(done.read_text())["improved"] else None
    for k in range(n_stages, 0, -1):
        done = folder / f"stage{k}" / "done.json"
        if done.exists() and json.loads(done.read_text())["improved"]:
            return folder / f"stage{k}" / "best"
    return None


def _metrics_at(history: list, step: int) -> dict:
    """Every validation metric of a phase's evaluated step (empty for a history from before they were kept)."""
    h = next((h for h in history if h["step"] == step), {})
    return {m: h.get(f"val_{m}") for m in VAL_METRICS if f"val_{m}" in h}


def ablation(folder: Path, base_val: float, cfg: TrainConfig) -> dict:
    """Validation NDCG@10 after stage 1, 1+2, 1+2+3, of each baseline and of the base encoder (what is trained);
    ``val_metrics``: every validation metric of that model (train.val_metric picks which one selects)."""
    base = json.loads((folder / "base.json").read_text()) if (folder / "base.json").exists() else {}
    cur = base.get("metrics") or {}
    rows = [{"model": "base encoder", "val_ndcg10": round(base_val, 5), "steps": 0, "kept": None,
             "val_metrics": cur}]
    best, steps = base_val, 0
    curves = {}
    for k in range(1, len(cfg.stages) + 1):
        done = folder / f"stage{k}" / "done.json"
        if not done.exists():
            break
        r = json.loads(done.read_text())
        steps += r["steps"]
        best = r["best_val"] if r["improved"] else best
        cur = _metrics_at(r["history"], r["best_step"]) if r["improved"] else cur
        rows.append({"model": "stage " + "+".join(str(i) for i in range(1, k + 1)), "val_ndcg10": round(best, 5),
                     "steps": steps, "kept": r["improved"], "stage_best": r["best_val"], "gain": r.get("gain"),
                     "val_metrics": cur})
        curves[f"stage{k}"] = r["history"]
    done = folder / PACED / "done.json"
    if done.exists():
        r = json.loads(done.read_text())
        rows.append({"model": "paced curriculum", "val_ndcg10": r["best_val"] if r["improved"] else round(base_val, 5),
                     "steps": r["steps"], "kept": r["improved"], "stage_best": r["best_val"], "gain": r.get("gain"),
                     "val_metrics": _metrics_at(r["history"], r["best_step"]) if r["improved"] else cur})
        curves[PACED] = r["history"]
    for b in BASELINES:
        done = folder / f"baseline-{b}" / "done.json"
        if done.exists():
            r = json.loads(done.read_text())
            rows.append({"model": f"baseline {b}", "val_ndcg10": r["best_val"], "steps": r["steps"], "kept": None,
                         "gain": r.get("gain"), "val_metrics": _metrics_at(r["history"], r["best_step"])})
            curves[f"baseline-{b}"] = r["history"]
    skipped = [r["model"] for r in rows if r.get("kept") is False]
    return {"ablation": rows, "curves": curves, "skipped_stages": skipped, "val_metric": cfg.val_metric,
            "final_checkpoint": str(final_checkpoint(folder, len(cfg.stages)) or "")}


def val_cells(row: dict) -> list[str]:
    """An ablation row's rerank NDCG@10, retrieval NDCG@10, embarrassing@10 and judged@10 as text ("-" unknown)."""
    m = row.get("val_metrics") or {}
    return ["-" if m.get(c) is None else f"{m[c]:.4f}" for c in VAL_METRICS]


def gain_text(gain: dict | None) -> str:
    """A phase's validation gain over its start as ``+0.0123 [+0.0021, +0.0230] P 0.99`` ("" when unknown)."""
    if not gain or gain.get("queries", 0) == 0:
        return ""
    return f"{gain['delta']:+.4f} [{gain['lo']:+.4f}, {gain['hi']:+.4f}] P {gain['p_above_0']:.2f}"


def curves_png(summary: dict, path: Path) -> Path:
    """Validation NDCG@10 against steps for every stage (laid end to end) and baseline of a train summary."""
    from assay.reporting import _mpl

    plt = _mpl()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    offset = 0
    for name, hist in summary.get("curves", {}).items():
        if not hist:
            continue
        x = np.array([h["step"] for h in hist]) + (offset if name.startswith("stage") else 0)
        ax.plot(x, [h["val_ndcg10"] for h in hist], marker="o", ms=3, label=name)
        if name.startswith("stage"):
            offset = x.max()
    if summary.get("base_val_ndcg10") is not None:
        ax.axhline(summary["base_val_ndcg10"], color="gray", ls="--", lw=1, label="base encoder")
    ax.set_xlabel("step (stages laid end to end)")
    ax.set_ylabel("validation NDCG@10")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_train_report(out: Path, summary: dict, folder: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    curves_png(summary, out / "curves.png")
    rows = [[r["model"], r["val_ndcg10"], r["steps"], "" if r["kept"] is None else ("kept" if r["kept"] else "skipped"),
             gain_text(r.get("gain")), *val_cells(r)] for r in summary.get("ablation", [])]
    write_report(out, "assay train", summary, [
        (f"Ablation (validation NDCG@10 on the cascade's labels of validation queries, {summary.get('val_metric')} "
         "NDCG@10 selecting; gain: the stage's best minus the model it started from, a baseline's minus the base "
         "encoder, with a paired bootstrap interval over the validation queries and P, the share of resamples in "
         "which it is better; rerank: each query's labeled pool re-ranked; retrieval, emb@10, judged@10: its top "
         "10 of the validation catalog)",
         table_html(["model", "val NDCG@10", "steps", "stage", "gain [interval] P", "rerank", "retrieval",
                     "emb@10", "judged@10"], rows)),
        ("Training curves", img("curves.png")),
    ])
    return out / "report.html"


def run_cli(cfg, workspace: Path, *, stage: int | None = None, baseline: str | None = None,
            progress: bool = True) -> dict | None:
    """`assay train`: one process, or every rank of a torchrun launch. Under torchrun all ranks load the training
    data read-only first; then rank 0 alone opens the workspace for writing and records the run."""
    import torch

    from assay.store import Store
    from assay.trainer.loop import init_dist, rank_device

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or cfg.store.threads))
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"device": rank_device(cfg.models.device)})})
    dist = init_dist(cfg.models.device)
    if not dist.enabled:
        with Store.open(workspace, threads=cfg.store.threads, memory_limit=cfg.store.memory_limit) as store:
            return run(cfg.train, store, cfg.models, stage=stage, baseline=baseline, progress=progress,
                       spell=cfg.spell)
    with Store.open(workspace, read_only=True, threads=cfg.store.threads) as ro:
        data = load_data(cfg.train, ro, with_clicks=baseline == "click", spell=cfg.spell, models_cfg=cfg.models)
    dist.barrier()
    try:
        if dist.main:
            with Store.open(workspace, threads=cfg.store.threads, memory_limit=cfg.store.memory_limit) as store:
                return run(cfg.train, store, cfg.models, stage=stage, baseline=baseline, progress=progress,
                           data=data, dist=dist, spell=cfg.spell)
        run(cfg.train, None, cfg.models, stage=stage, baseline=baseline, progress=False, data=data, dist=dist,
            workspace=workspace, spell=cfg.spell)
        return None
    finally:
        torch.distributed.destroy_process_group()
