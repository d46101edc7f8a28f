"""The refinement losses (rkl.train.losses): hand-computed values, empty masks, gradient paths.

Expected values are computed here with plain math.log / math.exp arithmetic on Python lists, never by calling
the torch function under test. Tiny example: B=2 rows, W=3 positions, V=3 classes, K=2 inner steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rkl import RecursiveConfig
from rkl.train.losses import (
    LOSS_NAMES,
    final_ce,
    halt_loss,
    halt_targets,
    halting_distribution,
    length_loss,
    length_targets,
    masked_ce,
    ponder_loss,
    refinement_losses,
    stability_loss,
    total_loss,
)

# --- the tiny example ----------------------------------------------------------------------------------

# step 1 logits [B=2][W=3][V=3]
L1 = [
    [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]],
    [[0.3, 0.2, 0.1], [1.0, 0.9, 0.0], [0.0, -1.0, 2.0]],
]
# step 2 logits
L2 = [
    [[2.0, 0.0, -1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
    [[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 3.0]],
]
TARGETS = [[0, 1, 2], [1, 0, 2]]
# Row 0 has one loss position, row 1 has two: token mean != mean of row means.
MASK = [[True, False, False], [False, True, True]]
LOSS_POS = [(0, 0), (1, 1), (1, 2)]
COMMIT = [[-1.0, 0.5], [2.0, -0.3]]  # commit logits per step: COMMIT[t][b]


def ce(z: list[float], y: int) -> float:
    return math.log(sum(math.exp(v) for v in z)) - z[y]


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    s = sum(e)
    return [v / s for v in e]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(c: float, y: float) -> float:
    p = sigmoid(c)
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def t(x, **kw) -> torch.Tensor:
    return torch.tensor(x, **kw)


def steps(requires_grad: bool = False) -> list[torch.Tensor]:
    return [t(L1, requires_grad=requires_grad), t(L2, requires_grad=requires_grad)]


def targets() -> torch.Tensor:
    return t(TARGETS, dtype=torch.long)


def mask() -> torch.Tensor:
    return t(MASK)


def empty_mask() -> torch.Tensor:
    return torch.zeros(2, 3, dtype=torch.bool)


def commits(requires_grad: bool = False) -> list[torch.Tensor]:
    return [t(c, requires_grad=requires_grad) for c in COMMIT]


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# --- 1, 2: cross-entropies -----------------------------------------------------------------------------

def test_final_ce_hand_value_is_token_mean_of_last_step():
    expected = sum(ce(L2[b][j], TARGETS[b][j]) for b, j in LOSS_POS) / 3
    assert_close(final_ce(steps(), targets(), mask()), scalar(expected))
    # Not the mean of per-row means (row 0 has 1 loss position, row 1 has 2).
    row_means = (ce(L2[0][0], 0) + (ce(L2[1][1], 0) + ce(L2[1][2], 2)) / 2) / 2
    assert abs(expected - row_means) > 1e-3


def test_final_ce_ignores_positions_outside_the_mask():
    base = final_ce(steps(), targets(), mask())
    changed = steps()
    changed[1][0, 1] = t([9.0, -7.0, 3.0])   # row 0, position 1: not a loss position
    changed[1][1, 0] = t([-4.0, 5.0, 0.0])   # row 1, position 0: not a loss position
    changed[0] = changed[0] * 10.0           # an earlier step: final CE reads only the last
    assert_close(final_ce(changed, targets(), mask()), base, rtol=0, atol=0)
    # Padding targets outside the mask (e.g. -100) are harmless.
    padded = targets().masked_fill(~mask(), -100)
    assert_close(final_ce(steps(), padded, mask()), base, rtol=0, atol=0)


def test_masked_ce_hand_value_is_mean_over_steps():
    per_step = [sum(ce(L[b][j], TARGETS[b][j]) for b, j in LOSS_POS) / 3 for L in (L1, L2)]
    assert_close(masked_ce(steps(), targets(), mask()), scalar(sum(per_step) / 2))


# --- 3: halt -------------------------------------------------------------------------------------------

def test_halt_targets_and_loss_hand_value():
    # Argmax at the loss positions: step 1, row 0 pos 0 -> [0,1,0] argmax 1 != target 0: wrong.
    # Step 1, row 1: pos 1 [1,.9,0] -> 0 ok, pos 2 [0,-1,2] -> 2 ok.  Step 2: all right.
    y = [[0.0, 1.0], [1.0, 1.0]]  # y[b][t]
    assert_close(halt_targets(steps(), targets(), mask()), t(y))
    expected = sum(bce(COMMIT[k][b], y[b][k]) for b in range(2) for k in range(2)) / 4
    assert_close(halt_loss(commits(), steps(), targets(), mask()), scalar(expected))


def test_halt_targets_row_without_loss_positions_is_one():
    m = mask()
    m[0] = False  # row 0: no loss positions -> y = 1 even though its step-1 argmax is wrong at pos 0
    assert_close(halt_targets(steps(), targets(), m), t([[1.0, 1.0], [1.0, 1.0]]))


def test_halt_targets_carry_no_gradient():
    z = steps(requires_grad=True)
    c = commits(requires_grad=True)
    halt_loss(c, z, targets(), mask()).backward()
    assert all(x.grad is None for x in z)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in c)


# --- 4: length -----------------------------------------------------------------------------------------

def test_length_targets_hand_made_drafts():
    tg = t([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafts = t([
        [5, 6, 7, 8],  # all right, all valid -> 4
        [0, 6, 7, 8],  # first wrong -> 0, floored to 1
        [5, 6, 7, 8],  # all right, EOS at position 1 (2 valid) -> capped at 2
        [5, 6, 0, 8],  # right prefix of 2 (a later right token does not extend it) -> 2
        [5, 6, 7, 8],  # no valid position at all -> 1
    ])
    valid = t([[True] * 4, [True] * 4, [True, True, False, False], [True] * 4, [False] * 4])
    lm = torch.ones(5, 4, dtype=torch.bool)
    out = length_targets(drafts, tg, valid, lm)
    assert out.dtype == torch.long
    assert out.tolist() == [4, 1, 2, 2, 1]
    # The mask does not change B* (positions outside it hold the input token, compared like any other).
    assert length_targets(drafts, tg, valid, torch.zeros_like(lm)).tolist() == [4, 1, 2, 2, 1]


def test_length_loss_hand_value():
    valid = t([[True, True, True], [True, True, False]])  # row 1: EOS at position 1
    drafts = [
        t([[0, 1, 0], [2, 0, 2]]),  # B* = 2 (cls 1); B* = 0 -> 1 (cls 0)
        t([[0, 1, 2], [1, 0, 2]]),  # B* = 3 (cls 2); B* = 3 capped at 2 valid (cls 1)
    ]
    LL = [
        [[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, -1.0, 0.5]],
        [[0.0, 0.0, 2.0, 0.0], [-0.5, 1.5, 0.0, 0.0]],
    ]
    cls = [[1, 0], [2, 1]]  # cls[t][b]
    expected = sum(ce(LL[k][b], cls[k][b]) for k in range(2) for b in range(2)) / 4
    got = length_loss([t(x) for x in LL], drafts, targets(), valid, mask())
    assert_close(got, scalar(expected))


def test_length_loss_clamps_class_to_head_size():
    # B* = 3 but the head only has L = 2 classes: the target is the largest class (index 1).
    z = [0.3, -0.2]
    got = length_loss([t([z])], [t([[0, 1, 2]])], t([[0, 1, 2]]), t([[True] * 3]), t([[True] * 3]))
    assert_close(got, scalar(ce(z, 1)))


# --- 5: halting distribution and ponder ----------------------------------------------------------------

def test_halting_distribution_hand_value_k3():
    c = [[-1.0, 0.0], [0.5, 2.0], [3.0, -2.0]]  # c[t][b]
    q = halting_distribution([t(x) for x in c])
    expected = []
    for b in range(2):
        p1, p2 = sigmoid(c[0][b]), sigmoid(c[1][b])
        expected.append([p1, (1 - p1) * p2, (1 - p1) * (1 - p2)])  # c_3 does not enter
    assert_close(q, t(expected))


def test_halting_distribution_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    c = [torch.randn(5, generator=g) * 4 for _ in range(4)]
    c[0][0], c[1][1], c[2][2] = 60.0, -60.0, 60.0  # saturated logits: still finite
    q = halting_distribution(c)
    assert q.shape == (5, 4)
    assert torch.isfinite(q).all() and (q >= 0).all()
    assert_close(q.sum(dim=1), torch.ones(5))


def test_ponder_hand_value_k2():
    # q = [p1, 1 - p1] per row; expected steps = p1 + 2 (1 - p1) = 2 - p1.
    expected = sum(2.0 - sigmoid(COMMIT[0][b]) for b in range(2)) / 2
    assert_close(ponder_loss(commits()), scalar(expected))


def test_ponder_has_gradient_into_commit_logits():
    c = commits(requires_grad=True)
    ponder_loss(c).backward()
    # d/dc1 (2 - sigmoid(c1)) / B = -p (1 - p) / 2
    expected = [-sigmoid(x) * (1 - sigmoid(x)) / 2 for x in COMMIT[0]]
    assert_close(c[0].grad, t(expected))
    assert c[0].grad.abs().min() > 0
    # The last step's logit does not enter q (the loop stops at K anyway).
    assert c[1].grad is None or (c[1].grad == 0).all()


# --- 6: stability --------------------------------------------------------------------------------------

def test_stability_hand_value():
    total = 0.0
    for b, j in LOSS_POS:
        p, q = softmax(L1[b][j]), softmax(L2[b][j])
        total += sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))
    assert_close(stability_loss(steps(), mask()), scalar(total / 3))


def test_stability_gradient_only_into_later_step():
    z = steps(requires_grad=True)
    stability_loss(z, mask()).backward()
    assert z[0].grad is None or (z[0].grad == 0).all()
    assert z[1].grad is not None and z[1].grad.abs().sum() > 0
    # Only at loss positions.
    assert (z[1].grad[~mask()] == 0).all()


def test_stability_k1_is_zero_with_grad_path():
    z = [t(L1, requires_grad=True)]
    out = stability_loss(z, mask())
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert (z[0].grad == 0).all()


# --- empty masks, totals -------------------------------------------------------------------------------

def test_every_loss_is_finite_with_an_all_false_mask():
    z = steps(requires_grad=True)
    c = commits(requires_grad=True)
    ll = [torch.randn(2, 4, requires_grad=True) for _ in range(2)]
    drafts = [x.argmax(-1) for x in steps()]
    valid = torch.ones(2, 3, dtype=torch.bool)
    em = empty_mask()
    outs = {
        "final": final_ce(z, targets(), em),
        "masked": masked_ce(z, targets(), em),
        "halt": halt_loss(c, z, targets(), em),
        "len": length_loss(ll, drafts, targets(), valid, em),
        "ponder": ponder_loss(c),
        "stability": stability_loss(z, em),
    }
    for name, v in outs.items():
        assert v.dim() == 0 and torch.isfinite(v), name
        assert v.requires_grad, name
    assert outs["final"].item() == 0.0 and outs["masked"].item() == 0.0 and outs["stability"].item() == 0.0
    # Empty mask: every row has y = 1 at every step.
    expected_halt = sum(bce(COMMIT[k][b], 1.0) for b in range(2) for k in range(2)) / 4
    assert_close(outs["halt"], scalar(expected_halt))
    # Also no valid positions at all: B* = 1 for every row, still finite.
    assert length_targets(drafts[0], targets(), torch.zeros_like(valid), em).tolist() == [1, 1]
    total = sum(outs.values())
    total.backward()
    for x in z + c + ll:
        assert x.grad is not None and torch.isfinite(x.grad).all()
    # The CE/KL terms contribute no gradient at all with an empty mask.
    assert (z[0].grad == 0).all()


def test_refinement_losses_keys_and_disabled_length_head():
    z, c = steps(), commits()
    valid = torch.ones(2, 3, dtype=torch.bool)
    drafts = [x.argmax(-1) for x in z]
    terms = refinement_losses(z, c, None, None, targets(), mask(), valid)
    assert tuple(terms) == LOSS_NAMES
    assert terms["len"].item() == 0.0
    assert_close(terms["final"], final_ce(z, targets(), mask()))
    assert_close(terms["stability"], stability_loss(z, mask()))
    ll = [torch.zeros(2, 4), torch.zeros(2, 4)]
    terms = refinement_losses(z, c, ll, drafts, targets(), mask(), valid)
    assert_close(terms["len"], scalar(math.log(4.0)))  # uniform over 4 classes
    assert all(torch.isfinite(v) for v in terms.values())


def test_total_loss_weights_terms_by_config_lambdas():
    cfg = RecursiveConfig(lambda_final=2.0, lambda_masked=0.5, lambda_halt=0.25, lambda_len=0.0,
                          lambda_ponder=0.125, lambda_stability=3.0)
    values = {"final": 1.0, "masked": 2.0, "halt": 4.0, "len": 100.0, "ponder": 8.0, "stability": 0.5}
    terms = {k: scalar(v) for k, v in values.items()}
    expected = 2.0 * 1.0 + 0.5 * 2.0 + 0.25 * 4.0 + 0.0 * 100.0 + 0.125 * 8.0 + 3.0 * 0.5
    assert_close(total_loss(terms, cfg), scalar(expected))
    with pytest.raises(KeyError, match="ponder"):
        total_loss({k: v for k, v in terms.items() if k != "ponder"}, cfg)


def test_end_to_end_bf16_batch_backpropagates():
    g = torch.Generator().manual_seed(1)
    B, W, V, K, L = 3, 5, 11, 3, 8
    z = [torch.randn(B, W, V, generator=g).bfloat16().requires_grad_() for _ in range(K)]
    c = [torch.randn(B, generator=g).requires_grad_() for _ in range(K)]
    ll = [torch.randn(B, L, generator=g).requires_grad_() for _ in range(K)]
    tg = torch.randint(0, V, (B, W), generator=g)
    lm = torch.rand(B, W, generator=g) < 0.5
    lm[0] = False  # one row without loss positions
    valid = torch.ones(B, W, dtype=torch.bool)
    valid[2, 3:] = False
    drafts = [torch.where(lm, x.argmax(-1), tg) for x in z]
    terms = refinement_losses(z, c, ll, drafts, tg, lm, valid)
    total = total_loss(terms, RecursiveConfig())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    for x in z + c + ll:
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()
