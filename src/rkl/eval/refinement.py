"""Refinement metrics on fixed held-out (prefix, chunk) pairs: masked-chunk restoration and draft quality.

The sidecar never reads a token it is scored on: restoration scores only corrupted positions (the chunk it
reads holds a different token there), draft quality scores the refined draft against a continuation that is
never an input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from rkl.data.chunks import GREEDY, TRUE, chunk_batch, chunk_modes
from rkl.data.packing import step_generator
from rkl.eval.metrics import NLLAccumulator, stability_at_k
from rkl.eval.tasks import (CHUNK_BATCH, EVAL_SEED, PREFIX_RANGE, RESTORE_MASK, RESTORE_RATE, Group, Tick,
                            cluster_se, model_device, row_stats)
from rkl.model.cache import restore_cache
from rkl.model.drafts import build_chunk


def eval_chunks(stream: torch.Tensor, width: int, eos_id: int, total: int) -> Iterator[Any]:
    """Fixed (prefix, chunk) batches of the held-out stream: batch i = chunk_batch(step=i, seed=EVAL_SEED), the
    first `total` pairs."""
    for i in range(math.ceil(total / CHUNK_BATCH)):
        b = chunk_batch(stream, i, CHUNK_BATCH, width, PREFIX_RANGE[0], PREFIX_RANGE[1], EVAL_SEED, eos_id)
        keep = min(CHUNK_BATCH, total - i * CHUNK_BATCH)
        yield i, type(b)(b.prefix_ids[:keep], b.chunk_ids[:keep], b.chunk_valid[:keep])


def _one_pass_logits(wrapper, chunk: torch.Tensor, snap: Any, prev: torch.Tensor) -> torch.Tensor:
    """Aligned logits of the base over the chunk after the cached prefix (entry j predicts position j): exactly
    what refine_chunk's first step computes, for models without a sidecar."""
    p = snap.seq_length
    pos = torch.arange(p, p + chunk.shape[1], device=chunk.device).expand(chunk.shape[0], -1)
    out = wrapper.base(input_ids=chunk, position_ids=pos, past_key_values=restore_cache(snap), use_cache=True)
    return torch.cat([prev.unsqueeze(1), out.logits[:, :-1].float()], 1)


class _Restore:
    """Accumulates restoration over batches (see `chunk_tasks`)."""

    def __init__(self) -> None:
        self.acc1, self.acck = NLLAccumulator(), NLLAccumulator()
        self.rows1: list[tuple] = []
        self.rowsk: list[tuple] = []
        self.unchanged = self.n_edit = 0.0

    def add(self, wrapper, chunk, mask, target, valid, snap, prev, config, prefix) -> None:
        if wrapper.enabled:
            res = wrapper.refine_chunk(chunk, snap, prev, torch.ones_like(valid), max_inner_steps=config.max_inner_steps,
                                       commit_threshold=None, prefix_ids=prefix)
            first, last = res.logits[0], res.logits[-1]
            n = float(mask.sum())
            self.unchanged += stability_at_k(list(res.tokens), mask) * n
            self.n_edit += n
        else:
            first = last = _one_pass_logits(wrapper, chunk, snap, prev)
        self.acc1.add(first, target, mask)
        self.acck.add(last, target, mask)
        self.rows1.append(row_stats(first, target, mask))
        self.rowsk.append(row_stats(last, target, mask))

    def group(self, enabled: bool) -> Group:
        flat = lambda rows, j: [x for r in rows for x in r[j]]  # noqa: E731
        sizes = flat(self.rows1, 2)
        a1, ak = self.acc1, self.acck
        out = Group({"restore_ce_1": a1.mean_nll(), "restore_acc_1": a1.token_accuracy()},
                    {"restore": a1.tokens, "restore_chunks": len(sizes)},
                    {"restore_ce_1": cluster_se(flat(self.rows1, 0), sizes),
                     "restore_acc_1": cluster_se(flat(self.rows1, 1), sizes)})
        if enabled:
            out.metrics.update(restore_ce_k=ak.mean_nll(), restore_acc_k=ak.token_accuracy(),
                               restore_stability_at_k=self.unchanged / self.n_edit if self.n_edit else math.nan)
            out.stderr.update(restore_ce_k=cluster_se(flat(self.rowsk, 0), sizes),
                              restore_acc_k=cluster_se(flat(self.rowsk, 1), sizes))
        return out


def chunk_tasks(wrapper, stream: torch.Tensor, config, eos_id: int, width: int, total: int, tick: Tick) -> Group:
    """Restoration and draft quality on the same fixed (prefix, true chunk) pairs; the prefix runs once.

    Restoration: a fraction RESTORE_RATE (fixed, the same for every stage) of each chunk's valid positions (random
    mask over the chunk, at least one per chunk; only those up to the chunk's EOS are scored) holds a token sampled from the base's own distribution given the chunk so far
    (rkl.model.drafts.build_chunk, as training builds its corrupted chunks); the sidecar refines the chunk with
    every position editable, all K steps, under the exact edit rule of generation. restore_ce/acc_1: CE and
    argmax accuracy at the sampled positions from step 1 (zero deltas: the unrefined model through the same chunk
    path); restore_ce/acc_k: from step K, the number a trained sidecar must beat. restore_stability_at_k: fraction
    of sampled positions whose token no inner step changed.
    Recursion off: restore_*_1 only (the base over the corrupted chunk after the cached prefix).

    Draft quality: draft_acc: the greedy W-token draft (recursion off) vs the true continuation at its valid
    positions (up to and including the true EOS); draft_acc_refined: the draft after refine_chunk with every
    position editable and the config's commit threshold, as in generation (drafted restoration: the one-pass
    draft vs K steps); stability_at_k: fraction of valid draft positions no inner step changed; draft_inner_steps:
    mean inner steps per batch (the halting decision is batch-wide).
    """
    dev = model_device(wrapper)
    restore = _Restore()
    hits, hits_ref, sizes, steps = [], [], [], []
    unchanged = 0.0
    for i, batch in eval_chunks(stream, width, eos_id, total):
        target, valid = batch.chunk_ids.to(dev), batch.chunk_valid.to(dev)
        snap, prev = wrapper.prepare_prefix(batch.prefix_ids.to(dev))
        g = step_generator(EVAL_SEED, i, "eval-corrupt")
        modes, _ = chunk_modes(target.shape[0], width, 0.0, 0.0, RESTORE_RATE, RESTORE_MASK, g)
        modes = modes.to(dev)
        chunk = build_chunk(wrapper, snap, prev, target, modes, g)
        prefix = batch.prefix_ids.to(dev)
        restore.add(wrapper, chunk, valid & (modes != TRUE), target, valid, snap, prev, config, prefix)
        draft = build_chunk(wrapper, snap, prev, target, torch.full_like(modes, GREEDY))
        hits += ((draft == target) & valid).double().sum(1).tolist()
        sizes += valid.double().sum(1).tolist()
        if wrapper.enabled:
            res = wrapper.refine_chunk(draft, snap, prev, torch.ones_like(valid), prefix_ids=prefix,
                                       max_inner_steps=config.max_inner_steps, commit_threshold=config.commit_threshold)
            hits_ref += ((res.final_tokens == target) & valid).double().sum(1).tolist()
            unchanged += stability_at_k([draft] + list(res.tokens), valid) * float(valid.sum())
            steps.append(res.steps_used)
        tick(draft.shape[0])
    n = sum(sizes)
    out = restore.group(wrapper.enabled)
    out.metrics["draft_acc"] = sum(hits) / n
    out.counts.update(draft=int(n), draft_chunks=len(sizes))
    out.stderr["draft_acc"] = cluster_se(hits, sizes)
    if wrapper.enabled:
        out.metrics.update(draft_acc_refined=sum(hits_ref) / n, stability_at_k=unchanged / n,
                           draft_inner_steps=sum(steps) / len(steps))
        out.stderr["draft_acc_refined"] = cluster_se(hits_ref, sizes)
    return out
