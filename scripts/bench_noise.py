#!/usr/bin/env python
"""The sampling noise of a draft walk, side by side in one process: the uniforms drawn on the host for every row and
position of the batch and copied to the device (rkl before 2026-12-06), against rkl.model.drafts.Noise (drawn on the
device, only for the rows that sample at a position). Modes as phase A draws them at its defaults (draft share 0.5,
splice share 0.5, corruption rate 0.3): about a quarter of the rows sample. Prints milliseconds per walk of W
positions (build_chunk samples at every one) and the ratio; nothing else of the walk runs.

    python scripts/bench_noise.py --rows 8,64,256 --vocab 32000,163840
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rkl.data.chunks import SAMPLE, chunk_modes
from rkl.model.drafts import Noise


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_walk(modes: torch.Tensor, vocab: int, device: torch.device) -> None:
    """The noise as rkl drew it before: [rows, vocab] on the host at every position where any row samples."""
    g = torch.Generator().manual_seed(0)
    for j in range(modes.shape[1]):
        if bool((modes[:, j] == SAMPLE).any()):
            torch.rand(modes.shape[0], vocab, generator=g).clamp_(1e-20, 1.0).to(device)


def device_walk(modes: torch.Tensor, vocab: int, device: torch.device) -> None:
    noise = Noise(torch.Generator().manual_seed(0), modes)
    for j in range(modes.shape[1]):
        drawn = noise.draw(j, vocab, device)
        if drawn is not None:
            drawn[1].clamp_(1e-20, 1.0)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,64,256")
    ap.add_argument("--vocab", default="32000,163840")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"noise of one walk of W = {args.width} positions on {where}, median of {args.repeats}\n")
    print("| rows | vocabulary | sampling rows | host, every row (ms) | device, sampling rows (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        modes, _ = chunk_modes(rows, args.width, 0.5, 0.5, 0.3, "random", torch.Generator().manual_seed(1))
        for vocab in [int(v) for v in args.vocab.split(",")]:
            old = timed(lambda: host_walk(modes, vocab, device), device, args.repeats)
            new = timed(lambda: device_walk(modes, vocab, device), device, args.repeats)
            sampling = int((modes == SAMPLE).any(1).sum())
            print(f"| {rows} | {vocab:,} | {sampling} | {old * 1e3:.1f} | {new * 1e3:.1f} | {old / new:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
