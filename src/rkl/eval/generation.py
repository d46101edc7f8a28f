"""Held-out arithmetic with generate_chunks: exact match, greedy hash, generation stats, TPOT vs recursion off."""

from __future__ import annotations

import time
from typing import Any

import torch

from rkl.data.arithmetic import Problem
from rkl.data.prompts import encode_prompt
from rkl.eval.metrics import arithmetic_answer, binomial_se
from rkl.eval.results import sha256_json
from rkl.eval.tasks import GEN_BATCH, Group, Tick, model_device


def _left_pad(rows: list[list[int]], pad: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=dev)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
    return ids, mask


def _until_eos(row: list[int], eos: int) -> list[int]:
    """The generated ids up to and including the first EOS (the padding HF adds after it is dropped)."""
    return row[: row.index(eos) + 1] if eos in row else row


def _generate(wrapper, which: str, ids: torch.Tensor, mask: torch.Tensor, max_new: int
              ) -> tuple[torch.Tensor, list[dict[str, Any]], float]:
    """(ids, stats, seconds) of one greedy generation: "chunks" = generate_chunks, "plain" = base.generate."""
    dev = ids.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    if which == "chunks":
        out, stats = wrapper.generate_chunks(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                             return_stats=True)
    else:
        out, stats = wrapper.base.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False), []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, stats, time.perf_counter() - t0


class _SideBySide:
    """generate_chunks and base.generate on the same batches, the order alternating per batch: wall time, generated
    positions, tokens up to EOS, agreement and generate_chunks' stats."""

    def __init__(self) -> None:
        self.secs = {"chunks": 0.0, "plain": 0.0}
        self.positions = {"chunks": 0, "plain": 0}
        self.tokens = {"chunks": 0, "plain": 0}
        self.agree = self.rows = 0
        self.warm = False
        self.stats: list[dict[str, Any]] = []

    def run(self, wrapper, ids: torch.Tensor, mask: torch.Tensor, max_new: int, eos: int, batch_index: int,
            timed: bool = True) -> dict[str, list[list[int]]]:
        if timed and not self.warm:
            # first calls pay one-off costs (CUDA kernels compiled and autotuned, caches allocated): not TPOT
            for which in ("chunks", "plain"):
                _generate(wrapper, which, ids, mask, max_new)
            self.warm = True
        order = ("chunks", "plain") if batch_index % 2 == 0 else ("plain", "chunks")
        new: dict[str, list[list[int]]] = {}
        for which in order if timed else ("chunks",):
            out, s, dt = _generate(wrapper, which, ids, mask, max_new)
            new[which] = [_until_eos(r, eos) for r in out[:, ids.shape[1]:].tolist()]
            self.stats += s
            if timed:
                self.secs[which] += dt
                self.positions[which] += out.shape[1] - ids.shape[1]
                self.tokens[which] += sum(map(len, new[which]))
        if timed:
            self.agree += sum(a == b for a, b in zip(new["chunks"], new["plain"]))
            self.rows += ids.shape[0]
        return new

    def metrics(self, prefix: str, k_steps: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.rows:
            tpot = {k: 1000 * self.secs[k] / max(self.positions[k], 1) for k in self.secs}
            out.update({f"{prefix}tpot_ms": tpot["chunks"], f"{prefix}tpot_ms_plain": tpot["plain"],
                        f"{prefix}tpot_uplift": tpot["chunks"] / tpot["plain"],
                        f"{prefix}tokens_per_s": self.tokens["chunks"] / self.secs["chunks"],
                        f"{prefix}tokens_per_s_plain": self.tokens["plain"] / self.secs["plain"],
                        f"{prefix}greedy_agree_plain": self.agree / self.rows})
        if self.stats:
            committed = self.committed_lengths()
            out.update({f"{prefix}avg_inner_steps": sum(s["inner_steps"] for s in self.stats) / len(self.stats),
                        f"{prefix}commit_rate": sum(s["inner_steps"] < k_steps for s in self.stats) / len(self.stats),
                        f"{prefix}mean_committed": sum(committed) / len(committed),
                        f"{prefix}committed_fraction": sum(committed) / sum(sum(s["open_positions"])
                                                                            for s in self.stats)})
        return out

    def committed_lengths(self) -> list[int]:
        return [int(n) for s in self.stats for n in s["committed_lengths"]]


def arithmetic(wrapper, tokenizer, problems: list[Problem], digits: int, tpot_prompts: int, tick: Tick) -> Group:
    """Held-out addition, greedy, batched (GEN_BATCH) with left padding; prompt = encode_prompt("a+b=") (EOS, the
    document start of the training stream, then the text: rkl.data.prompts); max_new_tokens = digits + 3.

    arith_exact: #{metrics.arithmetic_answer(text generated after the prompt, up to EOS) == answer} / n, the
    text generated by generate_chunks (recursion-off stages: its fallback, base.generate). greedy_sha256:
    sha256_json of every problem's generated ids up to and including EOS. Generation stats over every chunk
    generate_chunks committed: avg_inner_steps; commit_rate = fraction of chunks whose loop the commit head
    ended before step K; mean_committed = new tokens a running row committed per chunk (mean over rows and
    chunks; committed_lengths keeps every one); committed_fraction = committed / chunk positions open to a new
    token (seeded, not locked).
    TPOT: the batches that start before `tpot_prompts` are generated a second time with base.generate (recursion off) in
    the same run, the two calls alternating which goes first per batch; tpot_ms(_plain) = wall time / generated
    positions (prefill included), tokens_per_s(_plain) = generated tokens up to EOS / wall time over those
    batches, tpot_uplift = tpot_ms / tpot_ms_plain; greedy_agree_plain = fraction of them whose two
    generations are token-identical.
    """
    dev, eos = model_device(wrapper), tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    max_new = digits + 3
    both = _SideBySide()
    right = 0
    generated: list[list[int]] = []
    for start in range(0, len(problems), GEN_BATCH):
        batch = problems[start:start + GEN_BATCH]
        prompts = [encode_prompt(tokenizer, p.prompt) for p in batch]
        ids, mask = _left_pad(prompts, pad, dev)
        # TPOT over whole batches: splitting one would change its padding
        new = both.run(wrapper, ids, mask, max_new, eos, start // GEN_BATCH, timed=start < tpot_prompts)
        for p, row in zip(batch, new["chunks"]):
            text = tokenizer.decode([t for t in row if t != eos], skip_special_tokens=False)
            right += arithmetic_answer(text) == p.answer
        generated += new["chunks"]
        tick(len(batch))
    n = len(problems)
    out_g = Group({"arith_exact": right / n}, {"arith": n}, {"arith_exact": binomial_se(right / n, n)})
    out_g.extra["greedy_sha256"] = sha256_json(generated)
    out_g.extra["committed_lengths"] = both.committed_lengths()
    out_g.metrics.update(both.metrics("", wrapper.config.max_inner_steps))
    if both.rows:
        out_g.counts["tpot_prompts"] = both.rows
    if both.stats:
        out_g.metrics["gen_chunks"] = len(both.stats)  # not a "count": it differs between stages by design
    return out_g


def continuation(wrapper, stream: torch.Tensor, prompts: int, tick: Tick, prompt_len: int = 32,
                 new_tokens: int = 32) -> Group:
    """Greedy continuation of held-out text: `prompts` windows of `prompt_len` tokens, evenly spaced over the test
    stream, each continued by `new_tokens` tokens with generate_chunks and with base.generate side by side (order
    alternating per batch). Arithmetic answers are a few tokens, shorter than a chunk; this is where chunked
    generation's cost and commit lengths show. cont_tpot_ms(_plain), cont_tpot_uplift, cont_tokens_per_s(_plain),
    cont_greedy_agree_plain (identical continuations), cont_avg_inner_steps, cont_commit_rate, cont_mean_committed
    (new tokens a running row committed per chunk), cont_committed_fraction (committed / seeded chunk positions).
    """
    from rkl.eval.tasks import window_starts

    dev = model_device(wrapper)
    eos = wrapper.base.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) or eos is None else eos[0]
    starts = window_starts(stream.numel(), prompts, prompt_len)
    both = _SideBySide()
    for i in range(0, len(starts), GEN_BATCH):
        ids = torch.stack([stream[s:s + prompt_len] for s in starts[i:i + GEN_BATCH]]).to(dev)
        both.run(wrapper, ids, torch.ones_like(ids), new_tokens, eos, i // GEN_BATCH)
        tick(ids.shape[0])
    out = Group(counts={"cont_prompts": len(starts)})
    out.metrics.update(both.metrics("cont_", wrapper.config.max_inner_steps))
    return out
