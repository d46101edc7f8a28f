"""generate_chunks: text in chunks of W tokens, each refined by the sidecar before it is committed.

Inference lives here, apart from the model (ChunkRefineWrapper holds the sidecar and runs one chunk's inner loop).

Per chunk, for a batch whose rows share one cache (every row's cache holds the same number of tokens):

1. snapshot the cache at the chunk start (the prefix: the prompt and what every row has committed so far);
2. SEED the chunk: each row's carried tokens first, then HF-style decoding (greedy or sampled, token by token,
   the same forward arguments as `generate`) up to W positions. A row carries
   - LOCKED tokens: committed in an earlier chunk but not in the cache yet (the cache advances by the smallest
     commit of the batch; a row that committed more keeps the rest here). Not editable;
   - with `reuse_stale_suffix`, STALE tokens: the part of its last refined chunk after the position where its
     commit stopped. They were drafted after a token that has since changed, so each one is UNVERIFIED: it
     stands only where the next chunk's unrefined pass (step 1) predicts it, and is replaced by that prediction
     (which counts as a change) otherwise. Nothing stale is ever committed unchecked. Without reuse the row
     decodes those positions again, one token at a time.
   Carried tokens every row has are fed as one multi-token forward instead of one token at a time;
3. refine the chunk (`ChunkRefineWrapper.refine_chunk`) from the snapshot;
4. COMMIT per row with the commit rule (rkl.model.commit): up to and including the first position changed at any
   inner step (a rejected stale token counts), the
   whole chunk if nothing changed, never past the row's first non-committable position (padding after an EOS,
   positions beyond max_new_tokens). If every row still running committed the whole seeded chunk unchanged, the
   seeded cache is adopted (bitwise what `generate` holds); otherwise the snapshot is restored and advanced by the
   batch's smallest commit, with deltas off. No refinement state ([Z], deltas) ever enters the committed cache.

At neutral init nothing changes, every chunk commits whole, nothing is carried, and greedy output equals
`base.generate` token for token (fp32 and bf16): the first promise.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from rkl.model.cache import new_cache, restore_cache, snapshot_cache
from rkl.model.commit import commit_lengths
from rkl.model.wrapper import ChunkRefineWrapper, positions_from_mask


def special_tokens(base: torch.nn.Module) -> tuple[torch.Tensor | None, int | None]:
    """(EOS ids as a tensor or None, pad id) the way HF generate reads them: from generation_config only."""
    gc = base.generation_config
    eos = gc.eos_token_id
    eos_list = None if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gc.pad_token_id
    if pad is None and eos_list:
        pad = eos_list[0]  # what HF generate does (with a warning)
    eos_t = torch.tensor(eos_list, device=base.device) if eos_list else None
    return eos_t, pad


def select_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    """Greedy argmax, or a sample with HF's temperature and top-p (TopPLogitsWarper) semantics."""
    if not do_sample:
        return torch.argmax(logits, dim=-1)
    scores = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)


@torch.no_grad()
def generate_chunks(wrapper: ChunkRefineWrapper, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 64, chunk_width: int | None = None, max_inner_steps: int | None = None,
                    commit_threshold: float | None = None, do_sample: bool = False, temperature: float = 1.0,
                    top_p: float = 1.0, return_stats: bool = False, reuse_stale_suffix: bool | None = None) -> Any:
    """ids [B, prompt + new] exactly as HF `generate` returns them (finished rows padded with pad_token_id);
    generation stops once every row has emitted EOS or committed max_new_tokens.

    None arguments take the wrapper config's value. Sampling (do_sample) applies temperature and top-p as HF does,
    but its random draws are not HF's, logits processors of the base's generation_config are not applied, and
    stale tokens are never reused (their check is a greedy one). Exactness at neutral init needs use_soft_tokens
    off (soft inputs change step 2's logits even with zero deltas).

    return_stats=True returns (ids, stats), one dict per chunk: inner_steps, p_commit (per step, per row),
    tokens_changed (per step), rows (rows still running at the chunk start), seeded_length (chunk positions),
    committed_lengths (new tokens each running row committed), open_positions (chunk positions each running row
    could fill with a new token: not locked), carried (tokens each running row brought in), adopted_seed, and the
    tokens: draft (each running row's seeded chunk, [rows][seeded_length]), step_tokens (the chunk after each inner
    step, [steps][rows][seeded_length]), locked (leading chunk positions each running row had committed before).
    A running row commits step_tokens[-1][row][locked:locked + committed_lengths]. Stats change nothing generated.
    Disabled wrapper: `base.generate` (stats: []).
    """
    base, cfg = wrapper.base, wrapper.config
    if not wrapper.enabled:
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        out = base.generate(input_ids, attention_mask=attention_mask, **kwargs)
        return (out, []) if return_stats else out
    width = chunk_width or cfg.chunk_width
    k_steps = max_inner_steps or cfg.max_inner_steps
    threshold = cfg.commit_threshold if commit_threshold is None else commit_threshold
    reuse = (cfg.reuse_stale_suffix if reuse_stale_suffix is None else reuse_stale_suffix) and not do_sample
    policy = cfg.cache_reset_policy
    eos, pad = special_tokens(base)
    pad_id = 0 if pad is None else pad
    b, dev = input_ids.shape[0], input_ids.device
    if attention_mask is None:  # HF: infer from padding only when pad is set and is not an EOS token
        attention_mask = torch.ones_like(input_ids)
        if pad is not None and bool((input_ids == pad).any()) and (eos is None or not bool((eos == pad).any())):
            attention_mask = input_ids.ne(pad).long()
    mask = attention_mask.long()
    keep_mask = not bool((mask == 1).all())  # HF drops an all-ones mask for the whole generation
    decode_ctx = getattr(base, "_optimize_model_for_decode", contextlib.nullcontext)
    ones = lambda n: torch.ones(b, n, dtype=mask.dtype, device=dev)  # noqa: E731
    is_eos = lambda t: torch.isin(t, eos) if eos is not None else torch.zeros_like(t, dtype=torch.bool)  # noqa: E731

    def fwd(ids: torch.Tensor, m: torch.Tensor, cache: Any) -> torch.Tensor:
        out = base(input_ids=ids, attention_mask=m if keep_mask else None,
                   position_ids=positions_from_mask(m)[:, -ids.shape[1]:], past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].to(torch.float32, copy=True)

    cache = new_cache(base.config)
    seq = input_ids  # prompt + what is in the cache (common to every row)
    prev = fwd(input_ids, mask, cache)
    new_tokens: list[list[int]] = [[] for _ in range(b)]  # committed per row (the cache may lag behind)
    finished = torch.zeros(b, dtype=torch.bool, device=dev)  # committed an EOS
    carry = torch.full((b, 0), pad_id, dtype=torch.long, device=dev)
    n_locked = torch.zeros(b, dtype=torch.long, device=dev)
    n_carry = torch.zeros(b, dtype=torch.long, device=dev)
    cached = 0  # new tokens in the cache
    stats: list[dict[str, Any]] = []
    while cached < max_new_tokens:
        n = min(width, max_new_tokens - cached)
        snap = snapshot_cache(cache)
        # ---- seed: carried tokens, then HF decoding, continuing the live cache
        done = finished | (torch.tensor([len(t) for t in new_tokens], device=dev) >= max_new_tokens)
        unf = (~done).long()
        toks: list[torch.Tensor] = []
        running: list[torch.Tensor] = []
        logits, seed_mask = prev, mask
        carried_all = int(n_carry[~done].min())
        block = min(carried_all, n - 1)  # the chunk's last position goes through the loop below (its break rule)
        for j in range(block):
            nt = carry[:, j] * unf + pad_id * (1 - unf)
            running.append(unf.clone())
            toks.append(nt)
            unf = unf & ~is_eos(nt).long()
        if block:
            seed_mask = torch.cat([seed_mask, ones(block)], 1)
            logits = fwd(torch.stack(toks, 1), seed_mask, cache)
        with decode_ctx():
            for j in range(block, n):
                if not bool(unf.any()):
                    break
                nt = select_tokens(logits, do_sample, temperature, top_p)
                if j < carry.shape[1]:
                    nt = torch.where(j < n_carry, carry[:, j], nt)
                nt = nt * unf + pad_id * (1 - unf)
                running.append(unf.clone())
                toks.append(nt)
                unf = unf & ~is_eos(nt).long()
                if not bool(unf.any()) or cached + j + 1 >= max_new_tokens:
                    break  # generation ends here: like HF, do not feed the last token
                seed_mask = torch.cat([seed_mask, ones(1)], 1)
                logits = fwd(nt[:, None], seed_mask, cache)
        seeded = torch.stack(toks, 1)
        m = seeded.shape[1]
        pos = torch.arange(m, device=dev).unsqueeze(0)
        committable = torch.stack(running, 1).bool()
        locked = pos < n_locked.unsqueeze(1)
        unverified = (pos >= n_locked.unsqueeze(1)) & (pos < n_carry.unsqueeze(1)) & committable
        editable = committable & ~locked
        res = wrapper.refine_chunk(seeded, snap, prev, editable, attention_mask=torch.cat([mask, ones(m)], 1),
                                   max_inner_steps=k_steps, commit_threshold=threshold, soft=cfg.use_soft_tokens,
                                   prefix_ids=seq if policy == "reset_all" else None, prefix_mask=mask,
                                   unverified=unverified if bool(unverified.any()) else None)
        final = res.final_tokens
        lengths = commit_lengths(res.changed, committable)
        was_running = ~done
        for r in range(b):
            if was_running[r]:
                got = final[r, int(n_locked[r]):int(lengths[r])].tolist()
                new_tokens[r] += got
                if eos is not None and any(t in eos.tolist() for t in got):
                    finished[r] = True
        still = was_running & ~finished & (cached + lengths < max_new_tokens)  # rows that need the cache to go on
        advance = int(lengths[still].min()) if bool(still.any()) else m
        # A row that goes on and committed the whole seeded chunk unchanged never reached a break of the seed loop, so
        # when every such row did, the cache holds the chunk and `logits` predicts the next chunk's first token.
        adopt = advance == m and torch.equal(final[still], seeded[still])
        if return_stats:
            stats.append({
                "inner_steps": res.steps_used,
                "p_commit": [p.tolist() for p in res.p_commit],
                "tokens_changed": res.tokens_changed,
                "rows": int(was_running.sum()),
                "seeded_length": m,
                "committed_lengths": (lengths - n_locked)[was_running].tolist(),
                "open_positions": (m - n_locked)[was_running].tolist(),  # chunk positions a new token could take
                "carried": n_carry[was_running].tolist(),
                "adopted_seed": adopt,
                # the tokens themselves, for traces (`rkl generate --show-steps`): what each step read and wrote
                "locked": n_locked[was_running].tolist(),
                "draft": seeded[was_running].tolist(),
                "step_tokens": [t[was_running].tolist() for t in res.tokens],
            })
        if not bool(still.any()):
            break
        if adopt:
            prev = logits  # the seeded cache (`cache`) already holds exactly these tokens
            seq = torch.cat([seq, seeded], 1)
            mask = torch.cat([mask, ones(m)], 1)
            carry = carry[:, :0]
            n_locked.zero_()
            n_carry.zero_()
        else:
            cache = restore_cache(snap)
            advance_ids = torch.where(~still.unsqueeze(1), torch.full_like(final[:, :advance], pad_id),
                                      final[:, :advance])
            mask = torch.cat([mask, ones(advance)], 1)
            seq = torch.cat([seq, advance_ids], 1)
            prev = fwd(advance_ids, mask, cache)
            # what each running row carries into the next chunk: its committed tokens past the cache (locked), then
            # with reuse the rest of its refined chunk up to its last committable position (stale)
            end = committable.long().sum(1) if reuse else lengths
            end = torch.maximum(end, lengths)
            n_locked = torch.where(still, lengths - advance, 0)
            n_carry = torch.where(still, end - advance, 0)
            carry = final[:, advance:]
        cached = seq.shape[1] - input_ids.shape[1]
    width_out = max(len(t) for t in new_tokens)
    out = torch.full((b, width_out), pad_id, dtype=input_ids.dtype, device=dev)
    for r, row in enumerate(new_tokens):
        out[r, :len(row)] = torch.tensor(row, dtype=input_ids.dtype, device=dev)
    seq = torch.cat([input_ids, out], 1)
    return (seq, stats) if return_stats else seq
