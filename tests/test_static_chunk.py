"""The inner steps' chunk passes over static buffers (rkl.model.static_chunk): the same logits, tokens and sidecar
gradients as the eager passes, chunk after chunk from other prefix lengths; on a GPU, the graphed passes equal the
same static passes run eagerly."""

from __future__ import annotations

import pytest
import torch

from rkl import ChunkRefineWrapper, RecursiveConfig
from rkl.model.base import build_preset
from rkl.model.static_chunk import StaticChunkPasses

WIDTH, K, ROWS, MAX_PREFIX = 6, 3, 3, 24


@pytest.fixture(scope="module")
def base():
    model = build_preset("tiny", dtype=torch.float32, device_map="cpu")
    model.eval()
    model.requires_grad_(False)  # as phase A freezes it
    return model


def trained_looking(base, cell_type: str) -> ChunkRefineWrapper:
    """A wrapper whose cells make non-zero deltas (surgery's are zero, which would hide a broken pass)."""
    wrapper = ChunkRefineWrapper(base, RecursiveConfig(refine_cell_type=cell_type, max_inner_steps=K))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for cell in wrapper.refine_cells.values():
            cell.out_proj.weight.normal_(0, 0.5)
    wrapper.train()
    return wrapper


def step_and_grads(wrapper, chunk, snapshot, prev, targets, passes=None):
    result = wrapper.refine_chunk(chunk, snapshot, prev, editable=torch.ones_like(chunk, dtype=torch.bool),
                                  chunk_passes=passes)
    loss = sum(torch.nn.functional.cross_entropy(l.flatten(0, 1), targets.flatten()) for l in result.logits)
    loss = loss + sum(c.sum() for c in result.commit_logits)
    wrapper.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
    return result, grads


@pytest.mark.parametrize("cell_type", ["chunk_attention", "pooled"])
def test_static_passes_match_the_eager_passes_from_each_new_prefix(base, cell_type):
    """Three chunks through one StaticChunkPasses, the second from a SHORTER prefix than the first (latents the first
    loaded past it must stay invisible) and each with its own KDA states: every step's logits and commit logits
    equal the eager passes' to float32 rounding, the tokens are identical, and so are the gradients of every sidecar
    parameter that gets one (the graph's backward replaces theirs). Broken on purpose, this fails: with the padding
    between prefix and chunk visible, with the KDA states not reloaded. (Position ids off by one pass: Kimi-Linear's
    MLA is NoPE.)"""
    wrapper = trained_looking(base, cell_type)
    passes = StaticChunkPasses(base, MAX_PREFIX, graph=False)
    gen = torch.Generator().manual_seed(0)
    for prefix_len in (17, 8, MAX_PREFIX):
        ids = torch.randint(3, base.config.vocab_size, (ROWS, prefix_len), generator=gen)
        chunk = torch.randint(3, base.config.vocab_size, (ROWS, WIDTH), generator=gen)
        targets = torch.randint(3, base.config.vocab_size, (ROWS, WIDTH), generator=gen)
        snapshot, prev = wrapper.prepare_prefix(ids)
        eager, eager_grads = step_and_grads(wrapper, chunk, snapshot, prev, targets)
        static, static_grads = step_and_grads(wrapper, chunk, snapshot, prev, targets, passes)
        assert static.steps_used == eager.steps_used == K
        for a, b in zip(static.logits + static.commit_logits, eager.logits + eager.commit_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        for a, b in zip(static.tokens, eager.tokens):
            assert torch.equal(a, b)
        assert static_grads.keys() == eager_grads.keys() and any(n.startswith("refine_cells") for n in eager_grads)
        for name in eager_grads:
            torch.testing.assert_close(static_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert passes.key is not None  # the static passes ran
    assert passes.captures == 0  # a CPU runs the passes eagerly
    wrapper.remove_hooks()  # the base is shared by this module's tests


@pytest.fixture
def one_chunk(base):
    """(wrapper, static passes, chunk, its snapshot, prev logits, editable) for one chunk after a 10-token prefix."""
    wrapper = trained_looking(base, "chunk_attention")
    ids = torch.randint(3, base.config.vocab_size, (ROWS, 10))
    chunk = torch.randint(3, base.config.vocab_size, (ROWS, WIDTH))
    snapshot, prev = wrapper.prepare_prefix(ids)
    yield (wrapper, StaticChunkPasses(base, MAX_PREFIX, graph=False), chunk, snapshot, prev,
           torch.ones_like(chunk, dtype=torch.bool))
    wrapper.remove_hooks()  # the base is shared by this module's tests


def test_static_passes_stand_aside_where_they_do_not_apply(base, one_chunk):
    """Without gradient (validation), with a mask, and past the buffers' length the eager passes run or the call is
    refused; nothing is loaded in the first two."""
    wrapper, passes, chunk, snapshot, prev, editable = one_chunk
    with torch.no_grad():
        wrapper.refine_chunk(chunk, snapshot, prev, editable=editable, chunk_passes=passes)
    wrapper.refine_chunk(chunk, snapshot, prev, editable=editable, attention_mask=torch.ones_like(chunk),
                         chunk_passes=passes)
    assert passes.key is None
    long_ids = torch.randint(3, base.config.vocab_size, (ROWS, MAX_PREFIX + 1))
    long_snapshot, long_prev = wrapper.prepare_prefix(long_ids)
    with pytest.raises(ValueError, match="at most 24 tokens, got 25"):
        wrapper.refine_chunk(chunk, long_snapshot, long_prev, editable=editable, chunk_passes=passes)
    base.model.norm.weight.requires_grad_(True)  # a base that trains would get no gradient through the passes
    try:
        with pytest.raises(ValueError, match="freeze the base"):
            wrapper.refine_chunk(chunk, snapshot, prev, editable=editable, chunk_passes=passes)
    finally:
        base.model.norm.weight.requires_grad_(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphed_passes_equal_the_same_static_passes_run_eagerly():
    """On a GPU with a bf16 base under autocast: the graph replays give bitwise the logits, commit logits and tokens
    of the same static passes run eagerly, over two batches with different prefix lengths, and the same sidecar
    gradients up to the backward's run-to-run variation (about 1% relative on an H100 between two replays of one
    graph on the same input: the backward kernels are not deterministic)."""
    model = build_preset("small", dtype=torch.bfloat16, device_map="cuda")  # kernels shared with the benchmarks
    model.requires_grad_(False)  # as phase A freezes it
    wrapper = trained_looking(model, "chunk_attention").cuda()
    eager_passes = StaticChunkPasses(model, MAX_PREFIX, graph=False)
    graphed = StaticChunkPasses(model, MAX_PREFIX, graph=True)
    gen = torch.Generator().manual_seed(0)
    for prefix_len in (17, 8):
        ids = torch.randint(3, model.config.vocab_size, (ROWS, prefix_len), generator=gen).cuda()
        chunk = torch.randint(3, model.config.vocab_size, (ROWS, WIDTH), generator=gen).cuda()
        targets = torch.randint(3, model.config.vocab_size, (ROWS, WIDTH), generator=gen).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            snapshot, prev = wrapper.prepare_prefix(ids)
            a, a_grads = step_and_grads(wrapper, chunk, snapshot, prev, targets, eager_passes)
            b, b_grads = step_and_grads(wrapper, chunk, snapshot, prev, targets, graphed)
        assert graphed.failed is None and graphed.captures == 1
        for x, y in zip(a.logits + a.commit_logits + a.tokens, b.logits + b.commit_logits + b.tokens):
            assert torch.equal(x, y)
        assert a_grads.keys() == b_grads.keys()
        for name in a_grads:
            gap = (a_grads[name] - b_grads[name]).norm() / a_grads[name].norm().clamp_min(1e-12)
            assert gap < 0.05, (name, float(gap))


def test_phase_a_loss_and_gradients_are_the_same_through_the_static_passes(base):
    """RefineTask hands its chunk passes to refine_chunk: phase A's loss, its logged terms and the sidecar's
    gradients through StaticChunkPasses (run eagerly, as on a CPU) equal the eager passes', over steps whose prefix
    lengths differ (prefix_range sizes the buffers). Broken on purpose (losses_on not passing chunk_passes), the
    check that the static passes ran fails."""
    from types import SimpleNamespace

    from rkl.paths import stage_config_path
    from rkl.train.refine_phases import RefineTask, prefix_range

    config = RecursiveConfig.from_file(stage_config_path("phase_a")).replace(
        chunk_width=4, max_inner_steps=3, seq_len=20, batch_size=2, d_state=16, gate_hidden=16, steps=10)
    wrapper = ChunkRefineWrapper(base, config)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        for cell in wrapper.refine_cells.values():
            cell.out_proj.weight.normal_(0, 0.5)
    stream = torch.randint(3, base.config.vocab_size, (4000,), generator=torch.Generator().manual_seed(0))
    task = RefineTask(wrapper, SimpleNamespace(eos_token_id=2), config, stream, stream, torch.device("cpu"), "a", {})
    task.train_mode(True)
    static = StaticChunkPasses(base, prefix_range(config)[1], graph=False)
    prefixes = set()
    for step in range(3):
        runs = []
        for passes in (None, static):
            task.chunk_passes = passes
            loss, stats = task.loss(step, 0)
            wrapper.zero_grad(set_to_none=True)
            loss.backward()
            runs.append((loss.detach(), stats, {n: p.grad.clone() for n, p in wrapper.named_parameters()
                                                if p.grad is not None}))
        (loss_e, stats_e, grads_e), (loss_s, stats_s, grads_s) = runs
        torch.testing.assert_close(loss_s, loss_e, rtol=1e-5, atol=1e-6)
        assert stats_s["n_loss_positions"] == stats_e["n_loss_positions"] and stats_s["tokens"] == stats_e["tokens"]
        assert grads_s.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_s[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
        prefixes.add(int(stats_e["tokens"]))
    assert static.key is not None and len(prefixes) > 1  # the static passes ran, over different prefix lengths
    wrapper.remove_hooks()


def test_run_json_says_when_a_capture_failed(base):
    """run.json is written from run_facts at each checkpoint: a chunk-pass capture that failed after the run began
    shows there as eager, with its reason."""
    from types import SimpleNamespace

    from rkl.train.refine_phases import RefineTask

    config = RecursiveConfig(chunk_width=4, max_inner_steps=2, d_state=16, gate_hidden=16, seq_len=20)
    wrapper = ChunkRefineWrapper(base, config)
    stream = torch.arange(3, 300)
    task = RefineTask(wrapper, SimpleNamespace(eos_token_id=2), config, stream, stream, torch.device("cpu"), "a", {})
    assert task.run_facts() == {"draft_walk": "eager", "chunk_passes": "eager"}
    task.chunk_passes, task.chunk_pass_mode = StaticChunkPasses(base, 16, graph=False), "cuda_graph"
    assert task.run_facts()["chunk_passes"] == "cuda_graph"
    task.chunk_passes.failed = "operation not permitted when stream is capturing"
    assert task.run_facts()["chunk_passes"] == ("eager (the CUDA graphs' capture failed: operation not permitted "
                                                 "when stream is capturing)")
    wrapper.remove_hooks()


def test_a_second_forward_before_the_backward_is_refused(one_chunk):
    """The passes' buffers hold what a forward's backward needs: a second refine_chunk with gradient before that
    backward is refused (under a graph it would silently give wrong gradients); after the backward, or without
    gradient, it runs. Broken on purpose (no hook clearing the flag), the call after the backward fails."""
    wrapper, passes, chunk, snapshot, prev, editable = one_chunk
    run = lambda: wrapper.refine_chunk(chunk, snapshot, prev, editable=editable, chunk_passes=passes)  # noqa: E731
    first = run()
    with pytest.raises(RuntimeError, match="call backward first"):
        run()
    sum(l.sum() for l in first.logits).backward()
    with torch.no_grad():
        run()
    second = run()
    sum(l.sum() for l in second.logits).backward()
    assert not passes.awaiting_backward
