"""ChunkRefineWrapper on the tiny preset (CPU): neutrality, exact after-surgery generation, live hooks, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rkl import BoundaryHead, ChunkRefineWrapper, LatentToken, RecursiveConfig, RefineCell, UserError
from rkl.model.base import load_base
from rkl.model.cache import restore_cache
from rkl.model.wrapper import _Pass, commit_thresholds, positions_from_mask

MAX_NEW = 12


@pytest.fixture(scope="module")
def bases():
    out = {}
    for name in ("float32", "bfloat16"):
        base, _ = load_base("tiny", dtype=name)
        out[name] = base.eval()
    return out


def prompt(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, uneven lengths, left padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 384, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3] = pad
    mask[0, :3] = 0
    return ids, mask


def wrap(base, **cfg) -> ChunkRefineWrapper:
    return ChunkRefineWrapper(base, RecursiveConfig(**cfg))


def randomize_outputs(w: ChunkRefineWrapper, std: float = 0.05, seed: int = 0) -> None:
    """Move the zero-initialised output layers (refine out_proj, boundary heads) off zero, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in [cell.out_proj for cell in w.refine_cells.values()] + [w.boundary.commit]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


def every_step_loss(res, chunk: torch.Tensor) -> torch.Tensor:
    """A loss that reads every inner step's logits and commit logit (so gradients must reach every sidecar part)."""
    target = torch.roll(chunk, 1, dims=1)
    loss = sum(F.cross_entropy(lg.flatten(0, 1), target.flatten()) for lg in res.logits)
    return loss + sum(F.binary_cross_entropy_with_logits(c, torch.ones_like(c)) for c in res.commit_logits)


def chunk_setup(w: ChunkRefineWrapper, width: int = 5):
    ids, mask = prompt()
    snap, prev = w.prepare_prefix(ids, mask)
    g = torch.Generator().manual_seed(2)
    chunk = torch.randint(3, 384, (2, width), generator=g)
    full_mask = torch.cat([mask, torch.ones_like(chunk)], 1)
    editable = torch.ones_like(chunk, dtype=torch.bool)
    return ids, mask, snap, prev, chunk, full_mask, editable


# ------------------------------------------------------------------------------------------------ neutral init
@pytest.mark.parametrize("cell_type", ["pooled", "per_token", "chunk_attention"])
def test_refine_cell_zero_init(cell_type):
    cell = RefineCell(96, d_state=8, gate_hidden=16, cell_type=cell_type)
    assert torch.count_nonzero(cell.out_proj.weight) == 0 and torch.count_nonzero(cell.out_proj.bias) == 0
    assert cell.delta(None) is None  # step 1: no delta at all, whatever the cell learned
    h = torch.randn(2, 5, 96)
    state = cell.update(h, None, None)
    state = cell.update(h, torch.ones(2, 5), state)
    d = cell.delta(state)
    assert d.shape == ((2, 1, 96) if cell_type == "pooled" else (2, 5, 96))
    assert torch.count_nonzero(d) == 0
    assert torch.equal(h + d, h)


@pytest.mark.parametrize("cell_type", ["pooled", "per_token", "chunk_attention"])
def test_cell_group_equals_each_cell_on_its_own(cell_type):
    """CellGroup runs the layers' cells together (parameters stacked over the layers, one batched operation each):
    deltas, states over two updates (with padding, and a row with no valid position) and every parameter's gradient
    equal each cell's own, to float rounding, and exactly on the one-by-one path (cells on several devices); zero
    output projections still give exactly zero deltas."""
    from rkl.model.refine import CellGroup

    torch.manual_seed(0)
    cells = [RefineCell(24, d_state=8, gate_hidden=16, cell_type=cell_type) for _ in range(3)]
    group = CellGroup(cells)
    assert group.stacked
    assert all(torch.count_nonzero(d) == 0 for d in group.deltas(group.update([torch.randn(2, 5, 24)] * 3, None,
                                                                             None)))
    for c in cells:  # trained cells: non-zero output projections
        torch.nn.init.normal_(c.out_proj.weight)
        torch.nn.init.normal_(c.out_proj.bias)
    hiddens = [[torch.randn(3, 5, 24) for _ in cells] for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])  # a row with no valid position too

    def one_by_one(cells):  # CellGroup's path for cells on several devices
        group = CellGroup(cells)
        group.stacked = False
        return group

    results = []
    for run in ("together", "alone", "one by one"):
        states, out = None, []
        for step, hs in enumerate(hiddens):
            m = mask if step else None
            if run == "alone":
                states = [c.update(h, m, s) for c, h, s in zip(cells, hs, states or [None] * 3)]
                out += [c.delta(s) for c, s in zip(cells, states)]
            else:
                group = CellGroup(cells) if run == "together" else one_by_one(cells)
                states = group.update(hs, m, states)
                out += group.deltas(states)
        sum(d.square().sum() for d in out).backward()
        grads = {f"{i}.{n}": p.grad.clone() for i, c in enumerate(cells) for n, p in c.named_parameters()}
        for c in cells:
            c.zero_grad(set_to_none=True)
        results.append((out, grads))
    (together, g_together), (alone, g_alone), (loop, g_loop) = results
    for a, b, c in zip(together, alone, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(c, b)  # the one-by-one path is each cell's own code
    assert g_together.keys() == g_alone.keys()
    for name in g_alone:
        torch.testing.assert_close(g_together[name], g_alone[name], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(g_loop[name], g_alone[name]), name


def test_boundary_and_latent_init():
    head = BoundaryHead(96, gate_hidden=16)
    commit = head(torch.randn(3, 96))
    assert torch.allclose(commit, torch.full((3,), -2.0))
    z = LatentToken(96)
    assert z(3).shape == (3, 1, 96)


def test_hooked_hidden_states_bitwise(bases):
    base = bases["float32"]
    w = wrap(base)
    assert all(torch.count_nonzero(c.out_proj.weight) == 0 for c in w.refine_cells.values())
    ids, mask, snap, prev, chunk, full_mask, _ = chunk_setup(w)
    # states that are far from zero, so only the zero output projection keeps the deltas at zero
    states = {i: torch.randn(2, w.config.d_state) for i in w.layers_to_refine}
    deltas = {i: w.refine_cells[str(i)].delta(states[i]) for i in w.layers_to_refine}
    pos = positions_from_mask(full_mask)[:, ids.shape[1]:]
    emb = base.get_input_embeddings()(chunk)
    with torch.no_grad():
        st = _Pass(deltas, start=0, width=chunk.shape[1])
        hooked = w._run(emb, full_mask, pos, restore_cache(snap), st)
        plain = base.model(inputs_embeds=emb, attention_mask=full_mask, position_ids=pos,
                           past_key_values=restore_cache(snap), use_cache=True, output_hidden_states=True)
    assert torch.equal(hooked, plain.last_hidden_state)
    for i in w.layers_to_refine:  # hidden_states[0] is the embedding output; [i + 1] is layer i's output
        if i + 1 < len(plain.hidden_states) - 1:
            assert torch.equal(st.hidden[i], plain.hidden_states[i + 1])


# --------------------------------------------------------------------------------------------- pass-through
def test_disabled_wrapper_is_pass_through(bases):
    base = bases["float32"]
    w = wrap(base, recursive_enabled=False)
    assert w.refine_cells is None and w.boundary is None and w.latent_token is None
    ids, mask = prompt()
    with torch.no_grad():
        assert torch.equal(w(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(w.generate_chunks(ids, attention_mask=mask, max_new_tokens=6), ref)


def test_after_surgery_teacher_forced_logits_bitwise(bases):
    base = bases["float32"]
    ids, mask = prompt()
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask).logits
        w = wrap(base, use_latent_token=True)
        after = w(input_ids=ids, attention_mask=mask).logits
        after_base = base(input_ids=ids, attention_mask=mask).logits  # hooks registered on the base itself
    w.remove_hooks()
    assert torch.equal(before, after) and torch.equal(before, after_base)


@pytest.mark.parametrize("dtype,cell", [("float32", "chunk_attention"), ("bfloat16", "chunk_attention"),
                                        ("bfloat16", "pooled"), ("float32", "per_token")])
def test_inner_steps_at_init_are_identical(bases, dtype, cell):
    w = wrap(bases[dtype], max_inner_steps=3, use_latent_token=True, refine_cell_type=cell)
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    with torch.no_grad():
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
    w.remove_hooks()
    assert res.steps_used == 3
    for t in range(1, 3):
        assert torch.equal(res.logits[t], res.logits[0])
        assert torch.equal(res.tokens[t], chunk)  # the edit rule edits nothing at init
    assert torch.equal(res.logits[0][:, 0], prev)


def test_latent_token_leaves_text_logits_unchanged(bases):
    base = bases["float32"]
    outs = {}
    for lat in (False, True):
        w = wrap(base, use_latent_token=lat, max_inner_steps=2)
        randomize_outputs(w)  # with live deltas too: [Z] is after the chunk, causally invisible
        *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
        with torch.no_grad():
            outs[lat] = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
        w.remove_hooks()
    assert torch.equal(outs[False].logits[0], outs[True].logits[0])
    # the boundary head reads a different summary with [Z]
    assert not torch.equal(outs[False].commit_logits[0], outs[True].commit_logits[0])


# ------------------------------------------------------------------------------ exact after-surgery generation
CASES = [  # dtype, chunk width, K, latent, refine cell
    ("float32", 4, 1, False, "pooled"),
    ("float32", 5, 4, True, "chunk_attention"),
    ("float32", 4, 4, False, "per_token"),
    ("bfloat16", 4, 4, False, "chunk_attention"),
    ("bfloat16", 5, 1, True, "per_token"),
    ("bfloat16", 16, 4, True, "pooled"),  # one chunk wider than the whole generation
    ("bfloat16", 5, 3, True, "chunk_attention"),
]


@pytest.mark.parametrize("dtype,width,k,latent,cell", CASES)
def test_greedy_generate_chunks_equals_generate(bases, dtype, width, k, latent, cell):
    base = bases[dtype]
    ids, mask = prompt()
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    w = wrap(base, chunk_width=width, max_inner_steps=k, use_latent_token=latent, refine_cell_type=cell)
    out, stats = w.generate_chunks(ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_stats=True)
    w.remove_hooks()
    assert torch.equal(out, ref)
    assert all(s["inner_steps"] == k and s["adopted_seed"] for s in stats)
    assert sum(s["committed_lengths"][0] for s in stats) == MAX_NEW


@pytest.mark.parametrize("dtype,latent", [("float32", False), ("bfloat16", True)])
def test_greedy_exact_with_eos_inside_a_chunk(bases, dtype, latent):
    base = bases[dtype]
    ids, mask = prompt()
    free = base.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    # make row 1's 7th generated token the EOS: row 1 stops inside the second chunk, row 0 keeps going (or stops
    # wherever it happens to emit that token too)
    eos = int(free[1, ids.shape[1] + 6])
    gc = base.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = eos
    try:
        ref = base.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
        w = wrap(base, chunk_width=5, max_inner_steps=4, use_latent_token=latent)
        out, stats = w.generate_chunks(ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_stats=True)
        w.remove_hooks()
    finally:
        gc.eos_token_id = old
    assert (ref[1, ids.shape[1]:] == eos).any()
    assert torch.equal(out, ref)


def test_generation_stops_when_every_row_has_finished(bases):
    base = bases["float32"]
    ids, mask = prompt()
    free = base.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    gc = base.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = [int(free[0, ids.shape[1] + 2]), int(free[1, ids.shape[1] + 5])]
    try:
        ref = base.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
        w = wrap(base, chunk_width=4, max_inner_steps=2)
        out = w.generate_chunks(ids, attention_mask=mask, max_new_tokens=MAX_NEW)
        w.remove_hooks()
    finally:
        gc.eos_token_id = old
    assert ref.shape[1] < ids.shape[1] + MAX_NEW  # HF stopped early
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------- live hooks, grads
def test_nonzero_delta_changes_logits(bases):
    w = wrap(bases["float32"], max_inner_steps=2)
    randomize_outputs(w)
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    with torch.no_grad():
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
    w.remove_hooks()
    assert not torch.equal(res.logits[1], res.logits[0])
    assert torch.equal(res.logits[1][:, 0], res.logits[0][:, 0])  # entry 0 is the prefix's prediction


@pytest.mark.parametrize("cell_type,latent", [("pooled", True), ("per_token", False), ("chunk_attention", False)])
def test_gradients_reach_every_sidecar_parameter(bases, cell_type, latent):
    base = bases["float32"]
    for p in base.parameters():
        p.requires_grad_(False)
    w = wrap(base, max_inner_steps=3, refine_cell_type=cell_type, use_latent_token=latent, chunk_width=5)
    randomize_outputs(w)
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
    every_step_loss(res, chunk).backward()
    w.remove_hooks()
    for name, p in [(n, p) for n, p in w.named_parameters() if not n.startswith("base.")]:
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert all(p.grad is None for p in base.parameters())
    for p in base.parameters():
        p.requires_grad_(True)


def test_refine_chunk_is_deterministic(bases):
    w = wrap(bases["float32"], max_inner_steps=3, use_latent_token=True)
    randomize_outputs(w, std=0.5)
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    with torch.no_grad():
        a = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
        b = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
    w.remove_hooks()
    assert a.steps_used == b.steps_used
    for x, y in zip(a.logits + a.commit_logits + a.tokens, b.logits + b.commit_logits + b.tokens):
        assert torch.equal(x, y)


@pytest.mark.parametrize("latent", [False, True])
def test_policies_agree_where_they_should(bases, latent):
    w = wrap(bases["float32"], max_inner_steps=3, use_latent_token=latent)
    randomize_outputs(w)
    ids, mask, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    with torch.no_grad():
        snap_res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask, edit_rule="argmax")
        reset = w.refine_chunk(chunk, None, prev, editable, attention_mask=full_mask, prefix_ids=ids,
                               cache_reset_policy="reset_all", edit_rule="argmax")
        keep = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask,
                              cache_reset_policy="keep_all", edit_rule="argmax")
    w.remove_hooks()
    for a, b in zip(snap_res.logits, reset.logits):  # same computation, cached vs re-run prefix
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    for a, b in zip(snap_res.commit_logits, reset.commit_logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(keep.logits[0], snap_res.logits[0])  # step 1 starts from the snapshot too
    assert not torch.allclose(keep.logits[1], snap_res.logits[1], atol=1e-3)  # then it sees its stale chunk


def test_commit_threshold_stops_early(bases):
    w = wrap(bases["float32"], max_inner_steps=4)
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    with torch.no_grad():
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask, commit_threshold=0.9)
        assert res.steps_used == 4  # p_commit = sigmoid(-2) never reaches a threshold >= 0.5
        w.boundary.commit.bias.fill_(10.0)
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask, commit_threshold=0.9)
    w.remove_hooks()
    assert res.steps_used == 1 and torch.equal(res.final_tokens, chunk)
    assert commit_thresholds(0.9, 0.5, 3) == pytest.approx([0.9, 0.7, 0.5])


# ------------------------------------------------------------------------------------------------- dtypes
def test_sidecar_is_float32_on_a_bf16_base(bases):
    w = wrap(bases["bfloat16"], max_inner_steps=2, use_latent_token=True, refine_cell_type="per_token")
    assert {p.dtype for p in w.sidecar_parameters()} == {torch.float32}
    randomize_outputs(w)
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    with torch.no_grad():
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask, soft=True)
    w.remove_hooks()
    assert res.logits[1].dtype == torch.float32 and not torch.equal(res.logits[1], res.logits[0])


# ---------------------------------------------------------------------------------------------- bad input
def test_layers_to_refine_must_exist(bases):
    with pytest.raises(UserError, match=r"layer 7.*4 decoder layers"):
        wrap(bases["float32"], layers_to_refine=[0, 7])


def test_only_listed_layers_get_cells_and_hooks(bases):
    base = bases["float32"]
    w = wrap(base, layers_to_refine=[1, 3])
    assert sorted(w.refine_cells.keys()) == ["1", "3"]
    assert len(w._hook_handles) == 2
    w.remove_hooks()


def test_mixed_sidecar_and_base_dtypes_never_crash():
    """Even if only the base is cast after the wrapper was built, the sidecar's fp32 meets bf16 without errors."""
    base, _ = load_base("tiny")
    w = wrap(base, max_inner_steps=2, use_latent_token=True)
    randomize_outputs(w)
    base.to(torch.bfloat16)
    assert {p.dtype for p in w.sidecar_parameters()} == {torch.float32}
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    w.train()  # training mode too (phase A runs the frozen base in train mode or eval mode alike)
    res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
    (res.logits[-1].sum() + res.commit_logits[-1].sum()).backward()
    assert w.latent_token.embedding.grad is not None  # through the boundary head ([Z] is invisible to the text)
    assert all(p.grad is not None for p in w.refine_cells.parameters())
    w.eval()
    ids, mask = prompt()
    assert w.generate_chunks(ids, attention_mask=mask, max_new_tokens=4).shape == (2, 11)
    w.to(torch.bfloat16)  # moving the wrapper moves base and sidecar together
    assert {p.dtype for p in w.parameters()} == {torch.bfloat16}


def test_gradients_flow_through_the_recurrent_state_across_steps(bases, monkeypatch):
    """The step-1 update's parameters get gradient through every later step: detaching the cell state between
    steps changes their gradients (so the K-step backward really runs through the recurrence)."""
    from rkl.model.refine import CellGroup

    base = bases["float32"]
    for p in base.parameters():
        p.requires_grad_(False)
    grads = {}
    update = CellGroup.update
    for detach in (False, True):
        w = wrap(base, max_inner_steps=4, refine_cell_type="chunk_attention")
        randomize_outputs(w, std=0.3)
        if detach:
            monkeypatch.setattr(CellGroup, "update", lambda self, h, m, s: update(
                self, h, m, None if s is None else s.detach()))
        *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
        F.cross_entropy(res.logits[-1].flatten(0, 1), torch.roll(chunk, 1, dims=1).flatten()).backward()
        grads[detach] = torch.cat([p.grad.flatten() for p in w.refine_cells.parameters()])
        w.remove_hooks()
    for p in base.parameters():
        p.requires_grad_(True)
    assert not torch.allclose(grads[False], grads[True], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("cell_type,reads_later", [("chunk_attention", True), ("per_token", False)])
def test_what_an_early_position_can_read(bases, cell_type, reads_later):
    """chunk_attention: position 1's step-2 logits move when only the chunk's LAST token changes (it reads the
    whole draft); per_token: they do not (a causal position never sees a later token)."""
    w = wrap(bases["float32"], max_inner_steps=2, refine_cell_type=cell_type)
    randomize_outputs(w, std=0.3)
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    other = chunk.clone()
    other[:, -1] = (chunk[:, -1] + 1) % 384
    with torch.no_grad():
        a = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask, edit_rule="vs_first_step")
        b = w.refine_chunk(other, snap, prev, editable, attention_mask=full_mask, edit_rule="vs_first_step")
    w.remove_hooks()
    # step 1 is causal (the chunked KDA path rounds differently when a later token changes: ~1e-7)
    torch.testing.assert_close(a.logits[0][:, :2], b.logits[0][:, :2], rtol=0, atol=1e-6)
    moved = (a.logits[1][:, 2] - b.logits[1][:, 2]).abs().max()  # entry 2 = the logits at chunk position 1
    assert (moved > 1e-4) == reads_later, float(moved)


def test_sidecar_saved_with_the_old_length_head_still_loads(bases):
    w = wrap(bases["float32"])
    state = {**w.sidecar_state_dict(), "boundary.length.weight": torch.zeros(32, 64),
             "boundary.length.bias": torch.zeros(32)}
    w.load_sidecar_state_dict(state)
    w.remove_hooks()
    with pytest.raises(UserError, match="unexpected"):
        w.load_sidecar_state_dict({**state, "boundary.other": torch.zeros(1)})


def test_edit_margin_keeps_only_confident_edits(bases):
    """With a trained-looking sidecar some tokens change; a margin keeps exactly the edits whose log-probability
    gain over the chunk's token exceeds it, and an infinite-looking margin keeps none."""
    changed = {}
    for margin in (0.0, 0.5, 1e6):
        w = wrap(bases["float32"], max_inner_steps=2, refine_cell_type="chunk_attention", edit_margin=margin)
        randomize_outputs(w, std=0.5)
        *_, snap, prev, chunk, full_mask, editable = chunk_setup(w, width=8)
        with torch.no_grad():
            res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
        w.remove_hooks()
        changed[margin] = res.tokens[-1] != res.tokens[0]
        if margin == 0.5:
            logp = torch.log_softmax(res.logits[-1], -1)
            new, old = res.logits[-1].argmax(-1), res.tokens[0]
            moved = new != res.logits[0].argmax(-1)
            gain = logp.gather(-1, new[..., None]).squeeze(-1) - logp.gather(-1, old[..., None]).squeeze(-1)
            assert torch.equal(changed[margin], moved & (gain > 0.5))
    assert changed[0.0].any() and not changed[1e6].any()
    assert (changed[0.5] <= changed[0.0]).all() and changed[0.5].sum() < changed[0.0].sum()


# ------------------------------------------------------------------------------------ gradient checkpointing
def _saved_bytes_and_grads(base, checkpointing: bool, latent: bool, policy: str):
    """Refine a chunk with grad, backprop a loss on every step; (bytes autograd saved outside checkpointed regions,
    the sidecar's gradients, the LoRA-free base input-embedding gradient)."""
    w = wrap(base, max_inner_steps=3, refine_cell_type="chunk_attention", use_latent_token=latent, chunk_width=5,
             gradient_checkpointing=checkpointing)
    randomize_outputs(w)
    w.train()
    ids, mask, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask, prefix_ids=ids,
                             cache_reset_policy=policy)
        loss = every_step_loss(res, chunk)
    loss.backward()
    w.remove_hooks()
    grads = {n: p.grad.clone() for n, p in w.named_parameters() if not n.startswith("base.")}
    return sum(saved), grads, [lg.detach() for lg in res.logits]


@pytest.mark.parametrize("latent,policy", [(False, "keep_kda_recurrent_reset_mla"), (True, "keep_kda_recurrent_reset_mla"),
                                           (False, "reset_all")])
def test_step_checkpointing_keeps_the_cached_prefix_and_the_gradients(bases, latent, policy):
    """gradient_checkpointing recomputes each inner step from the snapshot in backward: the same logits and the same
    sidecar gradients (the recompute sees the cached prefix, unlike transformers' per-layer checkpointing), with a
    fraction of the saved activations."""
    base = bases["float32"]
    for p in base.parameters():
        p.requires_grad_(False)
    try:
        plain_bytes, plain, plain_logits = _saved_bytes_and_grads(base, False, latent, policy)
        ckpt_bytes, ckpt, ckpt_logits = _saved_bytes_and_grads(base, True, latent, policy)
    finally:
        for p in base.parameters():
            p.requires_grad_(True)
        base.eval()
    for a, b in zip(plain_logits, ckpt_logits):
        assert torch.equal(a, b)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_step_checkpointing_refuses_keep_all(bases):
    w = wrap(bases["float32"], max_inner_steps=2, gradient_checkpointing=True)
    w.train()
    *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
    with pytest.raises(RuntimeError, match="keep_all"):
        w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask, cache_reset_policy="keep_all")
    w.remove_hooks()
    bases["float32"].eval()


def test_step_checkpointing_holds_no_cache_until_backward(bases):
    """A checkpointed step keeps its function until backward: it must not keep an earlier step's cache alive (K - 1
    whole caches, each holding the prefix's MLA latents, stayed in memory in a first version)."""
    import gc

    from transformers.cache_utils import Cache

    base = bases["float32"]
    for p in base.parameters():
        p.requires_grad_(False)
    try:
        w = wrap(base, max_inner_steps=4, gradient_checkpointing=True, chunk_width=5)
        randomize_outputs(w)
        w.train()
        *_, snap, prev, chunk, full_mask, editable = chunk_setup(w)
        res = w.refine_chunk(chunk, snap, prev, editable, attention_mask=full_mask)
        gc.collect()
        live = [o for o in gc.get_objects() if issubclass(type(o), Cache)]
        assert live == []
        sum(lg.sum() for lg in res.logits).backward()
        w.remove_hooks()
    finally:
        for p in base.parameters():
            p.requires_grad_(True)
        base.eval()
