#!/usr/bin/env python
"""Benchmark of the recursive inner loop, everything measured side by side in one run.

1. Per-inner-step time of refine_chunk (W = --width) at prefix --long-prefix vs --short-prefix, with the default
   policy (keep_kda_recurrent_reset_mla: restore a snapshot, run only the chunk) and with reset_all (re-run prefix +
   chunk every step); the long/short ratio of each. The default should be ~flat (<= 1.2), reset_all grows with the
   prefix.
2. Cache snapshot + restore vs copy.deepcopy of the cache at the long prefix.
3. TPOT of generate_chunks at init (K = --k, W = --width) over base.generate TPOT on the same prompt, and the floor
   1 + K * t_chunk / (W * t_decode) from t_chunk (one inner step at the prompt's length) and t_decode (base TPOT).
4. Per-inner-step time of each refine cell type (pooled, per_token, chunk_attention) at the short prefix, side by
   side: what chunk_attention's O(W^2) attention over the chunk costs.

    python scripts/bench_inner_loop.py --device cpu --dtype float32 --preset tiny
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from rkl import ChunkRefineWrapper, RecursiveConfig
from rkl.model.base import load_base
from rkl.model.cache import restore_cache, snapshot_cache


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    return timed_together([fn], device, repeats)[0]


def timed_together(fns, device: str, repeats: int) -> list[float]:
    """Median seconds of each fn, the runs interleaved (a, b, a, b, ...) so that load from other processes on a
    shared machine hits every contender alike; one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def check_exact(base, device: str, max_new: int = 24) -> list[tuple[str, bool]]:
    """Greedy generate_chunks vs base.generate at neutral init: batch 2, uneven left-padded prompts, chunk widths
    that do and do not divide max_new, K in {1, 4}, [Z] on and off, and an EOS inside a chunk."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = base.generation_config.pad_token_id or 0, 0
    ids, mask = ids.to(device), mask.to(device)
    gc = base.generation_config
    saved_eos = gc.eos_token_id
    results = []
    try:
        free = base.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
        cases = [(4, 1, False, False), (7, 4, True, False), (24, 4, False, False), (5, 4, True, True),
                 (5, 1, False, True)]
        for width, k, latent, with_eos in cases:
            gc.eos_token_id = int(free[1, ids.shape[1] + 8]) if with_eos else saved_eos
            ref = base.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
            cfg = RecursiveConfig(chunk_width=width, max_inner_steps=k,
                                  use_latent_token=latent)
            w = ChunkRefineWrapper(base, cfg)
            out = w.generate_chunks(ids, attention_mask=mask, max_new_tokens=max_new)
            w.remove_hooks()
            name = f"W={width} K={k} Z={'on' if latent else 'off'}{' EOS' if with_eos else ''}"
            results.append((name, out.shape == ref.shape and torch.equal(out, ref)))
    finally:
        gc.eos_token_id = saved_eos
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width", type=int, default=64, help="W, chunk width")
    ap.add_argument("--k", type=int, default=4, help="K, inner steps")
    ap.add_argument("--short-prefix", type=int, default=256)
    ap.add_argument("--long-prefix", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length for the TPOT comparison")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated for TPOT (a multiple of W)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    ap.add_argument("--check-exact", action="store_true", help="also check greedy exactness over several cases")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, _ = load_base(args.preset, dtype=args.dtype, device_map=args.device)
    base.eval()
    vocab = base.config.vocab_size
    cfg = RecursiveConfig(chunk_width=args.width, max_inner_steps=args.k)
    w = ChunkRefineWrapper(base, cfg)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, vocab, (args.batch, n), generator=g).to(args.device)  # noqa: E731
    chunk = rand(args.width)
    editable = torch.ones_like(chunk, dtype=torch.bool)
    rows = []

    # --- 1. per-inner-step time vs prefix length (short and long interleaved)
    step = {}
    setups = {}
    for p_len in (args.short_prefix, args.long_prefix):
        prefix = rand(p_len)
        setups[p_len] = (prefix, *w.prepare_prefix(prefix))

    def inner(p_len, policy):
        prefix, snap, prev = setups[p_len]
        k = args.k if policy == "default" else 2
        kw = {"prefix_ids": prefix, "cache_reset_policy": "reset_all"} if policy == "reset_all" else {}
        return lambda: w.refine_chunk(chunk, snap if policy == "default" else None, prev, editable,
                                      max_inner_steps=k, **kw)

    with torch.no_grad():
        for policy, k, reps in (("default", args.k, args.repeats), ("reset_all", 2, max(1, args.repeats - 1))):
            short, long_ = timed_together([inner(args.short_prefix, policy), inner(args.long_prefix, policy)],
                                          args.device, reps)
            step[(policy, args.short_prefix)], step[(policy, args.long_prefix)] = short / k, long_ / k
    cache = restore_cache(setups[args.long_prefix][1])
    t_snap, t_deep = timed_together([lambda: restore_cache(snapshot_cache(cache)), lambda: copy.deepcopy(cache)],
                                    args.device, 20)
    for policy in ("default", "reset_all"):
        s, l_ = step[(policy, args.short_prefix)], step[(policy, args.long_prefix)]
        rows.append((f"inner step, {policy}", f"prefix {args.short_prefix}: {s * 1e3:.1f} ms",
                     f"prefix {args.long_prefix}: {l_ * 1e3:.1f} ms", f"ratio {l_ / s:.2f}"))
    rows.append((f"cache copy at prefix {args.long_prefix}", f"snapshot+restore: {t_snap * 1e3:.3f} ms",
                 f"deepcopy: {t_deep * 1e3:.3f} ms", f"ratio {t_deep / t_snap:.1f}x faster"))

    # --- 3. TPOT, generate_chunks at init vs base.generate, same prompt, same run
    prompt = rand(args.prompt)
    n = args.new_tokens

    def run_base():
        return base.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run_chunks():
        return w.generate_chunks(prompt, max_new_tokens=n)

    gc = base.generation_config
    saved_eos = gc.eos_token_id
    gc.eos_token_id = None  # generate exactly n tokens in both
    snap, prev = w.prepare_prefix(prompt)
    one_step = lambda: w.refine_chunk(chunk, snap, prev, editable, max_inner_steps=1)  # noqa: E731
    try:
        with torch.no_grad():
            t_base, t_chunks, t_chunk = timed_together([run_base, run_chunks, one_step], args.device, args.repeats)
        t_base, t_chunks = t_base / n, t_chunks / n
        same = torch.equal(run_base(), run_chunks())
    finally:
        gc.eos_token_id = saved_eos
    floor = 1 + args.k * t_chunk / (args.width * t_base)
    ratio = t_chunks / t_base
    rows.append((f"TPOT (K={args.k}, W={args.width}, {n} tokens)", f"generate: {t_base * 1e3:.1f} ms",
                 f"generate_chunks: {t_chunks * 1e3:.1f} ms", f"ratio {ratio:.2f}"))
    rows.append(("floor 1 + K*t_chunk/(W*t_decode)", f"t_chunk {t_chunk * 1e3:.1f} ms", f"t_decode {t_base * 1e3:.1f} ms",
                 f"floor {floor:.2f} (ratio/floor {ratio / floor:.2f})"))

    # --- 4. inner step per refine cell type
    prefix, snap_s, prev_s = setups[args.short_prefix]
    cells = ("pooled", "per_token", "chunk_attention")
    # (the hooks of the other wrappers on the same base return at once: only a running pass acts)
    wrappers = [ChunkRefineWrapper(base, cfg.replace(refine_cell_type=c)).to(args.device) for c in cells]
    fns = [lambda wc=wc: wc.refine_chunk(chunk, snap_s, prev_s, editable, max_inner_steps=args.k) for wc in wrappers]
    with torch.no_grad():
        per_cell = [t / args.k for t in timed_together(fns, args.device, args.repeats)]
    rows.append((f"inner step by cell (prefix {args.short_prefix})",
                 *(f"{c}: {t * 1e3:.2f} ms" for c, t in zip(cells, per_cell))))
    rows.append(("  relative to pooled", *(f"{c}: {t / per_cell[0]:.2f}x" for c, t in zip(cells, per_cell))))

    if args.check_exact:
        exact = check_exact(base, args.device)
        rows.append(("greedy exact at init (batch 2, left pad)", f"{sum(ok for _, ok in exact)}/{len(exact)} cases",
                      "failed: " + (", ".join(n for n, ok in exact if not ok) or "none"), ""))

    dev = args.device if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"\n{args.preset} preset, {args.dtype}, {dev}, batch {args.batch}, threads {torch.get_num_threads()}; "
          f"greedy generate_chunks token-identical to generate: {same}\n")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(" | ".join(c.ljust(wd) for c, wd in zip(r, widths)))


if __name__ == "__main__":
    main()
