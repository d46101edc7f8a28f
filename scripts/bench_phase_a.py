#!/usr/bin/env python
"""Phase A on one device, measured side by side in one process (random weights and tokens: speed needs no training).

1. Where a phase-A step goes: the sections of RefineTask.losses_on (prefix pass, building the draft-like chunk
   token by token, the K inner steps, the losses) and the backward, each timed with the device synchronised, beside
   the whole step as the training loop runs it; plus torch.profiler's top device kernels of one step.
2. Tokens/s of that step beside a vanilla fine-tune step (forward + backward of the base, every weight trainable) at
   the same batch and sequence length, and the analytical expectation from measured parts: one prefix pass without
   gradient + the W - 1 drafting decode steps + K chunk passes with backward.
3. With --walk-steps G[,G2...]: the step as the training loop runs it, with the chunks of G steps drafted in one batched
   walk (draft_walk_steps = G) beside each step drafting its own.
4. The largest batch that fits, with and without gradient checkpointing (rkl's per-inner-step recomputation), with
   its peak memory and tokens/s.
5. With --device-busy: each part of 1 (and the vanilla step, and one chunk pass of the base alone) profiled once more
   by torch.profiler: the kernels' device time, kernel launches, host-device syncs; with --walk-steps G too, a
   group's one walk of G batches and a step that finds its chunk walked, beside a step of draft_walk_steps 1.

    python scripts/bench_phase_a.py --preset small --batch 8 --prefix 1024 --width 64
    python scripts/bench_phase_a.py --preset kimi_linear_48b_a3b --prefix 512 --width 128 --batch 2 \
        --batches 2,4,8,16,32 --no-vanilla
    python scripts/bench_phase_a.py --preset small --batch 8 --prefix 1024 --width 64 --no-sections --walk-steps 8
    python scripts/bench_phase_a.py --preset small --batch 8 --prefix 1024 --width 64 --k 4 --device-busy
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from types import SimpleNamespace

import torch

from rkl import ChunkRefineWrapper, RecursiveConfig
from rkl.data.chunks import ChunkBatch, chunk_batch, chunk_modes
from rkl.model.base import build_preset
from rkl.model.cache import restore_cache
from rkl.model.kernels import set_cudnn_attention
from rkl.model.drafts import build_chunk
from rkl.paths import stage_config_path
from rkl.train.losses import refinement_losses, total_loss
from rkl.train.refine_phases import RefineTask, step_generator


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device):
    # what the training loop runs under (accelerate's bf16 mixed precision on a GPU, fp32 on a CPU)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def phase_a_task(base, args, batch: int, checkpointing: bool, walk_steps: int = 1, graph: bool = True,
                 chunk_graph: bool = True) -> RefineTask:
    # phase A as the stage file configures it (cell, draft/splice shares, edit margin), at the benchmark's shapes
    config = RecursiveConfig.from_file(stage_config_path("phase_a")).replace(
        chunk_width=args.width, max_inner_steps=args.k, batch_size=batch, seq_len=args.prefix + args.width,
        gradient_checkpointing=checkpointing, steps=1000, draft_walk_steps=walk_steps,
        draft_walk_graph=graph, chunk_pass_graph=chunk_graph)
    wrapper = ChunkRefineWrapper(base, config)
    device = next(base.parameters()).device
    wrapper.to(device)
    stream = torch.randint(3, base.config.vocab_size, (max(200_000, 8 * batch * config.seq_len),),
                           generator=torch.Generator().manual_seed(0))
    tokenizer = SimpleNamespace(eos_token_id=2)
    task = RefineTask(wrapper, tokenizer, config, stream, stream, device, "a", {})
    task.train_mode(True)
    return task


def fixed_prefix_batch(task: RefineTask, step: int) -> tuple[ChunkBatch, torch.Tensor, torch.Generator]:
    """The step's batch with the prefix at its longest (so every section sees the same shapes)."""
    c = task.config
    p = c.seq_len - c.chunk_width
    batch = chunk_batch(task.train_stream, step, c.batch_size, c.chunk_width, p, p, c.seed, 2)
    gen = step_generator(c.seed, step, 0)
    modes, _ = chunk_modes(c.batch_size, c.chunk_width, c.draft_share, c.splice_share, c.corruption_rate,
                           c.corruption_mask, gen)
    return batch, modes, gen


def timed_sections(task: RefineTask, step: int, probe=None) -> dict[str, float]:
    """One step of losses_on + backward with a device sync between its parts: seconds per part. `probe(name)`, where
    given, is a context manager wrapped around each part (the device-busy profile)."""
    device, w, c = task.device, task.wrapper, task.config
    batch, modes, gen = fixed_prefix_batch(task, step)
    prefix, targets, valid = (t.to(device) for t in (batch.prefix_ids, batch.chunk_ids, batch.chunk_valid))
    modes = modes.to(device)
    out = {}

    @contextlib.contextmanager
    def part(name: str):
        sync(device)
        t = time.perf_counter()
        with probe(name) if probe else contextlib.nullcontext():
            yield
            sync(device)
        out[name] = time.perf_counter() - t

    with autocast(device):
        with torch.no_grad():
            with part("prefix pass (no grad)"):
                snapshot, prev = w.prepare_prefix(prefix)
            with part(f"build chunk ({c.chunk_width - 1} decode steps)"):
                chunk = build_chunk(w, snapshot, prev, targets, modes, gen, decoder=task.decoder)
        with part(f"{c.max_inner_steps} inner steps (forward)"):
            result = w.refine_chunk(chunk, snapshot, prev, editable=torch.ones_like(valid), prefix_ids=prefix,
                                    chunk_passes=task.chunk_passes)
        with part("losses"):
            terms = refinement_losses(result.logits, result.commit_logits, result.inputs, result.final_tokens,
                                      targets, valid, valid)
            loss = total_loss(terms, c)
    with part("backward"):
        loss.backward()
    zero_grads(task)
    return out


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize")


def kernel_events(events) -> list:
    """The device's own events of a torch.profiler key_averages(): torch.profiler also books each kernel's time under
    the operator (or graph launch) that launched it, so a sum over every event counts it twice."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]


class DeviceBusy:
    """Per named part, from torch.profiler: the device's kernel time, kernel launches (graph replays counted as one
    launch each) and host-device syncs. Wall time far above the device time, with many launches, is a step that
    costs its launches, not its FLOPs."""

    def __init__(self) -> None:
        self.parts: dict[str, tuple[float, int, int]] = {}
        self.top: dict[str, list[tuple[str, float, int]]] = {}  # part -> its kernels by device time: (name, s, count)

    @contextlib.contextmanager
    def __call__(self, name: str):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            yield
        events = prof.key_averages()
        count = lambda names: sum(e.count for e in events if e.key in names)  # noqa: E731
        kernels = kernel_events(events)
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        self.parts[name] = (busy, count(LAUNCHES), count(SYNCS))
        kernels.sort(key=lambda e: -e.self_device_time_total)
        self.top[name] = [(e.key, e.self_device_time_total / 1e6, e.count) for e in kernels]

    def say_top(self, name: str, label: str, n: int = 8) -> None:
        """The part's n kernels that took the most device time: which work its busy time is."""
        kernels, busy = self.top[name], self.parts[name][0]
        if not kernels:
            return
        say(f"\n| {label}: top device events (kernels, copies) | device s | share | launches |\n|---|---|---|---|")
        for key, secs, calls in kernels[:n]:
            say(f"| `{key[:90]}` | {secs:.4f} | {secs / busy:.0%} | {calls:,} |")


def zero_grads(task: RefineTask) -> None:
    for params, _ in task.trainable_groups().values():
        for p in params:
            p.grad = None


def loop_step(task: RefineTask, step: int) -> tuple[float, float]:
    """(seconds, tokens) of one step as the training loop runs it: task.loss + backward."""
    sync(task.device)
    t = time.perf_counter()
    with autocast(task.device):
        loss, stats = task.loss(step, 0)
    loss.backward()
    zero_grads(task)
    sync(task.device)
    return time.perf_counter() - t, stats["tokens"]


def vanilla_step(base, batch: int, seq_len: int, device: torch.device) -> float:
    ids = torch.randint(3, base.config.vocab_size, (batch, seq_len), device=device)
    sync(device)
    t = time.perf_counter()
    with autocast(device):
        loss = base(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in base.parameters():
        p.grad = None
    sync(device)
    return time.perf_counter() - t


def decode_step(base, batch: int, prefix: int, device: torch.device) -> float:
    """Seconds of one cached single-token forward after `prefix` tokens (what each drafting step costs)."""
    from rkl.model.cache import new_cache

    ids = torch.randint(3, base.config.vocab_size, (batch, prefix), device=device)
    with torch.no_grad(), autocast(device):
        cache = new_cache(base.config)
        base(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = ids[:, -1:]
        times = []
        for j in range(6):
            sync(device)
            t = time.perf_counter()
            base(input_ids=tok, position_ids=torch.full((batch, 1), prefix + j, device=device),
                 past_key_values=cache, use_cache=True)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


@contextlib.contextmanager
def cells_one_by_one(on: bool):
    """With on: the refine cells run one after another (CellGroup's path for cells on several devices), as before
    they ran together."""
    from rkl.model.refine import CellGroup

    init = CellGroup.__init__

    def one_by_one(self, cells):
        init(self, cells)
        self.stacked = False

    CellGroup.__init__ = one_by_one if on else init
    try:
        yield
    finally:
        CellGroup.__init__ = init


def walk_comparison(base, args) -> dict[tuple[int, str, str, str, str], tuple[float, float, float]]:
    """The step as the training loop runs it, with draft_walk_steps 1 and each G of --walk-steps (and with
    --compare-graph each eagerly and with the CUDA-graphed walk; with --compare-prefix-reuse each G above 1 also with
    every step running its own prefix pass, as before it reused the walk's; with --compare-cells each also with the
    refine cells run one by one), over the steps of one group (8 steps for 1, whose
    steps all cost the same): each setting runs them twice, and the second pass, which meets no new shape, is timed.
    Every step is held at the prefix length of step 0 (each group's first), so all see the same shapes."""
    groups = [int(g) for g in args.walk_steps.split(",")] if args.walk_steps else []
    # (walk graph, chunk-pass graph) settings; without a GPU every setting runs eagerly: time it once
    on_gpu = torch.cuda.is_available()
    settings = ([(False, True), (True, True)] if args.compare_graph and on_gpu
                else [(True, False), (True, True)] if args.compare_chunk_graph and on_gpu else [(True, True)])
    cell_modes = ("one by one", "together") if args.compare_cells else ("together",)
    rows = {}
    for g, reuse, cells in [(g, r, c) for g, r in [(1, "own"), *(
            (g, r) for g in groups for r in (("own", "walk's") if args.compare_prefix_reuse else ("walk's",)))]
            for c in cell_modes]:
        for graph, chunk_graph in settings:
            with cells_one_by_one(cells == "one by one"):
                task = phase_a_task(base, args, args.batch, checkpointing=False, walk_steps=g, graph=graph,
                                    chunk_graph=chunk_graph)
                if g > 1 and reuse == "own":  # the walk's chunk, but the step's own prefix pass
                    losses_on, drafted = task.losses_on, task.drafted
                    task.losses_on = (lambda *a, walked=None, losses_on=losses_on, **kw:
                                      losses_on(*a, chunk_in=walked.chunk, **kw))

                    def chunk_only(step, micro, task=task, drafted=drafted):
                        """drafted() without the walk's prefix cache, which the group then no longer holds"""
                        walked = drafted(step, micro)
                        task.walked = {k: w._replace(snapshot=None, prev_logits=None) for k, w in task.walked.items()}
                        return walked._replace(snapshot=None, prev_logits=None)

                    task.drafted = chunk_only
                if g == 1:
                    drawn = task.micro_batch
                    group_prefix = drawn(0, 0)[0].prefix_ids.shape[1]
                    task.micro_batch = (lambda step, micro, prefix_len=None, drawn=drawn, p=group_prefix:
                                        drawn(step, micro, p))
                n = g if g > 1 else 8
                for timed in (False, True):
                    if timed and task.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    runs = [loop_step(task, s) for s in range(n)]
                peak = torch.cuda.max_memory_allocated() / 2**30 if task.device.type == "cuda" else float("nan")
                secs = sum(s for s, _ in runs)
                rows[g, task.draft_walk, task.chunk_pass_mode, reuse, cells] = (
                    secs / n, sum(t for _, t in runs) / secs, peak)
                say(f"  draft_walk_steps {g}, {task.draft_walk} walk, {task.chunk_pass_mode} chunk passes, {reuse} "
                    f"prefix pass, cells {cells}: {secs / n:.3f} s/step over {n} steps")
                task.wrapper.remove_hooks()
                del task
    first = next(iter(rows.values()))
    say("\n| draft_walk_steps | walk | chunk passes | prefix pass | cells | s/step | tokens/s | ratio | peak |\n"
        "|---|---|---|---|---|---|---|---|---|")
    for (g, walk, passes, reuse, cells), (s, tps, peak) in rows.items():
        say(f"| {g} | {walk} | {passes} | {reuse} | {cells} | {s:.3f} | {tps:,.0f} | {tps / first[1]:.2f}x | "
            f"{peak:.1f} GiB |")
    return rows


def group_profile(base, args, g: int) -> None:
    """Where a draft_walk_steps = g group's time goes (--device-busy with --walk-steps): the group's one walk of g
    batches (task.drafted at the group's first step, prefix pass included) and a step that finds its chunk walked
    already, each by wall time (unprofiled) and then kernel time, launches and syncs (profiled once more); beside a
    step of draft_walk_steps 1."""
    rows = []
    for steps in (1, g):
        task = phase_a_task(base, args, args.batch, checkpointing=False, walk_steps=steps)
        for s in range(max(steps, 2)):  # warm-up: every shape of the group once (step 1's too)
            loop_step(task, s)
        busy = DeviceBusy()

        def run(probe) -> dict[str, float]:
            """wall seconds of the group's walk (steps > 1) and of step 1, each inside probe(name)"""
            out = {}
            if steps > 1:
                task.walked = {}
                sync(task.device)
                t = time.perf_counter()
                with probe("walk"), autocast(task.device):  # as the loop runs it (a graph per autocast dtype)
                    task.drafted(0, 0)  # walks the whole group; step 1 below finds its chunk walked
                    sync(task.device)
                out["walk"] = time.perf_counter() - t
            with probe("step"):
                out["step"] = loop_step(task, 1)[0]
            return out

        parts = run(lambda name: contextlib.nullcontext())  # the wall times: without the profiler's own cost
        run(busy)
        for name, wall in parts.items():
            b, launches, syncs = busy.parts[name]
            label = (f"one walk of the group's {steps} batches ({steps * args.batch} rows, prefix pass included)"
                     if name == "walk" else f"one step, draft_walk_steps {steps}"
                     + (" (its chunk walked already)" if steps > 1 else ""))
            rows.append((label, wall, b, launches, syncs, (busy, name)))
        task.wrapper.remove_hooks()
        del task
    say("\n| part (device busy) | wall s | device busy s | kernel launches | syncs |\n|---|---|---|---|---|")
    for label, wall, b, launches, syncs, _ in rows:
        say(f"| {label} | {wall:.3f} | {b:.3f} | {launches:,} | {syncs:,} |")
    for label, *_, (busy, name) in rows:
        busy.say_top(name, label)


def largest_batch(base, args, checkpointing: bool) -> list[tuple[int, str]]:
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        try:
            task = phase_a_task(base, args, b, checkpointing)
            if task.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            # the same step twice: the timed one meets no new shape (fla autotunes each new one on the GPU)
            loop_step(task, 0)
            secs, tokens = loop_step(task, 0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if task.device.type == "cuda" else float("nan")
            rows.append((b, f"{tokens / secs:,.0f} tok/s, {secs:.2f} s/step, peak {peak:.1f} GiB"))
            say(f"  batch {b}: {rows[-1][1]}")
            task.wrapper.remove_hooks()
            del task
        except torch.OutOfMemoryError:
            rows.append((b, "out of memory"))
            say(f"  batch {b}: out of memory")
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def sections(base, args) -> dict[str, float]:
    """The timed parts of one step (median over --repeats), the decode step, and with --loop / --profile the step
    as the training loop runs it; printed as they are measured."""
    on_gpu = torch.cuda.is_available()
    device = next(base.parameters()).device
    task = phase_a_task(base, args, args.batch, checkpointing=False)
    t = time.perf_counter()
    timed_sections(task, 0)
    say(f"first step (warm-up, incl. kernel compilation): {time.perf_counter() - t:.1f} s")
    runs = [timed_sections(task, s) for s in range(1, 1 + args.repeats)]
    parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = sum(parts.values())
    say("\n| part of one phase-A step | seconds | share |\n|---|---|---|")
    for k, v in parts.items():
        say(f"| {k} | {v:.3f} | {v / total:.0%} |")
    say(f"| sum of the parts | {total:.3f} | |")
    if args.device_busy:  # on a CPU the device columns stay 0
        busy = DeviceBusy()
        timed_sections(task, 1, probe=busy)
        say("\n| part (profiled once more) | wall s (unprofiled) | device busy s | kernel launches | syncs (1 the "
            "benchmark's own) |\n"
            "|---|---|---|---|---|")
        for k, v in parts.items():
            b, launches, syncs = busy.parts[k]
            say(f"| {k} | {v:.3f} | {b:.3f} | {launches:,} | {syncs:,} |")
        # the base alone over one chunk from the restored prefix cache (no hooks, no gradient): what an inner step's
        # forward would launch without the sidecar
        batch, _, _ = fixed_prefix_batch(task, 1)
        prefix, chunk = batch.prefix_ids.to(device), batch.chunk_ids.to(device)
        with torch.no_grad(), autocast(device):
            snapshot, _ = task.wrapper.prepare_prefix(prefix)
            with busy("base"):
                task.wrapper.base.model(input_ids=chunk, past_key_values=restore_cache(snapshot), use_cache=True)
                sync(device)
        b, launches, syncs = busy.parts["base"]
        say(f"| one chunk pass of the base alone (cache restored, no sidecar, no grad) | | {b:.3f} | {launches:,} | "
            f"{syncs:,} |")
        for k in parts:
            if k.startswith("build chunk") or k == "backward":
                busy.say_top(k, k)
    tokens = args.batch * (args.prefix + args.width)
    say(f"\nphase A: {tokens / total:,.0f} tokens/s (prefix + chunk, fixed prefix)")
    t_decode = decode_step(base, args.batch, args.prefix, device)
    say(f"one cached decode step at batch {args.batch}: {t_decode * 1e3:.1f} ms; the {args.width - 1} drafting "
        f"steps would cost {(args.width - 1) * t_decode:.3f} s")
    if args.loop:  # prefix lengths vary per step: each new one may pay autotuning on the GPU
        loop_step(task, 0)
        loop = [loop_step(task, s) for s in range(1, 1 + args.repeats)]
        loop_s = statistics.median(s for s, _ in loop)
        say(f"the step as the training loop runs it (prefix length varies): {loop_s:.3f} s, "
            f"{statistics.median(n for _, n in loop) / loop_s:,.0f} tokens/s")
    if args.profile and on_gpu:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            loop_step(task, 5)
        say(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    task.wrapper.remove_hooks()
    return parts


def add_shape_arguments(ap: argparse.ArgumentParser, preset: str) -> None:
    """The model and the phase-A shapes a benchmark's task is built for (phase_a_task reads prefix, width, k)."""
    ap.add_argument("--preset", default=preset)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, preset="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="", help="comma-separated batch sizes for the largest-batch search")
    ap.add_argument("--no-vanilla", action="store_true", help="skip the vanilla step (a 48B base cannot train whole)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top device kernels of one step")
    ap.add_argument("--loop", action="store_true", help="also time the step as the training loop runs it")
    ap.add_argument("--walk-steps", default="",
                    help="comma-separated draft_walk_steps to compare with 1, the step as the training loop runs it")
    ap.add_argument("--compare-graph", action="store_true",
                    help="time each draft_walk_steps setting with the eager and the CUDA-graphed walk")
    ap.add_argument("--compare-chunk-graph", action="store_true",
                    help="time each draft_walk_steps setting with the eager and the CUDA-graphed chunk passes")
    ap.add_argument("--compare-prefix-reuse", action="store_true",
                    help="time each draft_walk_steps above 1 also with each step running its own prefix pass")
    ap.add_argument("--compare-cells", action="store_true",
                    help="time each setting also with the refine cells run one by one (as before CellGroup)")
    ap.add_argument("--no-sections", action="store_true", help="skip the timed sections of one step")
    ap.add_argument("--device-busy", action="store_true",
                    help="profile each section (and the vanilla step) once more: device busy time, launches, syncs")
    ap.add_argument("--cudnn-attention", action="store_true", help="let SDPA use cuDNN's attention (rkl does not)")
    ap.add_argument("--base-dtype", choices=["bfloat16", "float32"], default=None,
                    help="the base's weights (default: bfloat16 on a GPU, float32 on a CPU; `rkl train` on a preset "
                         "keeps float32 weights under bf16 autocast)")
    args = ap.parse_args()

    on_gpu = torch.cuda.is_available()
    base = build_preset(args.preset, dtype=getattr(torch, args.base_dtype or ("bfloat16" if on_gpu else "float32")))
    set_cudnn_attention(args.cudnn_attention)
    device = next(base.parameters()).device
    n_params = sum(p.numel() for p in base.parameters())
    say(f"{args.preset}: {n_params / 1e9:.2f}B parameters on {torch.cuda.get_device_name() if on_gpu else 'cpu'}; "
        f"{str(next(base.parameters()).dtype)[6:]} weights; batch {args.batch}, prefix {args.prefix}, W {args.width}, "
        f"K {args.k}; cuDNN attention "
        f"{'allowed' if args.cudnn_attention else 'off'}")

    # Every result is printed as soon as it is measured (flushed): on a GPU the first step also pays Triton's
    # compilation and autotuning of fla's kernels, and a run cut short by a time limit keeps what it measured.
    tokens = args.batch * (args.prefix + args.width)
    parts = sections(base, args) if not args.no_sections else None
    if not args.no_vanilla:
        for p in base.parameters():
            p.requires_grad_(True)
        vanilla_step(base, args.batch, args.prefix + args.width, device)
        t_van = statistics.median(vanilla_step(base, args.batch, args.prefix + args.width, device)
                                  for _ in range(args.repeats))
        vanilla_busy = None
        if args.device_busy:  # on a CPU the device columns stay 0
            vanilla_busy = DeviceBusy()
            with vanilla_busy("vanilla"):
                vanilla_step(base, args.batch, args.prefix + args.width, device)
        for p in base.parameters():
            p.requires_grad_(False)
        say(f"vanilla fine-tune step (forward + backward, T = {args.prefix + args.width}): {t_van:.3f} s, "
            f"{tokens / t_van:,.0f} tokens/s")
        if vanilla_busy:
            b, launches, syncs = vanilla_busy.parts["vanilla"]
            say(f"vanilla step profiled: device busy {b:.3f} s, {launches:,} kernel launches, {syncs:,} syncs (2 the "
                "benchmark's own)")
        if parts is not None:
            total = sum(parts.values())
            no_draft = total - parts[f"build chunk ({args.width - 1} decode steps)"]
            say(f"phase A / vanilla tokens/s = {t_van / total:.2f}; phase A without the drafting walk: "
                f"{tokens / no_draft:,.0f} tokens/s = {t_van / no_draft:.2f} of vanilla")
    if args.walk_steps or args.compare_graph or args.compare_chunk_graph or args.compare_prefix_reuse or \
            args.compare_cells:
        rows = walk_comparison(base, args)
        if not args.no_vanilla:
            for (steps, walk, passes, reuse, cells), (_, tps, _) in rows.items():
                say(f"phase A at draft_walk_steps {steps}, {walk} walk, {passes} chunk passes, {reuse} prefix pass, "
                    f"cells {cells} / vanilla tokens/s = {tps / (tokens / t_van):.2f}")
    if args.device_busy and args.walk_steps:
        for g in [int(x) for x in args.walk_steps.split(",")]:
            group_profile(base, args, g)
    if args.batches:
        for ckpt in (True, False):
            say(f"\nlargest batch, gradient checkpointing {'on' if ckpt else 'off'}:")
            largest_batch(base, args, ckpt)


def say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    main()
