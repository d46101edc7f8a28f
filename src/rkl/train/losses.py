"""The six refinement losses of a chunk refined over K inner steps, and their weighted total.

DESIGN.md, "The algorithm, precisely" (Training): final CE, masked CE (deep supervision), halt BCE, length
CE, ponder cost and stability KL; total = sum of lambda_* x loss with the lambdas from RecursiveConfig.

Conventions shared by every function here:

- Shapes: B rows, W chunk positions, V vocabulary, K inner steps, L = max_chunk_len.
  ``step_logits[t]`` is [B, W, V] and already aligned (entry [:, j] predicts chunk position j);
  ``commit_logits[t]`` is [B]; ``length_logits[t]`` is [B, L]; ``drafts[t]`` is [B, W] long.
- Loss positions are ``loss_mask`` (editable positions holding a corrupted token or a model draft). The
  leakage rule lives in the caller, which must never put a position whose target is visible in the chunk
  into ``loss_mask``; these functions only ever read targets at ``loss_mask`` positions for the CE/KL terms.
- Masked means divide by ``max(count, 1)``: an empty mask gives exactly 0, never NaN. Masked-out entries
  are removed with ``torch.where`` (never filled with -inf), and targets outside the mask are replaced by
  class 0 before the gather, so padding ids such as -100 are harmless.
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

LOSS_NAMES: tuple[str, ...] = ("final", "masked", "halt", "len", "ponder", "stability")
"""The keys of `refinement_losses` and the suffixes of the config's ``lambda_*`` fields, in order."""


# --- helpers -------------------------------------------------------------------------------------------

def _check_steps(name: str, seq: Sequence[Tensor]) -> int:
    if len(seq) == 0:
        raise ValueError(f"{name}: expected one tensor per inner step (K >= 1), got an empty list")
    return len(seq)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """sum(values[mask]) / max(count(mask), 1); 0 (with a grad path) for an empty mask."""
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def _token_ce(logits: Tensor, targets: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-position CE [B, W] = logsumexp(z) - z[target], float32; positions outside the mask use class 0."""
    safe_targets = targets.masked_fill(~loss_mask, 0)
    logits = logits.float()
    return F.cross_entropy(logits.flatten(0, -2), safe_targets.flatten(), reduction="none").view_as(targets)


def _zero_like_graph(t: Tensor) -> Tensor:
    """A float32 0-dim zero that is still connected to ``t``'s graph."""
    return t.float().sum() * 0.0


# --- 1, 2: cross-entropies -----------------------------------------------------------------------------

def final_ce(step_logits: Sequence[Tensor], targets: Tensor, loss_mask: Tensor) -> Tensor:
    """Final-step CE at the loss positions.

    final = sum_{b,j: mask[b,j]} CE(step_logits[K-1][b, j], targets[b, j]) / max(#mask, 1),
    with CE(z, y) = logsumexp(z) - z[y]. Token-level mean over the whole batch; 0 for an empty mask.
    """
    _check_steps("step_logits", step_logits)
    return _masked_mean(_token_ce(step_logits[-1], targets, loss_mask), loss_mask)


def masked_ce(step_logits: Sequence[Tensor], targets: Tensor, loss_mask: Tensor) -> Tensor:
    """Deep supervision: the mean over inner steps of the masked CE.

    masked = (1/K) sum_{t=1..K} [ sum_{b,j: mask[b,j]} CE(step_logits[t][b, j], targets[b, j]) / max(#mask, 1) ].
    The loss positions are the same at every step, so this equals the mean CE over all (step, loss position)
    pairs. With K == 1 it equals `final_ce`.
    """
    k = _check_steps("step_logits", step_logits)
    per_step = [_masked_mean(_token_ce(z, targets, loss_mask), loss_mask) for z in step_logits]
    return torch.stack(per_step).sum() / k


# --- 3: halting BCE ------------------------------------------------------------------------------------

@torch.no_grad()
def halt_targets(step_logits: Sequence[Tensor], targets: Tensor, loss_mask: Tensor) -> Tensor:
    """y [B, K] float: y[b, t] = 1.0 iff argmax(step_logits[t][b, j]) == targets[b, j] at every loss position j
    of row b (vacuously 1.0 for a row without loss positions). No gradient."""
    ys = []
    for z in step_logits:
        right = (z.argmax(dim=-1) == targets) | ~loss_mask
        ys.append(right.all(dim=-1))
    return torch.stack(ys, dim=1).float()


def halt_loss(commit_logits: Sequence[Tensor], step_logits: Sequence[Tensor], targets: Tensor,
              loss_mask: Tensor) -> Tensor:
    """Halting BCE: teach the commit head "is the chunk already right at step t?".

    halt = (1/(B*K)) sum_{b,t} BCEwithLogits(c[b,t], y[b,t]),
    BCEwithLogits(c, y) = -(y * log sigmoid(c) + (1-y) * log(1 - sigmoid(c))) = softplus(c) - y*c,
    with y from `halt_targets` (detached). A row without loss positions has y = 1 at every step.
    """
    k = _check_steps("commit_logits", commit_logits)
    if len(step_logits) != k:
        raise ValueError(f"commit_logits has {k} steps but step_logits has {len(step_logits)}")
    c = torch.stack([x.float() for x in commit_logits], dim=1)          # [B, K]
    y = halt_targets(step_logits, targets, loss_mask).to(c.device)
    return F.binary_cross_entropy_with_logits(c, y, reduction="mean")


# --- 4: length head ------------------------------------------------------------------------------------

@torch.no_grad()
def length_targets(drafts_t: Tensor, targets: Tensor, valid: Tensor, loss_mask: Tensor) -> Tensor:
    """B* [B] long: how many tokens of the current draft could be committed without an error.

    B*[b] = max(1, min(P[b], N[b])), where
      P[b] = the length of the longest prefix of the draft that is right: the largest p with
             drafts_t[b, j] == targets[b, j] for every j < p (0 when position 0 is already wrong);
      N[b] = valid[b].sum(): the chunk's true end, the EOS position included (``valid`` marks the positions
             inside the document, which are a prefix of the chunk).
    The floor of 1 is there because a commit always takes at least one token (when the very first token is
    wrong the best the head can do is commit as little as possible); it also makes a row with no valid
    positions get 1. Every position is compared, editable or not: outside ``loss_mask`` the draft holds the
    input token, which is the true token when the caller obeys the leakage rule, so ``loss_mask`` does not
    change B*; it is accepted so every length function takes the same arguments. No gradient.
    """
    del loss_mask  # see the docstring: positions outside it are compared like any other
    right = (drafts_t == targets).long()
    prefix = torch.cumprod(right, dim=-1).sum(dim=-1)                   # P
    n_valid = valid.long().sum(dim=-1)                                  # N
    return torch.minimum(prefix, n_valid).clamp(min=1)


def length_loss(length_logits: Sequence[Tensor], drafts: Sequence[Tensor], targets: Tensor, valid: Tensor,
                loss_mask: Tensor) -> Tensor:
    """Length-head CE against the longest correct prefix of the draft held after each step.

    len = (1/K) sum_t (1/B) sum_b CE(length_logits[t][b], cls[b,t]),
    cls[b,t] = min(B*_t[b] - 1, L - 1) with B*_t = length_targets(drafts[t], ...): class c means "commit c+1
    tokens", so a B* beyond what the head can express is clipped to its largest class.
    """
    k = _check_steps("length_logits", length_logits)
    if len(drafts) != k:
        raise ValueError(f"length_logits has {k} steps but drafts has {len(drafts)}")
    per_step = []
    for logits, draft in zip(length_logits, drafts):
        n_classes = logits.shape[-1]
        cls = (length_targets(draft, targets, valid, loss_mask) - 1).clamp(0, n_classes - 1)
        per_step.append(F.cross_entropy(logits.float(), cls.to(logits.device), reduction="mean"))
    return torch.stack(per_step).sum() / k


# --- 5: halting distribution and ponder cost -----------------------------------------------------------

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


# --- 6: stability KL -----------------------------------------------------------------------------------

def stability_loss(step_logits: Sequence[Tensor], loss_mask: Tensor) -> Tensor:
    """KL between successive steps' predictive distributions at the loss positions, earlier step detached.

    stability = (1/(K-1)) sum_{t=2..K} [ sum_{b,j: mask} KL(sg(P_{t-1}) || P_t)[b,j] / max(#mask, 1) ],
    KL(p || q) = sum_v p_v (log p_v - log q_v), P_t = softmax(step_logits[t]), sg = stop-gradient.
    The gradient flows only into the later step (pulling it toward the earlier one); K == 1 gives 0, still
    connected to ``step_logits[0]``'s graph.
    """
    k = _check_steps("step_logits", step_logits)
    if k == 1:
        return _zero_like_graph(step_logits[0])
    per_step = []
    for prev, cur in zip(step_logits[:-1], step_logits[1:]):
        logp_prev = F.log_softmax(prev.detach().float(), dim=-1)
        logp_cur = F.log_softmax(cur.float(), dim=-1)
        kl = (logp_prev.exp() * (logp_prev - logp_cur)).sum(dim=-1)     # [B, W]
        per_step.append(_masked_mean(kl, loss_mask))
    return torch.stack(per_step).sum() / (k - 1)


# --- all six, and the weighted total --------------------------------------------------------------------

def refinement_losses(step_logits: Sequence[Tensor], commit_logits: Sequence[Tensor],
                      length_logits: Sequence[Tensor] | None, drafts: Sequence[Tensor] | None,
                      targets: Tensor, loss_mask: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """All six refinement losses, keyed by `LOSS_NAMES` (final, masked, halt, len, ponder, stability).

    ``length_logits`` is None when the length head is disabled; "len" is then a 0 tensor (and ``drafts``
    may be None too).
    """
    k = _check_steps("step_logits", step_logits)
    if len(commit_logits) != k:
        raise ValueError(f"step_logits has {k} steps but commit_logits has {len(commit_logits)}")
    if length_logits is None:
        length = step_logits[0].new_zeros((), dtype=torch.float32)
    else:
        if drafts is None:
            raise ValueError("length_logits given without drafts: the length target needs the drafts")
        length = length_loss(length_logits, drafts, targets, valid, loss_mask)
    return {
        "final": final_ce(step_logits, targets, loss_mask),
        "masked": masked_ce(step_logits, targets, loss_mask),
        "halt": halt_loss(commit_logits, step_logits, targets, loss_mask),
        "len": length,
        "ponder": ponder_loss(commit_logits),
        "stability": stability_loss(step_logits, loss_mask),
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
