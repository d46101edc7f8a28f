"""RecursiveConfig: the one configuration object of an rkl run.

A stage file under configs/ (baseline.json, after_surgery.json, recursive_phase_a.json, ...) is a JSON
object of these fields; anything left out takes the value of the file it names in "inherits" (a path relative to
its own folder, else a file under configs/), and what that chain leaves out takes the default below. So a stage
file holds only what its stage changes: recursive_phase_b.json inherits recursive_phase_a.json and adds LoRA and
the rising draft share. Fields are grouped (FIELD_GROUPS):

- recursion (what the sidecar is and how the inner loop runs),
- losses (the lambda_* weights of the five refinement losses),
- training chunks (drafts, model-sampled corruption, splices),
- phases B and C (LoRA, unfreezing, L2 pull to pretrained weights),
- optimisation and run control (steps, batch, learning rates, intervals, data, seed).

Every field says which phases and commands read it (`read_by`); a `--set` of a field the command does not read
is refused (`unused_fields`). Every field is validated by type, range and allowed values; `validate()` returns every problem at once and
`from_dict` raises ConfigError naming the keys, so a typo never silently becomes a default.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rkl.errors import ConfigError


# Who reads a field (its `read_by`): the training phases by name, and the commands `rkl surgery` and `rkl eval`.
# A recursive phase's or surgery's checkpoint carries its config to `rkl eval`, which reads it from there.
LM_PHASES = ("pretrain", "vanilla")
REFINE_PHASES = ("a", "b", "c")
TRAIN_PHASES = LM_PHASES + REFINE_PHASES
SURGERY, EVAL = "surgery", "eval"
READERS = (*TRAIN_PHASES, SURGERY, EVAL)
SHAPE_READERS = (SURGERY, *REFINE_PHASES, EVAL)  # built at surgery, rebuilt from the checkpoint by every later stage


def _f(default: Any, doc: str, *, read_by: tuple[str, ...], lo: float | None = None, hi: float | None = None,
       choices: tuple | None = None, factory: Any = None) -> Any:
    assert set(read_by) <= set(READERS), read_by
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "read_by": tuple(read_by)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


CACHE_POLICIES = ("keep_kda_recurrent_reset_mla", "reset_all", "keep_all")
SCHEDULES = ("none", "linear", "cosine")


@dataclass
class RecursiveConfig:
    """Every setting of rkl in one validated dataclass: the recursion (W, K, commit thresholds), the sidecar's shape,
    the training phases' losses, data and optimiser, and the run (steps, batch size, seed). `rkl config` and the
    README's config reference list each field with its type, default, meaning and the commands that read it.

        RecursiveConfig(chunk_width=8)                          # defaults for the rest
        RecursiveConfig.from_file("configs/recursive_phase_a.json")  # a stage file (and the files it inherits)
        cfg.replace(max_inner_steps=2)                          # a validated copy with fields changed
        cfg.with_overrides(["lora_rank=16"])                    # `--set key=value` strings (values parsed as JSON)
        cfg.save(path); cfg.to_dict()

    A wrong type, an out-of-range value or an unknown key raises ConfigError naming the key. A checkpoint's
    recursive_config.json is the config its sidecar was built and trained with; `load_model_with_config` reads it.
    """

    # --- recursion -------------------------------------------------------------------------------------
    recursive_enabled: bool = _f(True, "Build the sidecar and refine chunks; False = the plain base model.", read_by=SHAPE_READERS)
    chunk_width: int = _f(16, "W: tokens per chunk that are drafted, refined and then committed.", lo=1, read_by=(*REFINE_PHASES, EVAL))
    max_inner_steps: int = _f(4, "K: inner refinement steps per chunk (upper bound; the commit head may stop early).", lo=1, read_by=(*REFINE_PHASES, EVAL))
    commit_threshold: float = _f(0.9, "Commit when p_commit >= this at the first inner step.", lo=0.0, hi=1.0, read_by=(EVAL,))
    min_commit_threshold: float = _f(0.5, "The threshold falls linearly to this value at step K (must be <= commit_threshold).", lo=0.0, hi=1.0, read_by=(EVAL,))
    layers_to_refine: list[int] | None = _f(None, "Decoder layer indices that get a refine cell; null = every layer.", factory=None, read_by=SHAPE_READERS)
    refine_cell_type: str = _f("pooled", "What position j's delta may read. 'pooled' (the spec): one delta per layer from the mean of the chunk's hidden states, broadcast; later tokens reach j only through that mean. 'per_token': a delta per position from that position's own (causal) state; never reads a later token. 'chunk_attention': a delta per position from a non-causal attention over the whole chunk; O(W^2) per layer.", choices=("pooled", "per_token", "chunk_attention"), read_by=SHAPE_READERS)
    use_latent_token: bool = _f(False, "Append a learned [Z] embedding after the chunk; the boundary head reads its hidden state.", read_by=SHAPE_READERS)
    d_state: int = _f(64, "Size of each refine cell's recurrent (GRU) state.", lo=1, read_by=SHAPE_READERS)
    gate_hidden: int = _f(64, "Hidden width of the refine cell's input MLP (and attention) and of the boundary head.", lo=1, read_by=SHAPE_READERS)
    cache_reset_policy: str = _f("keep_kda_recurrent_reset_mla", "How each inner step starts: from the chunk-start snapshot (default), re-running prefix+chunk (reset_all, slow reference), or continuing the live cache (keep_all).", choices=CACHE_POLICIES, read_by=(*REFINE_PHASES, EVAL))
    edit_margin: float = _f(0.0, "A refinement step changes a token only where it prefers its new argmax over the chunk's token by more than this many nats (log-probability); 0 = wherever the argmax moved away from step 1's. Each edit ends its row's commit, so a margin trades edits for committed length. Training and generation alike.", lo=0.0, read_by=(*REFINE_PHASES, EVAL))
    reuse_stale_suffix: bool = _f(False, "Generation: after a commit that stops at a changed token, start the next chunk from the rest of the refined chunk instead of re-decoding it; each reused token is committed only if the next chunk's unrefined pass predicts it (else it counts as changed). Off by default: on the CPU demo the check rejected most reused tokens, so commits got shorter and TPOT higher than re-decoding.", read_by=(EVAL,))
    use_soft_tokens: bool = _f(False, "Feed editable positions the probability-weighted embedding instead of the argmax token.", read_by=(EVAL,))
    # --- losses ----------------------------------------------------------------------------------------
    lambda_final: float = _f(1.0, "Weight of the final-step CE at loss positions.", lo=0.0, read_by=REFINE_PHASES)
    lambda_masked: float = _f(0.5, "Weight of the deep-supervision CE averaged over inner steps.", lo=0.0, read_by=REFINE_PHASES)
    lambda_halt: float = _f(0.1, "Weight of the halting BCE (target: the tokens a stop at step t would commit are right).", lo=0.0, read_by=REFINE_PHASES)
    lambda_ponder: float = _f(0.01, "Weight of the ponder cost (expected inner steps).", lo=0.0, read_by=REFINE_PHASES)
    lambda_keep: float = _f(1.0, "Weight of the keep KL: steps 2..K vs step 1's prediction at valid positions that hold the true token (not corrupted, or the model's own token is right there): damaging a right token costs.", lo=0.0, read_by=REFINE_PHASES)
    # --- training chunks: drafts, model-sampled corruption, splices ------------------------------------
    draft_share: float = _f(0.5, "Fraction of training chunks that are the model's own greedy draft from the prefix (every valid position is a loss position).", lo=0.0, hi=1.0, read_by=REFINE_PHASES)
    draft_share_final: float = _f(0.5, "Draft fraction at the end of training (with draft_schedule).", lo=0.0, hi=1.0, read_by=REFINE_PHASES)
    draft_schedule: str = _f("none", "How the draft fraction moves from draft_share to draft_share_final.", choices=SCHEDULES, read_by=REFINE_PHASES)
    splice_share: float = _f(0.5, "Of the other chunks: fraction that are splices (true tokens up to a random position, the model's greedy continuation after it); the rest get model-sampled tokens at corrupted positions.", lo=0.0, hi=1.0, read_by=REFINE_PHASES)
    corruption_rate: float = _f(0.3, "Fraction of chunk positions replaced by model-sampled tokens at the start of training.", lo=0.0, hi=1.0, read_by=REFINE_PHASES)
    corruption_rate_final: float = _f(0.15, "Corruption fraction at the end of training (with a schedule).", lo=0.0, hi=1.0, read_by=REFINE_PHASES)
    corruption_schedule: str = _f("linear", "How the rate moves from corruption_rate to corruption_rate_final.", choices=SCHEDULES, read_by=REFINE_PHASES)
    corruption_mask: str = _f("random", "'random' positions or contiguous 'span's.", choices=("random", "span"), read_by=REFINE_PHASES)
    draft_walk_steps: int = _f(1, "Steps whose training chunks are built in one batched walk of the frozen base (phase A), sharing the group's first prefix length: the walk is one decode step per chunk position, and its cost grows far slower than its rows (on one H100, 1.41x faster steps at batch 8 with 8 steps a walk; docs/benchmarks.md). 1: each micro-batch walks alone. Above 1, each step starts its inner steps from its rows of the walk's prefix pass instead of running its own (the group's prefix cache stays in memory until the group's last step), and validation also walks each held-out batch's drafted and corrupted chunks together. Phases B and C (LoRA, unfrozen layers) train the base their drafts come from: 1 only.", lo=1, read_by=REFINE_PHASES)
    draft_walk_graph: bool = _f(True, "On a GPU, run the draft walk's decode steps over a static cache, each step one CUDA-graph replay instead of about a thousand kernel launches (rkl.model.static_decode). Only where the base is frozen, unsharded and its routed experts bf16 (phase A without FSDP, a bf16 base: PyTorch's grouped_mm captures in bf16 only, so a float32 preset under autocast walks eagerly); elsewhere, and on a CPU, the walk runs eagerly. In bf16 a draft can differ from the eager walk's where two logits tie to the last bit. run.json records which walk ran and why not the graph (draft_walk).", read_by=REFINE_PHASES)
    chunk_pass_graph: bool = _f(True, "On a GPU, run the K inner steps' chunk passes over static buffers sized for the longest prefix, each pass's forward and backward one CUDA-graph replay instead of thousands of kernel launches (rkl.model.static_chunk). Where the draft walk can be a graph (a frozen, unsharded base with bf16 routed experts), without [Z] (use_latent_token) and without gradient_checkpointing; validation and every other case run the eager passes. In bf16 the hidden states round differently from the eager passes' (attention over the padded buffers), which a random-weight model amplifies. run.json records whether the graphs were on (chunk_passes); a capture that fails says so on stderr and the eager passes run.", read_by=REFINE_PHASES)
    # --- phases B and C ----------------------------------------------------------------------------------
    lora_rank: int = _f(0, "LoRA rank on attention and MLP projections (0 = no LoRA; phase B uses 8-16).", lo=0, read_by=REFINE_PHASES)
    lora_alpha: int = _f(16, "LoRA alpha.", lo=1, read_by=REFINE_PHASES)
    lora_layers: str = _f("top_third", "Which layers get LoRA: 'top_third' or 'all'.", choices=("top_third", "all"), read_by=REFINE_PHASES)
    lora_experts: bool = _f(True, "LoRA also on the fused routed experts (peft target_parameters, computed by `rkl.model.expert_lora` as x W + s (x A) B per expert group, no merged stack). false: attention, MLPs and the shared expert only.", read_by=REFINE_PHASES)
    unfreeze_every: int = _f(0, "Unfreeze every n-th decoder layer (phase C: 4); 0 = base stays frozen.", lo=0, read_by=REFINE_PHASES)
    l2_to_pretrained: float = _f(0.0, "Weight of the L2 pull of unfrozen weights toward their pretrained values.", lo=0.0, read_by=REFINE_PHASES)
    drift_new_tokens: int = _f(24, "Tokens each of the 8 n-gram drift prompts generates at every validation (phases with unfrozen layers).", lo=1, read_by=REFINE_PHASES)
    # --- optimisation and run control ------------------------------------------------------------------
    steps: int = _f(200, "Optimizer steps of a training run.", lo=1, read_by=TRAIN_PHASES)
    batch_size: int = _f(8, "Sequences (or chunks) per micro-batch.", lo=1, read_by=TRAIN_PHASES)
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", lo=1, read_by=TRAIN_PHASES)
    seq_len: int = _f(128, "Tokens per training sequence (pretrain / vanilla); prefix+chunk budget for phases.", lo=2, read_by=TRAIN_PHASES)
    lr: float = _f(3e-3, "Learning rate of base weights when they train (pretrain, vanilla).", lo=0.0, read_by=LM_PHASES)
    lr_refine: float = _f(3e-4, "Learning rate of the refine cells.", lo=0.0, read_by=REFINE_PHASES)
    lr_boundary: float = _f(5e-4, "Learning rate of the boundary head.", lo=0.0, read_by=REFINE_PHASES)
    lr_latent: float = _f(3e-4, "Learning rate of the latent token.", lo=0.0, read_by=REFINE_PHASES)
    lr_lora: float = _f(1e-5, "Learning rate of LoRA adapters.", lo=0.0, read_by=REFINE_PHASES)
    lr_unfrozen: float = _f(1e-5, "Learning rate of unfrozen base layers (phase C).", lo=0.0, read_by=REFINE_PHASES)
    warmup_steps: int = _f(20, "Linear warmup steps before the cosine decay.", lo=0, read_by=TRAIN_PHASES)
    min_lr_ratio: float = _f(0.1, "Cosine decay floor as a fraction of each group's peak lr.", lo=0.0, hi=1.0, read_by=TRAIN_PHASES)
    weight_decay: float = _f(0.01, "AdamW weight decay.", lo=0.0, read_by=TRAIN_PHASES)
    grad_clip: float = _f(1.0, "Gradient-norm clip (0 = off).", lo=0.0, read_by=TRAIN_PHASES)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (large models): pretrain/vanilla use transformers' per-layer checkpointing; phases a/b/c recompute each inner step from the chunk-start snapshot, which keeps the cached prefix (the default cache policy or reset_all).", read_by=TRAIN_PHASES)
    log_interval: int = _f(10, "Steps between TensorBoard scalars.", lo=1, read_by=TRAIN_PHASES)
    eval_interval: int = _f(50, "Steps between validation passes.", lo=1, read_by=TRAIN_PHASES)
    eval_batches: int = _f(4, "Validation micro-batches per evaluation.", lo=1, read_by=TRAIN_PHASES)
    save_interval: int = _f(100, "Steps between checkpoints (the last step always saves).", lo=1, read_by=TRAIN_PHASES)
    data: str = _f("mix", "Training data: 'mix' (stdlib+shakespeare+arithmetic), 'stdlib', 'shakespeare', 'arithmetic', a datasets name, or a local text/json/parquet file.", read_by=(*TRAIN_PHASES, SURGERY, EVAL))
    max_chars_per_source: int = _f(2_000_000, "Character cap per embedded corpus (stdlib, shakespeare, arithmetic) to bound tokenisation time.", lo=1000, read_by=(*TRAIN_PHASES, SURGERY, EVAL))
    arithmetic_digits: int = _f(3, "Digits per operand of the generated arithmetic set.", lo=1, hi=12, read_by=(*TRAIN_PHASES, SURGERY, EVAL))
    seed: int = _f(0, "Seed of every RNG of the run.", lo=0, read_by=READERS)

    # ----------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise ConfigError("; ".join(problems))

    def validate(self) -> list[str]:
        """Every problem with this config, one string each naming the key (empty when valid)."""
        problems = []
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            problem = _check_type(value, hints[f.name])
            if problem:
                problems.append(f"{f.name}: {problem}")
                continue
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                problems.append(f"{f.name}: {value!r} is not one of {', '.join(map(repr, meta['choices']))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    problems.append(f"{f.name}: must be finite, got {value}")
                if meta.get("lo") is not None and value < meta["lo"]:
                    problems.append(f"{f.name}: {value} is below the minimum {meta['lo']}")
                if meta.get("hi") is not None and value > meta["hi"]:
                    problems.append(f"{f.name}: {value} is above the maximum {meta['hi']}")
        if not problems:
            if self.min_commit_threshold > self.commit_threshold:
                problems.append(f"min_commit_threshold: must be <= commit_threshold, got {self.min_commit_threshold} > "
                            f"{self.commit_threshold}; lower min_commit_threshold or raise commit_threshold")
            if self.draft_walk_steps > 1 and (self.lora_rank > 0 or self.unfreeze_every > 0):
                problems.append(f"draft_walk_steps: {self.draft_walk_steps} drafts steps ahead with the base as it is "
                                "now, and lora_rank/unfreeze_every train that base (phases B and C): set "
                                "draft_walk_steps=1 there")
            if self.layers_to_refine is not None:
                if any(i < 0 for i in self.layers_to_refine):
                    problems.append("layers_to_refine: layer indices must be >= 0")
                if len(set(self.layers_to_refine)) != len(self.layers_to_refine):
                    problems.append("layers_to_refine: duplicate layer index")
        return problems

    # --- (de)serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecursiveConfig":
        return cls(**cls.known_fields(data))

    @classmethod
    def known_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The fields a dict sets: comment keys dropped, old keys migrated, unknown keys refused (with a "did you
        mean"), ints taken for float fields. Values are validated only when a config is built from them."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        if INHERITS in data:
            raise ConfigError(f'"{INHERITS}" is read only in a config file (it names the file that one builds on)')
        data = migrate(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
            raise ConfigError(f"unknown config key(s): {', '.join(hints)}; `rkl config` lists every field")
        # JSON has one number type: accept 3 for a float field, never 3.0 for an int field.
        hints = typing.get_type_hints(cls)
        coerced = {k: float(v) if hints[k] is float and type(v) is int else v for k, v in data.items()}
        return coerced

    @classmethod
    def from_file(cls, path: str | Path) -> "RecursiveConfig":
        """A config file and the chain of files it inherits: each file's keys are checked against the fields (the
        error names that file), later files override earlier ones, then the merged values are validated."""
        path = Path(path)
        merged: dict[str, Any] = {}
        for layer, data in inheritance_chain(path):
            try:
                merged.update(cls.known_fields(data))
            except ConfigError as e:
                raise ConfigError(f"{layer}: {e}") from None
        try:
            return cls.from_dict(merged)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    def with_overrides(self, assignments: list[str]) -> "RecursiveConfig":
        """Apply `key=value` strings (values parsed as JSON, else taken as a string)."""
        data = self.to_dict()
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            key, raw = item.split("=", 1)
            key = key.strip()
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            data[key] = value
        return type(self).from_dict(data)

    def replace(self, **changes: Any) -> "RecursiveConfig":
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def field_docs(cls) -> list[tuple[str, str, Any, str, tuple[str, ...]]]:
        """(name, type, default, doc, read_by) of every field, for the README and `rkl config`."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            rows.append((f.name, _type_name(hints[f.name]), default, f.metadata["doc"], f.metadata["read_by"]))
        return rows


# (title, first field) of each group, in declaration order: a field belongs to the last group started before it.
FIELD_GROUPS = (("recursion", "recursive_enabled"), ("losses", "lambda_final"),
                ("training chunks: drafts, model-sampled corruption, splices", "draft_share"),
                ("phases B and C", "lora_rank"), ("optimisation and run control", "steps"))


def grouped_field_docs() -> list[tuple[str, list[tuple[str, str, Any, str, tuple[str, ...]]]]]:
    """RecursiveConfig.field_docs() split into FIELD_GROUPS: [(title, rows)]."""
    starts = {first: title for title, first in FIELD_GROUPS}
    groups: list[tuple[str, list]] = []
    for row in RecursiveConfig.field_docs():
        if row[0] in starts:
            groups.append((starts[row[0]], []))
        groups[-1][1].append(row)
    return groups


def readers_text(read_by: tuple[str, ...]) -> str:
    """'train a, b, c; eval' for ("a", "b", "c", "eval"): the phases (`rkl train --phase ...`), then the commands."""
    phases = [p for p in TRAIN_PHASES if p in read_by]
    parts = [f"train {', '.join(phases)}"] if phases else []
    return "; ".join(parts + [c for c in (SURGERY, EVAL) if c in read_by])


def config_reference_markdown() -> str:
    """The README's config reference table: every field by group, with its type, default, readers and meaning."""
    lines = ["| field | type | default | read by | meaning |", "|---|---|---|---|---|"]
    for title, rows in grouped_field_docs():
        lines.append(f"| **{title}** | | | | |")
        for name, tp, default, doc, read_by in rows:
            tp = tp.replace("|", "\\|")  # a literal | would split the cell
            lines.append(f"| `{name}` | {tp} | `{default}` | {readers_text(read_by)} | {doc} |")
    return "\n".join(lines) + "\n"


INHERITS = "inherits"  # the key of a config file that names the file it builds on
MAX_INHERITANCE = 16


def inheritance_chain(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """[(file, its keys without "inherits")], the root of the chain first and `path` last.

    "inherits" is a path relative to the inheriting file's folder; a bare name not found there is looked up under
    configs/ (so a config of your own can build on a stage file: {"inherits": "recursive_phase_a.json", ...})."""
    from rkl.paths import configs_dir

    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    while True:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}; check the path (the stage files are under "
                              f"{configs_dir()})")
        if path.resolve() in seen:
            cycle = " -> ".join(p.name for p in [*seen, path.resolve()])
            raise ConfigError(f"{path}: \"{INHERITS}\" makes a cycle ({cycle}); remove it from one of these files")
        if len(seen) >= MAX_INHERITANCE:
            raise ConfigError(f"{path}: more than {MAX_INHERITANCE} files inherit one another")
        seen.append(path.resolve())
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: config must be a JSON object, got {type(data).__name__}")
        parent = data.pop(INHERITS, None)
        chain.append((path, data))
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f'{path}: "{INHERITS}" must be a file name, got {parent!r}')
        nxt = path.parent / parent
        if not nxt.is_file() and (configs_dir() / parent).is_file():
            nxt = configs_dir() / parent
        if not nxt.is_file():
            raise ConfigError(f'{path}: "{INHERITS}": {parent} not found (looked in {path.parent} and '
                              f"{configs_dir()})")
        path = nxt


# The sidecar's shape: written at surgery, read back from every checkpoint, never changed by a later stage.
SHAPE_FIELDS = ("refine_cell_type", "d_state", "gate_hidden", "layers_to_refine", "use_latent_token")


def reads_field(command: str, read_by: tuple[str, ...]) -> bool:
    """Whether a `--set` of a field with these readers changes what `command` (a phase or surgery/eval) does.

    A recursive phase and surgery also count a field `rkl eval` reads: their checkpoint carries the config to eval
    (phase A's commit_threshold is what `rkl eval --stage phase_a` generates with). Pretrain and vanilla do not:
    their stages are evaluated with the stage files (their checkpoints hold no sidecar)."""
    return command in read_by or (command in (*REFINE_PHASES, SURGERY) and EVAL in read_by)


def unused_fields(keys: list[str], command: str) -> list[str]:
    """One message per known key that `command` does not read (empty when all are read; unknown keys are left to
    `RecursiveConfig.known_fields`, which suggests the closest field)."""
    readers = {name: read_by for name, _, _, _, read_by in RecursiveConfig.field_docs()}
    what = f"phase {command}" if command in TRAIN_PHASES else f"rkl {command}"
    out = []
    for key in keys:
        if key not in readers or reads_field(command, readers[key]):
            continue
        if key == "lr" and command in REFINE_PHASES:
            out.append(f"lr is not used by phase {command}; its learning rates are lr_refine, lr_boundary, lr_latent "
                       "(and lr_lora, lr_unfrozen)")
        elif command in LM_PHASES and key.startswith("lr_"):
            out.append(f"{key} is not used by phase {command} (it trains the base alone; its learning rate is lr)")
        else:
            out.append(f"{key} is not used by {what}; it is read by {readers_text(readers[key])}")
    return out


# Keys of configs written before the length head was replaced by the commit rule (2026-11-22): renamed keys map to
# their new names, keys of removed features are dropped, so every saved recursive_config.json keeps loading.
RENAMED_KEYS = {"scheduled_sampling": "draft_schedule", "scheduled_sampling_final": "draft_share_final",
                "lambda_stability": "lambda_keep"}
REMOVED_KEYS = ("max_chunk_len", "enable_length_head", "lambda_len")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Drop comment keys ("_..."; JSON has no comments), rename old keys, drop keys of removed features.

    An old scheduled-sampling config drew drafts with a probability rising from 0, so it migrates with
    draft_share 0 (the new default, 0.5, would change what it trains on)."""
    out = {}
    for k, v in data.items():
        if k.startswith("_") or k in REMOVED_KEYS:
            continue
        out[RENAMED_KEYS.get(k, k)] = v
    if any(k in data for k in ("scheduled_sampling", "scheduled_sampling_final")):
        out.setdefault("draft_share", 0.0)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value: Any, tp: Any) -> str | None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            return f"expected a list of {item.__name__}, got {type(value).__name__}"
        bad = [v for v in value if _check_type(v, item)]
        return f"expected a list of {item.__name__}, got items {bad!r}" if bad else None
    if tp is float:
        ok = isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    return None if ok else f"expected {tp.__name__}, got {type(value).__name__} {value!r}"
