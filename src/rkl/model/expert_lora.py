"""LoRA on the fused routed experts as low-rank side products, never as a merged expert stack.

peft adapts a fused [experts, out, in] parameter (`target_parameters`) by parametrizing it: each forward builds
W + s B A for the whole stack and the grouped matmul saves that new tensor for backward, one stack per adapted
parameter per pass. At the 48B widths that is 6.75 GiB per MoE layer per inner step (docs/benchmarks.md), which
runs phases B and C out of memory. This forward keeps peft's wrappers and their parameters (so the adapter state
dict is peft's), but computes each projection as x W^T + s (x A^T) B^T per expert group: the base matmul saves only
its input and the frozen weight, the side product the same input and a rank-wide intermediate.

Adapted layers always run this grouped-matmul form, whatever `config._experts_implementation` says (unadapted
layers follow it). The forward is bound to the wrapper instance: deepcopy and FSDP2 keep it, pickling a whole model
does not (rkl saves state dicts, never pickled models).
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import ParamWrapper
from transformers.integrations.moe import _grouped_mm

ADAPTER = "default"  # rkl injects one adapter, under peft's default name


def install(experts_wrapper: ParamWrapper) -> None:
    """Route the forward of peft's outer expert wrapper (down_proj around gate_up_proj around the experts)
    through `lora_experts_forward`. The layout it assumes is checked here, once."""
    inner = experts_wrapper.base_layer
    experts = inner.base_layer
    assert (experts_wrapper.parameter_name, getattr(inner, "parameter_name", None)) == ("down_proj", "gate_up_proj")
    assert experts.has_gate and experts.is_concatenated and not (
        experts.is_transposed or experts.has_bias or experts.has_post_expert_norm
        or experts._is_expert_parallel), "unexpected expert layout"
    experts_wrapper.forward = types.MethodType(lora_experts_forward, experts_wrapper)


def restore_peft_forward(model: torch.nn.Module) -> int:
    """Put peft's own (merged-stack) forward back on every installed expert wrapper, for side-by-side comparisons;
    return how many."""
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper) and "forward" in vars(m)]
    for wrapper in wrappers:
        del wrapper.forward
    return len(wrappers)


def lora_factors(wrapper: ParamWrapper) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A^T, B^T, s) with A^T [experts, in, rank] and B^T [experts, rank, out], delta W_e = s B_e A_e: peft's own
    layout (`ParamWrapper.get_delta_factors` for a stack stored [experts, out, in]), kept in the adapter's float32.
    Contiguous: B's permuted view has no unit stride in its last two dimensions, which the grouped matmul refuses."""
    a, b, n = wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight, wrapper.num_experts
    a_t = a.reshape(n, -1, a.shape[-1]).transpose(-2, -1).contiguous()
    b_t = b.reshape(b.shape[0], -1, n).permute(2, 1, 0).contiguous()
    return a_t, b_t, wrapper.scaling[ADAPTER]


def adapted_projection(x: torch.Tensor, weight: torch.Tensor, wrapper: ParamWrapper,
                       offsets: torch.Tensor) -> torch.Tensor:
    """x W_e^T + s (x A_e^T) B_e^T for rows grouped by expert, in W's dtype, as peft's own expert path computes
    (it folds the factors, cast to W's dtype, into W). The float32 factors get float32 gradients through the cast.
    Not in float32 in a bf16 base: CUDA's grouped matmul runs float32 as one matmul per expert, which made one MoE
    layer at the 48B widths 3.8x slower than peft's (docs/benchmarks.md)."""
    a_t, b_t, scaling = lora_factors(wrapper)
    a_t, b_t = a_t.to(weight.dtype), b_t.to(weight.dtype)
    # the grouped matmul wants 16-byte strides: pad the rank with zeros (which add nothing) to a multiple of that,
    # so any lora_rank runs (rank 4 in bf16 did not)
    pad = -a_t.shape[-1] % (16 // weight.element_size())
    if pad:
        a_t = torch.cat([a_t, a_t.new_zeros(*a_t.shape[:-1], pad)], dim=-1)
        b_t = torch.cat([b_t, b_t.new_zeros(b_t.shape[0], pad, b_t.shape[-1])], dim=1)
    base = _grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    low_rank = _grouped_mm(_grouped_mm(x, a_t, offs=offsets), b_t, offs=offsets)
    return base + scaling * low_rank


def lora_experts_forward(self: ParamWrapper, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped-matmul experts forward (integrations/moe.py, without expert parallelism, biases or a
    post-expert norm: Kimi-Linear has none), with both projections adapted."""
    inner = self.base_layer
    experts = inner.base_layer
    if self.disable_adapters or self.merged or inner.merged or self.active_adapters != [ADAPTER]:
        return ParamWrapper.forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, num_top_k = hidden_states.shape[0], top_k_index.shape[-1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[order // num_top_k]
    # histc: bincount is not deterministic on CUDA; on CPU histc takes floats, on CUDA ints (as transformers does)
    counts = torch.histc(expert_ids.float() if rows.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gated = experts._apply_gate(adapted_projection(rows, experts.gate_up_proj, inner, offsets))
    out = adapted_projection(gated, experts.down_proj, self, offsets) * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out[inverse].view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden_states.dtype)
