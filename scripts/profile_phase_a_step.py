#!/usr/bin/env python
"""Which host-side operators launch kernels outside the CUDA graphs in one phase-A step (draft_walk_steps G, its
chunk walked already): the step's forward (task.loss), backward and gradient reset, each profiled by torch.profiler,
with the operators that launched most. Where bench_phase_a.py --device-busy says a step costs its launches, this says
whose launches they are.

    python scripts/profile_phase_a_step.py --preset small --batch 8 --prefix 1024 --width 64 --k 4 --walk-steps 8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_phase_a import LAUNCHES, autocast, build_preset, loop_step, phase_a_task, say, sync, zero_grads


# views and allocations: they launch no kernel
NO_KERNEL = {"as_strided", "slice", "select", "view", "reshape", "_reshape_alias", "empty", "empty_strided", "expand",
             "t", "transpose", "unsqueeze", "squeeze", "permute", "alias", "detach", "unbind", "split", "chunk",
             "narrow", "lift_fresh", "_unsafe_view", "empty_like", "split_with_sizes", "view_as", "expand_as",
             "numpy_T", "resolve_conj", "resolve_neg", "item", "_local_scalar_dense", "result_type", "is_nonzero"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--walk-steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    base = build_preset(args.preset, dtype=torch.bfloat16)
    task = phase_a_task(base, args, args.batch, checkpointing=False, walk_steps=args.walk_steps)
    for s in range(args.walk_steps + 1):  # every shape once (the graphs' captures, the next group's walk started)
        loop_step(task, s)
    step = args.walk_steps + 1  # its chunk was walked with the group's first step
    parts = {}
    with autocast(task.device):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loss, _ = task.loss(step, 0)
            sync(task.device)
        parts["forward (task.loss)"] = prof
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loss.backward()
        sync(task.device)
    parts["backward"] = prof
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        zero_grads(task)
        sync(task.device)
    parts["gradient reset"] = prof
    for name, prof in parts.items():
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in LAUNCHES)
        graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch")
        say(f"\n{name}: {launches:,} launches ({graphs} graph replays)")
        # operators by how many kernels they launched themselves and through their children is not what
        # key_averages gives; by call count (aten ops), which tracks launches for small elementwise ops
        ops = sorted((e for e in events if e.key.startswith("aten::") and e.key[6:] not in NO_KERNEL),
                     key=lambda e: -e.count)[:args.top]
        say("| operator | calls | host ms (self) |\n|---|---|---|")
        for e in ops:
            say(f"| `{e.key}` | {e.count:,} | {e.self_cpu_time_total / 1e3:.1f} |")


if __name__ == "__main__":
    main()
