"""ChunkRefineWrapper: Kimi-Linear plus the recursive sidecar (refine cells, boundary head, latent token).

The base model is `wrapper.base`, untouched; the sidecar lives outside it (`refine_cells`, `boundary`,
`latent_token`; all None with `recursive_enabled=False`, when the wrapper is a pure pass-through), created in
float32 (it is what trains; see build_sidecar) on the device of the part it attaches to (each refine cell beside
its decoder layer). Each delta is cast to its layer's dtype, and the cells and heads cast what they read to float32.

Deltas act INSIDE the forward pass: a forward hook on every decoder layer in `layers_to_refine`
(`register_forward_hook(prepend=True)`, outside transformers' gradient-checkpointing wrapper) adds the layer's
current delta to its output at the chunk positions, so later layers, the logits and the recorded hidden states all
see it. The hooks act only while a refinement pass is running (`self._pass` is set, inside refine_chunk);
otherwise they return None and the base runs bitwise as without the wrapper.

The inner loop (`refine_chunk`), precisely. Inputs: the chunk's current tokens [B, W], a snapshot of the cache at
the chunk start (the prefix fully cached, the chunk not), the logits at the last prefix position (the prediction
for chunk position 0: under the default policy the prefix is never re-run), and which positions are editable.
For t = 1..K:

1. the working cache: `keep_kda_recurrent_reset_mla` (default) restores the snapshot (KDA state cloned, MLA latents
   by reference; an autograd-safe cache, see cache.py), so every step costs O(W) however long the prefix;
   `reset_all` re-runs prefix + chunk in one forward without a cache (the slow reference; needs prefix_ids);
   `keep_all` restores the snapshot at step 1 only and then continues the live cache: at step t the KDA state and
   the MLA latents already hold steps 1..t-1's chunk (and [Z]) on top of the prefix, so the chunk "follows itself"
   K times. That is wrong as text (the chunk sees stale copies of itself as earlier context) and exists only as a
   measured ablation;
2. run the W chunk positions with the deltas of the cells' states; with `use_latent_token`, [Z] follows as a
   one-position forward continuing the working cache (so it sits after the chunk and attends to all of it, while
   the text positions' forward is bitwise the one without [Z]); [Z] gets no delta and never enters a committed
   cache;
3. logits aligned so that entry j predicts chunk position j: entry 0 = prev_logits, entries 1..W-1 = the chunk's
   logits at positions 0..W-2 (kept in float32);
4. boundary head on the summary (the [Z] position's final hidden state, or the last valid chunk position's) ->
   commit logit. With a commit threshold, the loop stops at the first step whose p_commit
   reaches threshold_t in every row that has an editable position; threshold_t falls linearly from
   commit_threshold at t = 1 to min(min_commit_threshold, commit_threshold) at t = K. A stopping step commits
   the tokens it was run on (its logits have already checked them) and edits nothing, except that a reused stale
   token (`unverified`) that step 1 does not predict is replaced by step 1's prediction, also at step 1;
5. TOKEN EDIT RULE: new_tok = where(editable & (argmax(logits_t) != argmax(logits_1)), argmax(logits_t), draft),
   and with edit_margin > 0 only where log p_t(new) - log p_t(draft token) > edit_margin.
   Step 1 always runs with zero deltas (every cell state starts at None), so logits_1 are the unrefined model's
   own predictions through this same chunked path, and a token changes only where refinement changed the
   argmax. Comparing against the draft instead would be wrong in bf16: the draft was decoded token by token on
   the single-token recurrent KDA path, the chunk forward uses the chunked KDA path, and the two differ by
   rounding, so near-ties flip and an untrained sidecar would "edit" tokens. With this rule an untrained (zero-
   delta) sidecar edits nothing, in any dtype, which makes greedy generation token-identical to the baseline;
6. the refine cells update their states from this step's hidden states (not after the last step).

Generation (chunks, commits, the stale-suffix check) lives in rkl.model.generate; the commit rule in
rkl.model.commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from rkl.config import RecursiveConfig
from rkl.errors import UserError
from rkl.model.boundary import BoundaryHead
from rkl.model.cache import CacheSnapshot, new_cache, restore_cache, snapshot_cache
from rkl.model.latent import LatentToken
from rkl.model.refine import CellGroup, RefineCell
from rkl.model.static_chunk import StaticChunkPasses

EDIT_RULES = ("vs_first_step", "argmax")


@dataclass
class RefineResult:
    """What refine_chunk did, per inner step (index 0 = step 1). All tensors keep their graph when grad is on.

    logits[t]        [B, W, V] float32, entry j predicts chunk position j (entry 0 is prev_logits every step);
    commit_logits[t] [B];
    tokens[t]        [B, W] the chunk tokens after step t (the input of step t + 1);
    steps_used       inner steps run; final_tokens = tokens[-1]; draft = the chunk as it came in.
    """

    logits: list[torch.Tensor] = field(default_factory=list)
    commit_logits: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    steps_used: int = 0
    final_tokens: torch.Tensor | None = None
    draft: torch.Tensor | None = None
    editable: torch.Tensor | None = None

    @property
    def p_commit(self) -> list[torch.Tensor]:
        return [torch.sigmoid(c.float()) for c in self.commit_logits]

    @property
    def changed(self) -> torch.Tensor:
        """[B, W] bool: positions whose token differed from the draft after any step (what the commit rule reads)."""
        out = torch.zeros_like(self.draft, dtype=torch.bool)
        for toks in self.tokens:
            out |= toks != self.draft
        return out

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The chunk each step read: the draft for step 1, then step t-1's tokens (one entry per step run)."""
        return [self.draft] + self.tokens[: self.steps_used - 1]

    @property
    def tokens_changed(self) -> list[int]:
        """Positions whose token changed at each step (step 1 against the draft)."""
        prev, out = self.draft, []
        for toks in self.tokens:
            out.append(int((toks != prev).sum()))
            prev = toks
        return out


@dataclass
class _Pass:
    """State the hooks read during one forward of a refinement pass."""

    deltas: dict[int, torch.Tensor | None]
    start: int  # first chunk position in the forward's sequence
    width: int  # chunk positions the deltas apply to ([Z] gets none)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids the way HF generate builds them: cumsum of the mask - 1, padding at 0."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def commit_thresholds(commit_threshold: float, min_commit_threshold: float, k: int) -> list[float]:
    """threshold_t for t = 1..K: linear from commit_threshold down to min(min_commit_threshold, commit_threshold)."""
    lo = min(min_commit_threshold, commit_threshold)
    if k == 1:
        return [commit_threshold]
    return [commit_threshold - (commit_threshold - lo) * (t / (k - 1)) for t in range(k)]


def build_sidecar(hidden_size: int, num_layers: int, config: RecursiveConfig, init_std: float = 0.02
                  ) -> dict[str, nn.Module | None]:
    """The sidecar modules (CPU, float32 whatever the base's dtype), seeded with config.seed so surgery is reproducible.

    float32 because they are what trains: AdamW steps of 3e-4 on bf16 weights round away (50 steps in bf16 left
    every refine LayerNorm weight and the commit bias exactly where they started). The hooks cast each delta to the
    layer's dtype, and a zero delta stays bitwise zero in any dtype.

    Returns {"refine_cells": ModuleDict keyed by str(layer), "boundary": BoundaryHead, "latent_token": LatentToken
    or None}. Raises UserError when layers_to_refine names a layer the model lacks.
    """
    layers = resolve_layers(config, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        cells = nn.ModuleDict({str(i): RefineCell(hidden_size, config.d_state, config.gate_hidden,
                                                  config.refine_cell_type) for i in layers})
        boundary = BoundaryHead(hidden_size, config.gate_hidden)
        latent = LatentToken(hidden_size, init_std) if config.use_latent_token else None
    return {"refine_cells": cells, "boundary": boundary, "latent_token": latent}


def resolve_layers(config: RecursiveConfig, num_layers: int) -> list[int]:
    if config.layers_to_refine is None:
        return list(range(num_layers))
    for i in config.layers_to_refine:
        if not 0 <= i < num_layers:
            raise UserError(f"layers_to_refine names layer {i}, but the model has {num_layers} decoder layers "
                            f"(indices 0..{num_layers - 1}); fix layers_to_refine in the recursive config")
    return sorted(config.layers_to_refine)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class ChunkRefineWrapper(nn.Module):
    """A Kimi-Linear base (`.base`, its weights untouched) with the recursive sidecar beside it: refine cells hooked
    onto the decoder layers, the commit (boundary) head and optionally the latent token, built from `.config`.

    `generate_chunks` generates in refined chunks (rkl.model.generate); `refine_chunk` runs one chunk's inner loop;
    `forward`/`generate` are the base's own, unchanged (the deltas act only inside refinement passes). With
    `config.recursive_enabled` False there is no sidecar and generate_chunks is `base.generate`. Usually built by
    `load_model_with_config`, which also loads a checkpoint's trained sidecar.
    """

    def __init__(self, base_model: nn.Module, config: RecursiveConfig | None = None) -> None:
        super().__init__()
        config = config or RecursiveConfig()
        self.base = base_model
        self.config = config
        num_layers = base_model.config.num_hidden_layers
        self.layers_to_refine = resolve_layers(config, num_layers)
        self._pass: _Pass | None = None
        self._hook_handles: list[Any] = []
        self.refine_cells: nn.ModuleDict | None = None
        self.boundary: BoundaryHead | None = None
        self.latent_token: LatentToken | None = None
        if not config.recursive_enabled:
            return
        parts = build_sidecar(base_model.config.hidden_size, num_layers, config,
                              getattr(base_model.config, "initializer_range", 0.02))
        layers = base_model.model.layers
        for key, cell in parts["refine_cells"].items():
            cell.to(_device_of(layers[int(key)]))
        self.refine_cells = parts["refine_cells"]
        self.boundary = parts["boundary"].to(_device_of(base_model.model.norm))
        if parts["latent_token"] is not None:
            self.latent_token = parts["latent_token"].to(base_model.get_input_embeddings().weight.device)
        for i in self.layers_to_refine:
            self._hook_handles.append(layers[i].register_forward_hook(self._make_hook(i), prepend=True))

    # ------------------------------------------------------------------------------------------------ hooks
    def _make_hook(self, idx: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            state = self._pass
            if state is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            s, e = state.start, state.start + state.width
            delta = state.deltas.get(idx)
            if delta is None:
                state.hidden[idx] = h[:, s:e]
                return None
            mid = h[:, s:e] + delta.to(h.dtype)
            state.hidden[idx] = mid
            new = torch.cat([h[:, :s], mid, h[:, e:]], dim=1)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def remove_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    # --------------------------------------------------------------------------------------------- basics
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward, unchanged (no deltas are active outside refinement passes)."""
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's HF `generate`, unchanged (token by token, no refinement)."""
        return self.base.generate(*args, **kwargs)

    @property
    def enabled(self) -> bool:
        return self.refine_cells is not None

    def sidecar_modules(self) -> dict[str, nn.Module]:
        parts = {"refine_cells": self.refine_cells, "boundary": self.boundary, "latent_token": self.latent_token}
        return {k: v for k, v in parts.items() if v is not None}

    def sidecar_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.sidecar_modules().values() for p in m.parameters()]

    def sidecar_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, m in self.sidecar_modules().items() for k, v in m.state_dict().items()}

    def load_sidecar_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load sidecar weights (cast to each module's dtype/device); UserError on missing or unexpected keys."""
        # sidecars saved before the length head was removed carry its weights: nothing reads them any more
        state = {k: v for k, v in state.items() if not k.startswith("boundary.length.")}
        own = self.sidecar_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
            raise UserError(f"sidecar weights in {source} do not match the recursive config ({'; '.join(parts)}); "
                            "use the recursive_config.json saved with them")
        for name, m in self.sidecar_modules().items():
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            for k, v in m.state_dict().items():
                if sub[k].shape != v.shape:
                    raise UserError(f"sidecar tensor {name}.{k} in {source} has shape {tuple(sub[k].shape)}, the "
                                    f"recursive config gives {tuple(v.shape)}; use the config saved with the weights")
            m.load_state_dict({k: t.to(dtype=m.state_dict()[k].dtype) for k, t in sub.items()})

    def num_sidecar_params(self) -> int:
        return sum(p.numel() for p in self.sidecar_parameters())

    def _require_sidecar(self) -> None:
        if not self.enabled:
            raise RuntimeError("refine_chunk needs the sidecar: this wrapper has recursive_enabled=False")

    # ------------------------------------------------------------------------------------ forward passes
    def _run(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
             cache: Any, pass_state: _Pass | None) -> torch.Tensor:
        """base.model over `inputs_embeds` with the hooks reading `pass_state`; returns the final hidden states.
        attention_mask: [B, keys] (0 = padding), or transformers' per-layer-type mask dict, passed on as it is."""
        if torch.is_tensor(attention_mask) and bool((attention_mask == 1).all()):
            attention_mask = None  # as HF generate does: no padding -> no mask
        self._pass = pass_state
        try:
            out = self.base.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=cache is not None)
        finally:
            self._pass = None
        return out.last_hidden_state

    def _check_checkpointing(self, policy: str, use_z: bool) -> None:
        if (policy == "reset_all" and not use_z) or not self.base.training:
            return
        if any(getattr(layer, "gradient_checkpointing", False) for layer in self.base.model.layers):
            # transformers 5.23's GradientCheckpointingLayer sets past_key_values=None inside checkpointed layers,
            # which would silently run the chunk without its prefix.
            raise RuntimeError("gradient checkpointing drops the KV/KDA cache in transformers' decoder layers, so a "
                               "chunk could not see its cached prefix; turn it off for refinement passes or use "
                               "cache_reset_policy='reset_all'")

    def _checkpoint_steps(self, policy: str) -> bool:
        """Whether refine_chunk recomputes each inner step in backward (config.gradient_checkpointing, training
        with grad). keep_all continues one live cache across steps, so its steps cannot be recomputed alone."""
        if not (self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return False
        if policy == "keep_all":
            raise RuntimeError("gradient_checkpointing recomputes each inner step from the chunk-start snapshot; "
                               "cache_reset_policy='keep_all' carries one cache across steps: use the default policy")
        return True

    @torch.no_grad()
    def _delta_samples(self, rows: int, width: int, device: torch.device) -> list[torch.Tensor]:
        """One delta per refined layer as the cells make them under the current autocast (shape and dtype)."""
        out = []
        for i in self.layers_to_refine:
            cell = self.refine_cells[str(i)]
            shape = (rows, cell.d_state) if cell.cell_type == "pooled" else (rows, width, cell.d_state)
            out.append(cell.delta(torch.zeros(shape, device=device, dtype=cell.out_proj.weight.dtype)))
        return out

    @torch.no_grad()
    def prepare_prefix(self, prefix_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                       ) -> tuple[CacheSnapshot, torch.Tensor]:
        """Run a prefix once (no deltas) -> (snapshot of its cache, float32 logits at its last position [B, V])."""
        cache = new_cache(self.base.config)
        mask = attention_mask if attention_mask is not None else torch.ones_like(prefix_ids)
        out = self.base(input_ids=prefix_ids, attention_mask=None if bool((mask == 1).all()) else mask,
                        position_ids=positions_from_mask(mask), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
        return snapshot_cache(cache), out.logits[:, -1].to(torch.float32, copy=True)

    def refine_chunk(self, chunk_ids: torch.Tensor, snapshot: CacheSnapshot | None, prev_logits: torch.Tensor,
                     editable: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_inner_steps: int | None = None, commit_threshold: float | None = None, soft: bool = False,
                     *, prefix_ids: torch.Tensor | None = None, prefix_mask: torch.Tensor | None = None,
                     cache_reset_policy: str | None = None, edit_rule: str = "vs_first_step",
                     unverified: torch.Tensor | None = None, chunk_passes: StaticChunkPasses | None = None
                     ) -> RefineResult:
        """The inner loop over one chunk (see the module docstring for the exact protocol).

        chunk_ids [B, W]: the current chunk (the draft). snapshot: the cache at the chunk start (unused by
        reset_all, which needs prefix_ids [B, P] instead). prev_logits [B, V]: logits at the last prefix position.
        editable [B, W] bool: positions whose token may change (padding never does). attention_mask: [B, P + W]
        over prefix and chunk (or [B, W] for the chunk, the prefix then taken from prefix_mask / all ones).
        commit_threshold None runs all K steps (training). soft: editable positions of step t + 1 get the
        probability-weighted embedding of step t's predictions instead of a token (differentiable).
        edit_rule 'vs_first_step' is the exactness-preserving rule above (training and inference); 'argmax' lets
        editable positions take argmax(logits_t) outright (an ablation; not exact in bf16).
        unverified [B, W] bool: editable positions holding a token nobody has checked against the current prefix
        (a reused stale draft token, see generate.py): under 'vs_first_step' such a token stands only where step
        1's argmax equals it and is replaced by that argmax otherwise, also when the loop stops at step 1.
        chunk_passes: run the chunk passes over static buffers, as CUDA graphs on a GPU (rkl.model.static_chunk),
        where they apply: training with gradient, the default cache policy, no [Z], no soft inputs, no step
        checkpointing, no padding (no masks given). Elsewhere the eager passes run.
        """
        self._require_sidecar()
        cfg = self.config
        k_steps = max_inner_steps or cfg.max_inner_steps
        policy = cache_reset_policy or cfg.cache_reset_policy
        if edit_rule not in EDIT_RULES:
            raise ValueError(f"edit_rule must be one of {EDIT_RULES}")
        if unverified is not None and edit_rule != "vs_first_step":
            raise ValueError("unverified tokens are checked by the 'vs_first_step' edit rule only")
        b, w = chunk_ids.shape
        dev = chunk_ids.device
        if policy == "reset_all":
            if prefix_ids is None:
                raise ValueError("cache_reset_policy='reset_all' re-runs the prefix: pass prefix_ids")
            p_len = prefix_ids.shape[1]
        else:
            if snapshot is None:
                raise ValueError(f"cache_reset_policy={policy!r} needs the chunk-start snapshot")
            p_len = snapshot.seq_length
            if p_len is None:  # a cache without attention layers records no length: take it from the mask
                if attention_mask is None or attention_mask.shape[1] <= w:
                    raise ValueError("this snapshot records no prefix length: pass attention_mask over prefix + chunk")
                p_len = attention_mask.shape[1] - w
        ones = lambda n: torch.ones(b, n, dtype=torch.long, device=dev)  # noqa: E731
        unpadded = attention_mask is None and prefix_mask is None  # known without reading the device
        if attention_mask is None or attention_mask.shape[1] == w:
            pm = prefix_mask.long() if prefix_mask is not None else ones(p_len)
            attention_mask = torch.cat([pm, attention_mask.long() if attention_mask is not None else ones(w)], 1)
        attention_mask = attention_mask.long()
        if attention_mask.shape[1] != p_len + w:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions, expected prefix {p_len} + "
                             f"chunk {w}")
        chunk_mask = attention_mask[:, p_len:]
        editable = editable.bool() & chunk_mask.bool()
        voters = editable.any(-1)
        if not bool(voters.any()):
            voters = torch.ones_like(voters)
        use_z = self.latent_token is not None
        self._check_checkpointing(policy, use_z)
        checkpoint_steps = self._checkpoint_steps(policy)
        static = (chunk_passes is not None and unpadded and policy == "keep_kda_recurrent_reset_mla" and not use_z
                  and not soft and not checkpoint_steps and torch.is_grad_enabled())
        static_step = None
        pos_all = positions_from_mask(attention_mask)
        last_valid = (chunk_mask * torch.arange(1, w + 1, device=dev)).argmax(-1)  # last position with mask 1
        thresholds = (commit_thresholds(commit_threshold, cfg.min_commit_threshold, k_steps)
                      if commit_threshold is not None else None)

        embed = self.base.get_input_embeddings()
        lm_head = self.base.get_output_embeddings()
        prev = prev_logits.to(torch.float32)
        draft = chunk_ids
        tokens = chunk_ids
        cells = CellGroup([self.refine_cells[str(i)] for i in self.layers_to_refine])
        states = None  # the cells' states, None before step 1 (CellGroup: one tensor, or a list by layer)
        probs: torch.Tensor | None = None
        first_argmax: torch.Tensor | None = None
        cache = None
        result = RefineResult(draft=draft, editable=editable)

        for t in range(k_steps):
            x = embed(tokens)
            if soft and probs is not None:
                soft_x = (probs.to(embed.weight.dtype) @ embed.weight).to(x.dtype)
                x = torch.where(editable.unsqueeze(-1), soft_x, x)
            delta_list = cells.deltas(states)
            if policy == "reset_all":
                x = torch.cat([embed(prefix_ids), x], 1)
                mask, pos, start = attention_mask, pos_all, p_len
            else:
                if policy == "keep_all" and cache is not None:
                    extra = cache.get_seq_length() - p_len  # previous steps' chunks (+[Z]) left in the cache
                    mask = torch.cat([attention_mask[:, :p_len], ones(extra), chunk_mask], 1)
                    pos = positions_from_mask(mask)[:, -w:]
                else:
                    mask, pos = attention_mask, pos_all[:, p_len:]
                start = 0
            fresh_cache = policy != "keep_all" or t == 0  # cache built inside the step: the step can be recomputed

            # Bound as defaults, not read from the loop's variables: a checkpointed step keeps this function (and
            # its defaults) until backward, so it must hold no earlier step's cache it does not use.
            def step_forward(x: torch.Tensor, *delta_list: torch.Tensor | None,
                             cache=None if fresh_cache else cache, mask=mask, pos=pos, start=start,
                             fresh_cache=fresh_cache):
                """One inner step's forward: (chunk hidden states, [Z]'s hidden state or None, per-layer hidden
                states at the chunk positions for the cells, the working cache for keep_all's next step or None).
                A pure function of its inputs and the snapshot when the step builds its own cache, which is what
                lets it be recomputed in backward."""
                if fresh_cache:
                    cache = (restore_cache(snapshot, grad_friendly=True) if policy != "reset_all"
                             else new_cache(self.base.config, grad_friendly=True) if use_z else None)
                pass_state = _Pass(dict(zip(self.layers_to_refine, delta_list)), start=start, width=w)
                hidden = self._run(x, mask, pos, cache, pass_state)
                z_hidden = None
                if use_z:
                    # [Z] is a second, one-position forward continuing the working cache: the text positions'
                    # forward is then exactly the one without [Z] (bitwise, not just causally equal), and [Z] sees
                    # it all.
                    z = self.latent_token(b).to(device=x.device, dtype=x.dtype)
                    z_hidden = self._run(z, torch.cat([mask, ones(1)], 1), pos[:, -1:] + 1, cache, None)[:, -1]
                layer_hidden = tuple(pass_state.hidden[i] for i in self.layers_to_refine)
                h_text = hidden[:, start:start + w]
                if start > 0:  # reset_all: copies, so that no slice keeps a whole prefix + chunk tensor alive
                    h_text, layer_hidden = h_text.clone(), tuple(h.clone() for h in layer_hidden)
                return h_text, z_hidden, layer_hidden, cache if policy == "keep_all" else None

            if static and t == 0:
                static_step = chunk_passes.start(self, snapshot, k_steps, w, x)
            if static_step is not None:
                h_text, layer_hidden = static_step(t, x, delta_list)
                z_hidden = cache = None
            elif checkpoint_steps:
                # Recompute this step's activations in backward instead of keeping them: memory for K steps of the
                # full model drops to about one step's. The step restores its cache from the snapshot inside
                # (transformers' own checkpointing would run the chunk without its cached prefix).
                h_text, z_hidden, layer_hidden, cache = torch.utils.checkpoint.checkpoint(
                    step_forward, x, *delta_list, use_reentrant=False)
            else:
                h_text, z_hidden, layer_hidden, cache = step_forward(x, *delta_list)
            chunk_logits = lm_head(h_text[:, : w - 1].to(lm_head.weight.device)).to(torch.float32)
            aligned = torch.cat([prev.unsqueeze(1).to(chunk_logits.device), chunk_logits], 1)
            summary = z_hidden if use_z else h_text[torch.arange(b, device=dev), last_valid]
            commit_logit = self.boundary(summary.to(_device_of(self.boundary)))
            result.logits.append(aligned)
            result.commit_logits.append(commit_logit)
            result.steps_used = t + 1
            argmax = aligned.argmax(-1).to(dev)
            if first_argmax is None:
                first_argmax = argmax
                if unverified is not None and edit_rule == "vs_first_step":
                    # a reused token stands only where the unrefined pass over the new prefix predicts it
                    draft = torch.where(editable & unverified.bool(), argmax, draft)
                    tokens = draft
            if thresholds is not None:
                p = torch.sigmoid(commit_logit.float()).to(dev)
                if bool((p >= thresholds[t])[voters].all()):
                    result.tokens.append(tokens)
                    break
            if edit_rule == "vs_first_step":
                change = editable & (argmax != first_argmax)
                if cfg.edit_margin > 0 and bool(change.any()):
                    # an edit costs the rest of the chunk (the commit stops at it): make it only where this step
                    # prefers the new token over the chunk's by more than edit_margin nats
                    logp = torch.log_softmax(aligned.float(), dim=-1).to(dev)
                    gain = logp.gather(-1, argmax[..., None]) - logp.gather(-1, draft[..., None])
                    change = change & (gain.squeeze(-1) > cfg.edit_margin)
            else:
                change = editable
            tokens = torch.where(change, argmax, draft)
            result.tokens.append(tokens)
            if t + 1 < k_steps:
                states = cells.update(list(layer_hidden), chunk_mask, states)
                if soft:
                    probs = torch.softmax(aligned, dim=-1)
        result.final_tokens = result.tokens[-1]
        return result

    # ------------------------------------------------------------------------------------------ generation
    def generate_chunks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
                        ) -> Any:
        """Chunked generation with refinement: ids [B, prompt + new] as HF `generate` returns them; with
        `return_stats=True`, (ids, one stats dict per chunk). Keyword arguments (max_new_tokens, chunk_width,
        max_inner_steps, commit_threshold, do_sample, temperature, top_p, return_stats, reuse_stale_suffix) and the
        stats' keys: `rkl.model.generate.generate_chunks`. Greedy with a neutral (untrained) sidecar, the tokens are
        `base.generate`'s exactly."""
        from rkl.model.generate import generate_chunks

        return generate_chunks(self, input_ids, attention_mask=attention_mask, **kwargs)
