"""Base models: a checkpoint folder or a preset name -> KimiLinearForCausalLM (+ its tokenizer).

Always the native transformers class (model_type `kimi_linear`): it reads the published Kimi-Linear folders
(original tensor names are converted on load) and, unlike the folders' own remote code, trains.
Presets are KimiLinearConfig fields in configs/models/<name>.json and build a randomly initialised model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, KimiLinearConfig, KimiLinearForCausalLM, PreTrainedTokenizerBase

from rkl.errors import UserError
from rkl.model.kernels import set_cudnn_attention, set_short_convolution, use_small_reference_kda_chunks
from rkl.model.weights import check_weight_files
from rkl.paths import configs_dir

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def preset_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.json"))


def preset_config(name: str) -> KimiLinearConfig:
    path = configs_dir() / "models" / f"{name}.json"
    if not path.is_file():
        raise UserError(f"no model preset '{name}' (presets: {', '.join(preset_names())})")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return KimiLinearConfig(**fields)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (use one of: {', '.join(DTYPES)})")
    if DTYPES[dtype] == torch.float16 and not torch.cuda.is_available():
        # fp16 on a CPU overflows in training (a 40-step phase A ended with most sidecar tensors NaN)
        raise UserError("float16 needs a GPU; on a CPU use --dtype float32 (or bfloat16)")
    return DTYPES[dtype]


def is_checkpoint_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def check_kimi_linear_folder(path: Path) -> None:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/config.json cannot be read: {e}") from None
    if model_type != "kimi_linear":
        raise UserError(f"{path} holds a '{model_type}' model; rkl needs a Kimi-Linear checkpoint (model_type 'kimi_linear')")


def load_base(model: str | Path, dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
              seed: int = 0) -> tuple[KimiLinearForCausalLM, PreTrainedTokenizerBase | None]:
    """Load a checkpoint folder (with its tokenizer, if it has one) or build a preset (no tokenizer).
    device_map "meta": the model's structure and dtypes without its weights (rkl.train.sharding fills it)."""
    use_small_reference_kda_chunks()  # CPU only: the reference KDA's Python loop runs per chunk row
    set_short_convolution("fla")  # GPU with fla only: else transformers' F.conv1d stays
    set_cudnn_attention(False)  # its per-shape host setup dominates a decode step (rkl.model.kernels)
    torch_dtype = resolve_dtype(dtype)
    path = Path(model)
    if path.is_dir():
        if not is_checkpoint_dir(path):
            raise UserError(f"{path} has no config.json: not a model checkpoint folder")
        check_kimi_linear_folder(path)
        if device_map == "meta":  # the shape alone, no weight read (the processes that receive a broadcast)
            config = KimiLinearConfig.from_pretrained(path)
            with torch.device("meta"):
                base = KimiLinearForCausalLM._from_config(config, dtype=torch_dtype or _auto_dtype(path, config))
            return base, load_tokenizer(path)
        kwargs = {"dtype": torch_dtype or "auto"}
        if device_map is not None:
            kwargs["device_map"] = device_map
        check_weight_files(path)
        base = KimiLinearForCausalLM.from_pretrained(path, **kwargs)
        return base, load_tokenizer(path)
    if str(model) in preset_names():
        return build_preset(str(model), torch_dtype, device_map, seed), None
    raise UserError(f"'{model}' is neither a checkpoint folder nor a preset (presets: {', '.join(preset_names())}); "
                    "train the base first with `rkl train --phase pretrain`")


def _auto_dtype(path: Path, config: KimiLinearConfig) -> torch.dtype:
    """The dtype from_pretrained's "auto" gives a folder: its config's, else its weights' first floating dtype (read
    from the first weight file's header, as transformers reads it)."""
    if isinstance(getattr(config, "dtype", None), torch.dtype):
        return config.dtype
    from transformers.modeling_utils import get_state_dict_dtype, load_state_dict

    return get_state_dict_dtype(load_state_dict(str(sorted(path.glob("*.safetensors"))[0]), map_location="meta"))


def preset_device(device_map: str | dict | None) -> torch.device:
    """Where a preset is built: on the GPU when there is one (a 48B preset does not fit a host's memory in fp32,
    and building it there takes seconds), unless the caller asks for the CPU."""
    if device_map == "meta":  # the structure alone (rkl.train.sharding fills it), also on a host without a GPU
        return torch.device("meta")
    if device_map == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if isinstance(device_map, str) and device_map not in ("auto", "cuda"):
        return torch.device(device_map)
    return torch.device("cuda")


def build_preset(name: str, dtype: torch.dtype | None = None, device_map: str | dict | None = None,
                 seed: int = 0) -> KimiLinearForCausalLM:
    """A randomly initialised preset, seeded, built directly on its device (see preset_device).

    It is built in the preset's own `dtype` when its JSON declares one (the 48B preset: bfloat16, 91.5 GiB instead
    of 183 GiB), else in float32, and then cast to `dtype` if that differs: so the small presets' weights do not
    depend on the dtype asked for beyond its rounding, and every stage that rebuilds a preset (surgery, eval,
    training) gets the same weights on the same device. The weights do depend on the device: the GPU's random
    generator is not the CPU's (and may fill differently on another GPU model), so a preset surgery folder is only
    comparable with stages run on the same kind of device."""
    set_short_convolution("fla")
    set_cudnn_attention(False)
    config = preset_config(name)
    declared = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    torch.manual_seed(seed)
    with torch.device(preset_device(device_map)):
        base = KimiLinearForCausalLM._from_config(config, dtype=declared)
    if dtype is not None and dtype != declared:
        base = base.to(dtype)
    return base


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has none. Published Kimi folders ship tiktoken remote code."""
    has_tokenizer = any((path / name).exists() for name in
                        ("tokenizer.json", "tokenizer_config.json", "tiktoken.model"))
    if not has_tokenizer:
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=(path / "tiktoken.model").exists())
