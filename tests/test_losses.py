"""Tests for assay.trainer.losses: hand-checked values on tiny batches, plus invariants."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from assay.trainer import losses as L
from assay.trainer.losses import (
    LOSSES,
    GradedBCELoss,
    GradedTripletLoss,
    ListwiseMNRLoss,
    MixedNegativesLoss,
    PacedLoss,
    get_loss,
)

D = torch.float64
NAN = float("nan")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def bmask(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def lse(xs) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def bce(z: float, y: float) -> float:
    sig = 1.0 / (1.0 + math.exp(-z))
    return -(y * math.log(sig) + (1.0 - y) * math.log(1.0 - sig))


def soft_ce(logits: list[float], p: dict[int, float]) -> float:
    """-sum_c p[c] * log softmax(logits)[c], written out."""
    z = lse(logits)
    return -sum(w * (logits[c] - z) for c, w in p.items())


def test_doctests_in_module_pass():
    result = doctest.testmod(L, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


# ------------------------------------------------------------------------------------ BCE


def test_bce_hand_value_and_padding_ignored():
    loss = GradedBCELoss()
    sims = t([[0.6, 0.2, 123.0], [0.5, 0.9, NAN]])
    targets = t([[1.0, 0.0, 7.0], [0.5, 0.75, NAN]])
    mask = bmask([[True, True, False], [True, True, False]])
    # z = 20 * s - 10
    expected = (bce(2.0, 1.0) + bce(-6.0, 0.0) + bce(0.0, 0.5) + bce(8.0, 0.75)) / 4
    got = loss(sims, targets, mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # other garbage in the padding: same value
    sims2 = sims.clone()
    sims2[:, 2] = -5.0
    assert loss(sims2, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_bce_scale_init_learnable_and_grads():
    loss = GradedBCELoss()
    assert loss.scale.item() == pytest.approx(20.0)
    assert loss.bias.item() == pytest.approx(-10.0)
    names = {n for n, _ in loss.named_parameters()}
    assert names == {"log_scale", "bias"}
    sims = t([[0.9, 0.1], [0.3, 0.7]]).requires_grad_(True)
    targets = t([[1.0, 0.0], [0.25, 1.0]])
    mask = bmask([[True, True], [True, False]])
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    out = loss(sims, targets, mask)
    out.backward()
    assert torch.isfinite(sims.grad).all()
    assert sims.grad[1, 1].item() == 0.0  # padding slot gets no gradient
    assert loss.log_scale.grad is not None and loss.log_scale.grad.item() != 0.0
    before = loss.scale.item()
    opt.step()
    assert loss.scale.item() != pytest.approx(before, abs=1e-9)
    assert loss.scale.item() > 0


def test_bce_fixed_and_config():
    fixed = GradedBCELoss(scale_init=10.0, bias_init=-5.0, learnable=False)
    assert list(fixed.parameters()) == []
    assert fixed.get_config_dict() == {"scale_init": 10.0, "bias_init": -5.0, "learnable": False}
    # z = 10 * 0.8 - 5 = 3
    got = fixed(t([[0.8]]), t([[1.0]]), bmask([[True]]))
    assert got.item() == pytest.approx(bce(3.0, 1.0), rel=1e-6)
    rebuilt = GradedBCELoss(**GradedBCELoss().get_config_dict())
    assert rebuilt.scale.item() == pytest.approx(20.0)


# ------------------------------------------------------------------------------- ListwiseMNR


def test_mnr_hand_value_graded_2x2():
    # B=2, G=2: columns 0,1 = query 0's items, 2,3 = query 1's items; scale 2
    loss = ListwiseMNRLoss(scale=2.0)
    sims = t([[0.8, 0.4, 0.1, 0.3], [0.2, 0.5, 0.0, 0.9]])
    targets = t([[1.0, 0.5], [0.0, 1.0]])
    mask = bmask([[True, True], [True, True]])
    r0 = [2 * x for x in (0.8, 0.4, 0.1, 0.3)]
    r1 = [2 * x for x in (0.2, 0.5, 0.0, 0.9)]
    expected = (soft_ce(r0, {0: 2 / 3, 1: 1 / 3}) + soft_ce(r1, {3: 1.0})) / 2
    assert loss(sims, targets, mask).item() == pytest.approx(expected, rel=1e-9)


def test_mnr_binary_equals_standard_mnr_with_hard_negatives_and_random_columns():
    g = torch.Generator().manual_seed(0)
    B, G, R = 3, 3, 2
    sims = torch.rand(B, B * G + R, generator=g, dtype=D) * 2 - 1
    pos = [2, 0, 1]
    targets = torch.zeros(B, G, dtype=D)
    for b, p in enumerate(pos):
        targets[b, p] = 1.0
    mask = torch.ones(B, G, dtype=torch.bool)
    labels = torch.tensor([b * G + p for b, p in enumerate(pos)])
    expected = F.cross_entropy(20.0 * sims, labels)
    got = ListwiseMNRLoss()(sims, targets, mask)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_mnr_graded_targets_change_loss_and_prefer_matching_order():
    loss = ListwiseMNRLoss(scale=5.0)
    mask = bmask([[True, True], [True, True]])
    sims = t([[0.8, 0.5, 0.1, 0.2], [0.0, 0.3, 0.7, 0.1]])
    graded = t([[1.0, 0.5], [1.0, 0.0]])
    binary = t([[1.0, 0.0], [1.0, 0.0]])
    assert loss(sims, graded, mask).item() != pytest.approx(loss(sims, binary, mask).item(), rel=1e-6)
    # own sims ordered like the targets (0.8 > 0.5) beat the swapped order
    swapped = sims.clone()
    swapped[0, 0], swapped[0, 1] = 0.5, 0.8
    assert loss(sims, graded, mask).item() < loss(swapped, graded, mask).item()


def test_mnr_rows_without_positive_are_skipped_and_all_skipped_is_zero_with_grad():
    loss = ListwiseMNRLoss(scale=1.0)
    mask = bmask([[True, True], [True, True]])
    sims = t([[0.8, 0.4, 0.1, 0.3], [0.2, 0.5, 0.0, 0.9]])
    targets = t([[1.0, 0.0], [0.0, 0.0]])
    expected = soft_ce([0.8, 0.4, 0.1, 0.3], {0: 1.0})  # only query 0 counts, mean over 1 row
    assert loss(sims, targets, mask).item() == pytest.approx(expected, rel=1e-9)
    # min_target: targets <= min_target count as no positive
    loss_min = ListwiseMNRLoss(scale=1.0, min_target=0.3)
    targets_low = t([[1.0, 0.2], [0.25, 0.0]])
    assert loss_min(sims, targets_low, mask).item() == pytest.approx(expected, rel=1e-9)
    # nobody has a positive: exact zero, still differentiable, no NaN
    x = sims.clone().requires_grad_(True)
    out = loss(x, torch.zeros(2, 2, dtype=D), mask)
    assert out.item() == 0.0 and out.grad_fn is not None
    out.backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_mnr_padding_is_ignored_and_grads_finite():
    # G=3 with query 0's third slot and query 1's second slot padded; garbage there
    loss = ListwiseMNRLoss(scale=3.0)
    mask = bmask([[True, True, False], [True, False, True]])
    targets = t([[0.5, 1.0, 9.0], [1.0, NAN, 0.25]])
    sims = t([[0.1, 0.7, NAN, 0.2, 1e6, 0.4], [0.3, 0.6, -1e6, 0.5, float("inf"), 0.9]])
    sims.requires_grad_(True)
    r0 = [3 * x for x in (0.1, 0.7, 0.2, 0.4)]  # valid columns 0,1,3,5
    r1 = [3 * x for x in (0.3, 0.6, 0.5, 0.9)]  # valid columns 0,1,3,5 (2 and 4 are padding)
    expected = (soft_ce(r0, {0: 1 / 3, 1: 2 / 3}) + soft_ce(r1, {2: 0.8, 3: 0.2})) / 2
    out = loss(sims, targets, mask)
    assert out.item() == pytest.approx(expected, rel=1e-9)
    out.backward()
    assert torch.isfinite(sims.grad).all()
    assert sims.grad[:, 2].abs().sum().item() == 0.0 and sims.grad[:, 4].abs().sum().item() == 0.0


def test_mnr_mask_all_and_same_item_exclude_columns():
    loss = ListwiseMNRLoss(scale=1.0)
    mask = bmask([[True, True], [True, True]])
    sims = t([[0.8, 0.4, 0.1, 0.3, 0.6], [0.2, 0.5, 0.0, 0.9, -0.2]])  # + 1 random column
    targets = t([[1.0, 0.0], [0.0, 1.0]])
    # query 1's item 1 (column 3) duplicates query 0's positive: drop it from query 0's softmax;
    # the same_item entry on query 1's own column must be ignored
    same = bmask([[False, False, False, True], [False, False, False, True]])
    expected = (soft_ce([0.8, 0.4, 0.1, 0.6], {0: 1.0}) + soft_ce([0.2, 0.5, 0.0, 0.9, -0.2], {3: 1.0})) / 2
    assert loss(sims, targets, mask, same_item=same).item() == pytest.approx(expected, rel=1e-9)
    # mask_all drops column 2 for query 0 (query 1's own item stays in its own softmax)
    mask_all = torch.tensor([True, True, False, True])
    expected2 = (soft_ce([0.8, 0.4, 0.3, 0.6], {0: 1.0}) + soft_ce([0.2, 0.5, 0.0, 0.9, -0.2], {3: 1.0})) / 2
    assert loss(sims, targets, mask, mask_all=mask_all).item() == pytest.approx(expected2, rel=1e-9)


def test_mnr_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ListwiseMNRLoss()(t([[0.1, 0.2, 0.3]]), t([[1.0, 0.0]]), bmask([[True, True, True]]))
    with pytest.raises(ValueError):
        ListwiseMNRLoss()(t([[0.1]]), t([[1.0, 0.0]]), bmask([[True, True]]))


# ----------------------------------------------------------------------------------- triplet


def test_triplet_hand_value_graded():
    loss = GradedTripletLoss(margin=0.3)
    sims = t([[0.6, 0.7, 0.1], [0.5, 0.45, 0.0]])
    targets = t([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)

    def h(ti, tj, si, sj):
        return max(0.0, 0.3 * (ti - tj) - (si - sj))

    pairs = [
        h(1.0, 0.5, 0.6, 0.7), h(1.0, 0.0, 0.6, 0.1), h(0.5, 0.0, 0.7, 0.1),  # query 0: 3 pairs
        h(1.0, 0.0, 0.5, 0.45), h(1.0, 0.0, 0.5, 0.0),  # query 1: 2 pairs, (1,2) equal targets
    ]
    expected = sum(pairs) / 5
    assert expected > 0
    assert loss(sims, targets, mask).item() == pytest.approx(expected, rel=1e-9)


def test_triplet_binary_is_standard_triplet_and_zero_when_satisfied():
    loss = GradedTripletLoss()  # margin 0.3
    mask = torch.ones(1, 2, dtype=torch.bool)
    targets = t([[1.0, 0.0]])
    assert loss(t([[0.5, 0.3]]), targets, mask).item() == pytest.approx(0.3 - 0.2, rel=1e-9)
    assert loss(t([[0.9, 0.5]]), targets, mask).item() == 0.0  # gap 0.4 >= 0.3
    assert loss(t([[0.1, 0.5]]), targets, mask).item() == pytest.approx(0.3 + 0.4, rel=1e-9)


def test_triplet_ignores_equal_targets_and_padding():
    loss = GradedTripletLoss(margin=0.3)
    # items 0 and 1 have equal targets and badly ordered sims: no pair between them
    sims = t([[0.2, 0.9, 0.0, 55.0]])
    targets = t([[0.5, 0.5, 0.0, 1.0]])
    mask = bmask([[True, True, True, False]])
    expected = (max(0.0, 0.15 - 0.2) + max(0.0, 0.15 - 0.9)) / 2
    assert loss(sims, targets, mask).item() == pytest.approx(expected, abs=1e-12)
    sims_bad = t([[0.2, 0.9, 0.1, -55.0]])  # only item 0 vs 2 violates now: 0.15 - 0.1
    assert loss(sims_bad, targets, mask).item() == pytest.approx(0.05 / 2, rel=1e-9)
    # no pair at all: zero with grad_fn
    x = t([[0.3, 0.1]]).requires_grad_(True)
    out = loss(x, t([[1.0, 1.0]]), bmask([[True, True]]))
    assert out.item() == 0.0 and out.grad_fn is not None
    out.backward()
    assert (x.grad == 0).all()


# ------------------------------------------------------------------------------------- mixed


def _mixed_batch():
    sims = t([[0.8, 0.4, 0.1, 0.3], [0.2, 0.5, 0.0, 0.9]])
    sims_random = t([[0.6, -0.1, 0.2], [0.7, 0.3, 0.1]])
    targets = t([[1.0, 0.5], [0.0, 1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    return sims, sims_random, targets, mask


def test_mixed_hand_value_mixture_partition():
    # n_in = 2, R = 3, K = 5, alpha = 0.5, scale = 2
    sims, sims_random, targets, mask = _mixed_batch()
    a, s, K, n_in, R = 0.5, 2.0, 5, 2, 3

    def row(own, inb, rnd, p):
        own_z = [s * x for x in own]
        Z = (
            sum(math.exp(z) for z in own_z)
            + K * (1 - a) / n_in * sum(math.exp(s * x) for x in inb)
            + K * a / R * sum(math.exp(s * x) for x in rnd)
        )
        return -sum(w * (own_z[i] - math.log(Z)) for i, w in p.items())

    expected = (
        row([0.8, 0.4], [0.1, 0.3], [0.6, -0.1, 0.2], {0: 2 / 3, 1: 1 / 3})
        + row([0.0, 0.9], [0.2, 0.5], [0.7, 0.3, 0.1], {1: 1.0})
    ) / 2
    got = MixedNegativesLoss(alpha=a, scale=s)(sims, sims_random, targets, mask)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_mixed_reduces_to_listwise_mnr_when_alpha_is_r_over_k():
    sims, sims_random, targets, mask = _mixed_batch()
    mixed = MixedNegativesLoss(alpha=3 / 5, scale=4.0)
    mnr = ListwiseMNRLoss(scale=4.0)
    expected = mnr(torch.cat([sims, sims_random], dim=1), targets, mask)
    assert torch.allclose(mixed(sims, sims_random, targets, mask), expected, rtol=1e-12)
    # and it is not the same at another alpha
    other = MixedNegativesLoss(alpha=0.1, scale=4.0)(sims, sims_random, targets, mask)
    assert other.item() != pytest.approx(expected.item(), rel=1e-6)
    # R = 0: plain listwise MNR whatever alpha
    empty = sims_random[:, :0]
    got = MixedNegativesLoss(alpha=0.7, scale=4.0)(sims, empty, targets, mask)
    assert torch.allclose(got, mnr(sims, targets, mask), rtol=1e-12)


def test_mixed_alpha_zero_is_mnr_without_random_columns():
    sims, sims_random, targets, mask = _mixed_batch()
    scale, K, n_in = 4.0, 5, 2
    got = MixedNegativesLoss(alpha=0.0, scale=scale)(sims, sims_random, targets, mask)
    # random values are irrelevant at alpha=0
    garbage = torch.full_like(sims_random, NAN)
    assert got.item() == pytest.approx(
        MixedNegativesLoss(alpha=0.0, scale=scale)(sims, garbage, targets, mask).item(), rel=1e-12
    )
    # = ListwiseMNR without the random columns, the in-batch negatives weighted K / n_in
    # (offset log(K / n_in) added to their logits, i.e. log(K / n_in) / scale to their sims)
    own = torch.tensor([[True, True, False, False], [False, False, True, True]])
    shifted = torch.where(own, sims, sims + math.log(K / n_in) / scale)
    expected = ListwiseMNRLoss(scale=scale)(shifted, targets, mask)
    assert torch.allclose(got, expected, rtol=1e-12)
    assert got.item() != pytest.approx(ListwiseMNRLoss(scale=scale)(sims, targets, mask).item(), rel=1e-6)


def test_mixed_alpha_one_drops_in_batch_negatives():
    sims, sims_random, targets, mask = _mixed_batch()
    loss = MixedNegativesLoss(alpha=1.0, scale=2.0)
    got = loss(sims, sims_random, targets, mask)
    sims_garbage = sims.clone()
    sims_garbage[0, 2:] = NAN
    sims_garbage[1, :2] = NAN
    assert got.item() == pytest.approx(loss(sims_garbage, sims_random, targets, mask).item(), rel=1e-12)
    # own + random with offset log(K / R) = log(5 / 3)
    off = math.log(5 / 3)
    r0 = [1.6, 0.8] + [2 * x + off for x in (0.6, -0.1, 0.2)]
    r1 = [0.0, 1.8] + [2 * x + off for x in (0.7, 0.3, 0.1)]
    expected = (soft_ce(r0, {0: 2 / 3, 1: 1 / 3}) + soft_ce(r1, {1: 1.0})) / 2
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_mixed_single_query_no_in_batch_negatives_and_grads():
    # B=1: no in-batch negatives; all negative mass on random items, offset 0
    sims = t([[0.7, 0.2]]).requires_grad_(True)
    rnd = t([[0.1, 0.4]]).requires_grad_(True)
    targets = t([[1.0, 0.0]])
    mask = bmask([[True, True]])
    out = MixedNegativesLoss(alpha=0.5, scale=1.0)(sims, rnd, targets, mask)
    assert out.item() == pytest.approx(soft_ce([0.7, 0.2, 0.1, 0.4], {0: 1.0}), rel=1e-9)
    out.backward()
    assert torch.isfinite(sims.grad).all() and torch.isfinite(rnd.grad).all()
    assert sims.grad.abs().sum() > 0 and rnd.grad.abs().sum() > 0


def test_mixed_rejects_bad_alpha():
    with pytest.raises(ValueError):
        MixedNegativesLoss(alpha=1.5)


# ------------------------------------------------------------------------------ all / registry


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_backward_finite_with_padding_garbage(name):
    mask = bmask([[True, True, False], [True, False, True]])
    targets = t([[1.0, 0.25, NAN], [0.5, 3.0, 0.0]])
    if name in ("bce", "triplet"):
        sims = t([[0.9, 0.2, NAN], [0.4, float("inf"), 0.6]]).requires_grad_(True)
        out = get_loss(name)(sims, targets, mask)
    elif name == "mnr":
        sims = t([[0.9, 0.2, NAN, 0.4, 1e9, 0.6], [0.1, 0.2, NAN, 0.4, -1e9, 0.6]]).requires_grad_(True)
        out = get_loss(name)(sims, targets, mask)
    elif name == "paced":  # one row of each mix
        sims = t([[0.9, 0.2, NAN, 0.4, 1e9, 0.6], [0.1, 0.2, NAN, 0.4, -1e9, 0.6]]).requires_grad_(True)
        out = get_loss(name)(sims, targets, targets, mask, torch.tensor([True, False]))
    else:
        sims = t([[0.9, 0.2, NAN, 0.4, 1e9, 0.6], [0.1, 0.2, NAN, 0.4, -1e9, 0.6]]).requires_grad_(True)
        rnd = t([[0.3], [-0.2]]).requires_grad_(True)
        out = get_loss(name)(sims, rnd, targets, mask)
    assert torch.isfinite(out) and out.item() > 0
    out.backward()
    grads = [sims.grad] + ([rnd.grad] if name == "mixed" else [])
    for gr in grads:
        assert gr is not None and torch.isfinite(gr).all()
    assert sims.grad.abs().sum().item() > 0


def test_get_loss_and_registry():
    assert set(LOSSES) == {"bce", "mnr", "triplet", "mixed", "paced"}
    assert isinstance(get_loss("mnr", scale=5.0), ListwiseMNRLoss)
    assert get_loss("mnr", scale=5.0).get_config_dict() == {"scale": 5.0, "min_target": 0.0}
    assert get_loss("mixed").get_config_dict() == {"alpha": 0.5, "scale": 20.0, "min_target": 0.0}
    assert get_loss("triplet").get_config_dict() == {"margin": 0.3}
    with pytest.raises(KeyError) as exc:
        get_loss("nope")
    msg = str(exc.value)
    assert "'nope'" in msg
    for name in LOSSES:
        assert name in msg
    assert set(L.__all__) >= {"GradedBCELoss", "ListwiseMNRLoss", "GradedTripletLoss", "MixedNegativesLoss", "LOSSES", "get_loss"}


def test_gathered_columns_of_other_ranks_are_in_batch_negatives():
    """Distributed: mask_all longer than B*G marks the other ranks' gathered items; they join the softmax as
    negatives (masked ones do not), and the random columns after them keep their mixed-negative offsets."""
    torch.manual_seed(0)
    b, g, other, r = 2, 2, 4, 3
    sims = torch.randn(b, b * g + other + r, dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    mask = torch.ones(b, g, dtype=torch.bool)
    mask_all = torch.tensor([True] * (b * g) + [True, False, True, True])
    got = ListwiseMNRLoss(scale=20.0)(sims, targets, mask, mask_all=mask_all)
    # by hand: query 0's softmax over its 2 own + other query's 2 + 3 valid gathered + 3 random columns
    keep = [c for c in range(sims.shape[1]) if c != b * g + 1]
    expect = []
    for q, tgt in ((0, [1.0, 0.0]), (1, [1.0, 0.0])):
        logits = 20.0 * sims[q, keep]
        logp = logits - torch.logsumexp(logits, 0)
        own = [keep.index(q * g + j) for j in range(g)]
        expect.append(-sum(t * logp[o] for t, o in zip(tgt, own)))
    assert torch.isclose(got, torch.stack(expect).mean())
    # mixed: the gathered columns count as in-batch negatives, not random items
    n_in = 2 + 3  # query's in-batch negatives: the other local query's 2 items + 3 valid gathered ones
    mixed = MixedNegativesLoss(alpha=r / (n_in + r), scale=20.0)
    got_mixed = mixed(sims[:, : b * g + other], sims[:, b * g + other:], targets, mask, mask_all=mask_all)
    assert torch.isclose(got_mixed, got)


# ------------------------------------------------------------------------------ paced


def test_paced_loss_is_bce_on_stage_1_groups_and_softmax_on_the_others():
    """Per mix: the stage-1 rows take the graded BCE on their own items, the full-mix rows the in-batch softmax
    (which still sees the stage-1 rows' items as negatives), each weighted by its share of the rows; all rows of
    one mix give that mix's loss alone; listwise: the in-batch softmax on every row."""
    torch.manual_seed(0)
    b, g = 4, 3
    sims = torch.randn(b, b * g, dtype=D).tanh()
    targets = t([[1.0, 0.2, 0.0], [0.8, 0.0, 0.0], [1.0, 0.2, 0.0], [0.8, 0.2, 0.0]])
    lt = targets.clone()
    mask = torch.ones(b, g, dtype=torch.bool)
    mask[3, 2] = False
    first = torch.tensor([True, False, True, False])
    loss = PacedLoss(scale=20.0)
    own = sims.reshape(b, b, g)[torch.arange(b), torch.arange(b)]
    bce = GradedBCELoss()(own, targets, mask & first.unsqueeze(1))
    assert torch.isclose(GradedBCELoss()(own[first], targets[first], mask[first]), bce)
    mnr = ListwiseMNRLoss(scale=20.0)(sims, torch.where(first.unsqueeze(1), 0.0, lt), mask)
    # by hand, row 1's softmax: every valid column of the batch (rows 0 and 2's items included)
    valid = mask.reshape(-1)
    logp = torch.log_softmax(20.0 * sims[1, valid], 0)
    cols = torch.arange(b * g)[valid]
    row1 = -sum(lt[1, j] / lt[1].sum() * logp[(cols == 1 * g + j).nonzero()[0, 0]] for j in range(g))
    logp3 = torch.log_softmax(20.0 * sims[3, valid], 0)
    row3 = -sum(lt[3, j] / lt[3].sum() * logp3[(cols == 3 * g + j).nonzero()[0, 0]] for j in range(2))
    assert torch.isclose(mnr, (row1 + row3) / 2)
    assert torch.isclose(loss(sims, targets, lt, mask, first), 0.5 * bce + 0.5 * mnr)
    every = torch.ones(b, dtype=torch.bool)
    assert torch.isclose(loss(sims, targets, lt, mask, every), GradedBCELoss()(own, targets, mask))
    assert torch.isclose(loss(sims, targets, lt, mask, ~every), ListwiseMNRLoss(scale=20.0)(sims, lt, mask))
    assert torch.isclose(PacedLoss(scale=20.0, listwise=True)(sims, targets, lt, mask, first),
                         ListwiseMNRLoss(scale=20.0)(sims, lt, mask))
    # the BCE's learnable temperature trains with the rest
    assert {n for n, _ in loss.named_parameters()} == {"bce.log_scale", "bce.bias"}
    with pytest.raises(ValueError, match="first must be"):
        loss(sims, targets, lt, mask, first[:2])
