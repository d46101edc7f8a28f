"""Evaluation metrics as pure functions on tensors and lists, independent of any model.

Each function states its formula, because the upstream prototype's numbers went wrong exactly where a
formula was left implicit (per-sample exp(loss) averaged and called "perplexity"). Nothing here touches
a model, a device or a file, so every metric can be checked by hand in a test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IntSeq = Sequence[int] | torch.Tensor


class NLLAccumulator:
    """Teacher-forced NLL, perplexity and token accuracy, pooled over every scored token of every batch.

    Alignment: `logits[:, t]` is the prediction FOR `labels[:, t]`; the caller shifts (labels = input_ids[:, 1:],
    logits = logits[:, :-1]). A position counts iff `mask` is True and its label is >= 0 (-100, the Hugging Face
    ignore index, is never scored). Per-token NLLs are computed in float32 and summed in float64: identical
    logits over identical batches give bit-identical totals (what lets compare demand that after_surgery equals
    baseline exactly), and the float64 sum keeps rounding over millions of tokens far below anything printed.
    """

    def __init__(self) -> None:
        self.total_nll: float = 0.0
        self.tokens: int = 0
        self.correct: int = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch: logits [B, T, V] (any float dtype), labels [B, T] long, mask [B, T] bool."""
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"expected logits [B,T,V] and labels [B,T]; got {tuple(logits.shape)}, {tuple(labels.shape)}")
        keep = labels >= 0
        if mask is not None:
            if mask.shape != labels.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
            keep = keep & mask.bool()
        if not bool(keep.any()):
            return
        sel_logits = logits[keep].float()  # [N, V]; float32 log-softmax avoids bf16 rounding of the NLL
        sel_labels = labels[keep].long()
        nll = F.cross_entropy(sel_logits, sel_labels, reduction="none")
        self.total_nll += float(nll.double().sum())
        self.tokens += int(sel_labels.numel())
        self.correct += int((sel_logits.argmax(dim=-1) == sel_labels).sum())

    def mean_nll(self) -> float:
        """sum_i NLL_i / N over all scored tokens i (nats per token); NaN when nothing was scored."""
        return self.total_nll / self.tokens if self.tokens else math.nan

    def perplexity(self) -> float:
        """exp(sum_i NLL_i / N): pooled over tokens, NOT mean_s exp(loss_s) over samples; NaN when empty."""
        return math.exp(self.mean_nll()) if self.tokens else math.nan

    def token_accuracy(self) -> float:
        """#{i : argmax logits_i == label_i} / N over all scored tokens; NaN when nothing was scored."""
        return self.correct / self.tokens if self.tokens else math.nan


def stability_at_k(step_tokens: Sequence[torch.Tensor], valid: torch.Tensor) -> float:
    """Stability@K = #{valid (b, j) : step_tokens[k][b, j] == step_tokens[0][b, j] for all k} / #{valid (b, j)}.

    step_tokens[0] is the draft before refinement and step_tokens[1..] the tokens after each inner step, each
    [B, W]. A token that changes and later changes back counts as changed: it was not stable. Returns 1.0 when
    K == 1 (no refinement, nothing can change) or when no position is valid (vacuously stable), so that an
    empty batch does not pull a stage's average down; the caller should weight batches by valid count.
    """
    if not step_tokens:
        raise ValueError("step_tokens is empty: pass at least the draft")
    stacked = torch.stack([t.to(step_tokens[0].device) for t in step_tokens])  # [K, B, W]
    if stacked.shape[1:] != valid.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} != step token shape {tuple(stacked.shape[1:])}")
    n_valid = int(valid.sum())
    if len(step_tokens) == 1 or n_valid == 0:
        return 1.0
    unchanged = (stacked == stacked[0]).all(dim=0) & valid.bool()
    return int(unchanged.sum()) / n_valid


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """#{i : predictions_i.strip() == answers_i.strip()} / n; 0.0 for n == 0 (no evidence is no accuracy)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / len(answers)


def arithmetic_answer(generated_text: str) -> str:
    """The answer in a generation that follows "a+b=": leading whitespace skipped, an optional '-', then digits
    up to the first non-digit (newline, EOS text, anything). "" when it does not start with a number, so a
    rambling generation can never match by containing the answer somewhere later."""
    text = generated_text.lstrip(" \t")
    sign = "-" if text.startswith("-") else ""
    rest = text[len(sign):]
    n = 0
    while n < len(rest) and rest[n] in "0123456789":
        n += 1
    return sign + rest[:n] if n else ""


def committed_length_histogram(lengths: Sequence[int], max_len: int) -> list[int]:
    """counts[b] = #{chunks committed with length b} for b = 0..max_len (max_len + 1 bins).

    A length outside 0..max_len is a bug upstream (commit of more than W tokens), so it raises instead of
    being clipped into the last bin where it would hide.
    """
    counts = [0] * (max_len + 1)
    for b in lengths:
        if not 0 <= int(b) <= max_len:
            raise ValueError(f"committed length {b} outside 0..{max_len}")
        counts[int(b)] += 1
    return counts


def tpot_uplift(tpot_recursive: float, tpot_plain: float) -> float:
    """TPOT(recursion on) / TPOT(recursion off), both measured in the same run: 1.0 = free, 2.0 = twice as slow
    per output token."""
    if tpot_plain <= 0:
        raise ValueError(f"plain TPOT must be positive, got {tpot_plain}")
    return tpot_recursive / tpot_plain


def binomial_se(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): standard error of an accuracy p measured on n independent items."""
    if n <= 0:
        raise ValueError(f"sample count must be positive, got {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def diff_se(p1: float, n1: int, p2: float, n2: int) -> float:
    """Standard error of p1 - p2 under "no difference": sqrt(p (1 - p) (1/n1 + 1/n2)), p = pooled accuracy
    (p1 n1 + p2 n2) / (n1 + n2). Treats the two samples as independent; when both stages were scored on the
    same items the true SE of the paired difference is usually smaller, so this errs towards calling a
    difference noise, which is the safe side for a claim that recursion helps."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError(f"sample counts must be positive, got {n1}, {n2}")
    p = (p1 * n1 + p2 * n2) / (n1 + n2)
    return math.sqrt(max(p * (1.0 - p), 0.0) * (1.0 / n1 + 1.0 / n2))
