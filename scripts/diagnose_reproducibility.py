#!/usr/bin/env python
"""Which module of Kimi-Linear makes two identical forwards differ on a GPU (deterministic mode)?

Runs the same prefill + one-token decode twice (an unrelated allocation in between), records every decoder
sub-module's input and output with forward hooks, and prints, per kernel setting, the first module whose inputs were
bitwise equal in both runs and whose outputs were not: that module holds the run-to-run nondeterminism. Settings:
fla's KDA kernels or transformers' PyTorch reference, and the MoE experts as grouped_mm or eager.

    python scripts/diagnose_reproducibility.py --preset small --batch 64 --deterministic
"""

from __future__ import annotations

import argparse
import inspect

import torch
from transformers.models.kimi_linear import modeling_kimi_linear as mkl

from rkl.determinism import set_deterministic

KDA = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")


def record(base, ids):
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name):
        def fn(module, args, output):
            first = args[0] if args else None
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(first) and torch.is_tensor(out):
                seen.append((name, first.detach().clone(), out.detach().clone()))
        return fn

    names = ("self_attn", "mlp", "mlp.gate", "mlp.experts", "mlp.shared_experts", "input_layernorm")
    # "model.layers.3.mlp.gate" -> "mlp.gate"
    inside_layer = lambda n: n.split("layers.")[-1].split(".", 1)[-1]  # noqa: E731
    handles = [m.register_forward_hook(hook(n)) for n, m in base.named_modules() if inside_layer(n) in names]
    from rkl.model.cache import new_cache
    cache = new_cache(base.config)
    with torch.no_grad():
        logits = [base(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        nxt = logits[0].argmax(-1, keepdim=True)
        logits.append(base(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1])
    for h in handles:
        h.remove()
    return seen, logits


def first_culprit(a, b) -> str:
    for (name, xa, ya), (_, xb, yb) in zip(a, b):
        if torch.equal(xa, xb) and not torch.equal(ya, yb):
            return f"{name} (max |diff| {(ya.float() - yb.float()).abs().max().item():.3g})"
    return "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--deterministic", action="store_true")
    args = ap.parse_args()
    set_deterministic(args.deterministic)
    from rkl.model.base import build_preset

    base = build_preset(args.preset, dtype=torch.bfloat16).eval()
    device = next(base.parameters()).device
    ids = torch.randint(3, base.config.vocab_size - 1, (args.batch, args.prompt),
                        generator=torch.Generator().manual_seed(0)).to(device)
    fla_kda = {name: getattr(mkl, name) for name in KDA}
    print(f"| KDA | experts | modules recorded | logits equal (prefill, decode) | first nondeterministic module |\n"
          "|---|---|---|---|---|")
    for kda in ("fla", "reference"):
        for name in KDA:
            setattr(mkl, name, fla_kda[name] if kda == "fla" else inspect.unwrap(fla_kda[name]))
        for experts in ("grouped_mm", "eager"):
            base.set_experts_implementation(experts)
            runs = []
            for _ in range(2):
                runs.append(record(base, ids))
                unrelated = torch.randn(4096, 4096, device=device) @ torch.randn(4096, 4096, device=device)
                del unrelated
            equal = ", ".join("yes" if torch.equal(x, y) else "no" for x, y in zip(runs[0][1], runs[1][1]))
            culprit = first_culprit(runs[0][0], runs[1][0])
            print(f"| {kda} | {experts} | {len(runs[0][0])} | {equal} | {culprit} |", flush=True)


if __name__ == "__main__":
    main()
