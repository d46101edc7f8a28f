#!/usr/bin/env python
"""Where one cached single-token decode step of the base goes (the step the draft walk and generation repeat):
wall time per step, host-device syncs and kernel launches per step, and torch.profiler's top operators by host
time and by device time. `--compare-cudnn` first times the step with SDPA allowed cuDNN's attention and without
(rkl's setting, rkl.model.kernels.set_cudnn_attention), side by side; the profile runs without.

    python scripts/profile_decode.py --preset small --batch 8 --prefix 1024 --compare-cudnn
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_phase_a import LAUNCHES, SYNCS, kernel_events  # scripts/, on the path when run as a script
from rkl.model.base import build_preset
from rkl.model.cache import new_cache
from rkl.model.kernels import set_cudnn_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--compare-cudnn", action="store_true", help="time the step with cuDNN attention too")
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

        def timed() -> float:
            for _ in range(3):
                step()
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            return (time.perf_counter() - t) / args.steps

        if args.compare_cudnn:
            walls = {}
            for allowed in (True, False, True, False):  # twice each, interleaved: the machine is noisy
                set_cudnn_attention(allowed)
                walls.setdefault(allowed, []).append(timed())
            on, off = min(walls[True]), min(walls[False])
            print(f"cuDNN attention allowed: {on * 1e3:.1f} ms per decode step; not allowed: {off * 1e3:.1f} ms "
                  f"({on / off:.2f}x)", flush=True)
        set_cudnn_attention(False)
        wall = timed()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
            for _ in range(args.steps):
                step()
            sync()
    events = prof.key_averages()
    count = lambda name: sum(e.count for e in events if e.key == name) / args.steps  # noqa: E731
    # the kernels' own events (this script summed every event until 2026-12-06, which counts each kernel twice)
    device_us = (sum(e.self_device_time_total for e in kernel_events(events)) / args.steps
                 if on_gpu else float("nan"))
    print(f"{args.preset}, batch {args.batch}, prefix {args.prefix}: {wall * 1e3:.1f} ms per decode step (wall), "
          f"device busy {device_us / 1e3:.1f} ms per step")
    print(f"per step: {sum(count(n) for n in LAUNCHES):.0f} kernel "
          f"launches, {sum(count(n) for n in SYNCS):.0f} syncs, "
          f"{count('cudaMemcpyAsync'):.0f} memcpy, {count('aten::item') + count('aten::_local_scalar_dense'):.0f} "
          f".item()-like reads, {count('aten::nonzero'):.0f} nonzero")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    if on_gpu:
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows // 2, max_name_column_width=70))


if __name__ == "__main__":
    main()
