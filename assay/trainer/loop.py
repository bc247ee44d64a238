"""One training phase (a curriculum stage or a baseline): seeded batches, a loss, AdamW with warmup, validation
every ``eval_every`` steps that keeps the best weights, and resumable state every ``checkpoint_every`` steps.

State on disk, under the phase's folder::

    state/step-N/   model.pt, optim.pt (torch state dicts: internal resume state, not an exchange format)
    state/latest.json  {"step": N, "best": ..., "history": [...]} -- replaced atomically after a state is complete
    best/           the best validated checkpoint (TwoTower.save: query/, item/, twotower.json)
    done.json       the phase's result, written last

A phase killed at any point (``kill -9`` included) resumes from the newest complete state: the batches are a pure
function of (seed, stage, step), and the dropout RNG is re-seeded from (seed, stage, step, rank) every step, so the
resumed run continues exactly as the uninterrupted one would have.

Distributed (``torchrun``): every rank holds the whole model, takes its share of the global batch, gathers the
other ranks' item embeddings (``torch.distributed.nn.functional.all_gather``, which carries gradients back) so
in-batch negatives span the global batch, and all-reduces the gradients before each optimizer step. Rank 0
validates and writes; the others follow its decision.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from assay.eval.metrics import (embarrassing_rate_at_k, judged_at_k, mean_rerank_ndcg, ndcg_at_k,
                                paired_bootstrap)
from assay.trainer.data import Batch, TrainData
from assay.trainer.losses import get_loss
from assay.trainer.model import TwoTower, pair_scores

log = logging.getLogger(__name__)


class Interrupted(RuntimeError):
    """Raised by the test hook ``stop_after_steps`` to simulate a crash between two steps."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_float(self, x: float) -> float:
        if not self.enabled:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.broadcast(t, 0)
        return float(t.item())


def init_dist(device: str = "cpu") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1: nccl when training on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())


def rank_device(device: str) -> str:
    """Under torchrun each rank takes its own GPU (``cuda:LOCAL_RANK``); CPU stays CPU."""
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


@dataclass
class PhaseSpec:
    name: str                 # e.g. "stage1", "baseline-click"
    stage: int                # seeds the batches (0 for baselines)
    loss: str                 # bce | mnr | triplet | mixed | paced
    steps: int
    learning_rate: float
    sampler: object           # GroupSampler / ClickSampler
    random_negatives: int = 0


@dataclass
class PhaseResult:
    name: str
    start_val: float
    best_val: float
    best_step: int
    steps: int
    improved: bool
    history: list = field(default_factory=list)
    examples_per_second: float = 0.0
    seconds: float = 0.0
    inbatch_columns: int = 0
    resumed_from: int = 0
    best_per_query: list | None = None  # validation NDCG@10 per validation query at the best evaluated step
    gain: dict | None = None  # that step minus the start, paired over validation queries (see val_gain)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


VAL_METRICS = ("rerank", "retrieval", "embarrassing", "judged")


def validate_all(model: TwoTower, data: TrainData, batch_size: int = 128,
                 precision: str = "fp32") -> dict[str, tuple[float, np.ndarray]]:
    """Validation from the labels a user has (cascade, human grades where present), on the validation queries;
    encoded under the training run's ``precision`` (bf16 autocast: about 3x the fp32 speed on a CPU with native
    bf16, embeddings at cosine 0.9999 to fp32's).

    Returns ``{metric: (mean, per_query)}``, ``per_query`` one value per validation query in ascending query
    order (NaN where undefined, left out of the mean):

    - ``rerank``: NDCG@10 of the model re-ranking each query's labeled pool (``val_pool_per_query`` pairs);

    and where the data has a validation catalog (``train.val_metric: retrieval``; it costs about 3x the items):

    - ``retrieval``: NDCG@10 of the model's top 10 from the whole validation catalog (every labeled item of the
      validation queries plus ``val_catalog_random`` catalog items), unlabeled items gaining 0;
    - ``embarrassing``: share of grade-0 labels among the labeled items of that top 10;
    - ``judged``: share of that top 10 that is labeled (read the two above next to it).
    """
    v = data.val
    names = VAL_METRICS if v.catalog is not None else VAL_METRICS[:1]
    if not len(v.grade):
        return {m: (float("nan"), np.empty(0, dtype=np.float64)) for m in names}
    was = model.training
    model.eval()
    uq, q_inv = np.unique(v.query_idx, return_inverse=True)
    cat = v.catalog_items()
    with torch.inference_mode():
        with _autocast(str(model.device), precision):
            q = encode_by_length(model.encode_queries, [data.query_texts[i] for i in uq], batch_size).float()
            it = encode_by_length(model.encode_items, [data.item_texts[i] for i in cat], batch_size).float()
        # rerank: score each pool pair with its own query, a block of pairs at a time
        i_pos = torch.as_tensor(np.searchsorted(cat, v.item_idx))
        scores = np.empty(len(v.grade), dtype=np.float32)
        for lo in range(0, len(v.grade), 4096):
            sl = slice(lo, lo + 4096)
            s = pair_scores(q[torch.as_tensor(q_inv[sl])], it[i_pos[sl]], model.beta)
            scores[sl] = s.cpu().numpy()
        # retrieval: each query's top 10 of the whole catalog
        k = min(10, len(cat))
        top = np.concatenate([torch.topk(model.score(q[lo:lo + 64], it), k, dim=1).indices.cpu().numpy()
                              for lo in range(0, len(uq), 64)]) if v.catalog is not None else None
    model.train(was)
    mean, per_query = mean_rerank_ndcg(scores, v.grade, v.query_idx, k=10)
    out = {"rerank": (float(mean), per_query)}
    if top is None:
        return out
    lq, li, lg = v.labels()
    judged: dict[int, dict[int, int]] = {int(x): {} for x in uq}
    for a, b, g in zip(lq.tolist(), li.tolist(), lg.tolist()):
        if a in judged:
            judged[a][b] = int(g)
    per = {m: np.full(len(uq), np.nan) for m in ("retrieval", "embarrassing", "judged")}
    for j, qi in enumerate(uq.tolist()):
        ranked = cat[top[j]].tolist()
        per["retrieval"][j] = ndcg_at_k(ranked, judged[qi], 10)
        per["embarrassing"][j] = embarrassing_rate_at_k(ranked, judged[qi], 10)
        per["judged"][j] = judged_at_k(ranked, judged[qi], 10)
    for m, pq in per.items():
        ok = ~np.isnan(pq)
        out[m] = (float(pq[ok].mean()) if ok.any() else float("nan"), pq)
    return out


def metric_means(vals: dict) -> dict:
    """``{metric: mean}`` of a :func:`validate_all` result, rounded for JSON (None for NaN)."""
    return {m: None if a != a else round(a, 5) for m, (a, _) in vals.items()}


def validate_per_query(model: TwoTower, data: TrainData, batch_size: int = 128,
                       metric: str = "rerank") -> tuple[float, np.ndarray]:
    """One validation NDCG@10 (``metric``: rerank or retrieval, see :func:`validate_all`): the mean over
    validation queries with a defined value, and one value per validation query in ascending query order."""
    return validate_all(model, data, batch_size)[metric]


def as_list(per_query: np.ndarray | None) -> list | None:
    """Per-query values as JSON (None for NaN), for done.json and the resumable state."""
    return None if per_query is None else [None if x != x else round(float(x), 6) for x in per_query]


def validate(model: TwoTower, data: TrainData, batch_size: int = 128, metric: str = "rerank") -> float:
    """Mean validation NDCG@10 (``metric``: rerank or retrieval, see :func:`validate_all`)."""
    return validate_per_query(model, data, batch_size, metric)[0]


def val_gain(best: list | None, start: list | None, cfg) -> dict | None:
    """How sure validation is of a phase's gain: the paired bootstrap (``train.val_bootstrap`` resamples,
    ``train.val_confidence`` interval) of best minus start NDCG@10 over the validation queries, with
    ``p_above_0``, the share of resamples in which the phase is better. None when either side is unknown or
    ``val_bootstrap`` is 0."""
    if best is None or start is None or len(best) != len(start) or not len(best) or not cfg.val_bootstrap:
        return None
    return paired_bootstrap(np.asarray(best, float), np.asarray(start, float), n_boot=cfg.val_bootstrap,
                            confidence=cfg.val_confidence, seed=cfg.seed)


def _autocast(device: str, precision: str):
    dev = device.split(":")[0]
    if precision == "bf16" or (precision == "auto" and (dev == "cuda" or (dev == "cpu" and native_cpu_bf16()))):
        return torch.autocast(device_type=dev, dtype=torch.bfloat16)
    return nullcontext()


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX): where ``precision: auto`` picks bf16."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _lr_lambda(total: int, warmup_ratio: float):
    warm = max(1, int(total * warmup_ratio))
    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    return f


def _step_seed(seed: int, stage: int, step: int, rank: int) -> int:
    return int(np.random.default_rng([seed, stage, step, rank, 99]).integers(2**31))


def encode_by_length(fn, texts: list[str], chunk: int) -> torch.Tensor:
    """Encode texts in chunks of similar length, so each chunk pads to its own longest text rather than the
    batch's; returns rows in the input order. In training it gives the same gradients as one padded batch for
    less compute (item texts vary from ~15 to ~60 tokens); validation and evaluation use it under inference mode."""
    if chunk <= 0 or len(texts) <= chunk:
        return fn(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")
    parts = [fn([texts[i] for i in order[lo:lo + chunk]]) for lo in range(0, len(texts), chunk)]
    inv = np.empty(len(order), dtype=np.int64)
    inv[order] = np.arange(len(order))
    return torch.cat(parts)[torch.as_tensor(inv, device=parts[0].device)]


def forward_loss(model: TwoTower, loss_fn, loss_name: str, data: TrainData, batch: Batch, rand_items: np.ndarray,
                 dist: Dist, item_chunk: int = 32, listwise_min_grade: int = 0,
                 listwise_gain: str = "linear") -> tuple[torch.Tensor, int]:
    """Encode one (local) batch and return (loss, in-batch columns seen by each query). The in-batch softmax
    losses (mnr, mixed) read :meth:`Batch.listwise_targets` with ``listwise_min_grade`` and ``listwise_gain``."""
    B, G = batch.item_idx.shape
    dev = model.device
    q = model.encode_queries([data.query_texts[i] for i in batch.query_idx])
    flat = batch.item_idx.reshape(-1)
    valid = flat >= 0
    uniq, inv = np.unique(flat[valid], return_inverse=True)
    enc = encode_by_length(model.encode_items, [data.item_texts[i] for i in uniq], chunk=item_chunk)
    items = torch.zeros(B * G, enc.shape[1], dtype=enc.dtype, device=dev)
    items[torch.as_tensor(np.flatnonzero(valid), device=dev)] = enc[torch.as_tensor(inv, device=dev)]
    mask = torch.as_tensor(batch.mask, device=dev)
    listwise = loss_name in ("mnr", "mixed", "paced")
    targets = torch.as_tensor(batch.listwise_targets(listwise_min_grade, listwise_gain) if listwise else batch.targets,
                              device=dev)
    ids_all = flat
    mask_all = mask.reshape(-1)
    if dist.enabled:  # local items first, then every other rank's, so own columns stay at b*G+g
        from torch.distributed.nn.functional import all_gather

        gathered = all_gather(items)
        ids_g = [torch.zeros(B * G, dtype=torch.long) for _ in range(dist.world)]
        torch.distributed.all_gather(ids_g, torch.as_tensor(flat, dtype=torch.long))
        others = [r for r in range(dist.world) if r != dist.rank]
        items = torch.cat([gathered[dist.rank]] + [gathered[r] for r in others])
        ids_all = np.concatenate([flat] + [ids_g[r].numpy() for r in others])
        mask_all = torch.as_tensor(ids_all >= 0, device=dev)
    sims_all = model.score(q, items)
    own = sims_all[:, : B * G].reshape(B, B, G)[torch.arange(B), torch.arange(B)]
    if loss_name in ("bce", "triplet"):
        return loss_fn(own, targets, mask), int(sims_all.shape[1])
    # false in-batch negatives: the same item id appearing in another query's group
    same = torch.as_tensor((ids_all[None, :] == batch.item_idx[:, :, None]).any(1) & (ids_all[None, :] >= 0),
                           device=dev)
    if loss_name == "paced":  # graded targets for the first stage's groups, listwise targets for the others
        first = torch.as_tensor(batch.first if batch.first is not None else np.zeros(B, bool), device=dev)
        return loss_fn(sims_all, torch.as_tensor(batch.targets, device=dev), targets, mask, first,
                       mask_all=mask_all, same_item=same), int(sims_all.shape[1])
    if loss_name == "mixed":
        r = encode_by_length(model.encode_items, [data.item_texts[i] for i in rand_items], item_chunk) \
            if len(rand_items) else items[:0]
        return loss_fn(sims_all, model.score(q, r), targets, mask, mask_all=mask_all, same_item=same), \
            int(sims_all.shape[1] + len(rand_items))
    return loss_fn(sims_all, targets, mask, mask_all=mask_all, same_item=same), int(sims_all.shape[1])


def train_phase(model: TwoTower, data: TrainData, spec: PhaseSpec, folder: Path, *, cfg, start_val: float,
                dist: Dist = Dist(), progress: bool = True, stop_after_steps: int | None = None,
                start_per_query: list | None = None) -> PhaseResult:
    """Train one phase from ``model``'s current weights. Returns its result; leaves the best weights in ``model``
    (or the starting weights when no validation beat ``start_val``). ``start_per_query``: the starting model's
    per-query validation NDCG@10, for the interval of the phase's gain (``PhaseResult.gain``)."""
    folder = Path(folder)
    done = folder / "done.json"
    if done.exists():  # finished earlier (a resumed `assay train`): load its best and return its result
        res = PhaseResult(**json.loads(done.read_text()))
        if res.improved:
            _load_weights(model, folder / "best-state.pt")
        return res
    device = str(model.device)
    loss_fn = _make_loss(spec.loss, cfg).to(model.device)
    freeze_lower(model, cfg.freeze_word_embeddings, cfg.freeze_layers)
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec.steps, cfg.warmup_ratio))
    start_state = copy.deepcopy(model.state_dict())
    best_val, best_step, history, step = start_val, 0, [], 0
    best_state, best_pq, top_val = None, None, float("-inf")  # top: the best evaluated step, kept or not
    state_dir = folder / "state"
    latest = state_dir / "latest.json"
    resumed_from = 0
    if latest.exists():
        meta = json.loads(latest.read_text())
        sdir = state_dir / f"step-{meta['step']}"
        model.load_state_dict(torch.load(sdir / "model.pt", weights_only=True))
        ck = torch.load(sdir / "optim.pt", weights_only=True)
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        loss_fn.load_state_dict(ck["loss"])
        step, best_val, best_step, history = meta["step"], meta["best_val"], meta["best_step"], meta["history"]
        best_pq, top_val = meta.get("best_per_query"), meta.get("top_val", float("-inf"))
        if (folder / "best-state.pt").exists() and best_step:
            best_state = torch.load(folder / "best-state.pt", weights_only=True)
        resumed_from = step
        log.info("%s: resumed at step %d (best val NDCG@10 %.4f at step %d)", spec.name, step, best_val, best_step)
    model.train()
    t0, seen, cols = time.perf_counter(), 0, 0
    from tqdm.auto import tqdm

    bar = tqdm(total=spec.steps, initial=step, desc=spec.name, unit="step", disable=not (progress and dist.main))
    while step < spec.steps:
        if stop_after_steps is not None and step - resumed_from >= stop_after_steps:
            bar.close()
            raise Interrupted(f"{spec.name}: stopped after {stop_after_steps} steps (test hook)")
        torch.manual_seed(_step_seed(cfg.seed, spec.stage, step, dist.rank))
        batch = spec.sampler.batch(step, dist.rank, dist.world)
        rand = spec.sampler.random_items(step, spec.random_negatives) if spec.loss == "mixed" else np.zeros(0, np.int64)
        with _autocast(device, cfg.precision):
            loss, cols = forward_loss(model, loss_fn, spec.loss, data, batch, rand, dist, cfg.item_chunk,
                                      cfg.listwise_min_grade, cfg.listwise_gain)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if dist.enabled:
            _all_reduce_grads(params, dist.world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        seen += int(batch.mask.sum()) * dist.world
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", ex_s=f"{rate:.0f}")
        if step % cfg.eval_every == 0 or step == spec.steps:
            vals = validate_all(model, data, precision=cfg.precision) if dist.main else {}
            val, pq = vals.get(cfg.val_metric, (0.0, None))
            val = dist.broadcast_float(val)
            history.append({"step": step, "loss": round(float(loss.item()), 5), "val_ndcg10": round(val, 5),
                            **{f"val_{m}": a for m, a in metric_means(vals).items()}})
            log.info("%s step %d: loss %.4f, val NDCG@10 %.4f (best %.4f)", spec.name, step, loss.item(), val, best_val)
            if val > top_val:
                top_val, best_pq = val, as_list(pq)
            if val > best_val:
                best_val, best_step = val, step
                best_state = copy.deepcopy(model.state_dict())
                if dist.main:
                    _atomic_torch_save(best_state, folder / "best-state.pt")
        if step % cfg.checkpoint_every == 0 and step < spec.steps and dist.main:
            _save_state(state_dir, step, model, opt, sched, loss_fn,
                        {"best_val": best_val, "best_step": best_step, "history": history, "best_per_query": best_pq,
                         "top_val": top_val})
    bar.close()
    seconds = time.perf_counter() - t0
    improved = best_state is not None and best_val > start_val + cfg.min_improvement
    model.load_state_dict(best_state if improved else start_state)
    res = PhaseResult(spec.name, round(start_val, 5), round(best_val, 5), best_step, spec.steps, bool(improved),
                      history, round(seen / max(seconds, 1e-9), 2), round(seconds, 1), cols, resumed_from, best_pq,
                      val_gain(best_pq, start_per_query, cfg))  # None on ranks > 0 (no per-query values)
    if dist.main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(res.to_dict()))
        os.replace(tmp, done)
        shutil.rmtree(state_dir, ignore_errors=True)
    dist.barrier()
    return res


def _layer_stack(enc):
    """The encoder's list of transformer layers (BERT / MPNet / RoBERTa: encoder.layer, DistilBERT:
    transformer.layer, others: layers), or None when the architecture is not one of these."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        obj = enc
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    return None


def freeze_lower(model: TwoTower, word_embeddings: bool, layers: int) -> None:
    """Keep the token embedding matrix and/or the embedding block plus the lowest ``layers`` transformer layers of
    each tower fixed. Frozen lower layers build no autograd graph, so the backward pass stops above them. An
    encoder whose layers are not found trains every layer (with a warning)."""
    for tower in (model.query_tower, model.item_tower):
        enc = tower[0].auto_model
        if word_embeddings:
            enc.get_input_embeddings().weight.requires_grad_(False)
        if layers <= 0:
            continue
        stack = _layer_stack(enc)
        if stack is None:
            log.warning("train.freeze_layers: no transformer layer list found in %s; every layer trains",
                        type(enc).__name__)
            continue
        if layers >= len(stack):
            raise ValueError(f"train.freeze_layers is {layers} but the encoder has {len(stack)} layers; "
                             "at least one must train")
        embeddings = getattr(enc, "embeddings", None)
        for m in ([embeddings] if embeddings is not None else []) + list(stack[:layers]):
            for p in m.parameters():
                p.requires_grad_(False)


def _make_loss(name: str, cfg):
    kw = {"bce": {"scale_init": cfg.bce_scale_init}, "mnr": {"scale": cfg.scale},
          "triplet": {"margin": cfg.triplet_margin}, "mixed": {"alpha": cfg.mix_alpha, "scale": cfg.scale},
          "paced": {"scale": cfg.scale, "scale_init": cfg.bce_scale_init,
                    "listwise": getattr(cfg, "pace_loss", "per_mix") == "listwise"}}[name]
    return get_loss(name, **kw)


def _all_reduce_grads(params: list, world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_weights(model: TwoTower, path: Path) -> None:
    model.load_state_dict(torch.load(path, weights_only=True))


def _save_state(state_dir: Path, step: int, model, opt, sched, loss_fn, meta: dict) -> None:
    sdir = state_dir / f"step-{step}"
    if sdir.exists():
        shutil.rmtree(sdir)
    sdir.mkdir(parents=True)
    torch.save(model.state_dict(), sdir / "model.pt")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "loss": loss_fn.state_dict()}, sdir / "optim.pt")
    tmp = state_dir / "latest.json.tmp"
    tmp.write_text(json.dumps({"step": step, **meta}))
    os.replace(tmp, state_dir / "latest.json")  # the state is visible only once complete
    for old in state_dir.glob("step-*"):
        if old != sdir:
            shutil.rmtree(old, ignore_errors=True)

