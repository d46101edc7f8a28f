"""The prompt convention: how a prompt becomes token ids, for `rkl eval`, `rkl generate` and the lm-eval model.

A prompt starts a document, and rkl's training stream marks every document start with the EOS token (documents
are packed as `doc1 <eos> doc2 <eos> ...`, no BOS; rkl.data.packing). So a prompt is encoded as

    [eos_token_id] + tokenizer(text, add_special_tokens=False)

never with `<bos>`, which training never used: on the issue's measurement the answer log-probability was -4.886
after `<eos>`, -4.938 bare and -5.005 after `<bos>`. Special-token strings inside the text are read as those
tokens, as HF tokenizers do by default.

The tokenizer rkl trains carries the same convention (`apply_prompt_convention`), so code that never imports
rkl gets it too: its post-processor prepends `<eos>` whenever special tokens are added (plain
`tokenizer(text)`, lm-eval's `--model hf`), and its chat template starts with `<eos>` and concatenates the
messages' contents (a base model has no chat format). `encode_prompt` does not rely on that: it gives the same
ids for tokenizers saved before the convention was stored, and for any other tokenizer with an EOS token.
"""

from __future__ import annotations

from tokenizers import processors
from transformers import PreTrainedTokenizerBase

from rkl.errors import UserError

# A base model has no roles: the template only marks the document start and concatenates the contents.
CHAT_TEMPLATE = "{{ eos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def document_separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id every prompt starts with: the tokenizer's EOS (the training stream's document separator)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which rkl uses as the document separator a prompt starts "
                        "with; use the tokenizer the model was trained with")
    return int(eos)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt: the document separator (EOS), then the text's ids with no special tokens added.

    Text that already starts with the separator's string (the chat template's output) is not given a second one."""
    sep = document_separator_id(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids if ids[:1] == [sep] and text.startswith(str(tokenizer.eos_token)) else [sep] + ids


def apply_prompt_convention(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Store the convention in a fast tokenizer (in place; returned for chaining): EOS is prepended whenever special
    tokens are added, and the chat template starts with it. Saved by `save_pretrained` (tokenizer.json,
    chat_template.jinja), so `AutoTokenizer` users get `tokenizer(text)["input_ids"] == encode_prompt(tokenizer,
    text)`."""
    eos_token, eos_id = tokenizer.eos_token, document_separator_id(tokenizer)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos_token} $A", pair=f"{eos_token} $A {eos_token} $B", special_tokens=[(eos_token, eos_id)])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
