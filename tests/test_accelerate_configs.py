"""The accelerate launch configs under configs/accelerate/ parse with accelerate's own loader and say what their
names promise (the README points researchers at them)."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from rkl.paths import configs_dir


@pytest.mark.parametrize("name,kind,processes", [("single_gpu", "NO", 1), ("ddp", "MULTI_GPU", 4),
                                                      ("fsdp2", "FSDP", 4)])
def test_accelerate_config_parses(name, kind, processes):
    config = load_config_from_file(str(configs_dir() / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(kind) and config.num_processes == processes
    assert str(config.mixed_precision).endswith("bf16")


def test_fsdp2_yaml_is_what_turns_rkl_sharding_on(tmp_path, cpu_accelerate_config):
    """rkl reads accelerate's own FSDP variable: launching with fsdp2.yaml (here on 2 CPU processes) sets it in every
    process, and ddp.yaml does not. (That the processes then shard: tests/test_data_parallel.py.)"""
    import os
    import subprocess
    import sys

    from rkl.paths import project_root

    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom rkl.train.sharding import fsdp_requested\n"
                     "print('rank', os.environ.get('RANK'), 'fsdp', fsdp_requested())\n")
    env = {**os.environ, "PYTHONPATH": str(project_root() / "src"), "OMP_NUM_THREADS": "1"}
    seen = {}
    for name in ("fsdp2", "ddp"):
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(cpu_accelerate_config(name)), str(probe)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        seen[name] = sorted(line for line in done.stdout.splitlines() if line.startswith("rank"))
    assert seen["fsdp2"] == ["rank 0 fsdp True", "rank 1 fsdp True"], seen
    assert seen["ddp"] == ["rank 0 fsdp False", "rank 1 fsdp False"], seen
