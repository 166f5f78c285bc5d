"""The CLI's terminal views: each builder rendered to text, the facts it must show checked."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console, RenderableType

from adaptflow import render
from factories import compare_result, strategy_outcome

SUMMARY: dict[str, Any] = {
    "status": "completed",
    "dataset": {
        "source": "/data/digits",
        "fingerprint": "0123456789abcdef" + "f" * 48,
        "counts": {"train": 70, "val": 15, "test": 20},
        "quarantined": [{"uri": "/data/digits/5/bad.png"}, {"uri": "/data/digits/6/empty.png"}],
    },
    "backbone": {"name": "resnet18", "init": "pretrained", "sha256": "ab" * 32},
    "baseline": {"metrics": {"accuracy": 0.8125, "accuracy_ci95": [0.71, 0.9], "macro_f1": 0.8}},
    "reference": {
        "name": "reference-logreg-pixels",
        "accuracy": 0.75,
        "accuracy_ci95": [0.6, 0.9],
        "scores": {"reference-logreg-pixels": 0.75, "reference-majority": 0.25},
    },
    "advisor": {"reason": "fine-tune (partial): baseline val accuracy 0.800 is below the target 0.970"},
    "finetune": {
        "ran": True,
        "strategy": "partial",
        "metrics": {"accuracy": 0.9375, "accuracy_ci95": [0.88, 0.99], "macro_f1": 0.93},
    },
    "winner": "finetune",
    "winner_reason": "finetune beats the baseline by +0.1250",
    "champion_before": "3",
    "champion_before_accuracy": 0.9,
    "model_uri": "models:/digits/4",
    "promoted": True,
    "gate": {
        "promote": True,
        "reasons": ["accuracy 0.9375 >= min_accuracy 0.5000", "beats champion v3 by +0.0375"],
    },
    "onnx": {"max_abs_diff": 3.2e-6, "tolerance": 1e-4, "latency_ms_p50": 1.234},
    "mlflow": {"tracking_uri": "sqlite:///state/mlflow.db", "run_id": "run-abc"},
    "stage_seconds": {"ingest": 1.04, "baseline": 12.36},
}
UNCHANGED: dict[str, Any] = {
    "status": "unchanged",
    "reason": "unchanged: data fingerprint 0123456789ab and config hash 9876 equal those of the champion v2",
    "champion_before": "2",
    "mlflow": {"tracking_uri": "sqlite:///state/mlflow.db", "run_id": "run-def"},
}
HISTORY: list[dict[str, Any]] = [
    {
        "time": 0.0,
        "action": "promote",
        "previous_champion": None,
        "new_champion": "1",
        "metrics": {"accuracy": 0.91234},
        "reason": "no champion yet",
    },
    {
        "time": 86_400.0 + 3_661.0,
        "action": "rollback",
        "previous_champion": "2",
        "new_champion": "1",
        "metrics": {},
        "reason": "bad labels in v2 " + "x" * 200,
    },
]
PREDICTIONS: list[dict[str, Any]] = [
    {"path": "img/a.png", "label": "7", "confidence": 0.98765, "error": None},
    {"path": "img/broken.png", "label": None, "confidence": None, "error": "cannot decode image"},
]
SCHEDULES: list[dict[str, Any]] = [
    {
        "recurring_run_id": "rr-1",
        "name": "adaptflow-retrain",
        "cron": "0 0 3 * * 1",
        "enabled": True,
        "max_concurrency": 1,
        "no_catchup": False,
    }
]


def text_of(renderable: RenderableType, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def rows_of(text: str) -> list[str]:
    """The table's lines with the box drawing dropped and the cells joined by single spaces."""
    cleaned = [
        "".join(" " if c in "│┃┏┓┗┛┡┩└┘━─┳┻╇╈┼┬┴╭╮╰╯" else c for c in line) for line in text.splitlines()
    ]
    return [" ".join(line.split()) for line in cleaned if line.strip()]


def test_summary_shows_winner_gate_and_promotion() -> None:
    text = text_of(render.summary_table(SUMMARY))
    lines = rows_of(text)
    assert "adaptflow run" in lines[0]
    assert "winner finetune: finetune beats the baseline by +0.1250" in lines
    assert "gate PROMOTED to champion" in lines
    assert "- accuracy 0.9375 >= min_accuracy 0.5000" in lines and "- beats champion v3 by +0.0375" in lines
    assert "finetune (partial) test accuracy 0.9375 CI95 0.880-0.990 macro-F1 0.9300" in lines
    assert "baseline (transfer) test accuracy 0.8125 CI95 0.710-0.900 macro-F1 0.8000" in lines
    assert "champion before v3 (0.9000)" in lines
    assert "fingerprint 0123456789abcdef counts {'train': 70, 'val': 15, 'test': 20} quarantined 2" in lines
    assert "onnx max |ort - torch| 3.20e-06 (tol 1e-04), p50 1.23 ms" in lines
    assert "mlflow sqlite:///state/mlflow.db run run-abc" in lines
    assert "stage seconds ingest 1.0 baseline 12.4" in lines
    assert "backbone resnet18, pretrained" in lines
    assert "references (pixels) test accuracy logreg-pixels 0.7500 majority 0.2500" in lines


def test_a_backbone_trained_from_scratch_says_so() -> None:
    scratch = SUMMARY | {"backbone": {"name": "resnet18", "init": "from scratch", "sha256": "random-init"}}
    assert "backbone resnet18, from scratch (backbone.weights=none)" in rows_of(
        text_of(render.summary_table(scratch))
    )


def test_summary_of_a_baseline_run_that_was_not_promoted() -> None:
    s = SUMMARY | {
        "finetune": {"ran": False, "strategy": None, "metrics": None},
        "promoted": False,
        "champion_before": None,
        "champion_before_accuracy": None,
        "stage_seconds": {},
    }
    lines = rows_of(text_of(render.summary_table(s)))
    assert "gate not promoted" in lines and not any("PROMOTED" in line for line in lines)
    assert "champion before none" in lines
    assert not any(line.startswith(("finetune", "stage seconds")) for line in lines)


def test_unchanged_says_why_and_names_the_champion() -> None:
    text = text_of(render.unchanged_text(UNCHANGED))
    reason = UNCHANGED["reason"].removeprefix("unchanged: ")  # said once, not "unchanged: unchanged: ..."
    assert text == f"unchanged: {reason}\nchampion: v2  this run: run-def\n"


def test_run_view_picks_the_summary_or_the_unchanged_line() -> None:
    assert isinstance(render.run_view(SUMMARY), type(render.summary_table(SUMMARY)))
    assert text_of(render.run_view(UNCHANGED)) == text_of(render.unchanged_text(UNCHANGED))


def test_history_lists_actions_versions_and_labelled_utc_times_with_whole_reasons() -> None:
    text = text_of(render.history_table(HISTORY, "digits"), width=400)
    lines = rows_of(text)
    assert lines[0] == "champion history of digits"
    assert lines[1] == "time (UTC) action from to accuracy by reason"
    assert lines[2] == "1970-01-01 00:00:00 promote - v1 0.9123 no champion yet"
    rollback = next(line for line in lines if "rollback" in line)
    assert rollback.startswith("1970-01-02 01:01:01 rollback v2 v1 bad labels in v2 x")
    assert rollback.endswith("x" * 200)  # the whole reason, not cut mid-phrase
    narrow = text_of(render.history_table(HISTORY, "digits"), width=100)
    assert narrow.count("x") >= 200  # a narrow terminal folds the reason onto more lines


def test_predictions_show_labels_confidence_and_errors() -> None:
    lines = rows_of(text_of(render.predictions_table(PREDICTIONS, "")))
    assert lines[0] == "predictions (champion)"
    assert "img/a.png 7 0.988" in lines
    assert "img/broken.png cannot decode image" in lines
    assert (
        rows_of(text_of(render.predictions_table(PREDICTIONS, "models:/m/3")))[0]
        == "predictions (models:/m/3)"
    )


def test_predictions_csv_keeps_the_csv_module_format() -> None:
    assert render.predictions_csv(PREDICTIONS) == (
        "path,label,confidence,error\r\nimg/a.png,7,0.98765,\r\nimg/broken.png,,,cannot decode image\r\n"
    )


def test_schedules_table_has_one_row_per_schedule() -> None:
    lines = rows_of(text_of(render.schedules_table(SCHEDULES)))
    assert lines[0] == "schedules"
    assert lines[1] == "recurring_run_id name cron enabled max_concurrency no_catchup"
    assert lines[2] == "rr-1 adaptflow-retrain 0 0 3 * * 1 True 1 False"
    assert len(lines) == 3


def test_compare_view_shows_the_table_best_advisor_report_and_run() -> None:
    result = compare_result(
        strategy_outcome("baseline", 0.8, trainable_params=1026),
        strategy_outcome("partial", 0.9),
        tracking_uri="sqlite:///state/mlflow.db",
        run_id="run-xyz",
        report_html="/out/report.html",
        report_markdown="/out/report.md",
    )
    lines = rows_of(text_of(render.compare_view(result), width=250))
    assert lines[0] == "transfer learning vs fine-tuning: /data/digits"
    assert lines[1].startswith("strategy test accuracy [95% CI] macro-F1")
    assert lines[2].startswith("baseline 0.8000 [0.780, 0.820]")
    assert lines[3].startswith("partial ★ 0.9000 [0.880, 0.920]")
    assert lines[4:] == [
        "best: partial: partial beats the baseline by +0.1000",
        "advisor: advisor predicted full (not compared here): this is the advisor's prediction from its "
        "signals, made before any strategy was trained, not a measured result. Among the strategies "
        "compared (baseline, partial) the measured best is partial.",
        "report: /out/report.html",
        "/out/report.md",
        "mlflow: sqlite:///state/mlflow.db run run-xyz",
    ]


@pytest.mark.parametrize(
    "markup", ["[yellow]unchanged[/]: v2 run 1f2e /tmp/x 0.5 True", "[bold]best[/]: partial: +0.1000"]
)
def test_markup_line_looks_like_console_print_of_the_string(markup: str) -> None:
    """Same styles as printing the string itself (markup, then the console's repr highlighting)."""

    def ansi(renderable: RenderableType) -> str:
        console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=120)
        console.print(renderable)
        return console.file.getvalue()  # type: ignore[attr-defined]

    styled = ansi(render.markup_line(markup))
    assert styled == ansi(markup)
    assert "\x1b[" in styled  # styled at all: the comparison above is not between two plain strings
