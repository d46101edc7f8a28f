#!/usr/bin/env python
"""A real experiment in one device call of under 10 minutes on one H200, from scratch: pretrain the `mini` preset
(29M parameters) on stdlib code + 3-digit MSD-first addition, surgery, phase A (and, with --phase-b-s, phase B
from it), the vanilla control on the recursive phases' token budget, eval of every stage, compare.

It runs the very `rkl` commands a researcher would type, but in ONE process (`rkl.cli.app` called per command):
on the GPU every new process pays its imports, CUDA start-up and Triton compilation/autotuning of the fla kernels
again (a first pretrain step took over 47 s there), which seven separate commands cannot afford in 10 minutes.
Training is time-boxed with SIGALRM turned into KeyboardInterrupt, which rkl handles as Ctrl-C (the last finished
step is saved); the vanilla control then gets the steps phases A and B actually ran.

    . .whl/preamble.sh; python3 scripts/gpu_experiment.py --out $OUT
    . .whl/preamble.sh; python3 scripts/gpu_experiment.py --out $OUT --bundle --pretrain-s 125 --pretrain-steps 300 \
        --phase-a-s 130 --phase-a-steps 90 --phase-b-s 80 --phase-b-steps 50 --limit 150   # phases A and B, <10 min
    ... --phase-b-s 80 --eval-merged   # also phase B with its LoRA merged (stage phase_b_merged), one eval more
    python3 scripts/gpu_experiment.py --out $OUT --more --phase-a-s 210   # later, on the same machine: train longer
    python scripts/gpu_experiment.py --preset tiny --pretrain-s 60 --phase-a-s 40 --phase-b-s 30 --limit 4 \
        --batch 4 --finetune-batch 4   # a check on the CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path


def run(args: list[str], seconds: float | None = None) -> int:
    """One rkl command in this process; with `seconds`, interrupted like Ctrl-C when they run out."""
    import click

    from rkl.cli import app

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    print(f"\n$ rkl {' '.join(args)}" + (f"   (time box {seconds:.0f} s)" if seconds else ""), flush=True)
    t = time.perf_counter()
    if seconds:
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        app(args, prog_name="rkl", standalone_mode=False)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"-> exit {code} after {time.perf_counter() - t:.0f} s", flush=True)
    return code


def export(out: Path, work: Path, bundle: bool) -> None:
    """Copy what exists so far into `out`: a device call that runs out of time still returns every finished result.
    With `bundle`, everything but compare.md goes into one results.tar.gz instead (the device tool brings back at most
    8 files, and a run with phase B writes over 20)."""
    import tarfile

    from rkl.paths import eval_results_dir

    results = eval_results_dir()
    files = {f.name: f for f in [*results.glob("*.json"), *results.glob("*.md"), *results.glob("*.png")]}
    for stage in ("baseline", "after_surgery", "phase_a", "phase_b", "finetuned_vanilla"):
        for name in ("run.json", "config.json"):
            if (work / stage / name).is_file():
                files[f"{stage}_{name}"] = work / stage / name
    if (work / "environment.json").is_file():
        files["environment.json"] = work / "environment.json"
    if not bundle:
        for name, f in files.items():
            shutil.copy(f, out / name)
        return
    if "compare.md" in files:
        shutil.copy(files.pop("compare.md"), out / "compare.md")
    partial = out / "results.tar.gz.partial"  # renamed when complete: a kill mid-write leaves the last whole bundle
    with tarfile.open(partial, "w:gz") as tar:
        for name, f in files.items():
            tar.add(f, arcname=name)
    partial.replace(out / "results.tar.gz")


def environment() -> dict:
    """What the numbers depend on: device, library versions, which KDA implementation ran."""
    import torch
    import transformers

    from rkl.model.kernels import fla_kernels_available

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "kda": "fla Triton kernels" if fla_kernels_available() else "transformers' PyTorch reference"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--work", default="/tmp/rkl_experiment_work")
    ap.add_argument("--out", default="/tmp/rkl_experiment")
    ap.add_argument("--pretrain-s", type=float, default=150)
    ap.add_argument("--pretrain-steps", type=int, default=2000, help="pretraining's --steps (see --phase-a-steps)")
    ap.add_argument("--phase-a-s", type=float, default=100)
    ap.add_argument("--phase-b-s", type=float, default=0, help="phase B's time box (0: no phase B)")
    ap.add_argument("--phase-a-steps", type=int, default=800,
                    help="phase A's --steps: its cosine schedule spans them, so a count the time box lets it finish "
                         "anneals its learning rate as the vanilla control's does")
    ap.add_argument("--phase-b-steps", type=int, default=800, help="phase B's --steps (see --phase-a-steps)")
    ap.add_argument("--lr-lora", type=float, default=1e-3,
                    help="phase B's LoRA learning rate (recursive_phase_b.json's 1e-5 is meant for the 48B model and "
                         "moves a 29M model's adapters by nothing in a few dozen steps)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="pretraining batch (rows of seq_len 256)")
    ap.add_argument("--finetune-batch", type=int, default=128,
                    help="phase A's and the vanilla control's batch: on a GPU a step of the small model is bound by "
                         "kernel launches, so more rows per step cost little time")
    ap.add_argument("--chars", type=int, default=500_000, help="max_chars_per_source")
    ap.add_argument("--more", action="store_true",
                    help="continue an earlier run in --work instead of starting over: resume phase A for --phase-a-s "
                         "seconds, the vanilla control to phase A's new step count, evaluate both again, compare")
    ap.add_argument("--eval-merged", action="store_true",
                    help="also score phase B with its LoRA merged (rkl eval --merge-lora: stage phase_b_merged), whose "
                         "plain decoding runs no adapter side product")
    ap.add_argument("--bundle", action="store_true",
                    help="put the results (all but compare.md) into one --out/results.tar.gz, for a device call that "
                         "brings back few files")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    if not args.more:
        shutil.rmtree(work, ignore_errors=True)
    elif not all((work / stage / "run.json").is_file() for stage in ("phase_a", "finetuned_vanilla")):
        sys.exit(f"--more continues a finished run, and {work} holds none")
    elif args.phase_b_s > 0 and not (work / "phase_b" / "run.json").is_file():
        sys.exit(f"--more --phase-b-s continues a run with phase B, and {work} holds none")
    out.mkdir(parents=True, exist_ok=True)
    width, prefix = 8, 64  # phase A: prefixes of up to `prefix` tokens (rkl's prefix_range) before a width-token chunk
    data = ["--set", "data=arithmetic+stdlib", "--set", "arithmetic_digits=3",
            "--set", f"max_chars_per_source={args.chars}"]
    w = ["--set", f"chunk_width={width}"]
    b = ["--batch-size", str(args.batch)]
    fb = ["--batch-size", str(args.finetune_batch)]

    work.mkdir(parents=True, exist_ok=True)
    (work / "environment.json").write_text(json.dumps(environment(), indent=1))

    def step(command: list[str], seconds: float | None = None) -> None:
        code = run(command, seconds)
        export(out, work, args.bundle)
        if code != 0:  # a time box ends a run with exit 0; anything else would feed stale results onwards
            sys.exit(f"stopped: `rkl {command[0]}` exited with {code}")

    resume = ["--resume"] if args.more else []
    refine = [*fb, "--set", f"seq_len={prefix + width}", "--set", "lr_refine=1e-3", "--set", "lr_boundary=1e-3",
              "--set", "warmup_steps=30", "--set", "eval_interval=200", "--set", "save_interval=200",
              "--set", "eval_batches=2", *data]  # phases A and B alike
    if not args.more:
        step(["train", "--phase", "pretrain", "--model", args.preset, "--out", str(work / "baseline"),
              "--steps", str(args.pretrain_steps), *b, "--set", "seq_len=256", "--set", "lr=1e-3",
              "--set", "warmup_steps=50",
              "--set", "eval_interval=500", "--set", "save_interval=500", *data], args.pretrain_s)
        step(["eval", "--stage", "baseline", "--model", str(work / "baseline"), "--limit", str(args.limit), *data, *w])
        step(["surgery", "--model", str(work / "baseline"), "--out", str(work / "after_surgery"), *data, *w])
        step(["eval", "--stage", "after_surgery", "--model", str(work / "after_surgery"), "--limit", str(args.limit),
              *data])
    step(["train", "--phase", "a", "--model", str(work / "after_surgery"), "--out", str(work / "phase_a"), *resume,
         "--steps", str(args.phase_a_steps), *refine], args.phase_a_s)
    a_steps = json.loads((work / "phase_a" / "run.json").read_text())["step"]
    stages, b_steps = ["phase_a"], 0
    if args.phase_b_s > 0:  # phase A's settings (its stage file inherits them), plus LoRA, from phase A's weights
        step(["train", "--phase", "b", "--model", str(work / "phase_a"), "--out", str(work / "phase_b"), *resume,
              "--steps", str(args.phase_b_steps), *refine, "--set", f"lr_lora={args.lr_lora}"], args.phase_b_s)
        b_steps = json.loads((work / "phase_b" / "run.json").read_text())["step"]
        stages.append("phase_b")
    # the control: the recursive phases' rows and mean tokens per row (prefix + chunk), for as many steps as they ran
    from rkl import RecursiveConfig
    from rkl.train.refine_phases import prefix_range

    shortest, longest = prefix_range(RecursiveConfig(seq_len=prefix + width, chunk_width=width))
    step(["train", "--phase", "vanilla", "--model", str(work / "baseline"), "--out", str(work / "finetuned_vanilla"),
         *resume, "--steps", str(a_steps + b_steps), *fb, "--set", f"seq_len={(shortest + longest) // 2 + width}",
         "--set", "warmup_steps=30", "--set", "eval_interval=200", "--set", "save_interval=200", *data])
    for stage in (*stages, "finetuned_vanilla"):
        step(["eval", "--stage", stage, "--model", str(work / stage), "--limit", str(args.limit), *data])
    if args.eval_merged and "phase_b" in stages:
        step(["eval", "--stage", "phase_b", "--model", str(work / "phase_b"), "--limit", str(args.limit), *data,
              "--merge-lora"])
        stages.append("phase_b_merged")
    step(["compare", "baseline", "after_surgery", "finetuned_vanilla", *stages])
    ran = f"phase A ran {a_steps} steps" + (f", phase B {b_steps}" if b_steps else "")
    print(f"\n{ran}; whole experiment {time.perf_counter() - t0:.0f} s")
    from rkl.paths import eval_results_dir

    md = eval_results_dir() / "compare.md"
    print(md.read_text() if md.is_file() else "no compare.md")


if __name__ == "__main__":
    sys.exit(main())
