#!/usr/bin/env python
"""What one training step of a recursive phase saves for backward, by the line that saved it: the activations side
of the step's memory, on any device (saved_tensors_hooks; storages counted once; the weights themselves and the L2
reference not counted). The base is built in bf16 and the step runs under bf16 autocast, as rkl trains on a GPU;
--experts N shrinks the routed experts, so the 48B widths fit a CPU. On a CPU the kernels are the reference ones
(transformers' KDA, torch's CPU grouped_mm), so what the GPU's kernels save may differ.

    python scripts/saved_for_backward.py --preset kimi_linear_48b_a3b --layers 8 --experts 8 --phase c

With gradient_checkpointing=true (--set) the forward saves only what each inner step's recomputation starts from;
backward then recomputes one inner step at a time, which saves at most one step's share again (not counted here).
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_refine_step  # noqa: E402  (its phase_task builds the RefineTask the training loop runs)

GiB = 2**30


def site() -> str:
    """The innermost caller in rkl, transformers or fla (as bench_refine_step names an allocation's site), leaving
    out this script's own hook."""
    frames = [{"filename": f.filename, "line": f.lineno, "name": f.name} for f in traceback.extract_stack()[:-2]]
    return bench_refine_step.allocation_site(frames[::-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_refine_step.add_phase_options(ap, batch=1, prefix=512)
    ap.add_argument("--experts", type=int, default=0, help="routed experts per MoE layer (0: the preset's)")
    args = ap.parse_args()
    build = functools.partial(bench_refine_step.build_base, dtype=torch.bfloat16, experts=args.experts)
    task = bench_refine_step.phase_task(args, build)
    weights = {t.untyped_storage().data_ptr() for t in [*task.wrapper.parameters(), *task.reference.values()]}
    seen, by_site, shapes = set(), collections.Counter(), collections.defaultdict(collections.Counter)

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in weights:
            seen.add(ptr)
            where = site()
            by_site[where] += t.untyped_storage().nbytes()
            shapes[where][f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"] += t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.autocast(task.device.type, dtype=torch.bfloat16), hooks:
        task.loss(0, 0)
    unfrozen = sorted({int(n.split(".")[2]) for n in task.unfrozen})
    settings = "".join(f"; {item}" for item in args.set)
    print(f"phase {args.phase}, {args.preset}" + (f" cut to {args.layers} layers" if args.layers else "")
          + (f", {args.experts} experts" if args.experts else "") + f"; batch {args.batch}, prefix {args.prefix}, "
          f"W {args.width}, K {args.k}{settings}; unfrozen layers {unfrozen}; "
          f"forward {time.perf_counter() - start:.0f} s on {task.device.type}")
    print("\n| saved at | GiB | largest kinds (shape dtype: GiB) |\n|---|---|---|")
    for where, size in by_site.most_common(12):
        common = ", ".join(f"{k}: {n / GiB:.3f}" for k, n in shapes[where].most_common(2))
        print(f"| {where} | {size / GiB:.3f} | {common} |")
    print(f"| **all (not the weights)** | {sum(by_site.values()) / GiB:.3f} | |")


if __name__ == "__main__":
    main()
