"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine oversubscription makes every
    op up to 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_stages(tmp_path_factory):
    """One tiny checkpoint of each kind, trained a few steps on 2-digit arithmetic, with a trained tokenizer:
    root/baseline (pretrain, 8 steps), root/after_surgery (neutral sidecar), root/phase_a (sidecar trained 3 steps).
    For tests that run a whole tool (rkl generate, lm-eval, the README example) on every kind of checkpoint."""
    from rkl import RecursiveConfig
    from rkl.model.surgery import surgery
    from rkl.train.phases import PhaseRun, run_phase

    root = tmp_path_factory.mktemp("tiny_stages")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a session fixture is set up before the module-scoped _one_thread above
    data = dict(data="arithmetic", max_chars_per_source=20_000, arithmetic_digits=2, seed=1)
    base_cfg = RecursiveConfig(recursive_enabled=False, steps=8, batch_size=8, seq_len=32, eval_batches=1,
                               eval_interval=8, save_interval=8, **data)
    run_phase(PhaseRun("pretrain", base_cfg, "tiny", root / "baseline", root / "logs/baseline", show_progress=False))
    refine = RecursiveConfig(chunk_width=4, max_inner_steps=2, d_state=16, gate_hidden=16, seq_len=20, batch_size=4,
                             eval_batches=1, warmup_steps=0, refine_cell_type="chunk_attention", **data)
    surgery(root / "baseline", refine, root / "after_surgery")
    phase_a = refine.replace(steps=3, eval_interval=3, save_interval=3)
    run_phase(PhaseRun("a", phase_a, str(root / "after_surgery"), root / "phase_a", root / "logs/phase_a",
                       show_progress=False))
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session")
def cpu_accelerate_config(tmp_path_factory):
    """make(name) -> a copy of configs/accelerate/<name>.yaml for this GPU-less machine: 2 CPU processes, no bf16.
    (`accelerate launch --cpu` would start one process without the file's FSDP setting; use_cpu in the file keeps
    both.)"""
    from rkl.paths import configs_dir

    folder = tmp_path_factory.mktemp("accelerate")

    def make(name: str):
        text = (configs_dir() / "accelerate" / f"{name}.yaml").read_text()
        copy = folder / f"{name}_cpu.yaml"
        copy.write_text(text.replace("num_processes: 4", "num_processes: 2").replace("gpu_ids: all", "use_cpu: true")
                        .replace("mixed_precision: bf16", "mixed_precision: 'no'"))
        return copy

    return make
