#!/usr/bin/env python
"""Batched generation, measured side by side in one process: generate_chunks (neutral sidecar) vs HF `generate`.

For each batch size: greedy tokens/s of both (their runs interleaved), and whether their tokens are identical
(promise 1 at that batch). With --repeat-check, HF `generate` also runs twice on one prompt batch with an unrelated
allocation in between, and the first new token where the two runs differ is reported: on the 48B architecture in
bf16 that happens in the default mode and not with --deterministic (torch deterministic algorithms + cuBLAS
workspace, rkl.determinism). Run it once in each mode to see the cost of deterministic mode.

    python scripts/bench_generation.py --preset small --batches 1,8,32,64 --new 128
    python scripts/bench_generation.py --preset kimi_linear_48b_a3b --batches 1,8,32 --new 64 --repeat-check --deterministic
"""

from __future__ import annotations

import argparse
import time

import torch

from rkl import ChunkRefineWrapper, RecursiveConfig
from rkl.determinism import set_deterministic


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_difference(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> int | None:
    """Index of the first new token (0-based) where any row differs, or None."""
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, prompt_len:n] != b[:, prompt_len:n]).any(0).nonzero()
    if len(diff):
        return int(diff[0])
    return None if a.shape == b.shape else n - prompt_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--repeat-check", action="store_true")
    args = ap.parse_args()
    set_deterministic(args.deterministic)  # before any CUDA work: cuBLAS reads its workspace setting at start

    from rkl.model.base import build_preset

    on_gpu = torch.cuda.is_available()
    base = build_preset(args.preset, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    device = next(base.parameters()).device
    wrapper = ChunkRefineWrapper(base, RecursiveConfig(chunk_width=args.width, max_inner_steps=args.k,
                                                       refine_cell_type="chunk_attention")).to(device).eval()
    # a token the random weights are unlikely to emit (a row that stops early would shorten both runs alike anyway)
    base.generation_config.eos_token_id = base.config.vocab_size - 1
    base.generation_config.pad_token_id = 0
    mode = "deterministic" if args.deterministic else "default"
    print(f"{args.preset} on {torch.cuda.get_device_name() if on_gpu else 'cpu'}, {mode} mode; prompt {args.prompt}, "
          f"{args.new} new tokens, W {args.width}, K {args.k}")

    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for b in [int(x) for x in args.batches.split(",")]:
            ids = torch.randint(3, base.config.vocab_size - 1, (b, args.prompt), generator=g).to(device)
            kw = dict(max_new_tokens=args.new, do_sample=False)
            run_hf = lambda: base.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # noqa: E731
            run_chunks = lambda: wrapper.generate_chunks(ids, attention_mask=torch.ones_like(ids),  # noqa: E731
                                                         max_new_tokens=args.new)
            try:
                out_hf, out_chunks = run_hf(), run_chunks()  # warm-up (kernel compilation)
                times = {"hf": [], "chunks": []}
                for _ in range(args.repeats):
                    for name, fn in (("hf", run_hf), ("chunks", run_chunks)):
                        sync()
                        t = time.perf_counter()
                        out = fn()
                        sync()
                        times[name].append(time.perf_counter() - t)
                        out_hf, out_chunks = (out, out_chunks) if name == "hf" else (out_hf, out)
            except torch.OutOfMemoryError:
                rows.append(f"| {b} | out of memory | | | |")
                torch.cuda.empty_cache()
                break
            t_hf, t_chunks = min(times["hf"]), min(times["chunks"])
            n_new = b * (out_hf.shape[1] - args.prompt)
            same = "yes" if first_difference(out_hf, out_chunks, args.prompt) is None else \
                f"no (from new token {first_difference(out_hf, out_chunks, args.prompt)})"
            rows.append(f"| {b} | {n_new / t_hf:,.0f} | {n_new / t_chunks:,.0f} | {t_chunks / t_hf:.2f}x | {same} |")
            print(rows[-1], flush=True)

        if args.repeat_check:
            ids = torch.randint(3, base.config.vocab_size - 1, (1, args.prompt), generator=g).to(device)
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False)
            first = base.generate(ids, **kw)
            unrelated = torch.randn(4096, 4096, device=device) @ torch.randn(4096, 4096, device=device)  # noqa: F841
            again = base.generate(ids, **kw)
            chunks = wrapper.generate_chunks(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new)
            d1 = first_difference(first, again, args.prompt)
            d2 = first_difference(again, chunks, args.prompt)
            print(f"\n{mode} mode: generate vs generate again: "
                  f"{'identical' if d1 is None else f'differ from new token {d1}'}; "
                  f"generate_chunks vs generate: {'identical' if d2 is None else f'differ from new token {d2}'}")

    print(f"\n| batch | HF generate tokens/s | generate_chunks tokens/s | time ratio | identical tokens |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
