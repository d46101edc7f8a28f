"""The accelerate launch configs under configs/accelerate/ parse with accelerate's own loader and say what their
names promise (the README points researchers at them)."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from rkl.paths import configs_dir


@pytest.mark.parametrize("name,kind,processes", [("single_gpu", "NO", 1), ("ddp", "MULTI_GPU", 4)])
def test_accelerate_config_parses(name, kind, processes):
    config = load_config_from_file(str(configs_dir() / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(kind) and config.num_processes == processes
    assert str(config.mixed_precision).endswith("bf16")
