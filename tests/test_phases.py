"""Phases A, B, C and vanilla on the tiny preset: what trains, what stays frozen, save/reload/resume,
and the leakage rule."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rkl import RecursiveConfig
from rkl.data.chunks import chunk_batch
from rkl.data.packing import step_generator
from rkl.model.surgery import load_model_with_config, surgery
from rkl.train.phases import PhaseRun, run_phase

DATA = dict(data="shakespeare+arithmetic", max_chars_per_source=30_000, arithmetic_digits=2, seed=1)
REFINE = dict(DATA, chunk_width=4, max_inner_steps=2, d_state=16, gate_hidden=16, seq_len=20, batch_size=4,
              eval_batches=1, warmup_steps=0, log_interval=1, refine_cell_type="chunk_attention")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    base_cfg = RecursiveConfig(recursive_enabled=False, steps=2, batch_size=4, seq_len=24, eval_batches=1, **DATA)
    run_phase(PhaseRun("pretrain", base_cfg, "tiny", root / "baseline", root / "logs/baseline", show_progress=False))
    surgery(root / "baseline", RecursiveConfig(**REFINE), root / "after_surgery")
    return root


def train(stages, phase, init, steps=3, **overrides):
    config = RecursiveConfig(steps=steps, eval_interval=steps, save_interval=steps, **{**REFINE, **overrides})
    out = stages / f"phase_{phase}"
    run = PhaseRun(phase, config, str(stages / init), out, stages / f"logs/{phase}", show_progress=False)
    return run_phase(run), out


def base_state(stages):
    return load_file(str(stages / "baseline" / "model.safetensors"))


def test_phase_a_trains_only_the_sidecar(stages):
    result, out = train(stages, "a", "after_surgery", steps=4)
    assert result.steps_done == 4
    assert {"draft_ce_k", "draft_ce_1", "corrupt_acc_k", "corrupt_acc_1", "loss_final"} <= set(result.val_history[-1])
    for row in result.history:
        for name in ("final", "masked", "halt", "ponder", "keep"):
            assert torch.isfinite(torch.tensor(row[f"loss_{name}"])), name
    wrapper, _, _ = load_model_with_config(out)
    before = base_state(stages)
    for name, tensor in wrapper.base.state_dict().items():
        if name in before:
            assert torch.equal(tensor, before[name]), f"base weight {name} changed in phase A"
    trained = load_file(str(out / "sidecar.safetensors"))
    initial = load_file(str(stages / "after_surgery" / "sidecar.safetensors"))
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert any(k.startswith("refine_cells") for k in changed) and any(k.startswith("boundary") for k in changed)


def test_phase_b_adds_lora_and_reloads_to_the_same_logits(stages):
    if not (stages / "phase_a").exists():
        train(stages, "a", "after_surgery")
    _, out = train(stages, "b", "phase_a", lora_rank=8, lr_lora=1e-2, draft_schedule="linear",
                   draft_share_final=1.0)
    lora = load_file(str(out / "lora.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items()), "LoRA B stayed at its zero init"
    wrapper, _, config = load_model_with_config(out)
    assert config.lora_rank == 8
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    again, _, _ = load_model_with_config(out)
    torch.testing.assert_close(wrapper(ids).logits, again(ids).logits, rtol=0, atol=0)
    plain, _, _ = load_model_with_config(stages / "baseline", recursive_enabled=False)
    assert not torch.equal(wrapper(ids).logits, plain(ids).logits), "LoRA did not change the base's outputs"


def test_phase_c_unfreezes_every_fourth_layer_and_logs_drift(stages):
    if not (stages / "phase_b").exists():
        train(stages, "b", "phase_a" if (stages / "phase_a").exists() else "after_surgery", lora_rank=8)
    result, out = train(stages, "c", "phase_b", lora_rank=8, unfreeze_every=4, l2_to_pretrained=0.1,
                        lr_unfrozen=1e-2)
    unfrozen = load_file(str(out / "unfrozen.safetensors"))
    assert unfrozen and all(k.startswith("model.layers.3.") for k in unfrozen)
    before = base_state(stages)
    moved = [k for k, v in unfrozen.items() if k.replace(".base_layer", "") in before
             and not torch.equal(v, before[k.replace(".base_layer", "")])]
    assert moved, "no unfrozen weight moved"
    assert "ngram_drift_1" in result.val_history[-1]
    assert any("loss_l2_pretrained" in row for row in result.history)


def test_vanilla_fine_tunes_the_base(stages):
    config = RecursiveConfig(recursive_enabled=False, steps=2, batch_size=4, seq_len=24, eval_batches=1,
                             eval_interval=2, **DATA)
    run = PhaseRun("vanilla", config, str(stages / "baseline"), stages / "vanilla", stages / "logs/vanilla",
                   show_progress=False)
    assert run_phase(run).steps_done == 2
    assert (stages / "vanilla" / "model.safetensors").is_file()


def test_phase_a_resume_matches_uninterrupted(stages):
    _, straight = train(stages, "a", "after_surgery", steps=4)
    a = load_file(str(straight / "sidecar.safetensors"))
    config = RecursiveConfig(steps=4, eval_interval=4, save_interval=3, **REFINE)  # stop_at 2 is not a save step
    out = stages / "phase_a_resumed"
    run_phase(PhaseRun("a", config, str(stages / "after_surgery"), out, stages / "logs/r", stop_at=2,
                       show_progress=False))
    run_phase(PhaseRun("a", config, str(stages / "after_surgery"), out, stages / "logs/r", resume=True,
                       show_progress=False))
    b = load_file(str(out / "sidecar.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def other_targets(targets: torch.Tensor, loss_mask: torch.Tensor, eos: int) -> torch.Tensor:
    """The targets with every loss position moved to another token: EOS where it was not, a plain token where it
    was (so the chunk's valid span moves too)."""
    moved = torch.where(targets == eos, (targets + 7) % 200 + 3, torch.full_like(targets, eos))
    return torch.where(loss_mask, moved, targets)


def test_leakage_rule_chunks_do_not_depend_on_loss_targets(stages):
    """Drafts, splices and model-sampled corruption: two batches that differ only in the targets at loss positions
    give the identical chunk, and so identical logits at every step. The negative control (a builder that puts the
    target into the chunk, 'draft := target') is caught by the same comparison."""
    from rkl.data.chunks import TRUE, chunk_modes, valid_until_eos
    from rkl.model.drafts import build_chunk
    from rkl.train.refine_phases import RefineTask

    config = RecursiveConfig(**REFINE)
    wrapper, tokenizer, _ = load_model_with_config(stages / "after_surgery", config=config)
    for p in wrapper.sidecar_parameters():  # a trained-looking sidecar that reads the whole chunk
        torch.nn.init.normal_(p, std=0.2)
    eos = tokenizer.eos_token_id
    stream = torch.arange(3, 300) % 200 + 3
    stream[::5] = eos  # short documents: chunks hold EOS tokens, some of them at loss positions
    task = RefineTask(wrapper, tokenizer, config, stream, stream, torch.device("cpu"), "a", {})
    batch = chunk_batch(stream, 0, 8, 4, 8, 8, 0, eos)
    modes, kind = chunk_modes(8, 4, 0.4, 0.5, 0.5, "random", step_generator(0, 0, "m"))
    assert set(kind.tolist()) == {0, 1, 2}  # drafts, splices and sampled rows in one batch
    loss_mask = modes != TRUE  # every position the model fills (valid or not): none may depend on its target
    assert (loss_mask & (batch.chunk_ids == eos)).any()
    swapped_ids = other_targets(batch.chunk_ids, loss_mask, eos)
    swapped = type(batch)(batch.prefix_ids, swapped_ids, valid_until_eos(swapped_ids, eos))
    assert not torch.equal(swapped.chunk_valid, batch.chunk_valid)  # the EOS moved
    snap, prev = wrapper.prepare_prefix(batch.prefix_ids)
    chunks = [build_chunk(wrapper, snap, prev, b.chunk_ids, modes, step_generator(0, 0, "s"))
              for b in (batch, swapped)]
    assert torch.equal(chunks[0], chunks[1])
    runs = [task.losses_on(b, modes, step_generator(0, 0, "s")) for b in (batch, swapped)]
    for x, y in zip(runs[0][2].logits, runs[1][2].logits):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert runs[0][0]["final"] != runs[1][0]["final"]  # the targets do reach the loss
    leaky = [torch.where(loss_mask, b.chunk_ids, c) for b, c in zip((batch, swapped), chunks)]
    assert not torch.equal(leaky[0], leaky[1])
    # the negative control of the EOS leak: modes that stop at the chunk's true EOS differ between the two batches
    stop_at_eos = [torch.where(b.chunk_valid, modes, TRUE) for b in (batch, swapped)]
    assert not torch.equal(stop_at_eos[0], stop_at_eos[1])


def test_phase_a_learns_to_beat_one_pass_on_drafts(stages):
    """After a short phase A the K-step prediction on held-out DRAFTED chunks (the model's own greedy drafts, the
    inference case) has a lower CE than the one-pass prediction of the same chunks."""
    result, _ = train(stages, "a", "after_surgery", steps=36, lr_refine=1e-2, lr_boundary=1e-2, eval_batches=2)
    first, last = result.val_history[0], result.val_history[-1]
    assert first["draft_ce_k"] == pytest.approx(first["draft_ce_1"], abs=1e-5)  # neutral at step 0
    assert last["draft_ce_k"] < last["draft_ce_1"] - 0.02, last


def test_bf16_training_moves_every_trainable_tensor_and_reloads_exactly(stages, tmp_path):
    """A bf16 base with LoRA and an unfrozen layer (phase C's setup): the trainable weights are float32, every one
    of them moves in a few AdamW steps, the frozen base does not, and a bf16 reload computes what was trained."""
    from rkl.train.optim import build_optimizer
    from rkl.train.refine_phases import RefineTask

    config = RecursiveConfig(**{**REFINE, "lora_rank": 4, "unfreeze_every": 4, "lr_lora": 1e-3, "lr_unfrozen": 1e-3})
    wrapper, tokenizer, _ = load_model_with_config(stages / "after_surgery", config=config, dtype="bfloat16")
    stream = torch.arange(3, 300) % 200 + 3
    pretrained, _, _ = load_model_with_config(stages / "baseline", recursive_enabled=False, dtype="bfloat16")
    surgery_info = json.loads((stages / "after_surgery" / "surgery.json").read_text())
    task = RefineTask(wrapper, tokenizer, config, stream, stream, torch.device("cpu"), "c", surgery_info,
                      pretrained=pretrained.base)
    groups = task.trainable_groups()
    params = [(f"{g}.{i}", p) for g, (ps, _) in groups.items() for i, p in enumerate(ps)]
    assert {p.dtype for _, p in params} == {torch.float32}
    assert {"refine", "boundary", "lora", "unfrozen"} <= set(groups)
    frozen = {n: p.detach().clone() for n, p in wrapper.base.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in params}
    optimizer = build_optimizer(groups, config)
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if g["name"].startswith("unfrozen"))
    task.train_mode(True)
    for step in range(4):
        loss, _ = task.loss(step, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    still = [n for n, p in params if torch.equal(p.detach(), before[n])]
    assert not still, f"{len(still)} of {len(params)} trainable tensors did not move: {still[:5]}"
    for n, p in wrapper.base.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    task.save_weights(tmp_path)
    again, _, _ = load_model_with_config(tmp_path, dtype="bfloat16")
    task.train_mode(False)
    batch = chunk_batch(stream, 5, 2, 4, 8, 8, 0, tokenizer.eos_token_id)
    outs = []
    for w in (wrapper, again):
        snap, prev = w.prepare_prefix(batch.prefix_ids)
        with torch.no_grad():
            outs.append(w.refine_chunk(batch.chunk_ids, snap, prev, torch.ones_like(batch.chunk_valid)).logits[-1])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_lora_reaches_attention_mlps_and_the_routed_experts():
    """The adapted weights of phase B's LoRA on the tiny preset, by name: attention and MLP projections of the top
    third of the layers, the shared expert, and the fused routed-expert parameters (peft target_parameters)."""
    from rkl.model.adapters import inject_lora
    from rkl.model.base import load_base

    base, _ = load_base("tiny")
    inject_lora(base, {"rank": 4, "alpha": 8, "layers": "top_third", "experts": True})
    adapted = sorted({n.split(".lora_")[0] for n, _ in base.named_parameters() if ".lora_A." in n})
    assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in adapted)
    for layer in (2, 3):
        assert f"model.layers.{layer}.mlp.experts" in adapted  # down_proj (outer wrapper)
        assert f"model.layers.{layer}.mlp.experts.base_layer" in adapted  # gate_up_proj (inner wrapper)
        assert f"model.layers.{layer}.mlp.shared_experts.gate_proj" in adapted
    assert any(".self_attn." in n for n in adapted)
    old = load_base("tiny")[0]
    inject_lora(old, {"rank": 4, "alpha": 8, "layers": "top_third"})  # a checkpoint from before: no experts
    assert not any(".experts.lora_" in n or ".experts.base_layer.lora_" in n for n, _ in old.named_parameters())


def test_expert_lora_saves_no_merged_stack_and_computes_what_peft_computes():
    """peft's LoRA on the fused experts builds W + s B A of a whole stack in each forward and backward keeps it (at
    48B this ran phases B and C out of memory, docs/benchmarks.md). rkl's expert forward saves no tensor of a stack's
    shape beyond the weights, gives peft's logits and gradients (B random, so the adapters act), is bitwise the
    unadapted base while B is zero, and lora_experts=false adapts no routed expert."""
    from rkl.model.adapters import apply_lora
    from rkl.model.base import load_base
    from rkl.model.expert_lora import restore_peft_forward

    ids = torch.arange(3, 27).reshape(2, 12)

    def step(base) -> tuple[torch.Tensor, dict, int]:
        stacks = {tuple(p.shape) for n, p in base.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
        stacks |= {s[:1] + s[1:][::-1] for s in stacks}  # the transposed views the grouped matmul gets
        weights = {p.untyped_storage().data_ptr() for p in base.parameters()}
        copies = []

        def pack(t):
            if tuple(t.shape) in stacks and t.untyped_storage().data_ptr() not in weights:
                copies.append(t)
            return t

        base.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = base(ids, use_cache=False).logits
        logits.pow(2).mean().backward()
        return logits.detach(), {n: p.grad for n, p in base.named_parameters() if "lora_" in n}, len(copies)

    unadapted = load_base("tiny")[0](ids, use_cache=False).logits.detach()
    base, _ = load_base("tiny")
    apply_lora(base, RecursiveConfig(**{**REFINE, "lora_rank": 4, "lora_experts": True}))
    expert_wrappers = [m for n, m in base.named_modules() if n.endswith(".mlp.experts") and hasattr(m, "lora_A")]
    assert expert_wrappers
    torch.testing.assert_close(step(base)[0], unadapted, rtol=0, atol=0)
    torch.manual_seed(0)
    for name, p in base.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    logits, grads, copies = step(base)
    assert copies == 0
    assert restore_peft_forward(base) == len(expert_wrappers)  # peft's ParamWrapper.forward: merged stacks
    peft_logits, peft_grads, peft_copies = step(base)
    assert peft_copies > 0  # the probe sees peft's merged stacks
    assert (logits - unadapted).abs().max() > 1e-3  # the adapters act
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-6)
    assert any(".experts." in n for n in grads) and grads.keys() == peft_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=1e-4, atol=1e-7)

    base, _ = load_base("tiny")
    apply_lora(base, RecursiveConfig(**{**REFINE, "lora_rank": 4, "lora_experts": False}))
    assert not any(".experts." in n and "lora_" in n for n, _ in base.named_parameters())
    assert step(base)[2] == 0


def test_l2_pull_keeps_no_copy_for_backward_and_matches_autograds_form(monkeypatch):
    """Phase C's L2 pull saves only the parameters and the reference for backward (autograd's own form kept a float32
    difference of every unfrozen tensor, which ran the 48B widths out of memory), in chunks and in one piece it
    gives autograd's value, and its gradient is autograd's bitwise."""
    from rkl.model import adapters

    g = torch.Generator().manual_seed(0)
    start = {"experts": torch.randn(4, 6, 5, generator=g), "norm": torch.randn(7, generator=g)}
    reference = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in start.items()}

    def pull(form, chunk=adapters.L2_CHUNK):
        monkeypatch.setattr(adapters, "L2_CHUNK", chunk)
        params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            value = form(params)
        (3.0 * value).backward()
        owned = {t.untyped_storage().data_ptr() for t in [*params.values(), *reference.values()]}
        copies = [t for t in saved if t.untyped_storage().data_ptr() not in owned]
        return value, {k: p.grad for k, p in params.items()}, copies

    def autograd_form(params):
        return sum((p.float() - reference[k].float()).pow(2).sum() for k, p in params.items())

    value, grads, copies = pull(lambda params: adapters.l2_to_pretrained(params, reference))
    value_chunked, grads_chunked, _ = pull(lambda params: adapters.l2_to_pretrained(params, reference), chunk=16)
    expected, expected_grads, expected_copies = pull(autograd_form)
    assert expected_copies and not copies  # autograd's form saves its differences; the pull saves none
    assert torch.equal(value, expected) and torch.allclose(value_chunked, expected, rtol=1e-6)
    for k in start:
        assert torch.equal(grads[k], expected_grads[k]) and torch.equal(grads_chunked[k], expected_grads[k]), k


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_draft_walk_groups_build_the_chunks_each_micro_batch_builds_alone(stages, rank, world):
    """draft_walk_steps = 3, 2 micro-batches per step: every micro-batch of a group gets the chunk its own walk would
    build at the group's prefix length (same modes, same sampling noise, also as one process's rows of a global
    batch) and, from the walk's prefix pass, the cache and last logits its own prefix pass would give; a group's
    micro-batches share the prefix length drawn for its first."""
    from rkl.data.chunks import SAMPLE
    from rkl.model.cache import cache_tensors, restore_cache
    from rkl.model.drafts import Noise, build_chunk
    from rkl.train.refine_phases import RefineTask

    config = RecursiveConfig(**{**REFINE, "batch_size": 2, "grad_accum": 2, "draft_walk_steps": 3, "steps": 5,
                                "seq_len": 40})
    wrapper, tokenizer, _ = load_model_with_config(stages / "after_surgery", config=config)
    stream = torch.arange(3, 3000) * 7 % 200 + 3
    task = RefineTask(wrapper, tokenizer, config, stream, stream, torch.device("cpu"), "a", {}, shard=(rank, world))
    lengths, sampled = [], 0
    for step in range(5):
        for micro in range(2):
            walked = task.drafted(step, micro)
            batch, modes, gen, mine, *_ = task.micro_batch(step, micro, walked.prefix_len)
            snap, prev = wrapper.prepare_prefix(batch.prefix_ids)
            alone = build_chunk(wrapper, snap, prev, batch.chunk_ids, modes[mine], noise=[Noise(gen, modes, mine)])
            assert torch.equal(walked.chunk, alone), (step, micro)
            # the step starts from its rows of the walk's prefix pass: what its own prefix pass gives (up to float
            # rounding: a matmul over more rows may sum in another order)
            assert walked.snapshot.seq_length == batch.prefix_ids.shape[1]
            torch.testing.assert_close(walked.prev_logits, prev, rtol=1e-5, atol=1e-6)
            ours, theirs = (cache_tensors(restore_cache(x)) for x in (walked.snapshot, snap))
            assert [n for n, _ in ours] == [n for n, _ in theirs]
            for (name, x), (_, y) in zip(ours, theirs):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"{name} at {(step, micro)}")
            lengths.append(walked.prefix_len)
            sampled += int((modes[mine] == SAMPLE).sum())
    assert sampled > 0  # the noise of sampled positions is part of what is compared
    first = [task.micro_batch(s, 0)[0].prefix_ids.shape[1] for s in (0, 3)]
    assert lengths == [first[0]] * 6 + [first[1]] * 4 and first[0] != first[1]
    assert not task.walked  # each chunk is handed out once


def test_draft_walk_groups_run_one_prefix_pass_a_group(stages):
    """With draft_walk_steps = 3, the steps of a group start from the walk's prefix pass: 2 groups of 5 steps x 2
    micro-batches run 2 prefix passes (one per walk), not one per micro-batch on top; and a micro-batch's loss
    equals what its own prefix pass gives, up to float rounding."""
    from rkl.train.losses import total_loss
    from rkl.train.refine_phases import RefineTask

    config = RecursiveConfig(**{**REFINE, "batch_size": 2, "grad_accum": 2, "draft_walk_steps": 3, "steps": 5,
                                "seq_len": 40})
    wrapper, tokenizer, _ = load_model_with_config(stages / "after_surgery", config=config)
    stream = torch.arange(3, 3000) * 7 % 200 + 3
    task = RefineTask(wrapper, tokenizer, config, stream, stream, torch.device("cpu"), "a", {})
    passes, prepare = [], wrapper.prepare_prefix
    wrapper.prepare_prefix = lambda ids, *a, **kw: passes.append(ids.shape[0]) or prepare(ids, *a, **kw)
    losses = [float(task.loss(step, micro)[0].detach()) for step in range(5) for micro in range(2)]
    assert passes == [2 * 2 * 3, 2 * 2 * 2]  # rows of each group's walk: batch x micro-batches x its steps
    # the same micro-batch with its own prefix pass (and the chunk its walk built)
    task.walked = {}
    walked = task.drafted(4, 1)
    batch, modes, gen, mine, *_ = task.micro_batch(4, 1, walked.prefix_len)
    own, *_ = task.losses_on(batch, modes[mine], gen, chunk_in=walked.chunk)
    assert abs(float(total_loss(own, config)) - losses[-1]) < 1e-5 * abs(losses[-1])


def test_validation_walks_both_kinds_of_chunk_together_with_the_same_numbers(stages):
    """With draft_walk_steps > 1, validation builds each held-out batch's drafted and corrupted chunks in one walk:
    each chunk equals its own walk's (same modes, same sampling noise), and every validation number equals what one
    walk per kind gives (draft_walk_steps 1)."""
    from rkl.data.chunks import SAMPLE
    from rkl.model.drafts import build_chunk
    from rkl.train.refine_phases import RefineTask

    stream = torch.arange(3, 3000) * 7 % 200 + 3
    numbers, sampled = [], []
    for steps in (1, 2):
        config = RecursiveConfig(**{**REFINE, "batch_size": 3, "eval_batches": 2, "draft_walk_steps": steps,
                                    "seq_len": 40})
        wrapper, tokenizer, _ = load_model_with_config(stages / "after_surgery", config=config)
        task = RefineTask(wrapper, tokenizer, config, stream, stream, torch.device("cpu"), "a", {})
        walk_together = task.walk_together

        def checked(batch, kinds):  # what validate walks together, against each kind's own walk
            before = {name: gen.get_state() for name, _, gen in kinds}  # the noise the walk is about to draw
            chunks = walk_together(batch, kinds)
            snapshot, prev = wrapper.prepare_prefix(batch.prefix_ids)
            for (name, modes, _), chunk in zip(kinds, chunks):
                alone = build_chunk(wrapper, snapshot, prev, batch.chunk_ids, modes,
                                    torch.Generator().set_state(before[name]))
                assert torch.equal(chunk, alone), name
            sampled.append(sum(int((modes == SAMPLE).sum()) for _, modes, _ in kinds))
            return chunks

        task.walk_together = checked
        numbers.append(task.validate())
    assert len(sampled) == 2 and sum(sampled) > 0  # both batches walked together, with sampled positions in them
    assert numbers[0].keys() == numbers[1].keys() and "corrupt_ce_k" in numbers[0]
    assert numbers[0] == numbers[1], {k: (numbers[0][k], numbers[1][k]) for k in numbers[0]}


def test_draft_walk_groups_resume_exactly(stages):
    """With draft_walk_steps = 3, a run stopped at step 2 (inside its first group) and resumed ends at the weights
    of the uninterrupted run: the resumed run rebuilds the group it resumes in, from the group's first step."""
    config = RecursiveConfig(steps=5, eval_interval=5, save_interval=5, **{**REFINE, "draft_walk_steps": 3})
    ends = []
    for name, stop_at in (("walk_straight", None), ("walk_resumed", 2)):
        out = stages / name
        run = lambda **kw: run_phase(PhaseRun("a", config, str(stages / "after_surgery"), out,  # noqa: E731
                                              stages / f"logs/{name}", show_progress=False, **kw))
        if stop_at:
            run(stop_at=stop_at)
            run(resume=True)
        else:
            run()
        ends.append(load_file(str(out / "sidecar.safetensors")))
    for k in ends[0]:
        torch.testing.assert_close(ends[0][k], ends[1][k], rtol=0, atol=0, msg=k)
