"""The whole DAG through kfp.local, driven by the real CLI, checked from the outside."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

ADAPTFLOW = [sys.executable, "-m", "adaptflow.cli"]
REPO = Path(__file__).resolve().parents[2]


def adaptflow(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_"))}
    result = subprocess.run(
        [*ADAPTFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"adaptflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    return result


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def three_runs(tiny_assets, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Three runs on the same data (one corrupt and one empty file added).

    The first promotes; the second (--force) retrains and must not promote an equal model;
    the third sees nothing changed and skips training.
    """
    work = tmp_path_factory.mktemp("pipeline")
    data = work / "data"
    shutil.copytree(tiny_assets.target, data)
    good = next((data / "5").glob("*.png")).read_bytes()
    (data / "5" / "corrupt.png").write_bytes(good[:40])
    (data / "6" / "zero.png").write_bytes(b"")
    overrides = [
        *tiny_assets.overrides(work / "state"),
        "baseline.advisor.force=true",
        "finetune.strategy=partial",
    ]
    run = ["run", "--data", str(data), *sets(overrides), "--json"]
    runs = [json.loads(adaptflow(*args, cwd=work).stdout) for args in (run, [*run, "--force"], run)]
    return work, data, overrides, runs


def test_first_run_registers_and_promotes(three_runs) -> None:  # type: ignore[no-untyped-def]
    _work, _data, _overrides, (first, _, _) = three_runs
    assert first["dataset"]["fingerprint"] and len(first["dataset"]["fingerprint"]) == 64
    assert set(first["dataset"]["counts"]) == {"train", "val", "test"}
    quarantined = {Path(q["uri"]).name for q in first["dataset"]["quarantined"]}
    assert quarantined == {"corrupt.png", "zero.png"}
    # the baseline's test accuracy: a count of the test images over their number, and far above chance
    # (1/5): the tiny frozen-backbone baseline scores ~0.96 on these digits
    baseline_accuracy, n_test = first["baseline"]["metrics"]["accuracy"], first["dataset"]["counts"]["test"]
    assert baseline_accuracy * n_test == pytest.approx(round(baseline_accuracy * n_test), abs=1e-6)
    assert baseline_accuracy >= 0.8
    assert first["finetune"]["ran"] is True and first["finetune"]["metrics"]["accuracy"] is not None
    assert "forced" in first["finetune"]["reason"]
    assert first["champion_before"] is None
    assert first["registered_version"] == "1" and first["promoted"] is True
    assert any("absolute thresholds" in r or "no champion" in r for r in first["gate"]["reasons"])
    assert first["onnx"]["max_abs_diff"] <= first["onnx"]["tolerance"]
    assert first["mlflow"]["tracking_uri"].startswith("sqlite:///")
    assert set(first["stage_seconds"]) >= {"ingest", "baseline", "finetune", "evaluate", "export", "register"}


def test_second_run_on_same_data_does_not_promote_and_says_why(three_runs) -> None:  # type: ignore[no-untyped-def]
    _, _, _, (first, second, _) = three_runs
    assert second["dataset"]["fingerprint"] == first["dataset"]["fingerprint"]
    assert second["champion_before"] == "1"
    assert second["registered_version"] == "2"
    assert second["promoted"] is False
    assert any("not better than champion v1" in r for r in second["gate"]["reasons"])
    assert second["champion_before_accuracy"] is not None


def test_registry_seen_by_a_separate_client(three_runs) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    _, _, _, (first, second, third) = three_runs
    client = MlflowClient(first["mlflow"]["tracking_uri"])
    name = first["mlflow"]["model_name"]
    assert client.get_run(third["mlflow"]["run_id"]).info.run_name == f"{name}: unchanged"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    v1, v2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    # the components ran from this checkout with ADAPTFLOW_GIT_COMMIT unset: they record its HEAD
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    head = rev.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head), f"run these tests from a git checkout: {rev.stderr}"
    for mv in (v1, v2):
        assert mv.tags["adaptflow.data_fingerprint"] == first["dataset"]["fingerprint"]
        assert mv.tags["adaptflow.strategy"] in {"transfer", "partial"}
        assert (
            mv.tags["adaptflow.backbone_init"] == "pretrained" == first["backbone"]["init"]
        )  # the demo mirror
        assert mv.tags["adaptflow.git_commit"] == head
        assert mv.tags["adaptflow.pipeline_run_id"] in {first["mlflow"]["run_id"], second["mlflow"]["run_id"]}
        assert mv.tags["adaptflow.kfp.run_id"]  # kfp.local's pipeline job id
        assert mv.tags["adaptflow.kfp.pipeline_name"] == "adaptflow"
    for mv, run in ((v1, first), (v2, second)):  # each version carries its own run's winner's test accuracy
        winner = run["baseline"] if run["winner"] == "baseline" else run["finetune"]
        assert mv.tags["adaptflow.candidate"] == run["winner"]
        assert float(mv.tags["adaptflow.metrics.test_accuracy"]) == pytest.approx(
            winner["metrics"]["accuracy"], abs=1e-6
        )
    assert v1.tags["adaptflow.gate.decision"] == "promoted"
    assert v2.tags["adaptflow.gate.decision"] == "rejected"
    # each version describes itself: a model card; the audit record is an artifact it links to, not a tag
    assert v1.description.startswith("## v1: ") and "### Gate: **promoted to champion**" in v1.description
    assert (
        f"`{first['dataset']['source']}`" in v1.description and "| baseline (candidate) |" in v1.description
    )
    assert "audit/champion_audit.jsonl" in v1.description
    assert "### Gate: **not promoted**" in v2.description and "not better than champion" in v2.description
    assert not [v for mv in (v1, v2) for v in mv.tags.values() if v.startswith("{")]  # no JSON blobs
    assert "not better than champion" in v2.tags["adaptflow.gate.reasons"]
    # one parent run per pipeline run, one nested run per stage
    parent = client.get_run(first["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    # readable in MLflow's own UI: a training experiment, runs named by outcome, stable metric keys
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name == f"{name}: promoted v1"
    assert client.get_run(second["mlflow"]["run_id"]).info.run_name == f"{name}: not promoted (v2)"
    winner = first["baseline"] if first["winner"] == "baseline" else first["finetune"]
    assert parent.data.metrics["test_accuracy"] == pytest.approx(winner["metrics"]["accuracy"])
    assert parent.data.metrics["baseline_test_accuracy"] == pytest.approx(
        first["baseline"]["metrics"]["accuracy"]
    )
    assert {"macro_f1", "wall_seconds", "reference_test_accuracy"} <= set(parent.data.metrics)
    second_metrics = client.get_run(second["mlflow"]["run_id"]).data.metrics
    assert second_metrics["champion_test_accuracy"] > 0  # the champion it was compared against
    (dataset,) = [d.dataset for d in parent.inputs.dataset_inputs]
    assert dataset.digest == first["dataset"]["fingerprint"][:36]
    assert json.loads(dataset.source)["uri"] == first["dataset"]["source"]
    assert json.loads(dataset.profile)["counts"] == first["dataset"]["counts"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {c.info.run_name for c in children} == {
        "ingest",
        "baseline",
        "finetune",
        "evaluate",
        "export",
        "register",
    }
    evaluate = next(c for c in children if c.info.run_name == "evaluate")
    artifacts = [a.path for a in client.list_artifacts(evaluate.info.run_id, "confusion_matrices")]
    assert any(p.endswith(".png") for p in artifacts)
    baseline = next(c for c in children if c.info.run_name == "baseline")
    assert "learning_curves.png" in [a.path for a in client.list_artifacts(baseline.info.run_id)]
    assert "baseline.epochs" in baseline.data.params


def test_registered_onnx_classifies_test_images(three_runs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import mlflow

    from adaptflow.config import load_settings
    from adaptflow.contracts import Snapshot
    from adaptflow.data.images import load_tensor_batch
    from adaptflow.data.ingest import ingest
    from adaptflow.onnx_model import load_onnx_classifier
    from adaptflow.registry import download_onnx

    _work, data, _overrides, (first, _, _) = three_runs
    mlflow.set_tracking_uri(first["mlflow"]["tracking_uri"])
    model = load_onnx_classifier(download_onnx(f"models:/{first['mlflow']['model_name']}@champion", tmp_path))
    snapshot: Snapshot = ingest(str(data), load_settings().ingest)
    test = snapshot.split("test")
    logits = model.logits(load_tensor_batch([e.uri for e in test], model.preprocessing).numpy())
    predicted = [model.class_names[i] for i in np.argmax(logits, axis=1)]
    accuracy = float(np.mean([p == e.label for p, e in zip(predicted, test, strict=True)]))
    assert accuracy == pytest.approx(
        first["finetune"]["metrics"]["accuracy"]
        if first["winner"] != "baseline"
        else first["baseline"]["metrics"]["accuracy"],
        abs=1e-6,
    )


def test_predict_and_history_commands(three_runs) -> None:  # type: ignore[no-untyped-def]
    work, data, _overrides, (_first, _, _) = three_runs
    state = [f"workdir={work / 'state'}"]
    out = adaptflow("predict", str(data / "7"), "--json", *sets(state), cwd=work)
    rows = json.loads(out.stdout)
    assert len(rows) == len(list((data / "7").glob("*.png")))
    assert all(r["label"] in {"5", "6", "7", "8", "9"} for r in rows)
    assert sum(r["label"] == "7" for r in rows) / len(rows) > 0.3
    history = json.loads(adaptflow("history", "--json", *sets(state), cwd=work).stdout)
    assert [h["action"] for h in history] == ["promote"] and history[0]["new_champion"] == "1"
    missing = adaptflow(
        "predict",
        str(data / "7"),
        "--model",
        "models:/no-such-model@champion",
        *sets(state),
        cwd=work,
        check=False,
    )
    assert missing.returncode == 1 and "no-such-model" in missing.stderr
    # a broken file among good ones: the good ones are classified, the run fails naming the file
    mixed = work / "mixed"
    mixed.mkdir(exist_ok=True)
    shutil.copy(next((data / "7").glob("*.png")), mixed / "good.png")
    (mixed / "broken.png").write_bytes(b"not an image")
    partial = adaptflow("predict", str(mixed), "--format", "csv", *sets(state), cwd=work, check=False)
    assert partial.returncode == 1, partial.stderr
    assert "good.png" in partial.stdout and "broken.png" in partial.stdout
    errors = [line for line in partial.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "broken.png: not an image format PIL can read" in errors[0], partial.stderr
    assert "BytesIO" not in partial.stdout + partial.stderr
    wrong = adaptflow("predict", str(mixed), "--format", "yaml", *sets(state), cwd=work, check=False)
    assert wrong.returncode == 2 and "error: Invalid value for '--format': 'yaml'" in wrong.stderr


# slow (make test-all): a whole pipeline run; the advisor's decision has unit tests (test_advisor_strategy.py, test_training.py)
@pytest.mark.slow
def test_else_branch_keeps_the_baseline(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    overrides = [*tiny_assets.overrides(tmp_path / "state"), "baseline.advisor.force=false"]
    summary = json.loads(
        adaptflow("run", "--data", str(tiny_assets.target), *sets(overrides), "--json", cwd=tmp_path).stdout
    )
    assert summary["finetune"]["ran"] is False
    assert summary["finetune"]["metrics"] is None
    assert summary["winner"] == "baseline"
    assert summary["promoted"] is True
    assert "finetune" not in summary["stage_seconds"]


def test_unknown_config_key_fails_before_any_work(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = adaptflow(
        "run",
        "--data",
        str(tiny_assets.target),
        "--set",
        "gate.min_delt=0.1",
        "--set",
        f"workdir={tmp_path / 'state'}",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "gate.min_delt: unknown key" in result.stderr
    assert not (tmp_path / "state").exists()


def test_bad_data_fails_with_the_stage_and_reason(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    shutil.copytree(tiny_assets.target, data)
    (data / "empty-class").mkdir()
    result = adaptflow(
        "run",
        "--data",
        str(data),
        *sets(tiny_assets.overrides(tmp_path / "state")),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1
    assert "stage ingest failed" in result.stderr and "empty-class" in result.stderr
    assert "hint:" in result.stderr


def test_compiled_pipeline_holds_the_condition_and_oneof(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yaml"
    adaptflow("compile", "-o", str(out), "--image", "registry.example/adaptflow:1.2.3", cwd=tmp_path)
    ir = next(yaml.safe_load_all(out.read_text()))  # the second document is the Kubernetes platform spec
    dags = [ir["root"]["dag"], *(c["dag"] for c in ir["components"].values() if "dag" in c)]
    tasks = {name: t for dag in dags for name, t in dag["tasks"].items()}
    assert {"ingest", "baseline", "finetune", "keep-baseline", "evaluate", "export", "register"} <= set(tasks)
    conditions = [t["triggerPolicy"]["condition"] for t in tasks.values() if "triggerPolicy" in t]
    assert any("should_finetune" in c and "== true" in c for c in conditions)
    assert any("should_finetune" in c and c.startswith("!") for c in conditions)  # the Else branch
    oneof = [spec for dag in dags for spec in dag.get("outputs", {}).get("artifacts", {}).values()]
    assert any(len(spec["artifactSelectors"]) == 2 for spec in oneof)  # dsl.OneOf(finetune, keep_baseline)
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/adaptflow:1.2.3"}
    for executor in ir["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"]["command"])  # image already holds kfp


def test_third_run_on_unchanged_data_skips_training(three_runs) -> None:  # type: ignore[no-untyped-def]
    _, _, _, (first, _, third) = three_runs
    assert third["status"] == "unchanged"
    assert "unchanged" in third["reason"] and "--force" in third["reason"]
    assert third["registered_version"] is None and third["promoted"] is False
    assert list(third["stage_seconds"]) == ["ingest"]  # no training stage ran
    assert third["dataset"]["fingerprint"] == first["dataset"]["fingerprint"]


def _versions(work: Path, model: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    from adaptflow.tracking import embedded_tracking_uri

    client = MlflowClient(embedded_tracking_uri(work / "state"))
    return {str(v.version) for v in client.search_model_versions(f"name='{model}'")}


# slow (make test-all): a whole run; the parity gate is unit-tested (test_evaluate_export_registry)
@pytest.mark.slow
def test_parity_failure_registers_nothing_and_moves_no_alias(three_runs) -> None:  # type: ignore[no-untyped-def]
    from adaptflow.registry import CHALLENGER, get_champion
    from adaptflow.tracking import embedded_tracking_uri

    work, data, overrides, (first, *_) = three_runs
    model = first["mlflow"]["model_name"]
    uri = embedded_tracking_uri(work / "state")
    before = (_versions(work, model), get_champion(uri, model), get_champion(uri, model, CHALLENGER))
    # no retries: a parity failure is deterministic (retrying it is issue 11's to stop)
    failing = [*overrides, "export.tolerance=1e-12", "cluster.retry.num_retries=0"]
    result = adaptflow("run", "--data", str(data), *sets(failing), "--force", cwd=work, check=False)
    assert result.returncode != 0
    assert "stage export failed" in result.stderr and "tolerance 1e-12" in result.stderr
    after = (_versions(work, model), get_champion(uri, model), get_champion(uri, model, CHALLENGER))
    assert after == before


# slow (make test-all): a whole pipeline run; labels in the fingerprint and the cache key are unit-tested
@pytest.mark.slow
def test_relabelling_one_file_is_new_data(three_runs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Same bytes, one label changed: a new fingerprint, so the run trains instead of saying unchanged."""
    work, data, overrides, (first, *_) = three_runs
    relabelled = tmp_path / "data"
    shutil.copytree(data, relabelled)
    moved = sorted((relabelled / "5").glob("*.png"))[0]
    moved.rename(relabelled / "6" / moved.name)
    summary = json.loads(
        adaptflow("run", "--data", str(relabelled), *sets(overrides), "--json", cwd=work).stdout
    )
    assert summary["status"] == "completed"
    assert summary["dataset"]["fingerprint"] != first["dataset"]["fingerprint"]
    assert summary["registered_version"] is not None and "baseline" in summary["stage_seconds"]
