"""Surgery checkpoints (sidecar + config + a reference to the base) and `load_model_with_config`.

A surgery folder holds

    sidecar.safetensors     the sidecar weights only (refine_cells.*, boundary.*, latent_token.*)
    recursive_config.json   the RecursiveConfig they were built with
    surgery.json            {"base": absolute path or "preset:<name>", "base_relative": the base folder's path
                             relative to this folder, "base_sha256": ..., "sidecar_params": n, "sidecar_bytes": n}

and never a copy of the base weights (96 GB for the real model). `base_sha256` is a cheap fingerprint, not a hash of
the weights: sha256 over the base folder's config.json bytes, the bytes of any *.index.json weight index, and the
name and size of every weight file (*.safetensors, *.bin, *.pt, *.pth), in sorted order; for a preset, over the
preset's JSON file. It catches "the base folder was replaced by another model" in milliseconds; a loader that finds
a different fingerprint warns and goes on. The folder is written atomically: into out_dir.tmp-XXXX, then renamed.

A moved tree still loads: a loader looks for the base at `base_relative` first, then at `base`, and takes the first
that exists with the recorded fingerprint (`find_base`); so checkpoints/ copied to another disk, base and surgery
folder together, finds the copied base. A phase checkpoint records the base the same way, relative to itself.

Surgery itself needs only the base's config (hidden size, layer count, dtype), never its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from transformers import KimiLinearConfig

from rkl.config import SHAPE_FIELDS, RecursiveConfig
from rkl.errors import UserError
from rkl.model.base import check_kimi_linear_folder, is_checkpoint_dir, load_base, preset_config, preset_names, resolve_dtype
from rkl.model.adapters import load_base_changes
from rkl.model.weights import check_weight_files, read_safetensors
from rkl.model.wrapper import ChunkRefineWrapper, build_sidecar
from rkl.paths import configs_dir
from rkl.train.checkpoint import atomic_dir

SIDECAR_FILE = "sidecar.safetensors"
CONFIG_FILE = "recursive_config.json"
SURGERY_FILE = "surgery.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def base_fingerprint(model: str | Path) -> tuple[str, str]:
    """(reference, sha256) of a base: an absolute folder path or 'preset:<name>'. UserError if it is neither."""
    path = Path(model)
    h = hashlib.sha256()
    if path.is_dir():
        if not is_checkpoint_dir(path):
            raise UserError(f"{path} has no config.json: not a model checkpoint folder")
        check_kimi_linear_folder(path)
        check_weight_files(path)  # a base that cannot be fully read is refused, not built upon
        h.update(b"config.json\0" + (path / "config.json").read_bytes())
        for f in sorted(path.iterdir()):
            if f.name.endswith(".index.json"):
                h.update(f"{f.name}\0".encode() + f.read_bytes())
            elif f.name.endswith(WEIGHT_SUFFIXES) and f.name != SIDECAR_FILE:
                h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
        return str(path.resolve()), h.hexdigest()
    if str(model) in preset_names():
        h.update((configs_dir() / "models" / f"{model}.json").read_bytes())
        return f"preset:{model}", h.hexdigest()
    raise UserError(f"'{model}' is neither a checkpoint folder nor a preset (presets: {', '.join(preset_names())})")


def _base_config(model: str | Path) -> KimiLinearConfig:
    path = Path(model)
    if path.is_dir():
        return KimiLinearConfig.from_pretrained(path)
    return preset_config(str(model))


def _config_dtype(cfg: KimiLinearConfig) -> torch.dtype:
    dt = getattr(cfg, "dtype", None)  # transformers 5 reads a config.json's torch_dtype into `dtype`
    if isinstance(dt, torch.dtype):
        return dt
    if isinstance(dt, str):
        return resolve_dtype(dt.replace("torch.", "")) or torch.float32
    return torch.float32


def surgery(base_path_or_preset: str | Path, config: RecursiveConfig, out_dir: str | Path,
            dtype: str | torch.dtype | None = None, make_tokenizer: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Write a surgery checkpoint for a base; returns {"out", "base", "base_sha256", "sidecar_params",
    "sidecar_bytes", "dtype"}. The sidecar is neutral (surgery changes no output) and float32 whatever the base's
    dtype ("dtype" records the base's): it is what trains. `make_tokenizer`, if given, builds a tokenizer to save in
    the folder (a preset base has none of its own); it is called only once the config and base have passed their
    checks, so a mistake is reported before seconds of tokenizer training."""
    if not config.recursive_enabled:
        raise UserError("surgery builds the recursive sidecar, but the config has recursive_enabled=false; "
                        "set recursive_enabled=true (e.g. configs/after_surgery.json)")
    ref, sha = base_fingerprint(base_path_or_preset)
    base_cfg = _base_config(base_path_or_preset)
    torch_dtype = resolve_dtype(dtype) or _config_dtype(base_cfg)
    parts = build_sidecar(base_cfg.hidden_size, base_cfg.num_hidden_layers, config,
                          getattr(base_cfg, "initializer_range", 0.02))
    state = {f"{name}.{k}": v.contiguous() for name, m in parts.items() if m is not None
             for k, v in m.state_dict().items()}
    n_params = sum(v.numel() for v in state.values())
    n_bytes = sum(v.numel() * v.element_size() for v in state.values())
    out = Path(out_dir)
    tokenizer = make_tokenizer() if make_tokenizer is not None else None
    info = {"base": ref, "base_sha256": sha, "sidecar_params": n_params, "sidecar_bytes": n_bytes,
            "dtype": str(torch_dtype).replace("torch.", "")}
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / SIDECAR_FILE), metadata={"format": "pt"})
        config.save(tmp / CONFIG_FILE)
        info = write_base_reference(info, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {"out": str(out), **info}


def run_surgery(model: str, config: RecursiveConfig, out: Path) -> dict[str, Any]:
    """What `rkl surgery` calls: `surgery(model, config, out)`; the dict has sidecar_params and sidecar_bytes.

    A preset base (random weights: the 48B architecture for smoke tests and benchmarks) has no tokenizer, so one is
    trained on the config's training data, as pretrain does, and saved with the sidecar: `rkl eval` and
    `rkl train --phase a` then run on the folder like on any other."""
    def preset_tokenizer() -> Any:
        from rkl.data.corpora import load_documents
        from rkl.data.tokenizer import train_tokenizer

        docs = load_documents(config.data, "train", arithmetic_digits=config.arithmetic_digits,
                              max_chars=config.max_chars_per_source)
        return train_tokenizer(docs, preset_config(model).vocab_size, exact=False)

    is_preset = not Path(model).is_dir() and model in preset_names()
    return surgery(model, config, out, make_tokenizer=preset_tokenizer if is_preset else None)


def write_base_reference(info: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write surgery.json into `folder` with `info`'s base also recorded relative to the folder (a folder base only);
    returns what was written. `folder` may be the temporary sibling of the final folder (atomic_dir): the relative
    path is the same from both."""
    info = {k: v for k, v in info.items() if k != "base_relative"}
    if not info["base"].startswith("preset:"):
        try:
            info = {"base": info["base"], "base_relative": os.path.relpath(info["base"], Path(folder).resolve()),
                    **info}
        except ValueError:  # another drive (Windows): only the absolute path can reach it
            pass
    (Path(folder) / SURGERY_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def find_base(folder: Path) -> dict[str, Any]:
    """surgery.json of a surgery or phase folder, with "base" set to where the base is now: a preset reference, or
    the first of base_relative (resolved from the folder) and base that exists, preferring one whose fingerprint is
    the recorded one (a found base with another fingerprint loads with a warning)."""
    try:
        info = json.loads((folder / SURGERY_FILE).read_text())
        recorded = info["base"]
        if not isinstance(recorded, str):
            raise TypeError(f"base is {type(recorded).__name__}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{folder / SURGERY_FILE} is unreadable ({e}); re-run `rkl surgery`") from None
    if recorded.startswith("preset:"):
        if recorded[len("preset:"):] not in preset_names():
            raise UserError(f"surgery checkpoint {folder} references base preset '{recorded[len('preset:'):]}', which "
                            f"does not exist (presets: {', '.join(preset_names())})")
        return info
    candidates = [(folder / info["base_relative"]).resolve()] if info.get("base_relative") else []
    candidates = [c for c in [*candidates, Path(recorded)] if c.is_dir()]
    if not candidates:
        relative = f" (nor does {info['base_relative']} relative to it)" if info.get("base_relative") else ""
        raise UserError(f"surgery checkpoint {folder} references base {recorded}, which does not exist{relative}; "
                        "restore the base folder or re-run `rkl surgery` against its new location")
    expected = info.get("base_sha256")
    found = {str(c): base_fingerprint(c)[1] for c in dict.fromkeys(candidates)}
    matching = [c for c, sha in found.items() if sha == expected]
    if expected and not matching:
        warnings.warn(f"base {candidates[0]} differs from the one surgery checkpoint {folder} was made for "
                      "(config or weight files changed); its sidecar may not fit this base", stacklevel=3)
    return {**info, "base": matching[0] if matching else str(candidates[0])}


def _resolve_config(folder: Path | None, config: RecursiveConfig | None, config_path: str | Path | None,
                    recursive_enabled: bool | None) -> RecursiveConfig:
    if config is None and config_path is not None:
        config = RecursiveConfig.from_file(config_path)
    if config is None and folder is not None and (folder / CONFIG_FILE).is_file():
        config = RecursiveConfig.from_file(folder / CONFIG_FILE)
    if config is None:
        config = RecursiveConfig()
    if recursive_enabled is not None and recursive_enabled != config.recursive_enabled:
        config = config.replace(recursive_enabled=recursive_enabled)
    return config


def load_model_with_config(model: str | Path, config: RecursiveConfig | None = None,
                           config_path: str | Path | None = None, recursive_enabled: bool | None = None,
                           dtype: str | torch.dtype | None = None, device_map: str | dict | None = None
                           ) -> tuple[ChunkRefineWrapper, Any, RecursiveConfig]:
    """(wrapper, tokenizer, config) of any stage: the one way to load it in Python (plain transformers loads the
    baseline folder only; the others hold a sidecar and a reference to their base, not a model).

    model: a base folder (checkpoints/baseline, a published Kimi-Linear folder); a surgery or phase folder
    (checkpoints/after_surgery, checkpoints/phase_a: the base is loaded from the path in its surgery.json, then a
    phase B/C folder's LoRA or unfrozen layers, then the sidecar); or a preset name (random weights, no tokenizer).
    Config: explicit `config` > `config_path` > the folder's recursive_config.json > RecursiveConfig();
    `recursive_enabled` overrides the resolved config's (False: the plain base, no sidecar). A config whose sidecar
    shape contradicts the folder's is refused (UserError). A folder's sidecar.safetensors is loaded when the config
    is enabled. dtype: "float32" | "bfloat16" | "float16" or a torch dtype (default: the checkpoint's own);
    device_map: as in transformers ("auto" spreads a large base over the GPUs); "meta": the structure and dtypes of
    every tensor (base, changes, sidecar) without reading a weight.
    The tokenizer is the folder's (a surgery folder without one: its base's); None for a preset. Call
    `wrapper.eval()` before generating, encode prompts with `rkl.data.prompts.encode_prompt`, and generate with
    `wrapper.generate_chunks` (README, "Python API").
    """
    path = Path(model)
    folder = path if path.is_dir() else None
    base_ref: str | Path = model
    if folder is not None and (folder / SURGERY_FILE).is_file():
        base_ref = find_base(folder)["base"]
        base_ref = base_ref[len("preset:"):] if base_ref.startswith("preset:") else base_ref
    cfg = _resolve_config(folder, config, config_path, recursive_enabled)
    if folder is not None and (folder / CONFIG_FILE).is_file() and (folder / SIDECAR_FILE).is_file():
        saved = RecursiveConfig.from_file(folder / CONFIG_FILE)
        for name in SHAPE_FIELDS:
            if getattr(cfg, name) != getattr(saved, name):
                raise UserError(f"{name}: the sidecar in {folder} was built with {getattr(saved, name)!r}, the config "
                                f"asks for {getattr(cfg, name)!r}; the sidecar's shape comes from its checkpoint: "
                                f"drop {name} from the stage file or --set (or run surgery again with it)")
    base, tokenizer = load_base(base_ref, dtype=dtype, device_map=device_map, seed=0)
    if folder is not None:
        load_base_changes(base, cfg, folder)  # LoRA / unfrozen layers of a phase B/C checkpoint
    if tokenizer is None and folder is not None and base_ref != model:
        from rkl.model.base import load_tokenizer
        tokenizer = load_tokenizer(folder)
    wrapper = ChunkRefineWrapper(base, cfg)
    skeleton = device_map == "meta"  # structure only: rkl.train.sharding broadcasts the values
    if wrapper.enabled and folder is not None and (folder / SIDECAR_FILE).is_file() and not skeleton:
        wrapper.load_sidecar_state_dict(read_safetensors(folder / SIDECAR_FILE), source=str(folder / SIDECAR_FILE))
    return wrapper, tokenizer, cfg


def save_sidecar(wrapper: ChunkRefineWrapper, out_dir: str | Path) -> Path:
    """Write the wrapper's sidecar weights and config into out_dir (for training checkpoints)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in wrapper.sidecar_state_dict().items()}
    tmp = out / (SIDECAR_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / SIDECAR_FILE)
    wrapper.config.save(out / CONFIG_FILE)
    return out / SIDECAR_FILE
