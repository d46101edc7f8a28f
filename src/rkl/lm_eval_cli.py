"""`rkl-lm-eval ...` (or `python -m rkl.lm_eval_cli ...`): lm-evaluation-harness's own command line, with the "rkl"
model registered and rkl's tasks/ included.

lm-eval 0.4 looks a `--model` name up in its own registry only (it has no plugin entry points), so `lm_eval --model
rkl` cannot find rkl's model; this is lm-eval's CLI after `import rkl.lm_eval_model`. Every lm-eval argument works
as documented there. Without `--include_path`, rkl's tasks/ folder is added, so `--tasks rkl_arithmetic,rkl_arc_agi_1,
rkl_humaneval` resolve. lm-eval resolves the data_files paths of rkl's arithmetic tasks against the working
directory: run it from the project root.
"""

from __future__ import annotations

import sys


def main() -> None:
    import rkl.lm_eval_model  # noqa: F401  (registers "rkl")
    from lm_eval.__main__ import cli_evaluate

    from rkl.eval.harness_tasks import tasks_dir

    args = sys.argv[1:]
    if "--include_path" not in args and any(a not in ("-h", "--help") for a in args):
        sys.argv = [sys.argv[0], *args, "--include_path", str(tasks_dir())]
    cli_evaluate()


if __name__ == "__main__":
    main()
