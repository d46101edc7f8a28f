"""The five refinement losses of a chunk refined over K inner steps, and their weighted total.

DESIGN.md, "The algorithm, precisely" (Training): final CE, masked CE (deep supervision), halt BCE, ponder cost
and the keep KL; total = sum of lambda_* x loss with the lambdas from RecursiveConfig. (There is no length loss:
how much a chunk commits is the label-free commit rule of rkl.model.commit.)

Conventions shared by every function here:

- Shapes: B rows, W chunk positions, V vocabulary, K inner steps.
  ``step_logits[t]`` is [B, W, V] and already aligned (entry [:, j] predicts chunk position j);
  ``commit_logits[t]`` is [B]; ``step_inputs[t]`` is [B, W] long (the tokens step t + 1 read).
- Loss positions are ``loss_mask`` (positions holding a model-sampled token or a model draft). The leakage rule
  lives in the caller, which must never put a position whose target is visible in the chunk into ``loss_mask``;
  the CE terms read targets only at ``loss_mask`` positions, the keep term reads none.
- Masked means divide by ``max(count, 1)``: an empty mask gives exactly 0, never NaN. Across data-parallel
  processes the caller passes the count instead (``counts``: the whole global batch's, divided by the number of
  processes), so that the processes' averaged gradients are those of the global batch's token-level mean.
  Masked-out entries are removed with ``torch.where`` (never filled with -inf), and targets outside the mask are
  replaced by class 0 before the gather, so padding ids such as -100 are harmless.
- Token-level means: a CE is averaged over all loss positions of the batch together (rows with more loss
  positions weigh more), not as a mean of per-row means.
- Everything is computed in float32 (bf16 logits are upcast; the gradient flows through the cast).
- Every loss is a 0-dim tensor connected to its inputs' graph, even when it is 0 (empty mask, K == 1), so
  ``total.backward()`` never fails because one term happened to be constant.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rkl.model.commit import commit_lengths  # the one definition of the commit rule

LOSS_NAMES: tuple[str, ...] = ("final", "masked", "halt", "ponder", "keep")
"""The keys of `refinement_losses` and the suffixes of the config's ``lambda_*`` fields, in order."""


# --- helpers -------------------------------------------------------------------------------------------

def _check_steps(name: str, seq: Sequence[Tensor]) -> int:
    if len(seq) == 0:
        raise ValueError(f"{name}: expected one tensor per inner step (K >= 1), got an empty list")
    return len(seq)


def _masked_mean(values: Tensor, mask: Tensor, count: Tensor | None = None) -> Tensor:
    """sum(values[mask]) / max(count(mask), 1), or / `count` where given; 0 (with a grad path) for an empty mask."""
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / (mask.sum().clamp(min=1) if count is None else count).to(values.dtype)


def _token_ce(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-position CE [B, W] = logsumexp(z) - z[target], float32; positions outside the mask use class 0."""
    safe_targets = targets.masked_fill(~loss_mask, 0)
    logits = logits.float()
    return F.cross_entropy(logits.flatten(0, -2), safe_targets.flatten(), reduction="none").view_as(targets)


def _zero_like_graph(t: Tensor) -> Tensor:
    """A float32 0-dim zero that is still connected to ``t``'s graph."""
    return t.float().sum() * 0.0


# --- 1, 2: cross-entropies -----------------------------------------------------------------------------

def final_ce(step_logits: Sequence[Tensor], targets: Tensor, loss_mask: Tensor, count: Tensor | None = None
             ) -> Tensor:
    """Final-step CE at the loss positions.

    final = sum_{b,j: mask[b,j]} CE(step_logits[K-1][b, j], targets[b, j]) / max(#mask, 1),
    with CE(z, y) = logsumexp(z) - z[y]. Token-level mean over the whole batch; 0 for an empty mask.
    """
    _check_steps("step_logits", step_logits)
    return _masked_mean(_token_ce(step_logits[-1], targets, loss_mask), loss_mask, count)


def masked_ce(step_logits: Sequence[Tensor], targets: Tensor, loss_mask: Tensor, count: Tensor | None = None
              ) -> Tensor:
    """Deep supervision: the mean over inner steps of the masked CE.

    masked = (1/K) sum_{t=1..K} [ sum_{b,j: mask[b,j]} CE(step_logits[t][b, j], targets[b, j]) / max(#mask, 1) ].
    The loss positions are the same at every step, so this equals the mean CE over all (step, loss position)
    pairs. With K == 1 it equals `final_ce`.
    """
    k = _check_steps("step_logits", step_logits)
    per_step = [_masked_mean(_token_ce(z, targets, loss_mask), loss_mask, count) for z in step_logits]
    return torch.stack(per_step).sum() / k


# --- 3: halting BCE ------------------------------------------------------------------------------------

@torch.no_grad()
def halt_targets(step_inputs: Sequence[Tensor], final_tokens: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """y [B, K] float: y[b, t] = 1.0 iff stopping at step t loses nothing in row b: the tokens a stop there would
    commit are all right, or they are exactly what running all K steps commits.

    A step that stops commits the tokens it was run on, ``step_inputs[t]`` (the chunk for t = 1, else step t-1's
    output), cut by the commit rule (`rkl.model.commit.commit_lengths`: up to and including the first position whose
    token differed from the chunk as it came in, ``step_inputs[0]``, at any step so far); running all K steps
    commits ``final_tokens`` cut the same way. So the head learns to stop once refinement will not change the commit any more (cheap chunks), and
    to go on while it still will, unless what it has is already right. Vacuously 1.0 for a row without valid
    positions. No gradient.
    """
    draft = step_inputs[0]
    idx = torch.arange(draft.shape[1], device=draft.device).unsqueeze(0)

    def committed(changed: Tensor) -> tuple[Tensor, Tensor]:
        n = commit_lengths(changed, valid)
        return n, idx < n.unsqueeze(1)

    # a stop at step t cuts at the first position changed at any step before it (step_inputs[1..t-1] are outputs)
    ever = torch.zeros_like(draft, dtype=torch.bool)
    changed_before = []
    for tokens in step_inputs:
        ever = ever | (tokens != draft)
        changed_before.append(ever)
    n_end, _ = committed(ever | (final_tokens != draft))
    ys = []
    for tokens, changed in zip(step_inputs, changed_before):
        n, inside = committed(changed)
        right = ((tokens == targets) | ~inside).all(dim=-1)
        same = (n == n_end) & ((tokens == final_tokens) | ~inside).all(dim=-1)
        ys.append(right | same)
    return torch.stack(ys, dim=1).float()


def halt_loss(commit_logits: Sequence[Tensor], step_inputs: Sequence[Tensor], final_tokens: Tensor,
              targets: Tensor, valid: Tensor) -> Tensor:
    """Halting BCE: teach the commit head "would stopping now lose nothing?".

    halt = (1/(B*K)) sum_{b,t} BCEwithLogits(c[b,t], y[b,t]),
    BCEwithLogits(c, y) = -(y * log sigmoid(c) + (1-y) * log(1 - sigmoid(c))) = softplus(c) - y*c,
    with y from `halt_targets` (detached).
    """
    k = _check_steps("commit_logits", commit_logits)
    if len(step_inputs) != k:
        raise ValueError(f"commit_logits has {k} steps but step_inputs has {len(step_inputs)}")
    c = torch.stack([x.float() for x in commit_logits], dim=1)          # [B, K]
    y = halt_targets(step_inputs, final_tokens, targets, valid).to(c.device)
    return F.binary_cross_entropy_with_logits(c, y, reduction="mean")


# --- 4: halting distribution and ponder cost -----------------------------------------------------------

def halting_distribution(commit_logits: Sequence[Tensor]) -> Tensor:
    """q [B, K]: the probability that the inner loop stops after step t (t = 1..K).

    With p_t = sigmoid(c_t):  q_t = p_t * prod_{s<t} (1 - p_s) for t < K,
                              q_K = prod_{s<K} (1 - p_s)   (the remainder mass: the loop always stops at K),
    so every row sums to 1 and c_K does not enter q. Computed in log space (log(1 - p) = logsigmoid(-c)),
    so saturated logits give 0/1 probabilities, never NaN.
    """
    _check_steps("commit_logits", commit_logits)
    c = torch.stack([x.float() for x in commit_logits], dim=1)          # [B, K]
    log_keep = F.logsigmoid(-c)                                         # log(1 - p_t)
    # log prod_{s<t}(1 - p_s): exclusive cumulative sum (the pad keeps the graph even when K == 1).
    log_surv = F.pad(torch.cumsum(log_keep, dim=1)[:, :-1], (1, 0))
    stop_here = torch.exp(F.logsigmoid(c[:, :-1]) + log_surv[:, :-1])  # q_t, t < K
    return torch.cat([stop_here, torch.exp(log_surv[:, -1:])], dim=1)


def ponder_loss(commit_logits: Sequence[Tensor]) -> Tensor:
    """Ponder cost: the expected number of inner steps, averaged over rows.

    ponder = (1/B) sum_b sum_{t=1..K} t * q[b, t], q = `halting_distribution`. Lies in [1, K]; differentiable
    through p_commit (for K >= 2, d ponder / d c_1 = -p_1 (1 - p_1) * (sum of later step counts) != 0).
    """
    q = halting_distribution(commit_logits)
    steps = torch.arange(1, q.shape[1] + 1, dtype=q.dtype, device=q.device)
    return (q * steps).sum(dim=1).mean()


# --- 5: keep KL ---------------------------------------------------------------------------------------

def keep_positions(valid: Tensor, loss_mask: Tensor, chunk: Tensor, targets: Tensor) -> Tensor:
    """[B, W] bool: the keep term's positions, valid positions that hold the true token, either because they were
    not corrupted or because the model's own token there (in the chunk as built) is right."""
    return valid & (~loss_mask | (chunk == targets))


def keep_loss(step_logits: Sequence[Tensor], keep_mask: Tensor, count: Tensor | None = None) -> Tensor:
    """KL from step 1's predictive distribution to each later step's, at the keep positions.

    keep = (1/(K-1)) sum_{t=2..K} [ sum_{b,j: keep_mask} KL(sg(P_1) || P_t)[b,j] / max(#keep_mask, 1) ],
    KL(p || q) = sum_v p_v (log p_v - log q_v), P_t = softmax(step_logits[t]), sg = stop-gradient.
    Keep positions (chosen by the caller) hold the true token: a refinement that moves the prediction there away
    from the unrefined one (step 1) pays. The term reads no target itself.
    K == 1 gives 0, still connected to ``step_logits[0]``'s graph.
    """
    k = _check_steps("step_logits", step_logits)
    if k == 1:
        return _zero_like_graph(step_logits[0])
    logp_first = F.log_softmax(step_logits[0].detach().float(), dim=-1)
    per_step = []
    for cur in step_logits[1:]:
        logp_cur = F.log_softmax(cur.float(), dim=-1)
        kl = (logp_first.exp() * (logp_first - logp_cur)).sum(dim=-1)    # [B, W]
        per_step.append(_masked_mean(kl, keep_mask, count))
    return torch.stack(per_step).sum() / (k - 1)


# --- all five, and the weighted total -------------------------------------------------------------------

def refinement_losses(step_logits: Sequence[Tensor], commit_logits: Sequence[Tensor],
                      step_inputs: Sequence[Tensor], final_tokens: Tensor, targets: Tensor, loss_mask: Tensor,
                      valid: Tensor, counts: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """All five refinement losses, keyed by `LOSS_NAMES` (final, masked, halt, ponder, keep).

    ``step_inputs[t]``: the chunk step t + 1 read (``step_inputs[0]`` is the chunk as built); ``final_tokens``: the
    tokens after step K. Keep positions (`keep_positions`): a refinement that damages a right token pays.
    counts: (loss positions, keep positions) to divide the token-level means by instead of this batch's own counts
    (data parallel: the global batch's counts / processes). The row means (halt, ponder) need none: every process
    holds the same number of rows.
    """
    loss_count, keep_count = counts if counts is not None else (None, None)
    k = _check_steps("step_logits", step_logits)
    if len(commit_logits) != k:
        raise ValueError(f"step_logits has {k} steps but commit_logits has {len(commit_logits)}")
    return {
        "final": final_ce(step_logits, targets, loss_mask, loss_count),
        "masked": masked_ce(step_logits, targets, loss_mask, loss_count),
        "halt": halt_loss(commit_logits, step_inputs, final_tokens, targets, valid),
        "ponder": ponder_loss(commit_logits),
        "keep": keep_loss(step_logits, keep_positions(valid, loss_mask, step_inputs[0], targets), keep_count),
    }


def total_loss(terms: dict[str, Tensor], config: Any) -> Tensor:
    """total = sum over name in LOSS_NAMES of config.lambda_<name> * terms[name].

    ``config`` is a RecursiveConfig (any object with the six ``lambda_*`` attributes). Every name must be in
    ``terms``: a missing term is a bug in the caller, not a silent zero.
    """
    missing = [n for n in LOSS_NAMES if n not in terms]
    if missing:
        raise KeyError(f"total_loss: missing loss term(s) {', '.join(missing)}")
    return sum((float(getattr(config, f"lambda_{n}")) * terms[n] for n in LOSS_NAMES[1:]),
               start=float(getattr(config, f"lambda_{LOSS_NAMES[0]}")) * terms[LOSS_NAMES[0]])
