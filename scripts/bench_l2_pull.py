#!/usr/bin/env python
"""Phase C's L2 pull to the pretrained weights, side by side in one process: autograd's own form
(p.float() - r.float()).pow(2).sum(), as rkl computed it before, against rkl.model.adapters.l2_to_pretrained, on
the float32 parameters of a preset's unfrozen layers (every 4th, as phase C unfreezes them) with a bf16 reference.

For each form: the bytes autograd saves for backward (counted by saved_tensors_hooks, on any device), and on a GPU
what the allocator holds between forward and backward and the peak of forward + backward above the tensors
themselves; the seconds of forward + backward (median of --repeats, the forms interleaved). At the 48B-A3B widths
autograd's form ran phase C out of memory on one H200 (docs/benchmarks.md).

    python scripts/bench_l2_pull.py --preset kimi_linear_48b_a3b --layers 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDecoderLayer

from rkl.model.adapters import l2_to_pretrained, unfrozen_layers
from rkl.model.base import preset_config

GiB = 2**30


def unfrozen_tensors(preset: str, count: int, device: torch.device):
    """(params, reference): the first `count` layers phase C unfreezes (unfreeze_every 4), float32 parameters and a
    bf16 reference 0.01 away, random."""
    config = preset_config(preset)
    params, reference = {}, {}
    g = torch.Generator(device=device).manual_seed(0)
    for i in unfrozen_layers(config.num_hidden_layers, 4)[:count]:
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in KimiLinearDecoderLayer(config, i).named_parameters()}
        for n, shape in shapes.items():
            p = torch.randn(shape, generator=g, device=device) * 0.02
            reference[f"model.layers.{i}.{n}"] = (p + 0.01 * torch.randn(shape, generator=g, device=device)).bfloat16()
            params[f"model.layers.{i}.{n}"] = torch.nn.Parameter(p)
    return params, reference


def autograd_form(params, reference):
    return sum((p.float() - reference[k].float()).pow(2).sum() for k, p in params.items())


def measure(form, params, reference, device) -> dict[str, float]:
    on_gpu = device.type == "cuda"
    saved = []
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if on_gpu else 0
    t = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        value = form(params, reference)
    owned = {x.untyped_storage().data_ptr() for x in [*params.values(), *reference.values()]}
    copies = sum(x.numel() * x.element_size() for x in saved if x.untyped_storage().data_ptr() not in owned)
    held = (torch.cuda.memory_allocated() - before) / GiB if on_gpu else float("nan")
    saved.clear()
    value.backward()
    if on_gpu:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params.values())
    peak = (torch.cuda.max_memory_allocated() - before) / GiB if on_gpu else float("nan")
    for p in params.values():
        p.grad = None
    return {"value": float(value.detach()), "copies": copies / GiB, "held": held, "peak": peak, "grads": grads / GiB,
            "secs": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2, help="how many of the unfrozen layers")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params, reference = unfrozen_tensors(args.preset, args.layers, device)
    numel = sum(p.numel() for p in params.values())
    print(f"{args.preset}: {args.layers} unfrozen layers, {numel / 1e9:.3f}B float32 parameters "
          f"({numel * 4 / GiB:.2f} GiB), bf16 reference {numel * 2 / GiB:.2f} GiB, on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}", flush=True)
    forms = {"autograd's (p.float() - r.float()).pow(2).sum()": autograd_form,
             "rkl's l2_to_pretrained": l2_to_pretrained}
    runs = {name: [] for name in forms}
    measure(l2_to_pretrained, params, reference, device)  # warm-up
    for r in range(args.repeats):
        for name in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
            runs[name].append(measure(forms[name], params, reference, device))
    print("\n| form | L2 value | saved for backward, copies (GiB) | held forward->backward (GiB) | peak above the "
          "tensors (GiB) | of which the gradients (GiB) | s (median) |\n|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        last = results[-1]
        print(f"| {name} | {last['value']:.6g} | {last['copies']:.2f} | {last['held']:.2f} | {last['peak']:.2f} | "
              f"{last['grads']:.2f} | {statistics.median(x['secs'] for x in results):.3f} |")


if __name__ == "__main__":
    main()
