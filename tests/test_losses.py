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
    keep_loss,
    keep_positions,
    masked_ce,
    ponder_loss,
    refinement_losses,
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

DRAFT = [[0, 1, 2], [1, 1, 2]]    # the chunk as built: row 0 right, row 1 wrong at position 1
AFTER1 = [[0, 1, 2], [1, 0, 0]]   # after step 1: row 1 changed positions 1 (right) and 2 (wrong)


FINAL = [[0, 1, 2], [1, 0, 0]]    # after step 2 (the last): what running all steps commits is cut from this


def inputs() -> list[torch.Tensor]:
    return [t(DRAFT), t(AFTER1)]


def final() -> torch.Tensor:
    return t(FINAL)


def test_halt_targets_judge_what_a_stop_would_commit():
    # Stop at step 1: commits the draft whole (nothing changed yet): row 0 right, row 1 wrong at 1 and not what
    # the end commits. Stop at step 2: commits step 1's tokens up to and including the first change: row 1 commits
    # [1, 0] (right); its wrong position 2 lies after the first change and is not committed.
    valid = torch.ones(2, 3, dtype=torch.bool)
    y = [[1.0, 1.0], [0.0, 1.0]]
    assert_close(halt_targets(inputs(), final(), targets(), valid), t(y))
    expected = sum(bce(COMMIT[k][b], y[b][k]) for b in range(2) for k in range(2)) / 4
    assert_close(halt_loss(commits(), inputs(), final(), targets(), valid), scalar(expected))


def test_halt_targets_stopping_early_loses_nothing_when_refinement_changes_nothing():
    wrong = t([[5, 5, 5]])
    y = halt_targets([wrong, wrong], wrong, t([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool))
    assert y.tolist() == [[1.0, 1.0]]  # wrong, but running on would commit the same tokens


def test_halt_targets_stop_at_the_row_end():
    valid = t([[True, True, True], [True, False, False]])  # row 1 ends after position 0 (its EOS)
    assert_close(halt_targets(inputs(), final(), targets(), valid), t([[1.0, 1.0], [1.0, 1.0]]))
    valid[0] = False  # a row without valid positions: vacuously right
    assert halt_targets(inputs(), final(), targets(), valid)[0].tolist() == [1.0, 1.0]


def test_halt_targets_carry_no_gradient():
    c = commits(requires_grad=True)
    halt_loss(c, inputs(), final(), targets(), torch.ones(2, 3, dtype=torch.bool)).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in c)


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


# --- 5: keep -------------------------------------------------------------------------------------------

def kl(p: list[float], q: list[float]) -> float:
    return sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))


KEEP_POS = [(0, 1), (0, 2), (1, 0)]  # valid and not a loss position


def test_keep_hand_value():
    total = sum(kl(softmax(L1[b][j]), softmax(L2[b][j])) for b, j in KEEP_POS)
    assert_close(keep_loss(steps(), ~mask()), scalar(total / 3))


def test_keep_compares_every_step_with_step_one():
    l3 = [[[v * 2 for v in row] for row in rows] for rows in L2]
    z = steps() + [t(l3)]
    per = [sum(kl(softmax(L1[b][j]), softmax(L[b][j])) for b, j in KEEP_POS) / 3 for L in (L2, l3)]
    assert_close(keep_loss(z, ~mask()), scalar(sum(per) / 2))


def test_keep_gradient_only_into_later_steps_at_keep_positions():
    z = steps(requires_grad=True)
    keep_loss(z, ~mask()).backward()
    assert z[0].grad is None or (z[0].grad == 0).all()
    assert z[1].grad is not None and z[1].grad.abs().sum() > 0
    assert (z[1].grad[mask()] == 0).all()


def test_keep_k1_is_zero_with_grad_path():
    z = [t(L1, requires_grad=True)]
    out = keep_loss(z, mask())
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert (z[0].grad == 0).all()


# --- empty masks, totals -------------------------------------------------------------------------------

def test_every_loss_is_finite_with_an_all_false_mask():
    z = steps(requires_grad=True)
    c = commits(requires_grad=True)
    em = empty_mask()
    outs = {
        "final": final_ce(z, targets(), em),
        "masked": masked_ce(z, targets(), em),
        "halt": halt_loss(c, inputs(), final(), targets(), em),
        "ponder": ponder_loss(c),
        "keep": keep_loss(z, em),
    }
    for name, v in outs.items():
        assert v.dim() == 0 and torch.isfinite(v), name
        assert v.requires_grad, name
    assert outs["final"].item() == 0.0 and outs["masked"].item() == 0.0 and outs["keep"].item() == 0.0
    # No valid position: every row has y = 1 at every step.
    expected_halt = sum(bce(COMMIT[k][b], 1.0) for b in range(2) for k in range(2)) / 4
    assert_close(outs["halt"], scalar(expected_halt))
    total = sum(outs.values())
    total.backward()
    for x in z + c:
        assert x.grad is not None and torch.isfinite(x.grad).all()
    # The CE/KL terms contribute no gradient at all with an empty mask.
    assert (z[0].grad == 0).all()


def test_refinement_losses_keys_and_positions():
    z, c = steps(), commits()
    valid = t([[True, True, False], [True, True, True]])
    terms = refinement_losses(z, c, inputs(), final(), targets(), mask(), valid)
    assert tuple(terms) == LOSS_NAMES
    assert_close(terms["final"], final_ce(z, targets(), mask()))
    # keep: valid positions holding the true token: not a loss position, or a loss position whose token is right
    # (row 0 position 0: the draft's 0 is its target)
    keep = valid & (~mask() | (inputs()[0] == targets()))
    assert keep[0, 0] and not keep[1, 1]
    assert_close(terms["keep"], keep_loss(z, keep))
    assert_close(terms["halt"], halt_loss(c, inputs(), final(), targets(), valid))
    assert all(torch.isfinite(v) for v in terms.values())


def test_total_loss_weights_terms_by_config_lambdas():
    cfg = RecursiveConfig(lambda_final=2.0, lambda_masked=0.5, lambda_halt=0.25, lambda_ponder=0.125,
                          lambda_keep=3.0)
    values = {"final": 1.0, "masked": 2.0, "halt": 4.0, "ponder": 8.0, "keep": 0.5}
    terms = {k: scalar(v) for k, v in values.items()}
    expected = 2.0 * 1.0 + 0.5 * 2.0 + 0.25 * 4.0 + 0.125 * 8.0 + 3.0 * 0.5
    assert_close(total_loss(terms, cfg), scalar(expected))
    with pytest.raises(KeyError, match="ponder"):
        total_loss({k: v for k, v in terms.items() if k != "ponder"}, cfg)


def test_end_to_end_bf16_batch_backpropagates():
    g = torch.Generator().manual_seed(1)
    B, W, V, K = 3, 5, 11, 3
    z = [torch.randn(B, W, V, generator=g).bfloat16().requires_grad_() for _ in range(K)]
    c = [torch.randn(B, generator=g).requires_grad_() for _ in range(K)]
    tg = torch.randint(0, V, (B, W), generator=g)
    lm = torch.rand(B, W, generator=g) < 0.5
    lm[0] = False  # one row without loss positions
    valid = torch.ones(B, W, dtype=torch.bool)
    valid[2, 3:] = False
    lm &= valid
    tokens = [torch.where(lm, x.argmax(-1), tg) for x in z]
    terms = refinement_losses(z, c, tokens, tokens[-1], tg, lm, valid)
    total = total_loss(terms, RecursiveConfig())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    for x in z + c:
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()


def test_slices_with_global_counts_average_to_the_whole_batch():
    """Data parallel: each process's slice divides its sums by the global batch's counts over the number of
    processes, so the mean of the slices' losses, and of their gradients, is the whole batch's. With each slice's
    own counts (the slices hold 1 and 5 loss positions here) it is not."""
    g = torch.Generator().manual_seed(2)
    B, W, V, K = 4, 5, 11, 3
    z = [torch.randn(B, W, V, generator=g).requires_grad_() for _ in range(K)]
    c = [torch.randn(B, generator=g).requires_grad_() for _ in range(K)]
    tg = torch.randint(0, V, (B, W), generator=g)
    valid = torch.ones(B, W, dtype=torch.bool)
    lm = torch.zeros(B, W, dtype=torch.bool)
    lm[0, 1] = True
    lm[2:, 2:] = True
    tokens = [torch.where(lm, x.argmax(-1), tg) for x in z]
    whole = refinement_losses(z, c, tokens, tokens[-1], tg, lm, valid)
    whole_grad = torch.autograd.grad(total_loss(whole, RecursiveConfig()), z + c)
    keep = keep_positions(valid, lm, tokens[0], tg)
    counts = (lm.sum().float() / 2, keep.sum().float() / 2)
    for split_counts, equal in ((counts, True), (None, False)):
        halves = []
        for rows in (slice(0, 2), slice(2, 4)):
            sl = lambda x: x[rows]  # noqa: E731
            halves.append(refinement_losses([sl(x) for x in z], [sl(x) for x in c], [sl(x) for x in tokens],
                                            sl(tokens[-1]), sl(tg), sl(lm), sl(valid), counts=split_counts))
        for name in LOSS_NAMES:
            same = torch.allclose((halves[0][name] + halves[1][name]) / 2, whole[name], atol=1e-6)
            assert same == equal or name in ("halt", "ponder"), (name, split_counts)  # row means: equal either way
        if equal:
            mean = (total_loss(halves[0], RecursiveConfig()) + total_loss(halves[1], RecursiveConfig())) / 2
            for a, b in zip(torch.autograd.grad(mean, z + c), whole_grad):
                assert torch.allclose(a, b, atol=1e-6)
