"""The production-like stack: MLflow on PostgreSQL with artifacts in (moto) S3, and nothing lost
across a stop and a start; nothing left running after a stop or a failed start. Also: a stack that
cannot start, and unreachable stores, fail with errors that name them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from adaptflow import localstack
from adaptflow.errors import StoreError
from adaptflow.localstack import StackConfig, StackInfo, check_s3_reachable, stack_status, stack_up
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


def _processes_mentioning(text: str, grace_s: float = 5.0) -> list[str]:
    """Processes whose command line holds ``text``, after waiting up to ``grace_s`` for them to go."""
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if text in args:
                    found.append(f"{cmdline.parent.name}: {args}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


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

    s3 = info.s3_client()
    s3.put_object(Bucket=info.data_bucket, Key="images/cat 1/ü.png", Body=b"\x89PNG")
    s3.create_bucket(Bucket="kept-bucket")
    big = os.urandom(9 * 1024 * 1024)  # over boto3's multipart threshold
    (tmp_path / "big.bin").write_bytes(big)
    s3.upload_file(str(tmp_path / "big.bin"), "kept-bucket", "big.bin")

    before = info.ports
    pids = {name: s.pid for name, s in stack_status(info.config).items()}
    assert all(pids.values()), pids
    down = _script("stack-down", info)
    assert down.stdout == ""
    assert not any(s.running for s in stack_status(info.config).values())
    with pytest.raises(StoreError):
        check_tracking_reachable(info.tracking_uri, timeout=2.0)
    assert (info.config.snapshot_dir / "COMPLETE").is_file()
    # Nothing left: not the supervisor, not moto, not PostgreSQL, not mlflow's workers (its group).
    assert _processes_mentioning(str(info.config.root_dir)) == []
    assert not _group_alive(pids["mlflow"])

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
    s3 = info.s3_client()
    assert s3.get_object(Bucket=info.data_bucket, Key="images/cat 1/ü.png")["Body"].read() == b"\x89PNG"
    assert s3.get_object(Bucket="kept-bucket", Key="big.bin")["Body"].read() == big


@pytest.mark.stack
@pytest.mark.integration
def test_stack_up_again_is_idempotent(production_stack: StackInfo) -> None:
    pids = {name: s.pid for name, s in stack_status(production_stack.config).items()}
    exported = _exports(_script("stack-up", production_stack).stdout)
    assert exported == production_stack.env
    assert {name: s.pid for name, s in stack_status(production_stack.config).items()} == pids


@pytest.mark.stack
@pytest.mark.integration
def test_stack_up_on_other_ports_while_running_is_refused(production_stack: StackInfo) -> None:
    moved = dataclasses.replace(production_stack.config, mlflow_port=_closed_port())
    with pytest.raises(StoreError) as caught:
        stack_up(moved)
    assert "runs on ports" in str(caught.value)
    assert caught.value.hint and "stack-down" in caught.value.hint
    assert all(s.healthy for s in stack_status(production_stack.config).values())


# slow (make test-all): an operator's manual restart; the stack's own restart runs in CI
@pytest.mark.slow
@pytest.mark.stack
@pytest.mark.integration
def test_a_moto_restarted_by_hand_never_replaces_the_s3_snapshot(stack_folder: Path) -> None:
    cfg = StackConfig(root=stack_folder / "stack", startup_timeout_s=120.0)
    info = stack_up(cfg)
    info.s3_client().put_object(Bucket=info.data_bucket, Key="kept.txt", Body=b"kept")
    localstack.stack_down(cfg)
    info = stack_up(cfg)  # restores kept.txt
    sup, _ = localstack._supervisor(cfg)
    sup.stopProcess("s3")
    sup.startProcess("s3")  # a new, empty moto that stack_up did not restore
    assert info.s3_client().list_buckets()["Buckets"] == []  # what a snapshot of it would hold
    localstack.stack_down(cfg)
    info = stack_up(cfg)
    try:
        assert info.s3_client().get_object(Bucket=info.data_bucket, Key="kept.txt")["Body"].read() == b"kept"
    finally:
        localstack.stack_down(cfg)


@pytest.mark.stack
@pytest.mark.integration
def test_taken_port_is_a_clear_error_and_starts_nothing(stack_folder: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = StackConfig(root=stack_folder / "stack", mlflow_port=port)
        with pytest.raises(StoreError) as caught:
            stack_up(cfg)
    assert f"port {port} for mlflow is taken" in str(caught.value)
    assert caught.value.hint and "--mlflow-port" in caught.value.hint
    assert not (cfg.root_dir / "stack.json").exists()  # so the next start picks its ports afresh
    assert _processes_mentioning(str(cfg.root_dir)) == []


@pytest.mark.stack
@pytest.mark.integration
def test_service_that_cannot_start_is_named_and_everything_is_stopped(stack_folder: Path) -> None:
    python = stack_folder / "python"  # the real interpreter, except that `mlflow server` fails
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in *"mlflow server"*) echo "mlflow: cannot start (test)" >&2; exit 3;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    cfg = StackConfig(root=stack_folder / "stack", python=str(python), startup_timeout_s=60.0)
    with pytest.raises(StoreError) as caught:
        stack_up(cfg)
    assert "mlflow did not become healthy" in str(caught.value)
    assert caught.value.hint and "mlflow: cannot start (test)" in caught.value.hint
    assert str(cfg.log_path("mlflow")) in caught.value.hint
    assert not any(s.running for s in stack_status(cfg).values())
    assert _processes_mentioning(str(cfg.root_dir)) == []


@pytest.mark.integration
def test_a_child_that_dies_before_supervisord_sees_it_up_is_named_with_its_log(tmp_path: Path) -> None:
    """Under load supervisord answers startProcess with SPAWN_ERROR instead of a later FATAL state."""
    import xmlrpc.client

    cfg = StackConfig(root=tmp_path / "stack")
    cfg.log_path("mlflow").parent.mkdir(parents=True)
    states = iter(["BACKOFF", "FATAL"])

    class Supervisor:
        def startProcess(self, name: str, wait: bool) -> None:
            cfg.log_path(name).write_text("mlflow: cannot start (test)\n")
            raise xmlrpc.client.Fault(50, f"SPAWN_ERROR: {name}")

        def getProcessInfo(self, name: str) -> dict[str, str]:
            return {"statename": next(states)}

    with pytest.raises(StoreError) as caught:
        localstack._start_program(Supervisor(), "mlflow", cfg, time.monotonic() + 5)
    assert "mlflow did not become healthy (supervisord: SPAWN_ERROR: mlflow)" in str(caught.value)
    assert caught.value.hint and "mlflow: cannot start (test)" in caught.value.hint


@pytest.mark.integration
def test_missing_postgresql_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(localstack, "find_pg_bin_dir", lambda preferred=None: None)
    with pytest.raises(StoreError) as caught:
        stack_up(StackConfig(root=tmp_path / "stack"))
    assert "PostgreSQL" in str(caught.value)
    assert caught.value.hint and "apt-get install postgresql" in caught.value.hint


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
