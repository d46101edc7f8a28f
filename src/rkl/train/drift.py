"""N-gram drift (phase C): how far the base's own greedy generations move away from the pretrained base's.

drift_n = 1 - |distinct n-grams of now ∩ those of the start| / |distinct n-grams of the start|, over
generations (recursion off) from fixed arithmetic and text prompts. 0 = the same text, 1 = nothing in common.
"""

from __future__ import annotations

import torch

from rkl.config import RecursiveConfig
from rkl.data.arithmetic import arithmetic_problems
from rkl.data.prompts import encode_prompt
from rkl.train.sharding import is_sharded

NGRAM_ORDERS = (1, 2, 3, 4)


def ngrams(tokens: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def ngram_drift(reference: list[list[int]], current: list[list[int]], n: int) -> float:
    ref = set().union(*(ngrams(t, n) for t in reference)) if reference else set()
    cur = set().union(*(ngrams(t, n) for t in current)) if current else set()
    return 1.0 - len(ref & cur) / len(ref) if ref else 0.0


class DriftProbe:
    """Reference generations from the pretrained base at construction; the trained base's at every measure()."""

    def __init__(self, wrapper, tokenizer, config: RecursiveConfig, device: torch.device,
                 reference_model: torch.nn.Module, new_tokens: int = 24):
        self.wrapper, self.tokenizer, self.device, self.new_tokens = wrapper, tokenizer, device, new_tokens
        prompts = [p.prompt for p in arithmetic_problems("val", config.arithmetic_digits, n=4)]
        prompts += ["def ", "class ", "KING HENRY.\n", "import "]
        self.prompts = [torch.tensor([encode_prompt(tokenizer, p)], device=device) for p in prompts]
        self.reference = self.generate(reference_model)

    @torch.no_grad()
    def generate(self, base: torch.nn.Module | None = None) -> list[list[int]]:
        base = base if base is not None else self.wrapper.base
        was_training = base.training
        base.eval()
        # a base sharded by FSDP all-gathers each layer for every forward: no process may stop generating early
        synced = any(is_sharded(p) for p in base.parameters())
        outs = []
        for ids in self.prompts:
            out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new_tokens,
                                do_sample=False, pad_token_id=self.tokenizer.pad_token_id, synced_gpus=synced)
            outs.append(out[0, ids.shape[1]:].tolist())
        base.train(was_training)
        return outs

    def measure(self) -> dict[str, float]:
        current = self.generate()
        return {f"ngram_drift_{n}": ngram_drift(self.reference, current, n) for n in NGRAM_ORDERS}
