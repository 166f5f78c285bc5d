"""The comparison report: one self-contained HTML file (plots inlined as base64 PNG) and a Markdown twin.

The HTML needs nothing outside itself: no scripts, no external stylesheets, every figure an
``<img src="data:image/png;base64,...">`` with alt text. The Markdown links the same PNG files,
written beside it under ``plots/``.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Sequence
from pathlib import Path

from adaptflow.contracts import CompareResult, StrategyOutcome
from adaptflow.plots import ConfusionLayout, confusion_layout, draw_confusion
from adaptflow.report_decision import (
    TIE_RULE,
    Decision,
    advisor_headline,
    decide,
    gap_note,
    parameter_notes,
)

SHIFT_METHOD = (
    "Domain shift is read from the frozen backbone's own BatchNorm layers (adaptflow.training.shift). "
    "Each pretrained BatchNorm layer stores the per-channel mean and variance of its inputs over the "
    "source images it was trained on (running_mean, running_var). The baseline stage feeds an even "
    "sample of the target's training images (baseline.advisor.shift_sample_images, 256 by default) "
    "through the frozen backbone in eval mode and measures the same per-channel mean and variance at "
    "every BatchNorm input. The signal is the Gaussian KL divergence KL(target || source) = "
    "0.5 * (var_t / var_s + (mean_t - mean_s)^2 / var_s - 1 - log(var_t / var_s)) per channel, "
    "averaged over the channels of a layer, then over the BatchNorm layers. 0 means the target looks "
    "like the source to every layer; larger values mean a larger shift in the input statistics (not "
    "in the classes: the transfer_gap signal covers that). It needs no source images; a backbone "
    "without BatchNorm gets none. With choose_strategy on, a value at or above baseline.advisor.high_shift "
    "(0.25 by default, calibrated on the demo only) makes the advisor pick full fine-tuning with uniform "
    "learning rates, because the early layers must adapt as much as the late ones."
)


def _pyplot():  # type: ignore[no-untyped-def]
    from adaptflow.plots import _pyplot as plt

    return plt()


def _colors(n: int) -> list[str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    return [palette[i % len(palette)] for i in range(n)]


def accuracy_vs_cost_png(outcomes: Sequence[StrategyOutcome], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = _colors(len(outcomes))
    for ax, (field, label, log) in zip(
        axes,
        [
            ("wall_seconds", "training wall time (s)", False),
            ("trainable_params", "trainable parameters", True),
        ],
        strict=True,
    ):
        for o, color in zip(outcomes, colors, strict=True):
            x = float(getattr(o, field))
            acc = o.score.accuracy
            low, high = o.score.accuracy_ci95
            ax.errorbar(
                [x],
                [acc],
                yerr=[[max(acc - low, 0.0)], [max(high - acc, 0.0)]],
                fmt="o",
                color=color,
                capsize=4,
                label=o.strategy,
            )
            ax.annotate(o.strategy, (x, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (95% CI)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("accuracy vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def learning_curves_grid_png(outcomes: Sequence[StrategyOutcome], path: Path) -> Path:
    plt = _pyplot()
    with_history = [o for o in outcomes if o.history]
    cols = min(3, max(1, len(with_history)))
    rows = max(1, math.ceil(len(with_history) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, o in zip(axes.flat, with_history, strict=False):
        epochs = [h.epoch for h in o.history]
        ax.plot(epochs, [h.train_accuracy for h in o.history], marker="o", label="train")
        ax.plot(epochs, [h.val_accuracy for h in o.history], marker="s", label="val")
        ax.axvline(o.best_epoch, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{o.strategy} (gap {o.train_val_gap:+.3f})", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(with_history) :]:
        ax.axis("off")
    fig.suptitle("learning curves (dotted: best epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


#: the widest the confusion figure gets by putting panels side by side (about the page's width at
#: the figure's dpi); one panel wider than this gets a row of its own, shown at its natural size
CONFUSION_MAX_WIDTH_INCHES = 12.0


def confusion_figure(outcomes: Sequence[StrategyOutcome], classes: Sequence[str]):  # type: ignore[no-untyped-def]
    """One legible panel per strategy (:func:`adaptflow.plots.confusion_layout`), counts in every cell."""
    plt = _pyplot()
    panel = confusion_layout(classes).panel_inches
    fit = max(1, int(CONFUSION_MAX_WIDTH_INCHES // panel))
    cols = min(3, fit, max(1, len(outcomes)))
    rows = max(1, math.ceil(len(outcomes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, panel * rows), squeeze=False)
    for ax, o in zip(axes.flat, outcomes, strict=False):
        draw_confusion(ax, o.score.confusion_matrix, classes, f"{o.strategy}: {o.score.accuracy:.3f}")
    for ax in list(axes.flat)[len(outcomes) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def confusion_grid_png(outcomes: Sequence[StrategyOutcome], classes: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    fig = confusion_figure(outcomes, classes)
    fig.savefig(path, dpi=ConfusionLayout.DPI)
    plt.close(fig)
    return path


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(result: CompareResult, decision: Decision | None = None) -> list[list[str]]:
    """The strategy table, header first; ★ marks :func:`adaptflow.report_decision.decide`'s best."""
    best = (decision or decide(result)).best
    header = [
        "strategy",
        "test accuracy [95% CI]",
        "macro-F1",
        "McNemar p vs baseline",
        "trainable params",
        "wall s",
        "images/s",
        "peak MB",
        "train-val gap",
        "epochs (best)",
    ]
    rows = [header]
    for o in result.outcomes:
        low, high = o.score.accuracy_ci95
        rows.append(
            [
                o.strategy + (" ★" if o.strategy == best else ""),
                f"{o.score.accuracy:.4f} [{low:.3f}, {high:.3f}]",
                f"{o.score.macro_f1:.4f}",
                _fmt(o.p_value_vs_baseline, ".3g"),
                f"{o.trainable_params:,}",
                f"{o.wall_seconds:.1f}",
                _fmt(o.images_per_second, ".0f"),
                _fmt(o.peak_memory_mb, ".0f"),
                f"{o.train_val_gap:+.3f}",
                f"{o.epochs_run} ({o.best_epoch})",
            ]
        )
    for r in result.references:  # the floor: what a linear model on pixels, or always the majority, gets
        low, high = r.accuracy_ci95
        rows.append([r.name, f"{r.accuracy:.4f} [{low:.3f}, {high:.3f}]", f"{r.macro_f1:.4f}", *["-"] * 7])
    return rows


PLOTS = (
    ("accuracy_vs_cost.png", "Accuracy versus cost: test accuracy with 95% bootstrap intervals against "
     "training wall time and trainable parameters, one point per strategy"),
    ("learning_curves.png", "Learning curves: train and validation accuracy per epoch for each strategy"),
    ("confusion_matrices.png", "Confusion matrices on the shared test split, one per strategy"),
)  # fmt: skip


# the confusion matrices keep their pixels (scrolling sideways if wider than the page): scaled down
# to the page's width, a many-class matrix's numbers would shrink below legibility again
NATURAL_SIZE = ' class="natural"'

REFERENCE_NOTE = (
    "Rows reference-*: scikit-learn references fitted on the same training images, no network: a "
    "logistic regression on downsampled grayscale pixels, and always the majority class. The "
    "registry gate refuses a model that does not beat them (gate.reference_margin)."
)


def _signals_rows(result: CompareResult) -> list[tuple[str, str]]:
    return [(k, "-" if v is None else str(v)) for k, v in result.decision.signals.items()]


def write_report(result: CompareResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Writes ``report.html`` (self-contained) and ``report.md`` (+ ``plots/*.png``); returns both paths."""
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    outcomes = result.outcomes
    accuracy_vs_cost_png(outcomes, plots / PLOTS[0][0])
    learning_curves_grid_png(outcomes, plots / PLOTS[1][0])
    confusion_grid_png(outcomes, result.class_names, plots / PLOTS[2][0])
    chosen = decide(result)
    rows = table_rows(result, chosen)
    decision = result.decision
    headline = chosen.best + (f" (tied with {', '.join(chosen.tied_with)})" if chosen.tied_with else "")
    evidence = [v.evidence() + f": {v.verdict}" for v in chosen.versus_baseline]
    pipeline = (
        []
        if result.best == chosen.best
        else [
            f"The pipeline's own pick, by the finetune_margin rule alone (as evaluate chooses): "
            f"{result.best}: {result.best_reason}"
        ]
    )
    advisor = advisor_headline(result, chosen)
    notes = [*parameter_notes(result), gap_note(result)]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    facts = [
        ("data", result.data_uri),
        ("fingerprint", result.fingerprint[:16]),
        ("backbone", result.backbone or "not recorded"),
        ("images", ", ".join(f"{k} {v}" for k, v in result.counts.items())),
        ("smallest class (train)", str(result.min_train_images_per_class)),
        ("fine-tuning epochs (planned)", str(result.epochs)),
        ("device", result.device),
        ("generated", when),
    ]
    if result.run_id:
        facts.append(("MLflow run", f"{result.run_id} ({result.tracking_uri})"))

    # Markdown
    md = ["# Transfer learning versus fine-tuning", ""]
    md += [f"- **{k}**: {v}" for k, v in facts]
    md += ["", "## Results (same test split for every row)", ""]
    md.append("| " + " | ".join(rows[0]) + " |")
    md.append("|" + "|".join("---" for _ in rows[0]) + "|")
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", f"**Best**: {headline}: {chosen.reason.rstrip('.')}.", ""]
    md += [f"- {line}" for line in evidence]
    md += ["", *(f"{line}\n" for line in pipeline), f"*{TIE_RULE}*", "", REFERENCE_NOTE, ""]
    md += ["### Reading the table", ""] + [f"- {line}" for line in notes] + [""]
    md += [
        "## The advisor's decision",
        "",
        f"**{advisor}**",
        "",
        f"The advisor's reasoning, from the baseline's signals before anything was fine-tuned: {decision.reason}",
        "",
    ]
    md += ["| signal | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _signals_rows(result)]
    md += ["", f"*How domain shift is measured.* {SHIFT_METHOD}", ""]
    md += ["## Plots", ""]
    md += [f"![{alt}](plots/{name})\n" for name, alt in PLOTS]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    # HTML
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    signals = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _signals_rows(result))
    facts_html = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in facts)
    figures = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode((plots / name).read_bytes()).decode()}" '
        f'alt="{e(alt)}"{NATURAL_SIZE if name == PLOTS[2][0] else ""}><figcaption>{e(alt)}</figcaption></figure>'
        for name, alt in PLOTS
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>adaptflow: transfer learning versus fine-tuning</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; overflow-x: auto; }} img {{ max-width: 100%; }}
img.natural {{ max-width: none; }} figcaption {{ color: #555; font-size: 90%; }}
.decision {{ background: #f7f7ff; border-left: 4px solid #55f; padding: 0.5em 1em; }}
</style></head><body>
<h1>Transfer learning versus fine-tuning</h1>
<ul>{facts_html}</ul>
<h2>Results (same test split for every row)</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p><b>Best</b>: {e(headline)}: {e(chosen.reason.rstrip("."))}.</p>
<ul>{"".join(f"<li>{e(line)}</li>" for line in evidence)}</ul>
{"".join(f"<p>{e(line)}</p>" for line in pipeline)}
<p><i>{e(TIE_RULE)}</i></p>
<p>{e(REFERENCE_NOTE)}</p>
<h3>Reading the table</h3>
<ul>{"".join(f"<li>{e(line)}</li>" for line in notes)}</ul>
<h2>The advisor's decision</h2>
<p class="decision"><b>{e(advisor)}</b></p>
<p>The advisor's reasoning, from the baseline's signals before anything was fine-tuned:
{e(decision.reason)}</p>
<table><thead><tr><th>signal</th><th>value</th></tr></thead><tbody>{signals}</tbody></table>
<p><i>How domain shift is measured.</i> {e(SHIFT_METHOD)}</p>
<h2>Plots</h2>
{figures}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return html_path, md_path
