#!/usr/bin/env python
"""One training step of a recursive phase (a, b or c) as the training loop runs it (RefineTask.loss, backward,
AdamW step), measured side by side in one process (random weights and tokens):

1. autocast's weight-cast cache off (rkl.train.loop.AUTOCAST, how rkl trains: with the cache, FSDP2's sharded
   weights got no gradient) against on: seconds per step, the two interleaved step by step (median of --repeats
   each), peak memory, and whether every trainable tensor got a gradient;
2. memory against the arithmetic: the tensors' own bytes (frozen base in bf16; the trainable weights in float32
   with a float32 gradient and two AdamW moments, 16 bytes per parameter; phase C's bf16 L2 reference) beside what
   the allocator holds after a step and at its peak; the rest of the peak is activations.

--memory-breakdown (GPU): the live allocations by the line that made them, in rkl, transformers or fla: after the
forward of the last measured step (what backward keeps) and where a step runs out of memory.

--layers N keeps the preset's first N decoder layers (its widths, experts and layer pattern), so phase C at the
48B-A3B widths fits one GPU: every 4th layer unfrozen is 16 bytes per parameter of AdamW training state.

    python scripts/bench_refine_step.py --preset small --phase c --batch 8 --prefix 256 --width 32
    python scripts/bench_refine_step.py --preset kimi_linear_48b_a3b --layers 8 --phase c --batch 2 --prefix 512

--peft-expert-forward runs the routed experts' LoRA as peft builds it (a merged stack per forward), to set beside
rkl.model.expert_lora's side products in a second process.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Callable

import torch
from transformers import KimiLinearConfig, KimiLinearForCausalLM

from rkl import ChunkRefineWrapper, RecursiveConfig
from rkl.model.base import preset_config
from rkl.model.expert_lora import restore_peft_forward
from rkl.model.kernels import set_short_convolution
from rkl.paths import stage_config_path
from rkl.train import refine_phases
from rkl.train.optim import build_optimizer

GiB = 2**30


def cut_preset(preset: str, layers: int = 0, experts: int = 0) -> KimiLinearConfig:
    """The preset's config (rkl.model.base.preset_config) cut to its first `layers` decoder layers (their widths,
    experts and layer pattern) and to `experts` routed experts per MoE layer, where those are > 0."""
    config = preset_config(preset)
    if layers:
        config.num_hidden_layers = layers
        for key in ("layer_types", "mlp_layer_types"):
            if getattr(config, key, None) is not None:
                setattr(config, key, getattr(config, key)[:layers])
    if experts:
        config.num_local_experts = experts
    return config


def build_base(preset: str, layers: int, seed: int, dtype: torch.dtype | None = None,
               experts: int = 0) -> KimiLinearForCausalLM:
    """The preset (as rkl.model.base.build_preset builds it: seeded, on the GPU when there is one, in bf16 there, or in
    `dtype`), cut as cut_preset cuts it."""
    set_short_convolution("fla")
    on_gpu = torch.cuda.is_available()
    torch.manual_seed(seed)
    with torch.device("cuda" if on_gpu else "cpu"):
        base = KimiLinearForCausalLM._from_config(cut_preset(preset, layers, experts),
                                                  dtype=dtype or (torch.bfloat16 if on_gpu else torch.float32))
    return base.eval()


def add_phase_options(ap: argparse.ArgumentParser, batch: int, prefix: int) -> None:
    """The options phase_task reads: the preset and its cut, the phase, the step's shapes, and --set."""
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all)")
    ap.add_argument("--phase", default="c", choices=("a", "b", "c"))
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--prefix", type=int, default=prefix)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="a RecursiveConfig field over the phase's stage file, e.g. gradient_checkpointing=true")


def phase_task(args, build: Callable[..., KimiLinearForCausalLM] = build_base,
               **overrides) -> refine_phases.RefineTask:
    """A RefineTask of the phase as its stage file configures it (cells, LoRA, unfrozen layers, L2 pull; --set and
    `overrides` over it), at the benchmark's shapes, on a base from `build`. Phase C's pretrained copy (the L2
    reference) is built like the CLI builds it, and dropped."""
    fields = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = RecursiveConfig.from_file(stage_config_path(f"phase_{args.phase}")).replace(
        chunk_width=args.width, max_inner_steps=args.k, batch_size=args.batch, seq_len=args.prefix + args.width,
        steps=1000, warmup_steps=0, **{**fields, **overrides})
    base = build(args.preset, args.layers, seed=0)
    pretrained = build(args.preset, args.layers, seed=0) if args.phase == "c" else None
    wrapper = ChunkRefineWrapper(base, config)
    device = next(base.parameters()).device
    wrapper.to(device)
    stream = torch.randint(3, base.config.vocab_size, (max(200_000, 8 * args.batch * config.seq_len),),
                           generator=torch.Generator().manual_seed(0))
    # the drift probe runs at validation, not in a training step (and needs a real tokenizer)
    refine_phases.DriftProbe = lambda *a, **k: None
    task = refine_phases.RefineTask(wrapper, SimpleNamespace(eos_token_id=2), config, stream, stream, device,
                                    args.phase, {}, pretrained)
    del pretrained
    task.train_mode(True)
    return task


def train_step(task, optimizer, step: int, cache: bool, breakdown: bool = False) -> tuple[float, float, int]:
    """(seconds, tokens, trainable tensors left without a gradient) of one step under bf16 autocast; breakdown:
    print the live allocations between forward and backward (a step not to time)."""
    device = task.device
    sync(device)
    t = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache):
        loss, stats = task.loss(step, 0)
    if breakdown:
        print_breakdown("live after the forward (what backward keeps)")
    loss.backward()
    missing = sum(p.grad is None for group in optimizer.param_groups for p in group["params"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t, stats["tokens"], missing


OUR_CODE = ("/src/rkl/", "site-packages/rkl/", "site-packages/transformers/", "site-packages/fla/", "/scripts/")


def allocation_site(frames: list[dict]) -> str:
    """The innermost frame in rkl, transformers, fla or a script (a snapshot lists a block's frames innermost
    first), else the innermost one."""
    for frame in frames:
        if any(part in frame["filename"] for part in OUR_CODE):
            break
    else:
        if not frames:
            return "(no stack recorded)"
        frame = frames[0]
    path = frame["filename"]
    for part in OUR_CODE:
        if part in path:
            path = part.split("/")[-2] + "/" + path.split(part, 1)[1]
            break
    return f"{path}:{frame['line']} {frame['name']}"


def memory_breakdown(snapshot: dict, top: int = 15) -> list[str]:
    """Markdown rows: GiB of live (allocated) blocks by allocation site, largest first, and the total."""
    by_site, count = collections.Counter(), collections.Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                site = allocation_site(block.get("frames", []))
                by_site[site] += block["size"]
                count[site] += 1
    rows = [f"| {site} | {count[site]} | {size / GiB:.2f} |" for site, size in by_site.most_common(top)]
    rest = sum(by_site.values()) - sum(size for _, size in by_site.most_common(top))
    return ["| allocated at | blocks | GiB |", "|---|---|---|", *rows, f"| (all other sites) | | {rest / GiB:.2f} |",
            f"| **all live blocks** | {sum(count.values())} | {sum(by_site.values()) / GiB:.2f} |"]


def print_breakdown(title: str) -> None:
    say(f"\n{title}:")
    for row in memory_breakdown(torch.cuda.memory._snapshot()):
        say(row)


def tensor_bytes(task, optimizer) -> dict[str, float]:
    """GiB of the tensors a step keeps, by kind, counted from the tensors themselves."""
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    ids = {id(p) for p in trainable}
    params = list(task.wrapper.base.parameters()) + [p for p in task.wrapper.parameters()
                                                     if id(p) not in {id(q) for q in task.wrapper.base.parameters()}]
    frozen = sum(p.numel() * p.element_size() for p in params if id(p) not in ids)
    weights = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.ndim > 0)
    reference = sum(t.numel() * t.element_size() for t in task.reference.values())
    return {"frozen weights": frozen / GiB, "trainable weights": weights / GiB,
            "their gradients (in backward)": weights / GiB, "AdamW moments": moments / GiB,
            "L2 reference": reference / GiB, "trainable parameters (B)": sum(p.numel() for p in trainable) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_phase_options(ap, batch=8, prefix=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-breakdown", action="store_true",
                    help="on a GPU: live allocations by their line after a forward and where a step runs out of memory")
    ap.add_argument("--settings", default="both", choices=("both", "off"),
                    help="off: only how rkl trains (cache off), e.g. where a warm-up step compiles for minutes")
    ap.add_argument("--peft-expert-forward", action="store_true",
                    help="run the routed experts' LoRA through peft's own forward (merged stacks), not rkl.model."
                         "expert_lora's, to compare the two")
    args = ap.parse_args()

    on_gpu = torch.cuda.is_available()
    breakdown = args.memory_breakdown and on_gpu
    if args.memory_breakdown and not on_gpu:
        say("--memory-breakdown needs a GPU: ignored")
    if breakdown:
        torch.cuda.memory._record_memory_history("state", stacks="python")  # live blocks' stacks only
    task = phase_task(args)
    restored = restore_peft_forward(task.wrapper.base) if args.peft_expert_forward else 0
    optimizer = build_optimizer(task.trainable_groups(), task.config)
    device = task.device
    say(f"phase {args.phase} on {args.preset}" + (f" cut to {args.layers} layers" if args.layers else "")
        + f" ({sum(p.numel() for p in task.wrapper.base.parameters()) / 1e9:.2f}B base parameters, "
        f"{len(task.unfrozen) and len({n.split('.')[2] for n in task.unfrozen})} layers unfrozen) on "
        f"{torch.cuda.get_device_name() if on_gpu else 'cpu'}; batch {args.batch}, prefix {args.prefix}, "
        f"W {args.width}, K {args.k}{''.join(f'; {item}' for item in args.set)}; routed experts' LoRA: "
        + (f"peft's forward ({restored} layers)" if args.peft_expert_forward else "rkl.model.expert_lora"))

    times, peaks, missing, tokens = {False: [], True: []}, {False: 0.0, True: 0.0}, {False: 0, True: 0}, 0.0
    settings = (False, True) if args.settings == "both" else (False,)
    try:
        # warm-up: one step in each setting at the fixed shapes of step 0 (fla compiles and autotunes each new shape)
        for cache in settings:
            t = time.perf_counter()
            train_step(task, optimizer, 0, cache)
            say(f"warm-up step, cache {'on' if cache else 'off'}: {time.perf_counter() - t:.1f} s")
        for r in range(args.repeats):
            for cache in (settings if r % 2 == 0 else settings[::-1]):  # alternate which goes first
                if on_gpu:
                    torch.cuda.reset_peak_memory_stats()
                secs, tokens, lost = train_step(task, optimizer, 0, cache)
                times[cache].append(secs)
                missing[cache] = max(missing[cache], lost)
                if on_gpu:
                    peaks[cache] = max(peaks[cache], torch.cuda.max_memory_allocated() / GiB)
        if breakdown:  # one more step, untimed, as rkl trains
            train_step(task, optimizer, 0, False, breakdown=True)
    except torch.OutOfMemoryError as e:
        say(f"out of memory: {str(e).splitlines()[0]}")
        if breakdown:
            print_breakdown("live where the step ran out of memory")
        sys.exit(1)
    say("\n| autocast weight-cast cache | s/step (median) | tokens/s | peak GiB | trainable tensors without a gradient |"
        "\n|---|---|---|---|---|")
    for cache in settings:
        s = statistics.median(times[cache])
        label = "off (rkl's AUTOCAST)" if not cache else "on (torch's default)"
        say(f"| {label} | {s:.3f} | {tokens / s:,.0f} | {peaks[cache]:.1f} | {missing[cache]} |")
    if len(settings) == 2:
        say(f"time ratio off / on: {statistics.median(times[False]) / statistics.median(times[True]):.3f}")

    counted = tensor_bytes(task, optimizer)
    static = sum(v for k, v in counted.items() if k not in ("their gradients (in backward)", "trainable parameters (B)"))
    say("\n| tensors | GiB |\n|---|---|")
    for k, v in counted.items():
        say(f"| {k} | {v:.2f} |" if "(B)" not in k else f"| {k} | {v:.3f} B |")
    say(f"| kept between steps (all but the gradients) | {static:.2f} |")
    if on_gpu:
        say(f"| allocated after a step (gradients freed) | {torch.cuda.memory_allocated() / GiB:.2f} |")
        peak = max(peaks.values())
        say(f"| peak of a step | {peak:.2f} |")
        say(f"| peak - kept - gradients: activations and transients | "
            f"{peak - static - counted['their gradients (in backward)']:.2f} |")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    main()
