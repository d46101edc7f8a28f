"""Phases A, B, C and vanilla on the tiny preset: what trains, what stays frozen, save/reload/resume,
and the leakage rule."""

import pytest
import torch
from safetensors.torch import load_file

from rkl import RecursiveConfig
from rkl.data.chunks import chunk_batch
from rkl.data.packing import step_generator
from rkl.model.surgery import load_model_with_config, surgery
from rkl.train.phases import PhaseRun, run_phase

DATA = dict(data="shakespeare+arithmetic", max_chars_per_source=30_000, arithmetic_digits=2, seed=1)
REFINE = dict(DATA, chunk_width=4, max_inner_steps=2, max_chunk_len=8, d_state=16, gate_hidden=16, seq_len=20,
              batch_size=4, eval_batches=1, warmup_steps=0, log_interval=1)


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
    assert result.steps_done == 4 and {"ce_k", "ce_1", "loss_final"} <= set(result.val_history[-1])
    for row in result.history:
        for name in ("final", "masked", "halt", "len", "ponder", "stability"):
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
    _, out = train(stages, "b", "phase_a", lora_rank=8, lr_lora=1e-2, scheduled_sampling="linear",
                   scheduled_sampling_final=1.0)
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


def test_leakage_rule_targets_never_reach_the_model(stages):
    """Hold the chunk input fixed and change the targets at loss positions: the logits must not move.
    The negative control (a loss position holding its own target) shows the test can see a leak."""
    from rkl.train.refine_phases import RefineTask

    config = RecursiveConfig(**REFINE)
    wrapper, tokenizer, _ = load_model_with_config(stages / "after_surgery", config=config)
    for p in wrapper.sidecar_parameters():  # a trained-looking sidecar: the pooled cells read the whole chunk
        torch.nn.init.normal_(p, std=0.2)
    stream = torch.arange(3, 300) % 200 + 3
    task = RefineTask(wrapper, tokenizer, config, stream, stream, torch.device("cpu"), "a", {})
    batch = chunk_batch(stream, 0, 4, 4, 8, 8, 0, tokenizer.eos_token_id)
    chunk_in, loss_mask = task.chunk_inputs(batch, 0.5, step_generator(0, 0, "t"))
    assert loss_mask.any() and not (chunk_in == batch.chunk_ids)[loss_mask].any()
    other_targets = torch.where(loss_mask, (batch.chunk_ids + 7) % 200 + 3, batch.chunk_ids)
    runs = [task.losses_on(batch.prefix_ids, chunk_in, loss_mask, t, batch.chunk_valid)
            for t in (batch.chunk_ids, other_targets)]
    for x, y in zip(runs[0][2].logits, runs[1][2].logits):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert runs[0][0]["final"] != runs[1][0]["final"]
    leaky = torch.where(loss_mask, batch.chunk_ids, chunk_in)
    leaky_other = torch.where(loss_mask, other_targets, chunk_in)
    a = task.losses_on(batch.prefix_ids, leaky, loss_mask, batch.chunk_ids, batch.chunk_valid)[2]
    b = task.losses_on(batch.prefix_ids, leaky_other, loss_mask, other_targets, batch.chunk_valid)[2]
    assert not torch.equal(a.logits[-1], b.logits[-1])
