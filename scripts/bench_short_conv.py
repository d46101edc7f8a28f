#!/usr/bin/env python
"""KDA's short convolution: fla's Triton kernel vs transformers' F.conv1d reference, side by side in one process.

Both kinds run on the same preset and inputs, interleaved, best of --repeats: greedy HF `generate` (the one-token
update path) and a training step's forward + backward (the multi-token path), and the report is their time ratio.
Needs a GPU with fla (rkl.model.kernels.set_short_convolution falls back to the reference elsewhere).

    python scripts/bench_short_conv.py --preset small
"""

from __future__ import annotations

import argparse
import time

import torch

from rkl.model.base import build_preset
from rkl.model.kernels import set_short_convolution


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default="1,32", help="generate batch sizes")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    base = build_preset(args.preset, dtype=torch.bfloat16)
    device, vocab = next(base.parameters()).device, base.config.vocab_size
    base.generation_config.eos_token_id = vocab - 1  # rows run to max_new_tokens
    base.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    kinds = ("reference", "fla")
    cases = {}
    for b in (int(x) for x in args.batches.split(",")):
        ids = torch.randint(3, vocab - 1, (b, args.prompt), generator=g).to(device)
        cases[f"generate, batch {b}, {args.new} new tokens"] = (
            lambda ids=ids: base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                          do_sample=False), b * args.new)
    train_ids = torch.randint(3, vocab - 1, (args.train_batch, args.train_tokens), generator=g).to(device)

    def train_step() -> None:
        base.train()
        base(input_ids=train_ids, labels=train_ids).loss.backward()
        base.zero_grad(set_to_none=True)
        base.eval()

    cases[f"forward + backward, {args.train_batch} x {args.train_tokens}"] = (train_step,
                                                                              args.train_batch * args.train_tokens)
    outputs = {}
    print(f"{args.preset} on {torch.cuda.get_device_name()}, bf16; warm-up (fla compiles its kernels)...", flush=True)
    for kind in kinds:
        assert set_short_convolution(kind) == kind, f"short convolution '{kind}' is not available here"
        with torch.no_grad():
            outputs[kind] = [fn() for name, (fn, _) in cases.items() if name.startswith("generate")]
        train_step()
    same = all(torch.equal(a, b) for a, b in zip(outputs["reference"], outputs["fla"]))
    best = {(kind, name): float("inf") for kind in kinds for name in cases}
    for _ in range(args.repeats):
        for name, (fn, _) in cases.items():
            for kind in kinds:
                set_short_convolution(kind)
                with torch.no_grad() if name.startswith("generate") else torch.enable_grad():
                    best[kind, name] = min(best[kind, name], timed(fn))
    print(f"\ngreedy tokens of the two kinds identical: {'yes' if same else 'no (bf16 rounding differs)'}")
    print("| case | reference tokens/s | fla tokens/s | fla time / reference time |")
    print("|---|---|---|---|")
    for name, (_, tokens) in cases.items():
        ref, fla = best["reference", name], best["fla", name]
        print(f"| {name} | {tokens / ref:,.0f} | {tokens / fla:,.0f} | {fla / ref:.2f}x |")


if __name__ == "__main__":
    main()
