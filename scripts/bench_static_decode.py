#!/usr/bin/env python
"""The draft walk eager vs over a static cache replayed as a CUDA graph (rkl.model.static_decode), side by side in
one process: seconds per walk of W - 1 decode steps at each row count, what the first start costs (two warm-up
steps and the capture), and how far the two agree: the largest logit difference at the walk's first decode step,
and the share of rows whose greedy draft is token-identical. Random weights and tokens; each walk starts from its own prefix, so a
graph that kept the previous walk's state would show as disagreement.

    python scripts/bench_static_decode.py --preset small --prefix 1024 --width 64 --rows 8,64,256
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from rkl.data.chunks import GREEDY
from rkl.model.base import build_preset
from rkl.model.drafts import _eager_steps, build_chunk
from rkl.model.kernels import set_cudnn_attention
from rkl.model.static_decode import StaticDecoder, graph_blocker
from rkl.model.wrapper import ChunkRefineWrapper


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rows", default="8,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base-dtype", choices=["bfloat16", "float32"], default=None,
                    help="the base's weights (default: bfloat16 on a GPU, float32 on a CPU; `rkl train` on a preset "
                         "keeps float32 weights under bf16 autocast)")
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    base = build_preset(args.preset, dtype=getattr(torch, args.base_dtype or ("bfloat16" if on_gpu else "float32")))
    set_cudnn_attention(False)
    device = next(base.parameters()).device
    wrapper = ChunkRefineWrapper(base, None)  # the walk reads wrapper.base only; no sidecar
    say(f"{args.preset}: {sum(p.numel() for p in base.parameters()) / 1e9:.2f}B parameters on "
        f"{torch.cuda.get_device_name() if on_gpu else 'cpu'}; prefix {args.prefix}, W {args.width}, "
        f"{str(next(base.parameters()).dtype)[6:]} weights{' under bf16 autocast' if on_gpu else ''}, greedy drafts")
    blocker = graph_blocker(base) if on_gpu else None
    if blocker:
        say(f"graph_blocker expects the capture to fail: {blocker}")
    gen = torch.Generator().manual_seed(0)
    table = []
    for rows in [int(r) for r in args.rows.split(",")]:
        # on a GPU, capture even where graph_blocker expects a refusal (a float32 base), to show what happens
        decoder = StaticDecoder(base, args.prefix + args.width, graph=on_gpu)
        modes = torch.full((rows, args.width), GREEDY, device=device)
        targets = torch.zeros(rows, args.width, dtype=torch.long, device=device)
        eager_s, graph_s, same_rows, logit_diff, first_graphed = [], [], [], [], None
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            for rep in range(args.repeats + 1):  # the first round warms up both (fla autotuning, the capture)
                ids = torch.randint(3, base.config.vocab_size, (rows, args.prefix), generator=gen).to(device)
                snapshot, prev = wrapper.prepare_prefix(ids)
                tok = prev.float().argmax(-1)
                eager_first = _eager_steps(base, snapshot, rows, device)(tok, args.prefix).float()
                t_start, graph_first = timed(lambda: decoder.start(snapshot)(tok, args.prefix).float(), device)
                t_e, eager = timed(lambda: build_chunk(wrapper, snapshot, prev, targets, modes), device)
                t_g, graphed = timed(lambda: build_chunk(wrapper, snapshot, prev, targets, modes, decoder=decoder),
                                     device)
                if rep == 0:  # the first start warms the step up twice and captures it
                    first_graphed = t_start
                    continue
                eager_s.append(t_e)
                graph_s.append(t_g)
                logit_diff.append(float((eager_first - graph_first).abs().max()))
                same_rows.append(float((eager == graphed).all(1).float().mean()))
        e, g = statistics.median(eager_s), statistics.median(graph_s)
        table.append((rows, e, g, first_graphed, max(logit_diff), statistics.mean(same_rows), decoder.captures))
        say(f"rows {rows}: eager {e:.3f} s per walk, graphed {g:.3f} s ({e / g:.2f}x)")
        del decoder
    say(f"\n| rows | eager walk | graphed walk (eager static step where graphs is 0) | speedup "
        f"| first start and step (2 warm-up steps + capture) | max logit diff at the first step | rows identical "
        f"| graphs |\n|---|---|---|---|---|---|---|---|")
    for rows, e, g, first, diff, same, caps in table:
        say(f"| {rows} | {e * 1e3:.0f} ms | {g * 1e3:.0f} ms | {e / g:.2f}x | {first * 1e3:.0f} ms | {diff:.3g} | "
            f"{same:.0%} | {caps} |")


def say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    main()
