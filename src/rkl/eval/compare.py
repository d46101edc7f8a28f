"""Compare stage results: one table, loud warnings, compare.md and plots.

This is where a researcher reads "does recursion help?", so it refuses to let three classic mistakes pass
quietly: an after_surgery model that is not exactly the baseline (the sidecar is not neutral, so every later
comparison is contaminated), stages scored on different data, and differences from the vanilla control that
are inside the sampling noise. Each produces a line starting with "WARNING:" in the terminal and in compare.md.

The table is transposed (metrics as rows, stages as columns): six stages fit a terminal, eighteen metric and
delta columns do not.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rkl.errors import UserError
from rkl.eval.metrics import diff_se
from rkl.eval.plots import PERCENT, plot_committed_lengths, plot_metric_bars, plot_training_curves
from rkl.eval.results import COUNT_GROUPS, now_iso, sample_count

BASELINE, SURGERY, VANILLA = "baseline", "after_surgery", "finetuned_vanilla"
STAGE_ORDER = (BASELINE, SURGERY, VANILLA, "phase_a", "phase_b", "phase_c")
KEY_METRICS = ("perplexity", "token_accuracy", "restore_acc_k", "restore_acc_1", "draft_acc", "arith_exact",
               "draft_acc_refined", "avg_inner_steps", "commit_rate", "stability_at_k", "mean_committed", "tpot_ms",
               "tpot_uplift", "cont_mean_committed", "cont_tpot_uplift", "cont_greedy_agree_plain")
DELTA_METRICS = ("perplexity", "arith_exact", "restore_acc_k")
# metrics that neutral initialisation must reproduce bit for bit (mean_nll too, when both stages report it)
MUST_MATCH = ("perplexity", "token_accuracy")
MISSING = "—"
FORMATS = {"perplexity": "{:.4f}", "avg_inner_steps": "{:.2f}", "mean_committed": "{:.2f}", "tpot_ms": "{:.2f}",
           "cont_mean_committed": "{:.2f}", "cont_tpot_uplift": "{:.2f}×", "cont_greedy_agree_plain": "{:.2f}",
           "tpot_uplift": "{:.2f}×"}


@dataclass
class CompareReport:
    """What compare found. table_rows[i][0] is the row label, then one cell per stage in `stages` order;
    rows from n_metric_rows on are deltas against the baseline and the vanilla control."""

    stages: list[str]
    columns: list[str]
    table_rows: list[list[str]]
    n_metric_rows: int
    warnings: list[str] = field(default_factory=list)
    markdown: str = ""
    plots: list[Path] = field(default_factory=list)
    markdown_path: Path | None = None


def order_stages(names: Any) -> list[str]:
    """Pipeline order first (baseline ... phase_c), then any other stage alphabetically."""
    names = list(names)
    return [s for s in STAGE_ORDER if s in names] + sorted(n for n in names if n not in STAGE_ORDER)


def _metric(result: dict[str, Any], name: str) -> float | None:
    v = (result.get("metrics") or {}).get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def format_metric(name: str, v: float | None) -> str:
    """Accuracies and rates as percentages, key metrics in fixed decimals (columns line up), others to 4 digits."""
    if v is None or math.isnan(v):
        return MISSING if v is None else "nan"
    return f"{100 * v:.2f}%" if name in PERCENT else FORMATS.get(name, "{:.4g}").format(v)


def _diff_se(ra: dict[str, Any], rb: dict[str, Any], ma: str, mb: str) -> float | None:
    """SE of value(ra, ma) - value(rb, mb): from result["stderr"] when both carry one, else binomial from
    result["counts"] for accuracies; None when no standard error can be justified."""
    sa, sb = (ra.get("stderr") or {}).get(ma), (rb.get("stderr") or {}).get(mb)
    if isinstance(sa, (int, float)) and isinstance(sb, (int, float)):
        return math.hypot(sa, sb)
    a, b, na, nb = _metric(ra, ma), _metric(rb, mb), sample_count(ra, ma), sample_count(rb, mb)
    if ma in COUNT_GROUPS and mb in COUNT_GROUPS and na and nb and a is not None and b is not None:
        return diff_se(a, na, b, nb)
    return None


def _delta_text(metric: str, a: float | None, b: float | None, se: float | None) -> str:
    """a - b for the table: perplexity as relative %, accuracies in percentage points, then the significance
    marker: * beyond 2 SE, ns within 2 SE, ? for an accuracy whose SE is unknown."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return MISSING
    if a == b:
        return "="
    if metric == "perplexity" and b:
        rel = (a - b) / b * 100
        text = f"{rel:+.1e}%" if abs(rel) < 0.01 else f"{rel:+.2f}%"  # a 1e-9 drift must not print as +0.00%
    elif metric in PERCENT:
        text = f"{(a - b) * 100:+.2f}pp"
    else:
        text = f"{a - b:+.4g}"
    if se is None:
        return text + (" ?" if metric in COUNT_GROUPS else "")
    return text + (" ns" if abs(a - b) <= 2 * se else " *")


def _delta_cell(results: dict[str, dict[str, Any]], metric: str, stage: str, ref: str) -> str:
    if stage == ref or ref not in results:
        return "(ref)" if stage == ref else MISSING
    ra, rb = results[stage], results[ref]
    return _delta_text(metric, _metric(ra, metric), _metric(rb, metric), _diff_se(ra, rb, metric, metric))


def kernel_settings(result: dict[str, Any]) -> dict[str, Any]:
    """The kernel choices a result records (None: not recorded, which is not held against the other result). A GPU
    result written before rkl recorded `cudnn_attention` ran with it allowed, PyTorch's default; on a CPU it means
    nothing."""
    ran = result.get("eval", {})
    settings = {k: ran.get(k) for k in ("kda_kernels", "short_convolution", "cudnn_attention")}
    if str(result.get("device", "cpu")).startswith("cpu"):
        settings["cudnn_attention"] = None
    elif settings["cudnn_attention"] is None:
        settings["cudnn_attention"] = True
    return settings


def check_exactness(results: dict[str, dict[str, Any]]) -> list[str]:
    """after_surgery must equal baseline exactly in perplexity, token accuracy and greedy generations; judged only
    between reproducible results (CPU, or GPU with deterministic kernels: rkl.determinism)."""
    if BASELINE not in results or SURGERY not in results:
        return []
    base, surg = results[BASELINE], results[SURGERY]
    loose = [s for s, r in ((BASELINE, base), (SURGERY, surg))
             if not str(r.get("device", "cpu")).startswith("cpu") and not r.get("eval", {}).get("deterministic")]
    if loose:
        return [f"WARNING: after_surgery == baseline not judged: {' and '.join(loose)} ran on a GPU without "
                "deterministic kernels, which is not reproducible run to run; re-run `rkl eval --deterministic`."]
    kernels = {s: kernel_settings(r) for s, r in ((BASELINE, base), (SURGERY, surg))}
    differ = [k for k in kernels[BASELINE] if None not in (kernels[BASELINE][k], kernels[SURGERY][k])
              and kernels[BASELINE][k] != kernels[SURGERY][k]]
    if differ:
        shown = {s: {k: kernels[s][k] for k in differ} for s in kernels}
        return [f"WARNING: after_surgery == baseline not judged: the two ran different kernels "
                f"({BASELINE}: {shown[BASELINE]}, {SURGERY}: {shown[SURGERY]}), which round differently; "
                "evaluate both on one machine setup."]
    out = []
    both_nll = _metric(base, "mean_nll") is not None and _metric(surg, "mean_nll") is not None
    for m in MUST_MATCH + (("mean_nll",) if both_nll else ()):
        a, b = _metric(surg, m), _metric(base, m)
        if a is None or b is None:
            where = " and ".join(s for s, v in ((SURGERY, a), (BASELINE, b)) if v is None)
            out.append(f"WARNING: cannot verify after_surgery == baseline on {m}: it is missing in {where}.")
        elif not a == b:  # NaN != NaN: a NaN is never "identical"
            out.append(f"WARNING: after_surgery differs from baseline in {m}: {a!r} vs {b!r} (diff {a - b:+.3g}). "
                       "Neutral initialisation must reproduce the baseline exactly; every later comparison is suspect.")
    ga, gb = surg.get("greedy_sha256"), base.get("greedy_sha256")
    if not ga or not gb:
        out.append("WARNING: cannot verify after_surgery greedy generations equal baseline: greedy_sha256 missing.")
    elif ga != gb:
        out.append(f"WARNING: after_surgery greedy generations differ from baseline "
                   f"(greedy_sha256 {ga[:12]}… vs {gb[:12]}…): the sidecar changes what the model generates.")
    return out


def lora_state(result: dict[str, Any]) -> str | None:
    """How a result ran its LoRA: "merged" (folded into the base weights, `rkl eval --merge-lora`), "unmerged" (as
    trained), "none" (no adapters); None for a result from before rkl recorded it (those ran any adapters unmerged)."""
    ran = result.get("eval") or {}
    if "lora_merged" not in ran:
        return None
    if ran["lora_merged"]:
        return "merged"
    return "unmerged" if ran.get("lora_layers") else "none"


def check_lora(results: dict[str, dict[str, Any]], stages: list[str]) -> list[str]:
    """Merged LoRA rounds the adapted weights differently (bf16) and decodes faster than unmerged LoRA: a stage scored
    merged is compared only with stages known to be merged or to have no LoRA."""
    states = {s: lora_state(results[s]) for s in stages}
    merged = [s for s in stages if states[s] == "merged"]
    if not merged:
        return []
    out = []
    unmerged = [s for s in stages if states[s] == "unmerged"]
    if unmerged:
        out.append(f"WARNING: LoRA merged into the base weights in {', '.join(merged)} (--merge-lora) but unmerged, "
                   f"as trained, in {', '.join(unmerged)}: their differences include the merge's rounding (bf16) "
                   "and its faster decoding, not only training.")
    unknown = [s for s in stages if states[s] is None]
    if unknown:
        out.append(f"WARNING: {', '.join(merged)} ran with LoRA merged (--merge-lora), but {', '.join(unknown)} do "
                   "not record whether they had LoRA (results from before rkl recorded it, which ran it unmerged): "
                   "re-evaluate them to compare like with like.")
    return out


def check_splits(results: dict[str, dict[str, Any]], stages: list[str]) -> list[str]:
    """All stages must be scored on the same held-out items: same data.split_hash and the same item counts."""
    if len(stages) < 2:
        return []
    out = []
    def data_key(result: dict[str, Any]) -> str | None:
        """The split, the eval set (chunk width, corruption, counts) and the test tokens: all must match."""
        data = result.get("data") or {}
        if not data.get("split_hash"):
            return None
        return "/".join(str(data.get(k) or "") for k in ("split_hash", "eval_set_sha256", "test_stream_sha256"))

    hashes = {s: data_key(results[s]) for s in stages}
    missing = [s for s in stages if not hashes[s]]
    if missing:
        out.append(f"WARNING: no data.split_hash in {', '.join(missing)}: cannot verify they were scored on the "
                   "same held-out split as the other stages.")
    groups: dict[str, list[str]] = defaultdict(list)
    for s in (s for s in stages if hashes[s]):
        groups[hashes[s]].append(s)
    if len(groups) > 1:
        desc = "; ".join(f"{h[:12]}: {', '.join(g)}" for h, g in groups.items())
        out.append(f"WARNING: stages were scored on DIFFERENT data splits ({desc}); their numbers are not comparable.")
    for key in sorted({k for s in stages for k in (results[s].get("counts") or {})}):
        have = {s: results[s]["counts"][key] for s in stages if key in (results[s].get("counts") or {})}
        if len(set(have.values())) > 1:
            desc = ", ".join(f"{s}={n}" for s, n in have.items())
            out.append(f"WARNING: stages were scored on different numbers of {key!r} items ({desc}).")
    return out


def check_noise(results: dict[str, dict[str, Any]], stages: list[str]) -> list[str]:
    """Every recursive stage vs the vanilla control (the baseline if no control): flag accuracy differences
    within 2 standard errors, and say so when the sample counts needed to judge are missing."""
    recursive = [s for s in stages if s not in (BASELINE, SURGERY, VANILLA)]
    ref = VANILLA if VANILLA in results else (BASELINE if BASELINE in results else None)
    out = []
    if recursive and VANILLA not in results:
        out.append(f"WARNING: no {VANILLA} result: {', '.join(recursive)} have no vanilla control, so a gain "
                   f"cannot be told apart from the effect of extra training" + (f" (compared with {ref})." if ref else "."))
    if ref is None:
        return out
    for s in recursive:
        within, unknown = [], []
        extra = [m for m in (results[s].get("stderr") or {}) if m not in COUNT_GROUPS]
        for m in list(COUNT_GROUPS) + extra:
            a, b = _metric(results[s], m), _metric(results[ref], m)
            if a is None or b is None:
                continue
            d, se = a - b, _diff_se(results[s], results[ref], m, m)
            if se is None:
                unknown.append(m)
            elif abs(d) <= 2 * se:
                k, fmt, unit = (100.0, ".2f", "pp") if m in PERCENT else (1.0, ".4g", "")
                within.append(f"{m} {d * k:+{fmt}}{unit} (2 SE = {2 * se * k:{fmt}}{unit})")
        if within:
            out.append(f"WARNING: {s} vs {ref}: difference within noise (|Δ| <= 2 SE, not significant): "
                       + "; ".join(within) + ".")
        if unknown:
            out.append(f"WARNING: {s} vs {ref}: significance unknown for {', '.join(unknown)}: the results lack "
                       "'counts' (number of scored items), so no standard error can be justified.")
    return out


def _build_rows(results: dict[str, dict[str, Any]], stages: list[str]) -> tuple[list[str], list[list[str]], int]:
    metrics = [m for m in KEY_METRICS if any(_metric(results[s], m) is not None for s in stages)]
    rows = [[m] + [format_metric(m, _metric(results[s], m)) for s in stages] for m in metrics]
    states = [lora_state(results[s]) for s in stages]
    if "merged" in states:  # the default (every adapter as trained) needs no row; a merged stage is named in the table
        rows.insert(0, ["lora"] + [state or MISSING for state in states])
    deltas = [[f"Δ {m} vs {label}"] + [_delta_cell(results, m, s, ref) for s in stages]
              for m in DELTA_METRICS if m in metrics for ref, label in ((BASELINE, "baseline"), (VANILLA, "vanilla"))]
    # what refinement itself buys: K inner steps vs one pass, on the same corrupted chunks of the same stage
    deltas.append(["Δ restore_acc_k − restore_acc_1"] + [_delta_text(
        "restore_acc_k", _metric(results[s], "restore_acc_k"), _metric(results[s], "restore_acc_1"),
        _diff_se(results[s], results[s], "restore_acc_k", "restore_acc_1")) for s in stages])
    n_metric_rows = len(rows)
    rows += [r for r in deltas if any(c not in (MISSING, "(ref)") for c in r[1:])]  # drop rows with nothing to say
    return metrics, rows, n_metric_rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _markdown(report: CompareReport, results: dict[str, dict[str, Any]], out_dir: Path) -> str:
    stages = report.stages
    parts = [f"# rkl compare\n\nGenerated {now_iso()} from {len(stages)} stage(s): {', '.join(stages)}.\n",
             "## Warnings\n"]
    parts.append("\n".join(f"- **{w}**" for w in report.warnings) if report.warnings else "No warnings.")
    parts += ["\n## Metrics\n", _md_table(report.columns, report.table_rows),
              "\nΔ perplexity: relative change (lower is better). Δ accuracies: absolute percentage points. "
              "`*` beyond 2 SE, `ns` within 2 SE (noise), `?` sample counts missing, `=` exactly equal.\n"]
    other = sorted({m for s in stages for m in (results[s].get("metrics") or {})} - set(KEY_METRICS))
    if other:
        parts += ["## Other metrics\n", _md_table(["metric"] + stages, [[m] + [format_metric(m, _metric(results[s], m))
                                                                             for s in stages] for m in other]), ""]
    prov = []
    for s in stages:
        r = results[s]
        ck, split = (r.get("checkpoint") or {}).get("sha256"), (r.get("data") or {}).get("split_hash")
        counts = ", ".join(f"{k}={v}" for k, v in (r.get("counts") or {}).items())
        prov.append([s, r.get("created", MISSING), (ck or MISSING)[:12], (split or MISSING)[:12],
                     r.get("device", MISSING), lora_state(r) or MISSING, counts or MISSING,
                     str(len(r.get("history") or []))])
    parts += ["## Provenance\n", _md_table(["stage", "created", "checkpoint sha256", "split hash", "device", "LoRA",
                                            "counts", "earlier results"], prov), ""]
    if report.plots:
        parts.append("## Plots\n")
        parts += [f"![{p.stem}]({os.path.relpath(p, out_dir)})\n" for p in report.plots]
    return "\n".join(parts) + "\n"


def compare(results: dict[str, dict[str, Any]], out_dir: Path, logs_dir: Path | None = None, *,
            draw_plots: bool = True) -> CompareReport:
    """Build the table and warnings, draw the plots into out_dir (unless draw_plots is False: matplotlib
    takes seconds per figure on a small CPU) and write out_dir/compare.md."""
    if not results:
        raise UserError("no eval results to compare: run `rkl eval --stage baseline` (and other stages) first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = order_stages(results)
    metrics, rows, n_metric_rows = _build_rows(results, stages)
    warnings = (check_exactness(results) + check_splits(results, stages) + check_lora(results, stages)
                + check_noise(results, stages))
    report = CompareReport(stages, ["metric"] + stages, rows, n_metric_rows, warnings)
    if draw_plots:
        report.plots = (plot_metric_bars(results, stages, metrics, out_dir, BASELINE, VANILLA)
                        + plot_training_curves(logs_dir, out_dir) + plot_committed_lengths(results, stages, out_dir))
    report.markdown = _markdown(report, results, out_dir)
    report.markdown_path = out_dir / "compare.md"
    report.markdown_path.write_text(report.markdown, encoding="utf-8")
    return report


def render_table(report: CompareReport) -> Table:
    """The comparison as a rich Table: metric rows, then a section of delta rows."""
    table = Table(title="rkl compare", title_style="bold", header_style="bold cyan",
                  caption=f"{len(report.warnings)} warning(s): see below" if report.warnings else "no warnings",
                  caption_style="bold red" if report.warnings else "green")
    for i, col in enumerate(report.columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for i, row in enumerate(report.table_rows):
        if i == report.n_metric_rows:
            table.add_section()
        table.add_row(*row, style="italic" if i >= report.n_metric_rows else None)
    return table


def print_report(report: CompareReport, console: Console | None = None) -> None:
    """Table, then every warning in bold red, then where compare.md and the plots are."""
    console = console or Console()
    console.print(render_table(report))
    for w in report.warnings:
        console.print(w, style="bold red", markup=False)
    for label, p in [("report", report.markdown_path)] + [("plot", p) for p in report.plots]:
        console.print(f"{label}: {p}", markup=False)
