#!/usr/bin/env python
"""Which operators run outside the chunk passes' CUDA graphs in one phase-A step (draft_walk_steps G, its chunk walked
already): where bench_phase_a.py --device-busy says a step costs its launches, this says whose launches they are.

- On a GPU: the step's forward (task.loss), backward and gradient reset, each profiled by torch.profiler: launches,
  graph replays, and the operators called most (small operators launch about one kernel per call).
- With --by-source (any device; on a CPU the static chunk passes run eagerly, as on a GPU they replay): every
  operator of the step's forward that runs outside the chunk passes, counted by the rkl source line that called it
  (views and allocations left out: they launch nothing). The backward of those operators is autograd's and is not
  attributed.

    python scripts/profile_phase_a_step.py --preset small --batch 8 --prefix 1024 --width 64 --k 4 --walk-steps 8
    python scripts/profile_phase_a_step.py --preset small --batch 2 --prefix 64 --width 64 --k 4 --walk-steps 2 --by-source
"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from bench_phase_a import (LAUNCHES, add_shape_arguments, autocast, build_preset, loop_step, phase_a_task, say, sync,
                           zero_grads)
from rkl.model.static_chunk import StaticChunkPasses
from rkl.train.refine_phases import prefix_range

# views and allocations: they launch no kernel
NO_KERNEL = {"as_strided", "slice", "select", "view", "reshape", "_reshape_alias", "empty", "empty_strided", "expand",
             "t", "transpose", "unsqueeze", "squeeze", "permute", "alias", "detach", "unbind", "split", "chunk",
             "narrow", "lift_fresh", "_unsafe_view", "empty_like", "split_with_sizes", "view_as", "expand_as",
             "new_empty", "new_empty_strided", "item", "_local_scalar_dense", "is_nonzero", "result_type"}


class OutsidePasses(TorchDispatchMode):
    """Counts the operators that run while no chunk pass does, by the innermost rkl source line above them."""

    def __init__(self, passes: StaticChunkPasses) -> None:
        super().__init__()
        self.inside = 0
        self.by_line: collections.Counter = collections.Counter()
        self.by_op: collections.Counter = collections.Counter()
        make = passes._chunk_pass

        def counted_pass(*args, **kwargs):
            run = make(*args, **kwargs)

            def chunk_pass(*x):
                self.inside += 1
                try:
                    return run(*x)
                finally:
                    self.inside -= 1
            return chunk_pass

        passes._chunk_pass = counted_pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL and not self.inside:
            frames = [f for f in traceback.extract_stack()[:-1] if "/rkl/" in f.filename]
            where = f"{frames[-1].filename.split('/rkl/')[-1]}:{frames[-1].lineno}" if frames else "(no rkl frame)"
            self.by_line[where] += 1
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))


def by_source(task, step: int, top: int) -> None:
    count = OutsidePasses(task.chunk_passes)  # counts only inside its `with` below
    for s in range(step):
        loop_step(task, s)
    with count, autocast(task.device):
        task.loss(step, 0)
    files = collections.Counter()
    for line, n in count.by_line.items():
        files[line.split(":")[0]] += n
    say(f"\nforward outside the chunk passes: {sum(count.by_line.values()):,} operators")
    say("| rkl source file | operators |\n|---|---|")
    for f, n in files.most_common():
        say(f"| {f} | {n:,} |")
    say("\n| rkl source line | operators |\n|---|---|")
    for line, n in count.by_line.most_common(top):
        say(f"| {line} | {n:,} |")
    say("\nby operator: " + ", ".join(f"{op} {n:,}" for op, n in count.by_op.most_common(top)))


def launches(task, step: int, top: int) -> None:
    for s in range(step):  # every shape once (the graphs' captures, the next group's walk started)
        loop_step(task, s)
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
        n = sum(e.count for e in events if e.key in LAUNCHES)
        graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch")
        say(f"\n{name}: {n:,} launches ({graphs} graph replays)")
        ops = sorted((e for e in events if e.key.startswith("aten::") and e.key[6:] not in NO_KERNEL),
                     key=lambda e: -e.count)[:top]
        say("| operator | calls | host ms (self) |\n|---|---|---|")
        for e in ops:
            say(f"| `{e.key}` | {e.count:,} | {e.self_cpu_time_total / 1e3:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, preset="small")
    ap.add_argument("--walk-steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--by-source", action="store_true", help="count the forward's operators outside the passes by "
                                                             "rkl source line")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    base = build_preset(args.preset, dtype=torch.bfloat16 if on_gpu else torch.float32)
    task = phase_a_task(base, args, args.batch, checkpointing=False, walk_steps=args.walk_steps)
    if task.chunk_passes is None:  # a CPU: the same static passes, run eagerly
        task.chunk_passes = StaticChunkPasses(base, prefix_range(task.config)[1], graph=False)
    step = args.walk_steps + 1  # its chunk was walked with its group's first step
    say(f"{args.preset}, batch {args.batch}, prefix {args.prefix}, W {args.width}, K {args.k}, draft_walk_steps "
        f"{args.walk_steps}, chunk passes {'graphed' if task.chunk_passes.graph else 'static, eager'}")
    if args.by_source:
        by_source(task, step, args.top)
    else:
        launches(task, step, args.top)


if __name__ == "__main__":
    main()
