#!/usr/bin/env python
"""rkl's expert LoRA (rkl.model.expert_lora: side products) beside peft's own forward (a merged stack per forward) on
one MoE layer of a preset at its widths, in one process: the output's and the LoRA gradients' largest difference
(relative to the largest value), what each saves for backward, and on a GPU the peak memory and time of a forward
and backward. In bf16 under autocast on the GPU (the adapters float32, as rkl trains), in float32 on a CPU. B is drawn at random so
the adapters act; only the MoE block runs (no attention, so no kernel compiles).

    python scripts/check_expert_lora.py --preset kimi_linear_48b_a3b --tokens 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_refine_step  # noqa: E402  (cut_preset and build_base: the preset as the benchmarks build it)

from rkl.model.adapters import inject_lora  # noqa: E402
from rkl.model.expert_lora import install, restore_peft_forward  # noqa: E402

GiB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--experts", type=int, default=0, help="routed experts per MoE layer (0: the preset's)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    base = bench_refine_step.build_base(args.preset, 2, seed=0, experts=args.experts)  # layer 1 is a MoE layer
    inject_lora(base, {"rank": args.rank, "alpha": 2 * args.rank, "layers": "all", "experts": True})
    moe = base.model.layers[1].mlp
    lora = {n: p for n, p in moe.named_parameters() if "lora_" in n}
    for name, p in lora.items():
        p.requires_grad_(True)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(device).manual_seed(1))
    hidden = torch.randn(1, args.tokens, base.config.hidden_size, device=device,
                         generator=torch.Generator(device).manual_seed(2)).to(base.dtype)
    weights = {p.untyped_storage().data_ptr() for p in base.parameters()}

    def step() -> tuple[torch.Tensor, dict, float]:
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        for p in lora.values():
            p.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu, cache_enabled=False):
            out = moe(hidden)  # under bf16 autocast on a GPU, as rkl trains (its cache off, rkl.train.loop.AUTOCAST)
        out.float().pow(2).mean().backward()
        return out.detach().float(), {n: p.grad.float() for n, p in lora.items()}, sum(saved.values()) / GiB

    def measure() -> dict:
        out, grads, saved = step()
        seconds, peak = [], 0.0
        for _ in range(args.repeats):
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t = time.perf_counter()
            step()
            if on_gpu:
                torch.cuda.synchronize()
                peak = max(peak, (torch.cuda.max_memory_allocated() - before) / GiB)
            seconds.append(time.perf_counter() - t)
        return {"out": out, "grads": grads, "saved": saved, "peak": peak, "s": statistics.median(seconds)}

    results = {}
    for form in ("rkl", "peft", "rkl again"):  # rkl twice: its second run shows what is noise
        if form == "peft":
            restore_peft_forward(base)
        elif form == "rkl again":
            install(moe.experts)
        results[form] = measure()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    rkl, peft = results["rkl"], results["peft"]
    expert_grads = [n for n in rkl["grads"] if n.startswith("experts.")]
    print(f"one MoE layer of {args.preset} ({moe.experts.num_experts} experts, hidden {base.config.hidden_size}, "
          f"rank {args.rank}), {args.tokens} tokens, {base.dtype} on {torch.cuda.get_device_name() if on_gpu else 'cpu'}")
    print(f"output: largest difference / largest value {rel(rkl['out'], peft['out']):.2e}; "
          f"routed experts' LoRA gradients ({len(expert_grads)}): up to "
          f"{max(rel(rkl['grads'][n], peft['grads'][n]) for n in expert_grads):.2e}; "
          f"rkl against itself: {rel(results['rkl again']['out'], rkl['out']):.1e}")
    print("\n| forward | saved for backward GiB | peak above the weights GiB | s, forward + backward |\n|---|---|---|---|")
    for form in ("rkl", "peft"):
        r = results[form]
        label = "rkl.model.expert_lora (side products)" if form == "rkl" else "peft's (merged stack)"
        print(f"| {label} | {r['saved']:.3f} | {r['peak']:.2f} | {r['s']:.4f} |")
    print(f"ratios rkl / peft: saved {rkl['saved'] / peft['saved']:.3f}, time {rkl['s'] / peft['s']:.3f}"
          + (f", peak {rkl['peak'] / peft['peak']:.3f}" if on_gpu else ""))


if __name__ == "__main__":
    main()
