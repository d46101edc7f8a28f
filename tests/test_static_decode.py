"""The draft walk over a static cache (rkl.model.static_decode): the same logits and drafts as the eager walk, walk
after walk from other prefixes, and phase A uses it only where a CUDA graph can replay it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rkl import ChunkRefineWrapper, RecursiveConfig
from rkl.data.chunks import GREEDY
from rkl.model.base import build_preset
from rkl.model.drafts import _eager_steps, build_chunk
from rkl.model.adapters import apply_lora
from rkl.model.static_decode import StaticDecoder, graph_by_default
from rkl.train.refine_phases import RefineTask


@pytest.fixture(scope="module")
def base():
    model = build_preset("tiny", dtype=torch.float32, device_map="cpu")
    model.eval()
    return model


def walk_logits(step, tokens: torch.Tensor, start: int) -> list[torch.Tensor]:
    """Feed `tokens` [B, n] one position at a time from `start`; the logits after each."""
    return [step(tokens[:, j], start + j).clone() for j in range(tokens.shape[1])]


@torch.no_grad()
def test_static_walk_matches_the_eager_walk_from_each_new_prefix(base):
    """Three walks through one decoder, the second from a SHORTER prefix than the first (keys the first walk wrote
    past it must stay invisible) and with another batch's KDA states: every step's logits equal the eager walk's to
    float32 rounding, and the greedy drafts are identical. Broken on purpose, this fails: with the KDA states not
    reloaded, with a mask that hides the position being written, with one that shows every key."""
    wrapper = ChunkRefineWrapper(base, None)
    gen = torch.Generator().manual_seed(0)
    decoder = StaticDecoder(base, max_len=40)
    width, rows = 6, 3
    for prefix_len in (21, 9, 30):
        ids = torch.randint(3, base.config.vocab_size, (rows, prefix_len), generator=gen)
        snapshot, prev = wrapper.prepare_prefix(ids)
        fed = torch.randint(3, base.config.vocab_size, (rows, width), generator=gen)
        eager = walk_logits(_eager_steps(base, snapshot, rows, ids.device), fed, prefix_len)
        static = walk_logits(decoder.start(snapshot), fed, prefix_len)
        for e, s in zip(eager, static):
            torch.testing.assert_close(s, e, rtol=0, atol=1e-5)
        modes = torch.full((rows, width), GREEDY)
        targets = torch.zeros(rows, width, dtype=torch.long)
        assert torch.equal(build_chunk(wrapper, snapshot, prev, targets, modes, decoder=decoder),
                           build_chunk(wrapper, snapshot, prev, targets, modes))
    assert decoder.captures == 0 and len(decoder.slots) == 1  # a CPU runs the step eagerly: no graph, one slot


@torch.no_grad()
def test_static_walk_refuses_a_skipped_position_and_the_end_of_its_buffers(base):
    wrapper = ChunkRefineWrapper(base, None)
    ids = torch.randint(3, base.config.vocab_size, (2, 7))
    snapshot, _ = wrapper.prepare_prefix(ids)
    step = StaticDecoder(base, max_len=9).start(snapshot)
    tok = torch.tensor([5, 6])
    with pytest.raises(ValueError, match="expected 7, got 8"):
        step(tok, 8)
    step(tok, 7)
    step(tok, 8)
    with pytest.raises(ValueError, match="max_len 9"):
        step(tok, 9)
    with pytest.raises(ValueError, match="below max_len 7"):
        StaticDecoder(base, max_len=7).start(snapshot)


@pytest.mark.parametrize("setting, dtype, walk, passes", [
    ({}, torch.bfloat16, "cuda_graph", "cuda_graph"),
    ({}, torch.float32, "eager (routed experts in float32: PyTorch's grouped_mm", "eager (routed experts"),
    ({"draft_walk_graph": False}, torch.bfloat16, "eager", "cuda_graph"),
    ({"chunk_pass_graph": False}, torch.bfloat16, "cuda_graph", "eager"),
    ({"use_latent_token": True}, torch.bfloat16, "cuda_graph", "eager"),
    ({"gradient_checkpointing": True}, torch.bfloat16, "cuda_graph", "eager"),
    ({"lora_rank": 4}, torch.bfloat16, "eager", "eager")],
    ids=["bf16", "float32", "walk_off", "passes_off", "latent", "checkpointing", "lora"])
def test_phase_a_walks_a_graph_only_on_a_gpu_with_a_frozen_bf16_base(base, setting, dtype, walk, passes, capsys):
    """On a CUDA device phase A's frozen bf16 base gets the graphed walk and chunk passes; off by config, or with
    LoRA (a base that trains, not measured with a graph), it walks eagerly; with float32 routed experts (no
    graph-safe grouped_mm) it walks eagerly and says why, in run.json's draft_walk and on stderr; on a CPU always
    eagerly. The chunk passes follow, except with [Z] or step checkpointing (which the static passes lack). Broken
    on purpose (the float32 check removed), the float32 case fails."""
    config = RecursiveConfig(chunk_width=4, max_inner_steps=2, d_state=16, gate_hidden=16, seq_len=20, **setting)
    stream = torch.arange(3, 300)
    tokenizer = SimpleNamespace(eos_token_id=2)
    for device, expected in ((torch.device("cuda"), walk), (torch.device("cpu"), "eager")):
        model = build_preset("tiny", dtype=dtype, device_map="cpu")
        wrapper = ChunkRefineWrapper(model, config)
        task = RefineTask(wrapper, tokenizer, config, stream, stream, device, "a", {})
        assert task.draft_walk.startswith(expected) and (task.draft_walk == expected) == ("(" not in expected)
        assert (task.decoder is not None) == (expected == "cuda_graph")
        assert task.chunk_pass_mode.startswith(passes if device.type == "cuda" else "eager")
        assert (task.chunk_passes is not None) == (task.chunk_pass_mode == "cuda_graph")
        assert ("run eagerly, not as CUDA graphs" in capsys.readouterr().err) == ("(" in expected)
        wrapper.remove_hooks()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_static_decode.sh runs it)")
@torch.no_grad()
def test_graph_replay_equals_the_static_step_run_eagerly():
    """On a GPU: the graphed walk gives bitwise the logits of the same static-cache step run without a graph, from
    two prefixes in turn (the graph reads each walk's state, not the capture's), under bf16 autocast."""
    model = build_preset("small", dtype=torch.bfloat16, device_map="cuda")  # kernels shared with the benchmarks
    wrapper = ChunkRefineWrapper(model, None)
    graphed, plain = StaticDecoder(model, 48), StaticDecoder(model, 48, graph=False)
    gen = torch.Generator().manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for prefix_len in (30, 12):
            ids = torch.randint(3, model.config.vocab_size, (4, prefix_len), generator=gen).cuda()
            snapshot, _ = wrapper.prepare_prefix(ids)
            fed = torch.randint(3, model.config.vocab_size, (4, 8), generator=gen).cuda()
            for a, b in zip(walk_logits(graphed.start(snapshot), fed, prefix_len),
                            walk_logits(plain.start(snapshot), fed, prefix_len)):
                assert torch.equal(a, b)
    assert graphed.captures == 1


@pytest.mark.parametrize("dtype, lora, expected", [(torch.bfloat16, False, True), (torch.float32, False, False),
                                                   (torch.float16, False, False), (torch.float32, True, False)],
                         ids=["bf16", "float32", "float16", "float32-lora"])
def test_a_decoder_captures_by_default_only_on_a_gpu_with_bf16_experts(dtype, lora, expected):
    """StaticDecoder's default: graphs on CUDA where the routed experts are bf16, also with peft's wrappers around
    the experts (their names gain base_layer segments); never on a CPU. Broken on purpose (the blocker ignored in
    the default, or matching only unwrapped names), the float32 cases fail."""
    model = build_preset("tiny", dtype=dtype, device_map="cpu")
    if lora:
        apply_lora(model, RecursiveConfig(lora_rank=4, lora_experts=True, lora_layers="all"))
        experts = [n for n, _ in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
                   or ".experts.base_layer" in n and n.endswith(("gate_up_proj", "down_proj"))]
        assert experts and all(".experts.base_layer" in n for n in experts)  # every routed expert wrapped
    assert graph_by_default(model, torch.device("cuda")) is expected
    assert graph_by_default(model, torch.device("cpu")) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_static_decode.sh runs it)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
def test_grouped_mm_captures_in_bf16_only(dtype):
    """What graph_blocker says, on a GPU: PyTorch's grouped_mm (the routed experts' kernel in transformers 5) can be
    captured with bf16 weights and not with float32 ones. If a later PyTorch captures float32 too, this fails and
    graph_blocker can let float32 bases walk as a graph."""
    x = torch.randn(8, 32, device="cuda", dtype=dtype)
    w = torch.randn(4, 32, 16, device="cuda", dtype=dtype)
    offs = torch.tensor([2, 4, 6, 8], device="cuda", dtype=torch.int32)
    mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    mm(x, w, offs=offs)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    captured = True
    try:
        with torch.cuda.graph(graph):
            mm(x, w, offs=offs)
    except RuntimeError:
        captured = False
    assert captured == (dtype == torch.bfloat16)


@torch.no_grad()
def test_a_failed_capture_leaves_the_same_step_running_eagerly(base, monkeypatch, capsys):
    """Where a capture raises (say, an operation that waits on the host), the decoder says so once and the walk
    runs the static step eagerly: the same logits as the eager walk."""
    wrapper = ChunkRefineWrapper(base, None)
    decoder = StaticDecoder(base, max_len=24, graph=True)

    def fail(slot, snapshot):
        decoder._forward(slot)  # the warm-up moves the state on before the capture fails
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decoder, "_capture", fail)
    ids = torch.randint(3, base.config.vocab_size, (2, 10))
    snapshot, _ = wrapper.prepare_prefix(ids)
    fed = torch.randint(3, base.config.vocab_size, (2, 4))
    static = walk_logits(decoder.start(snapshot), fed, 10)
    eager = walk_logits(_eager_steps(base, snapshot, 2, ids.device), fed, 10)
    for e, s in zip(eager, static):
        torch.testing.assert_close(s, e, rtol=0, atol=1e-5)
    assert decoder.graph is False and "runs eagerly" in capsys.readouterr().err


@torch.no_grad()
def test_static_walk_of_a_float32_base_under_bf16_autocast(base):
    """The GPU training setup (a float32 preset under accelerate's bf16 autocast) on the CPU: the MLA latents come
    out in two dtypes (the normed part float32, the rope part bf16), which the static buffers must each keep. The
    drafts equal the eager walk's, from two prefixes in turn."""
    wrapper = ChunkRefineWrapper(base, None)
    decoder = StaticDecoder(base, max_len=32)
    gen = torch.Generator().manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for prefix_len in (20, 11):
            ids = torch.randint(3, base.config.vocab_size, (3, prefix_len), generator=gen)
            snapshot, prev = wrapper.prepare_prefix(ids)
            modes = torch.full((3, 6), GREEDY)
            targets = torch.zeros(3, 6, dtype=torch.long)
            assert torch.equal(build_chunk(wrapper, snapshot, prev, targets, modes, decoder=decoder),
                               build_chunk(wrapper, snapshot, prev, targets, modes))


@torch.no_grad()
def test_the_decoder_keeps_two_slots_and_walks_right_after_evicting_one(base):
    """Walks at 2, 3, 4 and again 2 rows: at most MAX_SLOTS slots stay (the least recently used goes), and each walk,
    the one that rebuilt its evicted slot included, gives the eager walk's logits."""
    from rkl.model.static_decode import MAX_SLOTS

    wrapper = ChunkRefineWrapper(base, None)
    decoder = StaticDecoder(base, max_len=24)
    gen = torch.Generator().manual_seed(2)
    for rows in (2, 3, 4, 2):
        ids = torch.randint(3, base.config.vocab_size, (rows, 8), generator=gen)
        snapshot, _ = wrapper.prepare_prefix(ids)
        fed = torch.randint(3, base.config.vocab_size, (rows, 3), generator=gen)
        for e, s in zip(walk_logits(_eager_steps(base, snapshot, rows, ids.device), fed, 8),
                        walk_logits(decoder.start(snapshot), fed, 8)):
            torch.testing.assert_close(s, e, rtol=0, atol=1e-5)
        assert len(decoder.slots) <= MAX_SLOTS
    assert [k[0] for k in decoder.slots] == [4, 2]
