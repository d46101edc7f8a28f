"""Snapshot / restore of the hybrid KDA + MLA cache, and gradients through a chunk that starts from a cached prefix."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

from rkl import ChunkRefineWrapper, RecursiveConfig, restore_cache, snapshot_cache
from rkl.model.base import load_base
from rkl.model.cache import caches_equal, cache_tensors, new_cache
from rkl.model.wrapper import _Pass, positions_from_mask


@pytest.fixture(scope="module")
def base():
    b, _ = load_base("tiny")
    return b.eval()


def prefill(base, ids):
    cache = new_cache(base.config)
    with torch.no_grad():
        out = base(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache, out.logits


def test_cache_layout_is_hybrid(base):
    cache, _ = prefill(base, torch.randint(3, 384, (2, 6)))
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [LinearAttentionLayer] * 3 + [DynamicLayer]


def test_snapshot_restore_roundtrip_leaves_cache_untouched(base):
    ids = torch.randint(3, 384, (2, 9))
    cache, _ = prefill(base, ids)
    before = copy.deepcopy(cache)
    snap = snapshot_cache(cache)
    assert snap.seq_length == 9 and snap.batch_size == 2
    assert caches_equal(cache, before)  # taking a snapshot changes nothing

    restored = restore_cache(snap)
    assert caches_equal(restored, cache)
    # KDA tensors are fresh clones, MLA latents are shared (never mutated in place by transformers)
    assert restored.layers[0].recurrent_states[0].data_ptr() != cache.layers[0].recurrent_states[0].data_ptr()
    assert restored.layers[3].keys is cache.layers[3].keys

    # running on the restored cache leaves the original and the snapshot intact
    nxt = torch.randint(3, 384, (2, 1))
    with torch.no_grad():
        a = base(input_ids=nxt, past_key_values=restored, use_cache=True).logits
        chunk = torch.randint(3, 384, (2, 4))
        base(input_ids=chunk, past_key_values=restored, use_cache=True)
    assert caches_equal(cache, before)
    again = restore_cache(snap)
    assert caches_equal(again, before)
    with torch.no_grad():
        b = base(input_ids=nxt, past_key_values=again, use_cache=True).logits
        c = base(input_ids=nxt, past_key_values=copy.deepcopy(before), use_cache=True).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_restore_continues_exactly_like_the_original(base):
    ids = torch.randint(3, 384, (2, 8))
    cache, _ = prefill(base, ids)
    snap = snapshot_cache(cache)
    ref_cache = copy.deepcopy(cache)
    nxt = torch.randint(3, 384, (2, 3))
    with torch.no_grad():
        ref = base(input_ids=nxt, past_key_values=ref_cache, use_cache=True).logits
        got = base(input_ids=nxt, past_key_values=restore_cache(snap, grad_friendly=True), use_cache=True).logits
        got_plain = base(input_ids=nxt, past_key_values=restore_cache(snap), use_cache=True).logits
    assert torch.equal(ref, got) and torch.equal(ref, got_plain)


def test_snapshot_of_an_empty_cache(base):
    cache = new_cache(base.config)
    restored = restore_cache(snapshot_cache(cache))
    assert restored.get_seq_length() == 0 and cache_tensors(restored) == []
    ids = torch.randint(3, 384, (1, 5))
    with torch.no_grad():
        a = base(input_ids=ids, past_key_values=restored, use_cache=True).logits
        b = base(input_ids=ids).logits
    assert torch.equal(a, b)


def _chunk_loss(w: ChunkRefineWrapper, base, embeds, mask, pos, cache, start, width, target):
    deltas = {i: w.refine_cells[str(i)].delta(w._test_states[i]) for i in w.layers_to_refine}
    hidden = w._run(embeds, mask, pos, cache, _Pass(deltas, start=start, width=width))
    logits = base.lm_head(hidden[:, start:start + width]).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def test_gradients_through_a_cached_prefix_match_a_full_sequence(base):
    for p in base.parameters():
        p.requires_grad_(False)
    w = ChunkRefineWrapper(base, RecursiveConfig())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for cell in w.refine_cells.values():
            cell.out_proj.weight.copy_(torch.randn(cell.out_proj.weight.shape, generator=g) * 0.05)
    w._test_states = {i: torch.randn(2, w.config.d_state, generator=g) for i in w.layers_to_refine}
    p_len, width = 9, 6
    ids = torch.randint(3, 384, (2, p_len + width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in row 0
    target = torch.randint(3, 384, (2, width), generator=g)
    emb = base.get_input_embeddings()
    pos = positions_from_mask(mask)
    params = [p for c in w.refine_cells.values() for p in c.out_proj.parameters()]

    # reference: the whole sequence in one forward, no cache; deltas only at the chunk positions
    chunk_ref = emb(ids[:, p_len:]).detach().requires_grad_(True)
    full = torch.cat([emb(ids[:, :p_len]).detach(), chunk_ref], 1)
    loss_ref = _chunk_loss(w, base, full, mask, pos, None, p_len, width, target)
    grads_ref = torch.autograd.grad(loss_ref, [chunk_ref, *params])

    # the chunk alone from a cached prefix (snapshot -> autograd-safe restore)
    with torch.no_grad():
        cache = new_cache(base.config)
        base(input_ids=ids[:, :p_len], attention_mask=mask[:, :p_len], position_ids=pos[:, :p_len],
             past_key_values=cache, use_cache=True)
    snap = snapshot_cache(cache)
    chunk = emb(ids[:, p_len:]).detach().requires_grad_(True)
    loss = _chunk_loss(w, base, chunk, mask, pos[:, p_len:], restore_cache(snap, grad_friendly=True), 0, width, target)
    grads = torch.autograd.grad(loss, [chunk, *params])
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        rel = (a - b).norm() / b.norm()
        assert rel < 1e-5, float(rel)

    # transformers' own in-place cache updates break this backward; that is why the assigning layers exist
    chunk2 = emb(ids[:, p_len:]).detach().requires_grad_(True)
    plain = restore_cache(snap, grad_friendly=False)
    loss2 = _chunk_loss(w, base, chunk2, mask, pos[:, p_len:], plain, 0, width, target)
    with pytest.raises(RuntimeError, match="inplace"):
        loss2.backward()
    w.remove_hooks()
    for p in base.parameters():
        p.requires_grad_(True)


def test_new_cache_grad_friendly_layers(base):
    cache = new_cache(base.config, grad_friendly=True)
    assert all(type(layer).__name__.startswith("Assigning") for layer in cache.layers[:3])
    assert type(cache.layers[3]) is DynamicLayer
    snap = snapshot_cache(cache)
    assert all(type(layer) is LinearAttentionLayer for layer in restore_cache(snap).layers[:3])
