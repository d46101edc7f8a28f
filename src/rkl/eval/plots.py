"""PNG plots for `rkl compare`: metrics per stage, training curves from TensorBoard logs, committed lengths.

Figures are drawn on an explicit Agg canvas through the object-oriented API (no pyplot): no GUI backend is
ever needed, importing this module does not switch a notebook's backend, and no figure lingers in a global
registry. Every plot has a title, axis labels, rotated tick labels and dpi 120 so that it reads at a glance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from rkl.eval.metrics import binomial_se, committed_length_histogram
from rkl.eval.results import sample_count

DPI = 120
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 9, "figure.titlesize": 14}
COLORS = {"baseline": "#7f7f7f", "after_surgery": "#c7c7c7", "finetuned_vanilla": "#ff7f0e"}
STAGE_COLOR = "#1f77b4"
# fractions shown as percentages (accuracies and rates)
PERCENT = {"token_accuracy", "restore_acc_k", "restore_acc_1", "draft_acc", "draft_acc_refined", "arith_exact",
           "commit_rate", "stability_at_k"}
UNITS = {"perplexity": "perplexity (lower is better)", "avg_inner_steps": "steps", "mean_committed": "tokens",
         "tpot_ms": "ms per token", "tpot_uplift": "× plain TPOT", "cont_mean_committed": "tokens",
         "cont_tpot_uplift": "× plain TPOT"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _value(result: dict[str, Any], metric: str) -> float:
    v = (result.get("metrics") or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) else math.nan


def plot_metric_bars(results: dict[str, dict[str, Any]], stages: Sequence[str], metrics: Sequence[str],
                     out_dir: Path, baseline: str = "baseline", vanilla: str = "finetuned_vanilla") -> list[Path]:
    """One panel per metric, one bar per stage; the baseline (grey) and the vanilla control (orange) are drawn
    as reference lines across each panel so that every stage reads against both. Accuracies with sample counts
    get ±2 binomial SE error bars: a bar whose difference from the orange line is inside them is noise."""
    if not metrics or not stages:
        return []
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(4.8 * ncols, 3.9 * nrows + 0.6), layout="constrained")
        for i, metric in enumerate(metrics):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            scale = 100.0 if metric in PERCENT else 1.0
            vals = [_value(results[s], metric) * scale for s in stages]
            errs = []
            for s, v in zip(stages, vals):
                n = sample_count(results[s], metric) if metric in PERCENT else None
                errs.append(2 * binomial_se(v / scale, n) * scale if n and math.isfinite(v) else 0.0)
            x = list(range(len(stages)))
            colors = [COLORS.get(s, STAGE_COLOR) for s in stages]
            bars = ax.bar(x, [v if math.isfinite(v) else 0.0 for v in vals], color=colors,
                          yerr=errs if any(errs) else None, capsize=4, edgecolor="black", linewidth=0.5)
            labels = [f"{v:.4g}" if math.isfinite(v) else "n/a" for v in vals]
            ax.bar_label(bars, labels=labels, padding=4, fontsize=8)
            for ref, style in ((baseline, "--"), (vanilla, ":")):
                if ref in results and math.isfinite(v_ref := _value(results[ref], metric) * scale):
                    ax.axhline(v_ref, color=COLORS[ref] if ref in COLORS else "black", linestyle=style, linewidth=1.5)
            ax.set_title(metric)
            ax.set_ylabel("%" if metric in PERCENT else UNITS.get(metric, metric))
            ax.set_xticks(x, list(stages), rotation=30, ha="right")
            ax.margins(y=0.15)
        handles = [Patch(color=COLORS["baseline"], label=baseline),
                   Patch(color=COLORS["finetuned_vanilla"], label=f"{vanilla} (control)"),
                   Patch(color=STAGE_COLOR, label="other stages"),
                   Line2D([], [], color=COLORS["baseline"], linestyle="--", label="baseline level"),
                   Line2D([], [], color=COLORS["finetuned_vanilla"], linestyle=":", label="control level")]
        fig.legend(handles=handles, loc="outside lower center", ncols=5, frameon=False)
        fig.suptitle("Metrics per stage (error bars: ±2 binomial SE where sample counts are known)")
        return [_save(fig, Path(out_dir) / "metrics.png")]


def _runs_with_events(logs_dir: Path) -> list[Path]:
    return sorted({p.parent for p in logs_dir.rglob("events.out.tfevents.*") if p.is_file()})


def _read_loss_scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Scalars whose tag starts with train/loss or val/loss, as (steps, values) sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: lazy

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, tuple[list[int], list[float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(("train/loss", "val/loss")):
            events = sorted(acc.Scalars(tag), key=lambda e: e.step)
            out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def _ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, m = [], values[0]
    for v in values:
        m = (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def _draw_curves(ax: Any, curves: dict[str, tuple[list[int], list[float]]], title: str) -> None:
    for i, (tag, (steps, values)) in enumerate(sorted(curves.items())):
        color = f"C{i % 10}"
        if len(values) > 20:  # raw curve faint, EMA on top: noisy minibatch losses hide the trend otherwise
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _ema(values), color=color, label=tag, linewidth=1.6)
        else:
            ax.plot(steps, values, color=color, label=tag, linewidth=1.6, marker="o", markersize=3)
    positive = [v for _, vals in curves.values() for v in vals]
    if positive and min(positive) > 0 and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if len(curves) > 3:  # many curves: legend outside so that it covers none of them
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(loc="best")


def plot_training_curves(logs_dir: Path | None, out_dir: Path) -> list[Path]:
    """Per run (a directory of TensorBoard event files under logs_dir): total and validation loss on the left,
    the loss components (train/loss/<name>) on the right; plus one overlay of val/loss across runs when two or
    more runs logged it. Returns [] quietly when there are no logs or no loss tags."""
    if logs_dir is None or not Path(logs_dir).is_dir():
        return []
    logs_dir = Path(logs_dir)
    paths: list[Path] = []
    val_by_run: dict[str, tuple[list[int], list[float]]] = {}
    with matplotlib.rc_context(STYLE):
        for run_dir in _runs_with_events(logs_dir):
            scalars = _read_loss_scalars(run_dir)
            if not scalars:
                continue
            run = run_dir.relative_to(logs_dir).as_posix() if run_dir != logs_dir else logs_dir.name
            main = {t: c for t, c in scalars.items() if t in ("train/loss", "train/loss/total") or t.startswith("val/")}
            parts = {t: c for t, c in scalars.items() if t not in main}
            if "val/loss" in scalars:
                val_by_run[run] = scalars["val/loss"]
            panels = [(d, title) for d, title in ((main, "total and validation loss"), (parts, "loss components")) if d]
            fig = Figure(figsize=(6.4 * len(panels), 4.6), layout="constrained")
            for i, (curves, title) in enumerate(panels):
                _draw_curves(fig.add_subplot(1, len(panels), i + 1), curves, title)
            fig.suptitle(f"Training curves: {run}")
            paths.append(_save(fig, Path(out_dir) / f"curves_{re.sub(r'[^A-Za-z0-9_.-]+', '_', run)}.png"))
        if len(val_by_run) >= 2:
            fig = Figure(figsize=(7.5, 4.8), layout="constrained")
            _draw_curves(fig.add_subplot(1, 1, 1), val_by_run, "val/loss by run (as each run logged it)")
            paths.append(_save(fig, Path(out_dir) / "curves_val_all.png"))
    return paths


def plot_committed_lengths(results: dict[str, dict[str, Any]], stages: Sequence[str], out_dir: Path) -> list[Path]:
    """Histogram of committed chunk lengths B' per stage, as fractions of that stage's chunks (stages with
    different chunk counts stay comparable), on shared axes from 0 to the largest chunk width seen."""
    with_lengths = [s for s in stages if results[s].get("committed_lengths")]
    if not with_lengths:
        return []
    max_len = max(max(int(b) for b in results[s]["committed_lengths"]) for s in with_lengths)
    for s in with_lengths:
        width = (results[s].get("config") or {}).get("chunk_width")
        max_len = max(max_len, int(width) if isinstance(width, int) else 0)
    ncols = min(3, len(with_lengths))
    nrows = math.ceil(len(with_lengths) / ncols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(4.8 * ncols, 3.6 * nrows), layout="constrained")
        axes = []
        for i, stage in enumerate(with_lengths):
            ax = fig.add_subplot(nrows, ncols, i + 1, sharex=axes[0] if axes else None,
                                 sharey=axes[0] if axes else None)
            axes.append(ax)
            lengths = [int(b) for b in results[stage]["committed_lengths"]]
            counts = committed_length_histogram(lengths, max_len)
            ax.bar(range(max_len + 1), [c / len(lengths) for c in counts], color=COLORS.get(stage, STAGE_COLOR),
                   edgecolor="black", linewidth=0.4)
            ax.set_title(f"{stage} (n={len(lengths)}, mean={sum(lengths) / len(lengths):.2f})")
            ax.set_xlabel("committed length B' (tokens)")
            ax.set_ylabel("fraction of chunks")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("Committed chunk lengths per stage")
        return [_save(fig, Path(out_dir) / "committed_lengths.png")]
