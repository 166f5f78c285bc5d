"""The strategy comparison: fan-out pipeline, few-images subsample, report, MLflow runs."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml

from adaptflow.compare import CompareResult, parse_strategies
from adaptflow.config import IngestConfig, Settings, load_settings
from adaptflow.contracts import FinetuneDecision
from adaptflow.data.ingest import ingest, subsample_train
from adaptflow.errors import ConfigError
from factories import compare_result, model_score, strategy_outcome


def test_compare_pipeline_fans_out_with_parallel_for(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adaptflow.cli import app

    path = tmp_path / "compare.yaml"
    result = CliRunner().invoke(
        app, ["compile", "--compare", "-o", str(path), "--image", "example/adaptflow:t"]
    )
    assert result.exit_code == 0, result.output
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
    assert "iteratorPolicy" not in loops[0]  # a cluster runs every strategy at once


def test_the_local_compare_dag_trains_one_strategy_at_a_time(tmp_path: Path) -> None:
    from adaptflow.pipelines.compare import build_compare_pipeline
    from kfp import compiler

    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_compare_pipeline(Settings(), parallelism=1), str(path))
    tasks = next(iter(yaml.safe_load_all(path.read_text())))["root"]["dag"]["tasks"]
    (loop,) = [t for t in tasks.values() if "parameterIterator" in t]
    assert loop["iteratorPolicy"] == {"parallelismLimit": 1}


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
    assert ingest(str(tiny_assets.target), IngestConfig(train_per_class=3)) == few
    with pytest.raises(ConfigError, match=r"ingest\.train_per_class"):
        load_settings(overrides=["ingest.train_per_class=0"])


def synthetic_result() -> CompareResult:
    decision = FinetuneDecision(
        should_finetune=True,
        strategy="full",
        reason="fine-tune (full): baseline val accuracy 0.800 is below the target 0.970",
        signals={"baseline_val_accuracy": 0.8, "domain_shift": 1.23, "budget_seconds": 900.0},
    )
    return compare_result(
        strategy_outcome("baseline", 0.80, 1026, 2.0),
        strategy_outcome("partial", 0.85, 8_000_000, 20.0),
        strategy_outcome("full", 0.90, 11_000_000, 30.0),
        data_uri="/data/<digits> & co",
        decision=decision,
        references=(model_score("reference-logreg-pixels", 0.7, version=None, n=20),),
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
        "0.9000 [0.880, 0.920]",
        "11,000,000",
        "+0.100",
        "domain_shift",
        "How domain shift is measured",
    ):
        assert text in page
    assert "reference-logreg-pixels" in page and "0.7000 [0.680, 0.720]" in page  # the floor, same split
    md = md_path.read_text()
    assert "| full ★ |" in md and "![Accuracy versus cost" in md
    assert "- **backbone**: not recorded" in md  # a result saved before the field existed
    assert all((md_path.parent / "plots" / name).exists() for name in re.findall(r"\(plots/([^)]+)\)", md))
    assert CompareResult.model_validate_json(synthetic_result().model_dump_json()) == synthetic_result()


def test_report_says_whether_the_backbone_was_pretrained_or_from_scratch(tmp_path: Path) -> None:
    from adaptflow.models.weights import RANDOM_INIT, describe_backbone
    from adaptflow.report import write_report

    for sha, label in (
        (RANDOM_INIT, "resnet18, from scratch (backbone.weights=none)"),
        ("ab" * 32, "pretrained"),
    ):
        result = synthetic_result().model_copy(update={"backbone": describe_backbone("resnet18", sha)})
        html_path, md_path = write_report(result, tmp_path / sha[:6])
        assert label in md_path.read_text() and label in html_path.read_text()
