"""The "rkl" model of lm-evaluation-harness (0.4.x): any rkl stage, scored by lm-eval's tasks.

    rkl-lm-eval --model rkl --model_args checkpoint=checkpoints/phase_a,chunk_width=16 --tasks rkl_arithmetic

Importing this module registers the model (`@register_model("rkl")`); `rkl-lm-eval` (rkl.lm_eval_cli) is lm-eval's
CLI with it imported, because lm-eval 0.4 finds models only in its own registry (no plugin entry points).

What each request type runs:
- generate_until: `generate_chunks`, the chunked generation with refinement (a recursion-off stage: `base.generate`).
  It generates max_gen_toks tokens or until EOS, then cuts the text at the first stop sequence, as lm-eval's HF
  model does after its generation; it does not stop early at a stop sequence (a chunk is refined and committed
  whole, so a stop string may appear only after refinement), so a long max_gen_toks costs its full length.
- loglikelihood and loglikelihood_rolling: the BASE model's teacher-forced forward. The recursion acts only inside
  generate_chunks, so log-likelihood tasks score the base, whatever the stage: phase A (frozen base) scores exactly
  what the baseline scores, and only phases B/C (LoRA, unfrozen layers) change these numbers.

Prompts follow rkl's convention (rkl.data.prompts): every context starts with `<eos>` (the training stream's
document separator), never `<bos>`; an empty context is `<eos>` alone, as lm-eval's prefix token.

Batching and progress are lm-eval's HF model's: requests sorted longest first (`Collator`), generation batches
grouped by generation kwargs, `batch_size` rows per forward or generation (an integer; "auto" is not supported),
tqdm bars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from rkl.data.prompts import document_separator_id, encode_prompt
from rkl.errors import UserError
from rkl.stage_model import load_stage_model

# RecursiveConfig fields a model_args key may override, on top of the stage's config
CONFIG_ARGS = ("chunk_width", "max_inner_steps", "commit_threshold", "min_commit_threshold", "edit_margin",
               "reuse_stale_suffix")
GEN_KWARGS = ("do_sample", "temperature", "top_p")  # what generate_chunks takes of a task's generation_kwargs


@register_model("rkl")
class RklLM(TemplateLM):
    """An rkl stage as an lm-eval LM.

    model_args: `checkpoint=PATH` (any folder `rkl eval --model` takes) and/or `stage=NAME` (checkpoints/NAME and
    its config, as `rkl eval --stage`), `recursive_config=FILE`, `dtype=float32|bfloat16|float16`, `max_length=N`
    (default: the model's max_position_embeddings), `max_gen_toks=N` (default 256, as lm-eval's HF model), and
    any of chunk_width, max_inner_steps (K), commit_threshold, min_commit_threshold, edit_margin,
    reuse_stale_suffix. `device` is not used: like `rkl eval`, the model goes to the GPU when there is one; nor
    is `max_batch_size` (it bounds lm-eval's "auto" batch size, which this model does not have).
    From Python, `loaded=` takes a StageModel already loaded (rkl.stage_model; what `rkl eval --tasks` passes).
    """

    backend = "causal"

    def __init__(self, checkpoint: str | None = None, stage: str | None = None, recursive_config: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 loaded: Any = None, **overrides: Any) -> None:
        super().__init__()  # max_batch_size and device: lm-eval passes them to every model; see the docstring
        unknown = sorted(set(overrides) - set(CONFIG_ARGS))
        if unknown:
            raise UserError(f"unknown rkl model_args {', '.join(unknown)}: use checkpoint, stage, recursive_config, "
                            f"dtype, max_length, max_gen_toks, {', '.join(CONFIG_ARGS)}")
        if checkpoint is None and stage is None and loaded is None:
            raise UserError("the rkl model needs checkpoint=PATH or stage=NAME in --model_args")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"the rkl model takes an integer batch_size >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        if loaded is None:
            sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]
            loaded = load_stage_model(stage or Path(str(checkpoint)).name,
                                      model=None if checkpoint is None else str(checkpoint),
                                      config_path=recursive_config, overrides=sets, dtype=dtype)
        self.stage = loaded
        self.wrapper, self.tokenizer = self.stage.wrapper, self.stage.tokenizer
        self._max_length = int(max_length) if max_length else self.stage.max_length
        self._max_gen_toks = int(max_gen_toks)
        self._device = self.stage.device

    # ------------------------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window are conditioned on: the document separator."""
        return document_separator_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The text's ids, nothing added: the separator is added where a context starts (`_encode_pair`,
        `generate_until`) or is lm-eval's prefix token (empty contexts, rolling windows)."""
        return list(self.tokenizer(string, add_special_tokens=False)["input_ids"])

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split of a non-empty context and its continuation (trailing spaces of the context move to the
        continuation; the whole is encoded, then split at the context's length), the context as a prompt."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = encode_prompt(self.tokenizer, context + continuation)
        context_enc = encode_prompt(self.tokenizer, context)
        return context_enc, whole[len(context_enc):]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------------------------------ log-likelihood
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request, from
        the base model's forward over context + continuation (left-truncated to max_length + 1 tokens)."""
        out: list[tuple[float, bool]] = []
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (base model)")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        for batch in order.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]
            width = max(map(len, inputs))
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=self._device)
            # right padding: a causal model's logits at real positions never see the padding after them
            logp = F.log_softmax(self.wrapper.base(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            for (key, _, cont), row, n in zip(batch, logp, map(len, inputs)):
                scored = row[n - len(cont):n]
                target = torch.tensor(cont, device=self._device)
                answer = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                out.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return order.get_original(out)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (perplexity tasks), in disjoint windows of max_length tokens, the
        first conditioned on the separator: `<eos> text` scored as the training stream scores a document."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0,
                              desc="Running loglikelihood_rolling requests (base model)"):
            windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) generation with generate_chunks, batched like lm-eval's HF model; each text is cut
        at its first stop sequence (the task's `until` and the EOS string)."""
        out: list[str] = []
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="Running generate_until requests (generate_chunks)")
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        for batch in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*batch)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise UserError(f"max_gen_toks {max_new} leaves no room for a context in max_length {self.max_length}")
            gen = {k: kwargs[k] for k in GEN_KWARGS if k in kwargs}
            if not gen.get("do_sample"):
                gen = {"do_sample": False}
            rows = [encode_prompt(self.tokenizer, c)[-(self.max_length - max_new):] for c in contexts]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self._device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self._device)
            seqs = self.wrapper.generate_chunks(ids, attention_mask=mask, max_new_tokens=max_new, **gen)
            for context, kw, seq in zip(contexts, all_kwargs, seqs[:, width:].tolist()):
                text = postprocess_generated_text(self.tok_decode(seq), stop=until, think_end_token=None)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, kw), text)
                bar.update(1)
        bar.close()
        return order.get_original(out)
