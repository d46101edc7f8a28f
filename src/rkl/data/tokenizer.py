"""A small byte-level BPE tokenizer trained on the run's own corpus (the tiny models' vocabulary).

Digits are pre-split one by one, so no merge ever glues digits together: every number is a sequence of
single-digit tokens and the carries of MSD-first addition stay learnable at any vocabulary size.
Byte-level means any text round-trips exactly (code indentation and newlines included).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rkl.data.prompts import apply_prompt_convention
from rkl.errors import UserError

# ids 0, 1, 2: the model presets in configs/models/*.json use pad 0, bos 1, eos 2.
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the 256 byte symbols


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def train_tokenizer(texts: Iterable[str], vocab_size: int, exact: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (specials and all 256 bytes included).

    Raises UserError when vocab_size is below 259, or, with `exact`, when the corpus has too few distinct pairs
    to reach it (without `exact` the tokenizer may be smaller: the model's extra embedding rows go unused).
    """
    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size()
    if got > vocab_size or (exact and got != vocab_size):
        raise UserError(f"the corpus only supports {got} tokens, not vocab_size {vocab_size}: "
                        "train on more text or lower the vocabulary size")
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        # Exact round-trips: no " ." -> "." clean-up, and no length warnings when encoding whole documents.
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    return apply_prompt_convention(fast)  # a prompt starts with <eos>, never <bos> (rkl.data.prompts)
