"""Training losses for the two-tower retriever, on similarity scores with graded targets.

Every loss here takes SIMILARITY tensors (cosines already computed by the model), never embeddings,
so the same losses serve a single-vector query tower and a multi-head query tower (both produce a
score matrix). Targets are graded relevance targets in [0, 1]: 1 is an exact match, 0 is irrelevant,
values in between come from intermediate grades (and engagement, see docs/architecture.md "Graded
targets").

Tensor conventions
------------------
A batch has ``B`` queries; each query has a group of ``G`` candidate items (its own items). Groups
are padded to the same ``G``.

- ``sims``: ``(B, G)`` cosine similarity of each query with its own group items.
- ``targets``: ``(B, G)`` float in [0, 1], the graded target of each (query, own item) pair.
- ``mask``: ``(B, G)`` bool, True where the slot holds a real item (False = padding). Values of
  ``sims`` and ``targets`` in padding slots are ignored, whatever they are (even NaN).
- In-batch losses take ``sims_all``: ``(B, N)`` similarity of each query with every item of the batch
  flattened in order (``N = B * G``; item ``(b, g)`` is column ``b * G + g``), optionally followed by
  ``R`` extra columns for random items shared across the batch (shape ``(B, N + R)``).
- ``mask_all``: ``(M,)`` bool, the valid in-batch columns; defaults to ``mask.reshape(-1)`` (M = N). In a
  distributed run M > N: the first N columns are this rank's batch and the next M - N the other ranks' items
  (gathered), which are in-batch negatives like any other. Columns after M are the ``R`` random items, always
  valid.
- ``same_item``: optional ``(B, N)`` bool, columns to drop from query ``b``'s softmax because they
  hold an item that is really one of ``b``'s own (a duplicate item id: a false negative). Query
  ``b``'s own columns are never dropped by it.

Every loss returns a scalar (mean over what it averages) that always has a ``grad_fn`` when its
inputs require grad, also when nothing in the batch contributes (then it is an exact zero).

Losses and curriculum stages (docs/architecture.md "Five tiers, three stages")
-------------------------------------------------------------------------
- Stage 1, easy_pos + random_neg: :class:`GradedBCELoss`, pointwise BCE on
  ``sigmoid(scale * cos + bias)`` with a learnable temperature (init 20).
- Stage 2, hard_pos + hard_neg: :class:`ListwiseMNRLoss`, in-batch softmax (MNR) with mined hard
  negatives in each group and graded soft targets; :class:`MixedNegativesLoss` is the same with
  random negatives shared across the batch mixed in at ratio ``alpha`` (DPSR, default 0.5).
  The single-stage "graded listwise" baseline uses these too.
- Stage 3, token_sim_neg anchored on positives: :class:`GradedTripletLoss`, margin 0.3 scaled by
  the target gap.
- The paced curriculum (one run whose batches move from stage 1's mix to every tier): :class:`PacedLoss`, BCE on
  the stage-1 groups and the in-batch softmax on the others, or the in-batch softmax on all of them.

``LOSSES`` maps short names to classes and :func:`get_loss` builds one by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GradedBCELoss",
    "ListwiseMNRLoss",
    "GradedTripletLoss",
    "PacedLoss",
    "MixedNegativesLoss",
    "LOSSES",
    "get_loss",
    "masked_soft_target_cross_entropy",
]


# ----------------------------------------------------------------------------------------------
# shared helpers


def _check_group_inputs(sims: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
    if sims.dim() != 2:
        raise ValueError(f"sims must be (B, G), got shape {tuple(sims.shape)}")
    if targets.shape != sims.shape or mask.shape != sims.shape:
        raise ValueError(
            f"sims, targets and mask must have the same (B, G) shape, got "
            f"{tuple(sims.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")


def masked_soft_target_cross_entropy(
    logits: torch.Tensor, target_probs: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_c p[c] * log_softmax(logits over valid columns)[c]``.

    ``logits`` and ``target_probs`` are ``(B, C)``; ``valid`` is ``(B, C)`` bool, the columns taking part
    in each row's softmax. ``target_probs`` must be zero outside ``valid`` (rows are normalised by
    the caller; an all-zero row gives 0). Invalid logits may hold anything (inf, NaN): they are
    replaced by the most negative finite value before the log-softmax and their log-probabilities
    are zeroed afterwards, so neither the value nor the gradient can become NaN, even for rows
    where every column is invalid. Returns ``(B,)``.

    >>> logits = torch.tensor([[2.0, 0.0, float("nan")]])
    >>> p = torch.tensor([[1.0, 0.0, 0.0]])
    >>> valid = torch.tensor([[True, True, False]])
    >>> ce = masked_soft_target_cross_entropy(logits, p, valid)
    >>> round(ce.item(), 4) == round(math.log(1 + math.exp(-2.0)), 4)
    True
    """
    fill = torch.finfo(logits.dtype).min
    safe_logits = torch.where(valid, logits, torch.full_like(logits, fill))
    log_p = F.log_softmax(safe_logits, dim=-1)
    log_p = torch.where(valid, log_p, torch.zeros_like(log_p))
    p = torch.where(valid, target_probs, torch.zeros_like(target_probs))
    return -(p * log_p).sum(dim=-1)


def _listwise_problem(
    sims_all: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    mask_all: torch.Tensor | None,
    same_item: torch.Tensor | None,
    min_target: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Build the listwise in-batch softmax problem shared by ListwiseMNR and MixedNegatives.

    Returns ``(valid, target_probs, has_positive, own, n)``: ``valid`` ``(B, C)`` columns in each
    query's softmax, ``target_probs`` ``(B, C)`` normalised soft targets (zero rows for queries
    without a positive), ``has_positive`` ``(B,)``, ``own`` ``(B, C)`` True on each query's own group
    columns, and ``n = B * G`` the number of in-batch columns (columns ``>= n`` are random items).
    """
    if targets.dim() != 2 or mask.shape != targets.shape:
        raise ValueError(
            f"targets and mask must both be (B, G), got {tuple(targets.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    b, g = targets.shape
    n = b * g
    if sims_all.dim() != 2 or sims_all.shape[0] != b or sims_all.shape[1] < n:
        raise ValueError(
            f"sims_all must be (B, B*G [+ R]) = ({b}, >= {n}), got {tuple(sims_all.shape)}"
        )
    c = sims_all.shape[1]
    device = sims_all.device

    mask_flat = mask.reshape(n)
    if mask_all is None:
        mask_all = mask_flat
    elif mask_all.dim() != 1 or mask_all.shape[0] < n or mask_all.shape[0] > c or mask_all.dtype != torch.bool:
        raise ValueError(f"mask_all must be a (M,) bool tensor with {n} <= M <= {c}, got "
                         f"{tuple(mask_all.shape)} {mask_all.dtype}")
    # in-batch columns: this batch's own B*G, then (distributed) the other ranks' items, then random ones
    m = mask_all.shape[0]

    cols = torch.arange(c, device=device)
    # own[b, col]: col is one of query b's group columns (b*G .. b*G+G-1); random columns are nobody's
    own = (cols.unsqueeze(0) // g) == torch.arange(b, device=device).unsqueeze(1)
    own &= (cols < n).unsqueeze(0)

    col_valid = torch.ones(c, dtype=torch.bool, device=device)
    col_valid[:m] = mask_all  # padding is never a candidate
    col_valid[:n] &= mask_flat
    valid = col_valid.unsqueeze(0).expand(b, c).clone()
    # own columns: a real own item is always in the softmax; own padding never is
    own_valid = torch.zeros(c, dtype=torch.bool, device=device)
    own_valid[:n] = mask_flat
    valid = torch.where(own, own_valid.unsqueeze(0).expand(b, c), valid)
    if same_item is not None:
        if same_item.dtype != torch.bool or same_item.shape[0] != b or same_item.shape[1] not in (m, c):
            raise ValueError(
                f"same_item must be a (B, M) = ({b}, {m}) bool tensor, got {tuple(same_item.shape)} {same_item.dtype}"
            )
        drop = torch.zeros(b, c, dtype=torch.bool, device=device)
        drop[:, : same_item.shape[1]] = same_item
        valid &= ~(drop & ~own)

    # soft targets on own real items with target > min_target, normalised per query
    t = torch.where(mask & (targets > min_target), targets, torch.zeros_like(targets))
    t_cols = torch.zeros(b, c, dtype=t.dtype, device=device)
    t_cols[:, :n] = t.reshape(1, n)  # column b*G+g holds targets[b, g]
    t_own = torch.where(own, t_cols, torch.zeros_like(t_cols))
    total = t_own.sum(dim=1, keepdim=True)
    has_positive = total.squeeze(1) > 0
    target_probs = t_own / total.clamp_min(torch.finfo(t_own.dtype).tiny)
    return valid, target_probs.to(sims_all.dtype), has_positive, own, m


def _mean_over_rows(per_row: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row`` over rows where ``keep``; an exact zero (with grad_fn) if none."""
    per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
    return per_row.sum() / keep.sum().clamp_min(1).to(per_row.dtype)


# ----------------------------------------------------------------------------------------------
# losses


class GradedBCELoss(nn.Module):
    r"""Pointwise binary cross-entropy on scaled cosines against graded targets (stage 1).

    For each real (query, item) slot with cosine :math:`s` and graded target :math:`t \in [0, 1]`:

    .. math::

        z = \text{scale} \cdot s + \text{bias}, \qquad
        \ell = -\,t \log \sigma(z) - (1 - t) \log (1 - \sigma(z))

    averaged over the slots where ``mask`` is True (an exact zero if there are none). ``scale`` is
    a learnable temperature stored as ``log_scale`` so it stays positive (init 20); ``bias`` is
    learnable too (init -10, so the decision point :math:`\sigma(z) = 0.5` starts at cosine 0.5).
    With ``learnable=False`` both are fixed buffers. Computed with
    ``binary_cross_entropy_with_logits`` (stable for large ``|z|``).

    Example (at cosine 0.5 the initial logit is 0, so the loss is log 2 for any target):

    >>> loss = GradedBCELoss()
    >>> sims = torch.tensor([[0.5, 0.5]])
    >>> targets = torch.tensor([[1.0, 0.25]])
    >>> mask = torch.tensor([[True, True]])
    >>> round(loss(sims, targets, mask).item(), 4)
    0.6931
    >>> round(loss.scale.item(), 4), round(loss.bias.item(), 4)
    (20.0, -10.0)
    """

    def __init__(self, scale_init: float = 20.0, bias_init: float = -10.0, learnable: bool = True) -> None:
        super().__init__()
        if scale_init <= 0:
            raise ValueError(f"scale_init must be > 0, got {scale_init}")
        self.scale_init = float(scale_init)
        self.bias_init = float(bias_init)
        self.learnable = bool(learnable)
        log_scale = torch.tensor(math.log(self.scale_init))
        bias = torch.tensor(self.bias_init)
        if self.learnable:
            self.log_scale = nn.Parameter(log_scale)
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("log_scale", log_scale)
            self.register_buffer("bias", bias)

    @property
    def scale(self) -> torch.Tensor:
        """The current (positive) temperature, ``exp(log_scale)``."""
        return self.log_scale.exp()

    def forward(self, sims: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_group_inputs(sims, targets, mask)
        zeros = torch.zeros_like(sims)
        s = torch.where(mask, sims, zeros)
        t = torch.where(mask, targets.to(sims.dtype), zeros)
        logits = self.scale.to(sims.dtype) * s + self.bias.to(sims.dtype)
        per_slot = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        per_slot = torch.where(mask, per_slot, zeros)
        return per_slot.sum() / mask.sum().clamp_min(1).to(sims.dtype)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale_init": self.scale_init, "bias_init": self.bias_init, "learnable": self.learnable}


class ListwiseMNRLoss(nn.Module):
    r"""In-batch softmax (multiple-negatives ranking) with graded soft targets, listwise (stage 2).

    For query :math:`b` the logits are ``scale * sims_all[b]`` over its valid columns :math:`V_b`:
    its own real group items (positives and mined hard negatives), the other queries' items as
    in-batch negatives (``mask_all``, minus ``same_item`` duplicates), and any extra random columns.
    The target distribution puts mass only on :math:`b`'s own real items whose target exceeds
    ``min_target``:

    .. math::

        p_{b,g} = \frac{t_{b,g}}{\sum_{g'} t_{b,g'}}, \qquad
        \ell_b = -\sum_{c \in V_b} p_{b,c} \, \log \operatorname{softmax}_{V_b}(\text{scale} \cdot s_b)_c

    and the loss is the mean of :math:`\ell_b` over queries with a positive target sum. Queries whose
    own targets are all ``<= min_target`` are skipped; if none remain the loss is an exact zero that
    still has a ``grad_fn``. With one target 1 per group and the rest 0 this is the standard MNR loss
    with hard negatives (cross-entropy with the positive's column as the label).

    Example (2 queries x 2 items, the first item of each group is the positive):

    >>> loss = ListwiseMNRLoss(scale=1.0)
    >>> sims_all = torch.tensor([[0.9, 0.1, 0.2, 0.0],
    ...                          [0.3, 0.1, 0.8, 0.2]])
    >>> targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> mask = torch.ones(2, 2, dtype=torch.bool)
    >>> expected = F.cross_entropy(sims_all, torch.tensor([0, 2]))
    >>> bool(torch.isclose(loss(sims_all, targets, mask), expected))
    True
    """

    def __init__(self, scale: float = 20.0, min_target: float = 0.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.min_target = float(min_target)

    def forward(
        self,
        sims_all: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        mask_all: torch.Tensor | None = None,
        same_item: torch.Tensor | None = None,
    ) -> torch.Tensor:
        valid, p, has_pos, _own, _n = _listwise_problem(
            sims_all, targets, mask, mask_all, same_item, self.min_target
        )
        per_row = masked_soft_target_cross_entropy(self.scale * sims_all, p, valid)
        return _mean_over_rows(per_row, has_pos)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "min_target": self.min_target}


class GradedTripletLoss(nn.Module):
    r"""Pairwise hinge (triplet) loss with a margin scaled by the target gap (stage 3).

    For every query and every ordered pair :math:`(i, j)` of its own real items with
    :math:`t_i > t_j`:

    .. math::

        h_{ij} = \max\bigl(0,\; \text{margin} \cdot (t_i - t_j) - (s_i - s_j)\bigr)

    averaged over all such pairs in the batch (pairs with equal targets are ignored; an exact zero
    with ``grad_fn`` if there are no pairs). With binary targets this is the standard cosine
    triplet loss ``relu(margin - (s_pos - s_neg))`` with margin 0.3.

    Example (targets 1 > 0.5 > 0; only the pair (0, 1) violates its margin 0.3 * 0.5 = 0.15):

    >>> loss = GradedTripletLoss(margin=0.3)
    >>> sims = torch.tensor([[0.6, 0.7, 0.1]])
    >>> targets = torch.tensor([[1.0, 0.5, 0.0]])
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> round(loss(sims, targets, mask).item(), 4)   # (0.15 + 0.1) / 3 pairs
    0.0833
    """

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, sims: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_group_inputs(sims, targets, mask)
        zeros = torch.zeros_like(sims)
        s = torch.where(mask, sims, zeros)
        t = torch.where(mask, targets.to(sims.dtype), zeros)
        t_gap = t.unsqueeze(2) - t.unsqueeze(1)  # (B, G, G): t_i - t_j
        s_gap = s.unsqueeze(2) - s.unsqueeze(1)  # s_i - s_j
        pair = mask.unsqueeze(2) & mask.unsqueeze(1) & (t_gap > 0)
        hinge = F.relu(self.margin * t_gap - s_gap)
        hinge = torch.where(pair, hinge, torch.zeros_like(hinge))
        return hinge.sum() / pair.sum().clamp_min(1).to(sims.dtype)

    def get_config_dict(self) -> dict[str, Any]:
        return {"margin": self.margin}


class MixedNegativesLoss(nn.Module):
    r"""DPSR mixed negative sampling: listwise MNR over own, in-batch and shared random items.

    Candidates for query :math:`b`: its own group items (soft targets exactly as in
    :class:`ListwiseMNRLoss`), the other queries' items as in-batch negatives (:math:`n_b` valid
    columns) and :math:`R` random items shared across the batch. ``alpha`` is the share of the
    negative probability mass attributed to the random items. With :math:`K_b = n_b + R`, log-offsets
    are added to the logits so that the negative part of the partition function is a mixture:

    .. math::

        Z_b = \sum_{\text{own}} e^{z} + K_b\Bigl[(1-\alpha)\,\frac{1}{n_b}\sum_{\text{in-batch}} e^{z}
              + \alpha\,\frac{1}{R}\sum_{\text{random}} e^{z}\Bigr]

    i.e. in-batch logits get :math:`+\log((1-\alpha) K_b / n_b)` and random logits
    :math:`+\log(\alpha K_b / R)`. When :math:`\alpha = R / K_b` both offsets are 0 and this is
    exactly :class:`ListwiseMNRLoss` over the concatenated columns. ``alpha = 0`` drops the random
    items (masked, not ``-inf``) and ``alpha = 1`` drops the in-batch negatives. Note that
    ``alpha = 0`` is ListwiseMNR without the random columns *with the in-batch negatives up-weighted
    by* :math:`K_b / n_b` (the negative mass stays that of :math:`K_b` negatives at every alpha). If a
    query has no valid in-batch negative, all negative mass goes to the random items (offset 0); if
    ``R == 0``, all goes to the in-batch negatives (offset 0), whatever ``alpha``.

    Example (alpha = R / K: no offsets, same value as ListwiseMNR on the concatenation):

    >>> sims = torch.tensor([[0.9, 0.1, 0.2, 0.0],
    ...                      [0.3, 0.1, 0.8, 0.2]])
    >>> sims_random = torch.tensor([[0.4, -0.1], [0.0, 0.5]])
    >>> targets = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    >>> mask = torch.ones(2, 2, dtype=torch.bool)
    >>> mixed = MixedNegativesLoss(alpha=2 / 4, scale=5.0)   # n_in = 2, R = 2, K = 4
    >>> mnr = ListwiseMNRLoss(scale=5.0)
    >>> a = mixed(sims, sims_random, targets, mask)
    >>> b = mnr(torch.cat([sims, sims_random], dim=1), targets, mask)
    >>> bool(torch.isclose(a, b))
    True
    """

    def __init__(self, alpha: float = 0.5, scale: float = 20.0, min_target: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.scale = float(scale)
        self.min_target = float(min_target)

    def forward(
        self,
        sims_own_and_inbatch: torch.Tensor,
        sims_random: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        mask_all: torch.Tensor | None = None,
        same_item: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if targets.dim() != 2:
            raise ValueError(f"targets must be (B, G), got shape {tuple(targets.shape)}")
        b, g = targets.shape
        n = b * g
        if sims_own_and_inbatch.dim() != 2 or sims_own_and_inbatch.shape[0] != b or sims_own_and_inbatch.shape[1] < n:
            raise ValueError(
                f"sims_own_and_inbatch must be (B, M >= B*G) = ({b}, >= {n}), got {tuple(sims_own_and_inbatch.shape)}"
            )
        if mask_all is None and sims_own_and_inbatch.shape[1] != n:
            raise ValueError("sims_own_and_inbatch has columns beyond B*G: pass mask_all for them")
        if sims_random.dim() != 2 or sims_random.shape[0] != b:
            raise ValueError(f"sims_random must be (B, R) with B = {b}, got {tuple(sims_random.shape)}")
        r = sims_random.shape[1]
        sims_all = torch.cat([sims_own_and_inbatch, sims_random.to(sims_own_and_inbatch.dtype)], dim=1)
        valid, p, has_pos, own, m = _listwise_problem(
            sims_all, targets, mask, mask_all, same_item, self.min_target
        )
        c = sims_all.shape[1]
        is_random = (torch.arange(c, device=sims_all.device) >= m).unsqueeze(0).expand(b, c)
        in_neg = valid & ~own & ~is_random  # (B, C) valid in-batch negatives
        n_in = in_neg.sum(dim=1)  # (B,)

        dtype = sims_all.dtype
        alpha = torch.full((b,), self.alpha, dtype=dtype, device=sims_all.device)
        if r == 0:
            alpha = torch.zeros_like(alpha)
        alpha = torch.where(n_in == 0, torch.ones_like(alpha), alpha)
        k = (n_in + r).to(dtype)
        one = torch.ones_like(alpha)
        w_in = torch.where((n_in > 0) & (alpha < 1), (1 - alpha) * k / n_in.clamp_min(1).to(dtype), one)
        w_rand = torch.where(alpha > 0, alpha * k / max(r, 1), one)
        off_in = torch.log(w_in.clamp_min(torch.finfo(dtype).tiny))
        off_rand = torch.log(w_rand.clamp_min(torch.finfo(dtype).tiny))

        offsets = torch.where(in_neg, off_in.unsqueeze(1), torch.zeros_like(sims_all))
        offsets = torch.where(is_random, off_rand.unsqueeze(1).expand(b, c), offsets)
        # components with no mass leave the softmax (masked, never -inf arithmetic)
        valid = valid & ~(in_neg & (alpha >= 1).unsqueeze(1)) & ~(is_random & (alpha <= 0).unsqueeze(1))

        per_row = masked_soft_target_cross_entropy(self.scale * sims_all + offsets, p, valid)
        return _mean_over_rows(per_row, has_pos)

    def get_config_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "scale": self.scale, "min_target": self.min_target}


class PacedLoss(nn.Module):
    r"""The paced curriculum's loss (``train.schedule: paced``): one batch holds groups of the first stage's mix
    (``first`` rows: easy positives against random negatives) and groups of the full mix (the other rows: tiers
    1-2 against tiers 3-5). With ``listwise=False`` each group gets the loss its mix calls for, weighted by its
    share of the batch's groups:

    .. math::

        \ell = \frac{n_1}{B} \, \text{BCE}(\text{first rows}) + \frac{B - n_1}{B} \, \text{MNR}(\text{other rows})

    where the MNR softmax of a full-mix row still sees every item of the batch (the first rows' items included) as
    in-batch negatives. With ``listwise=True`` every row takes the in-batch softmax over its graded targets
    (one loss for the whole run). The BCE's learnable temperature and bias are parameters of this module.

    >>> loss = PacedLoss(scale=1.0)
    >>> sims = torch.tensor([[0.9, 0.1], [0.2, 0.7]])
    >>> t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> m = torch.ones(2, 2, dtype=torch.bool)
    >>> every = loss(torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.2, 0.7]]), t, t, m, torch.tensor([True, True]))
    >>> bool(torch.isclose(every, loss.bce(sims, t, m)))
    True
    """

    def __init__(self, scale: float = 20.0, scale_init: float = 20.0, listwise: bool = False) -> None:
        super().__init__()
        self.bce = GradedBCELoss(scale_init=scale_init)
        self.mnr = ListwiseMNRLoss(scale=scale)
        self.listwise = bool(listwise)

    def forward(
        self,
        sims_all: torch.Tensor,
        targets: torch.Tensor,
        list_targets: torch.Tensor,
        mask: torch.Tensor,
        first: torch.Tensor,
        mask_all: torch.Tensor | None = None,
        same_item: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``targets``: the graded targets (BCE); ``list_targets``: the in-batch softmax's targets (after
        ``listwise_min_grade``); ``first``: ``(B,)`` bool, the rows drawn from the first stage's mix."""
        b, g = targets.shape
        if first.shape != (b,) or first.dtype != torch.bool:
            raise ValueError(f"first must be a ({b},) bool tensor, got {tuple(first.shape)} {first.dtype}")
        if self.listwise:
            return self.mnr(sims_all, list_targets, mask, mask_all=mask_all, same_item=same_item)
        own = sims_all[:, : b * g].reshape(b, b, g)[torch.arange(b), torch.arange(b)]
        n1 = int(first.sum())
        parts = []
        if n1:
            parts.append(self.bce(own, targets, mask & first.unsqueeze(1)) * (n1 / b))
        if n1 < b:  # the first rows keep their items as in-batch columns but take no softmax loss
            t = torch.where(first.unsqueeze(1), torch.zeros_like(list_targets), list_targets)
            parts.append(self.mnr(sims_all, t, mask, mask_all=mask_all, same_item=same_item) * ((b - n1) / b))
        return sum(parts[1:], parts[0])

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.mnr.scale, "scale_init": self.bce.scale_init, "listwise": self.listwise}


LOSSES: dict[str, type[nn.Module]] = {
    "bce": GradedBCELoss,
    "mnr": ListwiseMNRLoss,
    "triplet": GradedTripletLoss,
    "mixed": MixedNegativesLoss,
    "paced": PacedLoss,
}


def get_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by its short name (``LOSSES`` keys), passing ``kwargs`` to its constructor.

    >>> get_loss("triplet", margin=0.2).get_config_dict()
    {'margin': 0.2}
    """
    try:
        cls = LOSSES[name]
    except KeyError:
        raise KeyError(f"Unknown loss {name!r}. Available: {sorted(LOSSES)}") from None
    return cls(**kwargs)
