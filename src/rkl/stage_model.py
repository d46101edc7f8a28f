"""A stage name (or `--model`) -> the loaded model that `rkl generate` and the lm-eval model run.

The resolution is `rkl eval`'s (rkl.eval.runner): the folder is `--model`, else checkpoints/<stage>; the config is
`--recursive-config`, else the folder's recursive_config.json when it holds a sidecar, else the stage's file under
configs/ (configs/baseline.json for a name without one); then `--set`, then `--chunk-width`. So a stage evaluated,
generated from and scored by lm-eval is the same model under the same config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rkl.config import RecursiveConfig
from rkl.eval.runner import load_for_eval, require_sidecar, resolve_eval_config, resolve_model


@dataclass
class StageModel:
    """wrapper (ChunkRefineWrapper, in eval mode), its tokenizer and resolved config, what was loaded and from where
    the config came."""

    wrapper: Any
    tokenizer: Any
    config: RecursiveConfig
    model: Path | str
    config_source: str

    @property
    def device(self) -> torch.device:
        return self.wrapper.base.get_input_embeddings().weight.device

    @property
    def max_length(self) -> int:
        """Tokens the model takes in one sequence, prompt and generation together (max_position_embeddings)."""
        return int(self.wrapper.base.config.max_position_embeddings)


def load_stage_model(stage: str, model: str | None = None, config_path: str | Path | None = None,
                     overrides: list[str] | None = None, chunk_width: int | None = None,
                     dtype: str | torch.dtype | None = None, merge_lora: bool = False) -> StageModel:
    """Load a stage the way `rkl eval` does; UserError (one line) for a missing checkpoint, a recursive config on a
    folder without a sidecar, or a folder without a tokenizer. merge_lora: as `rkl eval --merge-lora` (LoRA folded
    into the base weights; rkl.model.merge.lora_record(wrapper.base) tells whether any was)."""
    target = resolve_model(stage, model)
    folder = Path(target) if Path(target).is_dir() else None
    config, source, _ = resolve_eval_config(stage, folder, config_path, list(overrides or []), chunk_width)
    require_sidecar(config, folder)
    wrapper, tokenizer, config = load_for_eval(target, config, dtype, merge_lora=merge_lora)
    return StageModel(wrapper, tokenizer, config, target, source)
