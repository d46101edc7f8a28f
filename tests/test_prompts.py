"""The prompt convention (rkl.data.prompts): <eos> first, never <bos>, the same ids from encode_prompt, from a
saved tokenizer used without rkl, and from its chat template; rkl eval's arithmetic prompts follow it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from rkl.data import load_documents, train_tokenizer
from rkl.data.prompts import encode_prompt
from rkl.data.tokenizer import BOS_ID, EOS_ID
from rkl.errors import UserError

PROMPTS = ["12+34=", "def add(a, b):\n    return", "KING HENRY.\n", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(load_documents("mix", "train", arithmetic_digits=2, max_chars=20_000), 384, exact=False)


def test_a_prompt_is_eos_then_the_text_and_never_bos(tokenizer):
    for text in PROMPTS:
        ids = encode_prompt(tokenizer, text)
        assert ids[0] == EOS_ID and BOS_ID not in ids
        assert ids[1:] == tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids[1:]) == text


def test_the_saved_tokenizer_carries_the_convention_without_rkl(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)  # what transformers / lm-eval's hf model load
    for text in PROMPTS[:3]:
        assert plain(text)["input_ids"] == encode_prompt(tokenizer, text)
        chat = plain.apply_chat_template([{"role": "user", "content": text}], tokenize=True)
        assert list(chat["input_ids"]) == encode_prompt(tokenizer, text)
    # left-padded batches keep the separator right after the padding
    batch = plain(PROMPTS[:2], padding=True, padding_side="left")
    for row, mask, text in zip(batch["input_ids"], batch["attention_mask"], PROMPTS[:2]):
        assert [t for t, m in zip(row, mask) if m] == encode_prompt(tokenizer, text)


def test_a_chat_templated_prompt_gets_one_separator_not_two(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "12+34="}], tokenize=False)
    assert text.startswith("<eos>")
    assert encode_prompt(tokenizer, text) == encode_prompt(tokenizer, "12+34=")


def test_tokenizers_saved_before_the_convention_encode_the_same(tokenizer, tmp_path):
    from tokenizers import processors

    tokenizer.save_pretrained(tmp_path)
    old = AutoTokenizer.from_pretrained(tmp_path)
    old.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert old("12+34=")["input_ids"] != encode_prompt(tokenizer, "12+34=")  # nothing added by the tokenizer now
    assert all(encode_prompt(old, t) == encode_prompt(tokenizer, t) for t in PROMPTS)


def test_a_tokenizer_without_eos_is_a_user_error(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    no_eos = AutoTokenizer.from_pretrained(tmp_path)
    no_eos.eos_token = None
    with pytest.raises(UserError, match="no EOS token"):
        encode_prompt(no_eos, "1+1=")


def test_rkl_eval_arithmetic_prompts_follow_the_convention(tokenizer, monkeypatch):
    """What generation.arithmetic feeds generate_chunks: each row, after its left padding, is encode_prompt(prompt)."""
    from rkl.data.arithmetic import arithmetic_problems
    from rkl.eval import generation
    from rkl.model.base import load_base
    from rkl.model.wrapper import ChunkRefineWrapper
    from rkl.config import RecursiveConfig

    base, _ = load_base("tiny")
    wrapper = ChunkRefineWrapper(base, RecursiveConfig(recursive_enabled=False))
    seen = []

    def record(ids, attention_mask, max_new_tokens, **_):
        seen.extend([t for t, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), attention_mask.tolist()))
        out = torch.cat([ids, torch.full((ids.shape[0], 1), EOS_ID)], 1)
        return out, []

    monkeypatch.setattr(wrapper, "generate_chunks", record)
    problems = arithmetic_problems("test", 2)[:5]
    generation.arithmetic(wrapper, tokenizer, problems, 2, tpot_prompts=0, tick=lambda n: None)
    assert seen == [encode_prompt(tokenizer, p.prompt) for p in problems]
