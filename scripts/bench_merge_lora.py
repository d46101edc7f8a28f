#!/usr/bin/env python
"""Plain greedy decoding (`base.generate`) with phase B's LoRA unmerged vs merged (`rkl eval --merge-lora`) vs no LoRA,
measured side by side in one process: time per generated token, prefill included (as rkl eval's tpot_ms_plain).

The three bases are the same seeded preset; the adapted two get phase B's LoRA shape with a random B (at peft's zero
B merging would change nothing), and one of them is merged (rkl.model.merge). The runs are interleaved, the order
rotating each repeat, and each model's time is the median over the repeats. Also printed: whether the merged model
generated the unmerged one's tokens.

    python scripts/bench_merge_lora.py --preset tiny --new 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rkl.model.adapters import inject_lora
from rkl.model.base import load_base
from rkl.model.merge import merge_lora

VARIANTS = ("unmerged", "merged", "no LoRA")


def build(preset: str, dtype: str, variant: str, shape: dict, device_map: str | None) -> torch.nn.Module:
    base, _ = load_base(preset, dtype=dtype, device_map=device_map)
    if variant != "no LoRA":
        inject_lora(base, shape)
        g = torch.Generator().manual_seed(0)
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.data = 0.05 * torch.randn(p.shape, generator=g).to(p)
    if variant == "merged":
        merge_lora(base)
    # a token the random weights are unlikely to emit: every run generates all --new tokens
    base.generation_config.eos_token_id = base.config.vocab_size - 1
    base.generation_config.pad_token_id = 0
    return base.eval()


def timed_generate(base: torch.nn.Module, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (phase B: 8-16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (rkl eval uses 1 for small models)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = {"rank": args.rank, "alpha": 2 * args.rank, "layers": "top_third", "experts": True}
    device_map = "cuda" if torch.cuda.is_available() else None  # on the GPU where there is one, as rkl eval loads
    models = {v: build(args.preset, args.dtype, v, shape, device_map) for v in VARIANTS}
    device = next(models["no LoRA"].parameters()).device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, models["no LoRA"].config.vocab_size - 1, (1, args.prompt), generator=g).to(device)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    outputs = {}
    with torch.no_grad():
        for base in models.values():  # warm-up: first-call allocations and lazy initialisation
            timed_generate(base, ids, 4)
        for r in range(args.repeats):
            for v in VARIANTS[r % 3:] + VARIANTS[: r % 3]:
                outputs[v], s = timed_generate(models[v], ids, args.new)
                seconds[v].append(s)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"{args.preset} ({args.dtype}) on {where}; LoRA rank {args.rank} on the top third of the layers, experts "
          f"included; prompt {args.prompt}, {args.new} new tokens, median of {args.repeats} interleaved runs")
    ms = {v: 1000 * statistics.median(s) / args.new for v, s in seconds.items()}
    for v in VARIANTS:
        print(f"  {v:<9} {ms[v]:7.3f} ms/token  ({ms[v] / ms['no LoRA']:.2f}x no LoRA)")
    print(f"  unmerged / merged: {ms['unmerged'] / ms['merged']:.2f}x; merged generated the unmerged tokens: "
          f"{torch.equal(outputs['merged'], outputs['unmerged'])}")


if __name__ == "__main__":
    main()
