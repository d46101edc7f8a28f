"""Each metric on inputs small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rkl.eval.metrics import (
    NLLAccumulator,
    arithmetic_answer,
    binomial_se,
    committed_length_histogram,
    diff_se,
    exact_match,
    stability_at_k,
    tpot_uplift,
)


def _logits_for(probs: list[list[list[float]]]) -> torch.Tensor:
    """Logits whose softmax is exactly `probs` (log p is a valid logit vector)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def _two_samples() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample 0: one scored token with p(label) = 1/2. Sample 1: three tokens with p(label) = 1/4 each.
    Sample 0's padding positions carry a wrong label with tiny probability: they must not be scored."""
    sharp = [0.5, 0.25, 0.125, 0.125]  # argmax is class 0
    junk = [0.97, 0.01, 0.01, 0.01]
    logits = _logits_for([[sharp, junk, junk], [sharp, sharp, sharp]])
    labels = torch.tensor([[0, 3, 3], [1, 1, 1]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    return logits, labels, mask


def test_perplexity_is_pooled_over_tokens_not_averaged_over_samples() -> None:
    logits, labels, mask = _two_samples()
    acc = NLLAccumulator()
    acc.add(logits, labels, mask)
    # total NLL = ln 2 + 3 ln 4 = 7 ln 2 over 4 tokens -> ppl = 2 ** (7/4)
    assert acc.tokens == 4
    assert acc.mean_nll() == pytest.approx(7 * math.log(2) / 4, rel=1e-6)
    assert acc.perplexity() == pytest.approx(2 ** 1.75, rel=1e-6)
    # the prototype's number: mean over samples of exp(per-sample mean loss) = (2 + 4) / 2 = 3
    per_sample_mean_of_exp = (math.exp(math.log(2)) + math.exp(math.log(4))) / 2
    assert per_sample_mean_of_exp == pytest.approx(3.0)
    assert abs(acc.perplexity() - per_sample_mean_of_exp) > 0.3


def test_token_accuracy_and_batch_split_invariance() -> None:
    logits, labels, mask = _two_samples()
    acc = NLLAccumulator()
    acc.add(logits, labels, mask)
    # argmax is class 0 everywhere: only sample 0's single scored token (label 0) is right -> 1/4
    assert acc.correct == 1
    assert acc.token_accuracy() == pytest.approx(0.25)
    split = NLLAccumulator()
    split.add(logits[:1], labels[:1], mask[:1])
    split.add(logits[1:], labels[1:], mask[1:])
    assert split.perplexity() == pytest.approx(acc.perplexity(), rel=1e-12)
    assert split.token_accuracy() == acc.token_accuracy()


def test_accumulator_ignores_minus_100_bf16_and_empty() -> None:
    logits, labels, mask = _two_samples()
    labels = labels.masked_fill(~mask, -100)
    acc = NLLAccumulator()
    acc.add(logits.bfloat16(), labels)  # no mask: -100 alone excludes padding
    assert acc.tokens == 4
    assert acc.perplexity() == pytest.approx(2 ** 1.75, rel=2e-2)
    empty = NLLAccumulator()
    assert math.isnan(empty.perplexity()) and math.isnan(empty.token_accuracy())


def test_stability_at_k_by_hand() -> None:
    draft = torch.tensor([[1, 2, 3, 4]])
    step1 = torch.tensor([[1, 5, 3, 4]])
    step2 = torch.tensor([[1, 2, 3, 6]])  # position 1 changed and came back: still unstable
    valid = torch.tensor([[True, True, True, False]])
    # valid positions 0, 1, 2; unchanged across all steps: 0 and 2 -> 2/3
    assert stability_at_k([draft, step1, step2], valid) == pytest.approx(2 / 3)
    assert stability_at_k([draft], valid) == 1.0
    assert stability_at_k([draft, step1], torch.zeros(1, 4, dtype=torch.bool)) == 1.0
    with pytest.raises(ValueError):
        stability_at_k([draft, step1], torch.ones(2, 4, dtype=torch.bool))


def test_exact_match() -> None:
    assert exact_match(["42", " 7\n", "13"], ["42", "7", "31"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["1"], [])


@pytest.mark.parametrize(
    ("text", "answer"),
    [("579\n12+3=15", "579"), ("  42</s>", "42"), ("-17 rest", "-17"), ("abc 12", ""), ("", ""), ("7", "7")],
)
def test_arithmetic_answer(text: str, answer: str) -> None:
    assert arithmetic_answer(text) == answer


def test_histogram_uplift_and_standard_errors() -> None:
    assert committed_length_histogram([1, 4, 4, 0], 4) == [1, 1, 0, 0, 2]
    with pytest.raises(ValueError):
        committed_length_histogram([5], 4)
    assert tpot_uplift(30.0, 20.0) == pytest.approx(1.5)
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    # pooled p = 0.5 -> sqrt(0.25 * (1/100 + 1/100))
    assert diff_se(0.6, 100, 0.4, 100) == pytest.approx(math.sqrt(0.25 * 0.02))
