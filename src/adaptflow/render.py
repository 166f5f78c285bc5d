"""What the CLI shows on a terminal: pure builders of rich renderables from plain data.

Nothing here prints or reads state; ``adaptflow.cli`` prints what these return (``--json`` skips them).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.highlighter import ReprHighlighter
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from adaptflow.contracts import CompareResult

SCHEDULE_COLUMNS = ("recurring_run_id", "name", "cron", "enabled", "max_concurrency", "no_catchup")
PREDICTION_FIELDS = ("path", "label", "confidence", "error")


def markup_line(text: str) -> Text:
    """``text`` as ``Console.print(text)`` shows it: rich markup, then the console's repr highlighting."""
    styled = Text.from_markup(text)
    line = ReprHighlighter()(str(styled))
    line.copy_styles(styled)
    return line


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _test_metrics(m: dict[str, Any]) -> str:
    low, high = m["accuracy_ci95"]
    return f"test accuracy {_num(m['accuracy'])}  CI95 {low:.3f}-{high:.3f}  macro-F1 {_num(m['macro_f1'])}"


def summary_table(s: dict[str, Any]) -> Table:
    """The summary of a completed ``adaptflow run`` (the dict ``run --json`` prints): a borderless
    grid, so it stays short in a terminal and in a CI log. The advisor's reasoning is printed while
    the run goes (and is in ``--json``)."""
    table = Table.grid(padding=(0, 2))
    table.title = "adaptflow run"
    table.add_column(style="bold")
    table.add_column()
    d = s["dataset"]
    table.add_row(
        "data",
        f"{d['source']}\nfingerprint {d['fingerprint'][:16]}  counts {d['counts']}  quarantined {len(d['quarantined'])}",
    )
    if "backbone" in s:  # summaries written before the backbone was recorded have none
        b = s["backbone"]
        init = "[yellow]from scratch[/] (backbone.weights=none)" if b["init"] == "from scratch" else b["init"]
        table.add_row("backbone", markup_line(f"{b['name']}, {init}"))
    table.add_row("baseline (transfer)", _test_metrics(s["baseline"]["metrics"]))
    f = s["finetune"]
    if f["ran"]:
        table.add_row(f"finetune ({f['strategy']})", _test_metrics(f["metrics"]))
    if s.get("reference"):
        r = s["reference"]
        floor = "  ".join(f"{name.removeprefix('reference-')} {acc:.4f}" for name, acc in r["scores"].items())
        table.add_row("references (pixels)", f"test accuracy {floor}")
    table.add_row("winner", f"{s['winner']}: {s['winner_reason']}")
    table.add_row(
        "champion before",
        f"v{s['champion_before']} ({_num(s['champion_before_accuracy'])})"
        if s["champion_before"]
        else "none",
    )
    table.add_row("registered", f"{s['model_uri']}")
    verdict = "[green]PROMOTED to champion" if s["promoted"] else "[yellow]not promoted"
    table.add_row("gate", verdict + "\n" + "\n".join(f"- {r}" for r in s["gate"]["reasons"]))
    o = s["onnx"]
    table.add_row(
        "onnx",
        f"max |ort - torch| {o['max_abs_diff']:.2e} (tol {o['tolerance']:.0e}), p50 {o['latency_ms_p50']:.2f} ms",
    )
    mlflow = s["mlflow"]
    table.add_row("mlflow", mlflow.get("ui_url") or f"{mlflow['tracking_uri']}  run {mlflow['run_id']}")
    if s.get("stage_seconds"):
        table.add_row("stage seconds", "  ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items()))
    return table


def unchanged_text(s: dict[str, Any]) -> Text:
    """A run that skipped training: nothing changed since the champion (or challenger) was made."""
    reason = str(s["reason"]).removeprefix("unchanged: ")
    model = s["mlflow"].get("model_name")
    champion = f"models:/{model}/{s['champion_before']}" if model else f"v{s['champion_before']}"
    return markup_line(
        f"[yellow]unchanged[/]: {reason}\nchampion: {champion}  this run: {s['mlflow']['run_id']}"
    )


def run_view(s: dict[str, Any]) -> RenderableType:
    """``adaptflow run`` / ``demo``: the summary table, or why nothing was trained."""
    return summary_table(s) if s["status"] == "completed" else unchanged_text(s)


def history_table(rows: Sequence[dict[str, Any]], model_name: str) -> Table:
    """The champion audit trail (``registry.read_audit``), oldest first."""
    table = Table(title=f"champion history of {model_name}")
    for col in ("time (UTC)", "action", "from", "to", "accuracy", "by", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        acc = r.get("metrics", {}).get("accuracy")
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"])),
            r["action"],
            f"v{r['previous_champion']}" if r.get("previous_champion") else "-",
            f"v{r['new_champion']}",
            f"{acc:.4f}" if acc is not None else "",
            str(r.get("user") or ""),
            r["reason"],  # whole: the gate's reasons are the point of the audit trail
        )
    return table


def predictions_table(rows: Sequence[dict[str, Any]], model: str) -> Table:
    """One row per file; a file that could not be read shows its error in red."""
    table = Table(title=f"predictions ({model or 'champion'})")
    for col in ("path", "label", "confidence"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["path"],
            r["label"] or f"[red]{r['error']}",
            f"{r['confidence']:.3f}" if r["confidence"] else "",
        )
    return table


def predictions_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The predictions as CSV (``csv`` module defaults: a header, ``\\r\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PREDICTION_FIELDS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def schedules_table(rows: Sequence[dict[str, Any]]) -> Table:
    """Recurring runs, as ``kfp_client.Schedule.to_dict`` gives them."""
    table = Table(title="schedules")
    for col in SCHEDULE_COLUMNS:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r.get(c)) for c in SCHEDULE_COLUMNS))
    return table


def compare_view(result: CompareResult) -> Group:
    """``adaptflow compare``: the strategy table, then the best, the advisor, the report and the run.

    The best is :func:`adaptflow.report_decision.decide`'s: a difference the test split cannot
    resolve is a tie with the baseline, and the cheaper of tied strategies is preferred.
    """
    from rich.markup import escape

    from adaptflow.report import table_rows
    from adaptflow.report_decision import advisor_headline, decide

    chosen = decide(result)
    rows = table_rows(result, chosen)
    table = Table(title=f"transfer learning vs fine-tuning: {result.data_uri}")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for row in rows[1:]:
        table.add_row(*row)
    tied = f" (tied with {', '.join(chosen.tied_with)})" if chosen.tied_with else ""
    return Group(
        table,
        markup_line(f"[bold]best[/]: {escape(f'{chosen.best}{tied}: {chosen.reason}')}"),
        markup_line(f"[bold]advisor[/]: {escape(advisor_headline(result, chosen))}"),
        markup_line(f"[bold]report[/]: {result.report_html}\n        {result.report_markdown}"),
        markup_line(f"[bold]mlflow[/]: {result.tracking_uri}  run {result.run_id}"),
    )
