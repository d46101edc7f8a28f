#!/usr/bin/env python
"""Where one cached single-token decode step of the base goes (the step the draft walk and generation repeat):
wall time per step, host-device syncs and kernel launches per step, and torch.profiler's top operators by host
time and by device time.

    python scripts/profile_decode.py --preset small --batch 8 --prefix 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rkl.model.base import build_preset
from rkl.model.cache import new_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    base = build_preset(args.preset, dtype=torch.bfloat16 if on_gpu else torch.float32)
    device = next(base.parameters()).device
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.prefix), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
        cache = new_cache(base.config)
        out = base(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        position = args.prefix

        def step() -> None:
            nonlocal tok, position
            pos = torch.full((args.batch, 1), position, device=device)
            tok = base(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1].argmax(
                -1, keepdim=True)
            position += 1

        for _ in range(3):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = (time.perf_counter() - t) / args.steps
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            for _ in range(args.steps):
                step()
            sync()
    events = prof.key_averages()
    count = lambda name: sum(e.count for e in events if e.key == name) / args.steps  # noqa: E731
    device_us = sum(e.self_device_time_total for e in events) / args.steps if on_gpu else float("nan")
    print(f"{args.preset}, batch {args.batch}, prefix {args.prefix}: {wall * 1e3:.1f} ms per decode step (wall), "
          f"device busy {device_us / 1e3:.1f} ms per step")
    print(f"per step: {count('cudaLaunchKernel') + count('cuLaunchKernel') + count('cuLaunchKernelEx'):.0f} kernel "
          f"launches, {count('cudaStreamSynchronize') + count('cudaDeviceSynchronize'):.0f} syncs, "
          f"{count('cudaMemcpyAsync'):.0f} memcpy, {count('aten::item') + count('aten::_local_scalar_dense'):.0f} "
          f".item()-like reads, {count('aten::nonzero'):.0f} nonzero")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    if on_gpu:
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows // 2, max_name_column_width=70))


if __name__ == "__main__":
    main()
