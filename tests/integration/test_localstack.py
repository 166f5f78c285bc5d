"""The production-like stack: MLflow on PostgreSQL with artifacts in (moto) S3, and nothing lost
across a stop and a start. Also: unreachable stores fail with errors that name them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from adaptflow.errors import StoreError
from adaptflow.localstack import StackInfo, check_s3_reachable, stack_status
from adaptflow.tracking import check_tracking_reachable

REPO = Path(__file__).resolve().parents[2]


def _script(name: str, info: StackInfo) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_", "AWS_"))}
    env["ADAPTFLOW_STACK_ROOT"] = str(info.config.root_dir)
    env["ADAPTFLOW_PYTHON"] = sys.executable
    result = subprocess.run(
        [str(REPO / "infra" / "local" / name)], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"{name} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def _exports(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert all(line.startswith("export ") for line in lines), stdout
    return dict(line.removeprefix("export ").split("=", 1) for line in lines)


def _artifact_keys(info: StackInfo) -> list[str]:
    listing = info.s3_client().list_objects_v2(Bucket=info.artifacts_bucket, Prefix="mlflow/")
    return [item["Key"] for item in listing.get("Contents", [])]


@pytest.mark.stack
@pytest.mark.integration
def test_stack_keeps_runs_artifacts_and_registry_across_restart(
    production_stack: StackInfo, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    info = production_stack
    assert all(s.healthy for s in stack_status(info.config).values())
    client = MlflowClient(tracking_uri=info.tracking_uri)
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "accuracy", 0.875, step=3)
    note = tmp_path / "note.txt"
    note.write_text("kept across restarts\n")
    client.log_artifact(run_id, str(note), artifact_path="evidence")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00\x01weights")
    client.log_artifact(run_id, str(tmp_path / "model"))
    client.set_terminated(run_id)

    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    keys = _artifact_keys(info)
    assert any(k.endswith(f"{run_id}/artifacts/evidence/note.txt") for k in keys), keys

    name = f"stack-model-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    before = info.ports
    down = _script("stack-down", info)
    assert down.stdout == ""
    assert not any(s.running for s in stack_status(info.config).values())
    with pytest.raises(StoreError):
        check_tracking_reachable(info.tracking_uri, timeout=2.0)
    assert (info.config.snapshot_dir / "COMPLETE").is_file()

    up = _script("stack-up", info)
    exported = _exports(up.stdout)
    assert exported["MLFLOW_TRACKING_URI"] == info.tracking_uri  # ports persisted in stack.json
    assert exported["ADAPTFLOW_S3_ENDPOINT_URL"] == info.s3_endpoint_url
    assert exported["ADAPTFLOW_DATA_BUCKET"] == info.data_bucket
    assert stack_status(info.config)["mlflow"].port == before["mlflow"]

    client = MlflowClient(tracking_uri=info.tracking_uri)
    again = client.get_run(run_id)
    assert again.info.status == "FINISHED"
    assert again.data.metrics["accuracy"] == pytest.approx(0.875)
    assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == [3]
    fetched = client.download_artifacts(run_id, "evidence/note.txt", str(tmp_path / "fetched"))
    assert Path(fetched).read_text() == "kept across restarts\n"
    assert any(k.endswith(f"{run_id}/artifacts/model/weights.bin") for k in _artifact_keys(info))
    assert client.get_model_version(name, version.version).run_id == run_id
    assert client.get_model_version_by_alias(name, "champion").version == version.version


@pytest.mark.stack
@pytest.mark.integration
def test_stack_up_again_is_idempotent(production_stack: StackInfo) -> None:
    pids = {name: s.pid for name, s in stack_status(production_stack.config).items()}
    exported = _exports(_script("stack-up", production_stack).stdout)
    assert exported == production_stack.env
    assert {name: s.pid for name, s in stack_status(production_stack.config).items()} == pids


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
def test_unreachable_tracking_uri_is_a_clear_store_error() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(StoreError) as caught:
        check_tracking_reachable(uri, timeout=2.0)
    assert uri in str(caught.value)
    assert caught.value.hint and "stack-up" in caught.value.hint


@pytest.mark.integration
def test_unreachable_s3_endpoint_is_a_clear_store_error() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(StoreError) as caught:
        check_s3_reachable(endpoint, timeout=2.0)
    assert endpoint in str(caught.value)
    assert caught.value.hint and "ADAPTFLOW_S3_ENDPOINT_URL" in caught.value.hint
