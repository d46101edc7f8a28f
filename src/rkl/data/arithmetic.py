"""Generated addition problems, most-significant digit first: "347+685=" -> "1032".

MSD-first is the hard direction for a left-to-right model: a carry makes an early answer digit depend on
later operand digits, which is exactly where refining a drafted chunk should help. Each problem belongs
to one split by a hash of its prompt, so the held-out set is fixed however many problems a run draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rkl.data.corpora import SPLITS, split_of
from rkl.errors import UserError

DEFAULT_SIZES = {"train": 20000, "val": 500, "test": 500}
SPLIT_FRACTION = {"train": 0.9, "val": 0.05, "test": 0.05}
# Up to this many operand pairs (digits <= 2) every pair is enumerated; beyond it pairs are sampled.
ENUMERATE_LIMIT = 10**4


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def make_problem(a: int, b: int) -> Problem:
    return Problem(prompt=f"{a}+{b}=", answer=str(a + b))


def _enumerated(split: str, digits: int, n: int, rng: random.Random) -> list[Problem]:
    hi = 10**digits
    pairs = [(a, b) for a in range(hi) for b in range(hi) if split_of(f"{a}+{b}=") == split]
    rng.shuffle(pairs)
    return [make_problem(a, b) for a, b in pairs[:n]]


def _sampled(split: str, digits: int, n: int, rng: random.Random) -> list[Problem]:
    hi = 10**digits
    seen: set[str] = set()
    problems = []
    while len(problems) < n:
        p = make_problem(rng.randrange(hi), rng.randrange(hi))
        if p.prompt not in seen and split_of(p.prompt) == split:
            seen.add(p.prompt)
            problems.append(p)
    return problems


def arithmetic_problems(split: str, digits: int, n: int | None = None) -> list[Problem]:
    """`n` problems of one split (default: train 20000, val/test 500), operands uniform in [0, 10**digits).

    Deterministic: the same arguments give the same list in the same order, and a smaller `n` gives a
    prefix of a larger one. When the split holds fewer than `n` distinct problems (1-2 digits), all of
    them are returned.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if digits < 1:
        raise UserError(f"arithmetic_digits must be >= 1, got {digits}")
    n = DEFAULT_SIZES[split] if n is None else n
    rng = random.Random(f"rkl-arithmetic:{digits}:{split}")
    space = 10 ** (2 * digits)
    if space <= ENUMERATE_LIMIT:
        return _enumerated(split, digits, n, rng)
    # Rejection sampling slows down as the split fills up; past half of it, enumerate (3 digits) or refuse.
    expected = int(space * SPLIT_FRACTION[split])
    if n > expected // 2:
        if space <= 10**6:
            return _enumerated(split, digits, n, rng)
        raise UserError(f"{n} {split} problems is too many for {digits}-digit addition (about {expected} exist)")
    return _sampled(split, digits, n, rng)
