#!/usr/bin/env python
"""Batched generation, measured side by side in one process: generate_chunks (neutral sidecar) vs HF `generate`.

For each batch size: greedy tokens/s of both (their runs interleaved), whether their tokens are identical (promise 1
at that batch), and what an eval of a GSM8K-sized set (1,319 prompts x --new tokens) would take at that batch. With
--repeat-check, at every batch HF `generate` also runs a second time after an unrelated allocation (does it reproduce
itself?), and generate_chunks reports how many tokens its neutral refinement changed (it must change none: a change
means the inner passes did not reproduce step 1's logits bitwise). On the 48B architecture in bf16 HF generate did not
reproduce itself in the default mode; --deterministic (torch deterministic algorithms + cuBLAS workspace,
rkl.determinism) is the mode to judge identity in. --conv reference measures transformers' F.conv1d short
convolution instead of fla's kernel (rkl.model.kernels).

    python scripts/bench_generation.py --preset small --batches 1,8,32,64 --new 128
    python scripts/bench_generation.py --preset kimi_linear_48b_a3b --batches 1,8,32,64 --new 256 --repeat-check --deterministic
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
    ap.add_argument("--conv", choices=("fla", "reference"), default="fla", help="KDA short convolution")
    ap.add_argument("--cudnn-attention", action="store_true", help="let SDPA use cuDNN's attention (rkl does not)")
    ap.add_argument("--prompts", type=int, default=1319, help="set size of the eval-cost estimate (GSM8K test)")
    args = ap.parse_args()
    set_deterministic(args.deterministic)  # before any CUDA work: cuBLAS reads its workspace setting at start

    from rkl.model.base import build_preset
    from rkl.model.kernels import set_cudnn_attention, set_short_convolution

    on_gpu = torch.cuda.is_available()
    base = build_preset(args.preset, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    conv = set_short_convolution(args.conv)
    cudnn = set_cudnn_attention(args.cudnn_attention)
    device = next(base.parameters()).device
    wrapper = ChunkRefineWrapper(base, RecursiveConfig(chunk_width=args.width, max_inner_steps=args.k,
                                                       refine_cell_type="chunk_attention")).to(device).eval()
    # a token the random weights are unlikely to emit (a row that stops early would shorten both runs alike anyway)
    base.generation_config.eos_token_id = base.config.vocab_size - 1
    base.generation_config.pad_token_id = 0
    mode = "deterministic" if args.deterministic else "default"
    print(f"{args.preset} on {torch.cuda.get_device_name() if on_gpu else 'cpu'}, {mode} mode; prompt {args.prompt}, "
          f"{args.new} new tokens, W {args.width}, K {args.k}, short convolution: {conv}, "
          f"cuDNN attention {'allowed' if cudnn else 'off'}")

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
            d = first_difference(out_hf, out_chunks, args.prompt)
            same = "yes" if d is None else f"no (from new token {d})"
            runs = -(-args.prompts // b)  # the eval-cost estimate: ceil(prompts / batch) batches like this one
            cost = f"{runs * t_hf / 60:.1f} / {runs * t_chunks / 60:.1f} min"
            checks = ""
            if args.repeat_check:
                unrelated = torch.randn(4096, 4096, device=device) @ torch.randn(4096, 4096, device=device)  # noqa: F841
                d_again = first_difference(out_hf, run_hf(), args.prompt)
                _, stats = wrapper.generate_chunks(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                                   return_stats=True)
                changed = sum(sum(chunk["tokens_changed"]) for chunk in stats)
                checks = (f" | {'yes' if d_again is None else f'no (from new token {d_again})'} | {changed}")
            rows.append(f"| {b} | {n_new / t_hf:,.0f} | {n_new / t_chunks:,.0f} | {t_chunks / t_hf:.2f}x | {same} | "
                        f"{cost}{checks} |")
            print(rows[-1], flush=True)

    extra = " | HF generate reproduces itself | tokens changed by neutral refinement" if args.repeat_check else ""
    print(f"\n{args.preset}, {mode} mode, short convolution {conv}, {args.new} new tokens")
    print(f"| batch | HF generate tokens/s | generate_chunks tokens/s | time ratio | identical tokens | "
          f"{args.prompts} prompts: HF / chunks{extra} |")
    print("|---" * (8 if args.repeat_check else 6) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
