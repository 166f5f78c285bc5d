"""The strategy comparison: fan-out pipeline, few-images subsample, report, MLflow runs."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml

from adaptflow.compare import (
    CompareResult,
    StrategyOutcome,
    parse_strategies,
    run_compare,
    subsample_train,
)
from adaptflow.config import Settings, load_settings
from adaptflow.contracts import EpochRecord, FinetuneDecision, ModelScore
from adaptflow.data.ingest import ingest
from adaptflow.errors import ConfigError


def test_compare_pipeline_fans_out_with_parallel_for(tmp_path: Path) -> None:
    from adaptflow.pipelines.compare import compile_compare_pipeline

    path = compile_compare_pipeline(Settings(), tmp_path / "compare.yaml", image="example/adaptflow:test")
    spec = next(iter(yaml.safe_load_all(path.read_text())))
    tasks = spec["root"]["dag"]["tasks"]
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    assert len(loops) == 1
    assert loops[0]["parameterIterator"]["items"]["inputParameter"].endswith("strategies")
    loop_dag = spec["components"][loops[0]["componentRef"]["name"]]["dag"]["tasks"]
    assert "compare-strategy" in loop_dag
    assert spec["root"]["inputDefinitions"]["parameters"]["strategies"]["parameterType"] == "LIST"
    report = tasks["compare-report"]
    assert "outcomes" in report["inputs"]["artifacts"]  # dsl.Collected over the loop's outputs


def test_parse_strategies() -> None:
    assert parse_strategies("partial, full,partial,baseline") == ["partial", "full"]
    assert parse_strategies(["scratch"]) == ["scratch"]
    with pytest.raises(ConfigError, match="unknown strategy 'fulll'"):
        parse_strategies("fulll")


def test_few_images_subsample_is_deterministic_and_keeps_val_and_test(tiny_assets) -> None:  # type: ignore[no-untyped-def]
    snapshot = ingest(str(tiny_assets.target), Settings().ingest)
    few = subsample_train(snapshot, 3)
    assert few.class_counts["train"] == dict.fromkeys(snapshot.class_names, 3)
    assert few.split("val") == snapshot.split("val") and few.split("test") == snapshot.split("test")
    assert subsample_train(snapshot, 3) == few and few.fingerprint != snapshot.fingerprint
    assert {e.sha256 for e in few.split("train")} < {e.sha256 for e in snapshot.split("train")}
    with pytest.raises(ConfigError):
        subsample_train(snapshot, 0)


def _outcome(strategy: str, acc: float, params: int, seconds: float) -> StrategyOutcome:
    score = ModelScore(
        name=strategy,
        kind="candidate",
        accuracy=acc,
        accuracy_ci95=(acc - 0.05, min(acc + 0.05, 1.0)),
        macro_f1=acc - 0.01,
        per_class_precision={},
        per_class_recall={},
        confusion_matrix=[[8, 2], [1, 9]],
        n=20,
    )
    history = tuple(
        EpochRecord(
            epoch=e,
            train_loss=1 / e,
            train_accuracy=min(1.0, acc + 0.05 * e),
            val_loss=1 / e,
            val_accuracy=acc,
            seconds=1.0,
        )
        for e in (1, 2, 3)
    )
    return StrategyOutcome(
        strategy=strategy,
        candidate=strategy,
        score=score,
        trainable_params=params,
        total_params=11_000_000,
        wall_seconds=seconds,
        images_per_second=100.0,
        peak_memory_mb=900.0,
        train_accuracy=acc + 0.1,
        val_accuracy=acc,
        train_val_gap=0.1,
        best_epoch=2,
        epochs_run=3,
        history=history,
        p_value_vs_baseline=None if strategy == "baseline" else 0.03,
    )


def synthetic_result() -> CompareResult:
    return CompareResult(
        data_uri="/data/<digits> & co",
        fingerprint="ab" * 32,
        class_names=("cat", "dog"),
        counts={"train": 60, "val": 20, "test": 20},
        min_train_images_per_class=30,
        test_size=20,
        decision=FinetuneDecision(
            should_finetune=True,
            strategy="full",
            reason="fine-tune (full): baseline val accuracy 0.800 is below the target 0.970",
            signals={"baseline_val_accuracy": 0.8, "domain_shift": 1.23, "budget_seconds": 900.0},
        ),
        outcomes=(
            _outcome("baseline", 0.80, 1026, 2.0),
            _outcome("partial", 0.85, 8_000_000, 20.0),
            _outcome("full", 0.90, 11_000_000, 30.0),
        ),
        best="full",
        best_reason="full beats the transfer-learning baseline by +0.1000",
        finetune_margin=0.01,
        epochs=3,
        device="cpu",
    )


def test_report_is_self_contained_html_and_markdown(tmp_path: Path) -> None:
    from adaptflow.report import write_report

    html_path, md_path = write_report(synthetic_result(), tmp_path / "report")
    page = html_path.read_text()
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert len(images) == 3 and all(alt for _, alt in images)
    for data, _ in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;digits&gt; &amp; co" in page  # escaped
    for text in (
        "0.9000 [0.850, 0.950]",
        "11,000,000",
        "+0.100",
        "domain_shift",
        "How domain shift is measured",
    ):
        assert text in page
    md = md_path.read_text()
    assert "| full ★ |" in md and "![Accuracy versus cost" in md
    assert all((md_path.parent / "plots" / name).exists() for name in re.findall(r"\(plots/([^)]+)\)", md))
    assert CompareResult.model_validate_json(synthetic_result().model_dump_json()) == synthetic_result()


def test_run_compare_scores_every_strategy_on_one_split_and_logs_nested_runs(
    tiny_assets, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    settings = load_settings(
        overrides=[*tiny_assets.overrides(tmp_path / "work"), "finetune.epochs=1", "baseline.epochs=10"]
    )
    result = run_compare(str(tiny_assets.target), settings, ["linear_probe", "scratch"], tmp_path / "out")
    assert [o.strategy for o in result.outcomes] == ["baseline", "linear_probe", "scratch"]
    assert len({o.score.n for o in result.outcomes}) == 1 and result.test_size == result.outcomes[0].score.n
    scratch = result.outcome("scratch")
    assert scratch.trainable_params == scratch.total_params and scratch.p_value_vs_baseline is not None
    assert result.outcome("linear_probe").trainable_params == result.outcome("baseline").trainable_params
    assert CompareResult.load(tmp_path / "out") == result
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.run_name == "compare" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == [
        "baseline",
        "compare-linear_probe",
        "compare-scratch",
    ]
    assert all("test_accuracy" in r.data.metrics for r in children)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= artifacts
