"""`rkl compare [STAGE ...]`: load eval results, build the comparison, print it with loud warnings."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from rkl.errors import UserError
from rkl.eval.compare import CompareReport, compare, print_report
from rkl.eval.results import load_results
from rkl.paths import eval_results_dir, logs_dir


def run_compare(stages: list[str] | None, console: Console | None = None, *, results_dir: Path | None = None,
                log_root: Path | None = None, draw_plots: bool = True) -> CompareReport:
    """Compare `stages` (None: every result in eval_results/): the rich table, every warning in bold red, and
    where compare.md and the PNG plots were written (into the results folder). Training curves are read from the
    TensorBoard logs under logs/."""
    results_dir = Path(results_dir) if results_dir is not None else eval_results_dir()
    results = load_results(results_dir, stages)
    if not results:
        raise UserError(f"no eval results in {results_dir}: run `rkl eval --stage baseline` (and other stages) first")
    report = compare(results, results_dir, log_root if log_root is not None else logs_dir(), draw_plots=draw_plots)
    console = console or Console()
    print_report(report, console)
    if report.warnings:
        console.print(f"{len(report.warnings)} WARNING(S) above: read them before drawing any conclusion.",
                      style="bold red reverse", markup=False)
    return report
