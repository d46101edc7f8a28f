"""Token streams and language-model batches.

Documents are packed into one stream separated by EOS; a batch is a set of random windows of it. A batch
is a pure function of (seed, step), so resuming from step s replays exactly the batches an uninterrupted
run would have seen, with no sampler state to checkpoint.
"""

from __future__ import annotations

import hashlib
from itertools import chain

import torch
from transformers import PreTrainedTokenizerBase

from rkl.errors import UserError


def encode_documents(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> torch.Tensor:
    """1-D LongTensor: each document's ids followed by eos_token_id (no BOS: EOS already marks a start).

    Literal "<eos>" or "<pad>" inside a document is encoded as plain text (split_special_tokens), so the
    only EOS ids in the stream are the document separators that chunk validity relies on.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id")
    if not docs:
        return torch.empty(0, dtype=torch.long)
    encoded = tokenizer(docs, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return torch.tensor(list(chain.from_iterable(ids + [eos] for ids in encoded)), dtype=torch.long)


def step_generator(seed: int, step: int, salt: str = "lm") -> torch.Generator:
    """A CPU generator seeded by sha256 of (salt, seed, step): independent streams for every step."""
    digest = hashlib.sha256(f"{salt}:{seed}:{step}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return g


def windows(stream: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """[len(starts), width] slices stream[s : s + width], gathered in one indexing op."""
    return stream[starts.to(stream.device)[:, None] + torch.arange(width, device=stream.device)]


def lm_batch(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] random windows; inputs are [:, :-1] and labels [:, 1:].

    Windows cross document boundaries (the EOS between them is a normal token to predict), as in
    GPT-style packed pre-training.
    """
    width = seq_len + 1
    if stream.ndim != 1 or stream.numel() < width:
        raise UserError(f"the token stream has {stream.numel()} tokens, fewer than seq_len + 1 = {width}: "
                        "use more data or a shorter seq_len")
    g = step_generator(seed, step, "lm")
    starts = torch.randint(0, stream.numel() - width + 1, (batch_size,), generator=g)
    return windows(stream, starts, width)
