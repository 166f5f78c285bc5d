"""Broken tracking stores: a corrupt, truncated, unopenable or read-only embedded SQLite store, and an
MLflow server restarted mid-run. Each ends in one ``error:`` line with a ``hint:`` and no traceback, or
(the restart) lets the stage carry on.

The SQLite cases drive the real CLI in a subprocess, since what is checked is what reaches the terminal.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from adaptflow.errors import StoreError

ADAPTFLOW = [sys.executable, "-m", "adaptflow.cli"]


def _adaptflow(work: Path, *args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    # backbone.weights=none: these runs stop at the store, before any weights or data are needed
    argv = [*ADAPTFLOW, *args, "--set", f"workdir={work}", "--set", "backbone.weights=none"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # 60 s: MLflow alone retries opening a bad SQLite file for ~100 s before its traceback
    return subprocess.run([*(prefix or []), *argv], capture_output=True, text=True, timeout=60, env=env)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], meaning: str) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1, result.stderr[-3000:]
    assert meaning in errors[0] and "mlflow.db" in errors[0]
    return hints[0]


def _store(tmp_path: Path) -> tuple[Path, Path]:
    work = tmp_path / "work"
    (work / "data" / "a").mkdir(parents=True)  # a class folder: --data passes the check before the store's
    return work, work / "mlflow.db"


def _real_store(db: Path) -> None:
    """A store MLflow made, with a run and enough metrics to span many pages."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("x"))
    for step in range(200):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)


@pytest.mark.parametrize("command", ["run", "history"])
def test_corrupt_store_is_one_line_error_and_left_untouched(tmp_path: Path, command: str) -> None:
    work, db = _store(tmp_path)
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    args = ["run", "--data", str(work / "data")] if command == "run" else ["history"]
    hint = _assert_one_line_error(_adaptflow(work, *args), "is corrupt: file is not a database")
    assert "move the file aside" in hint and "tracking.tracking_uri" in hint
    assert db.read_bytes() == garbage  # evidence kept: nothing overwrote or replaced the file


def test_truncated_store_is_one_line_error(tmp_path: Path) -> None:
    work, db = _store(tmp_path)
    _real_store(db)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])  # a copy cut short, a full disk mid-write
    result = _adaptflow(work, "run", "--data", str(work / "data"))
    _assert_one_line_error(result, "is corrupt (truncated or damaged): database disk image is malformed")


def test_store_that_cannot_be_opened_fails_fast(tmp_path: Path) -> None:
    work, db = _store(tmp_path)
    db.mkdir()  # a folder where the file should be: SQLite cannot open it, whoever runs
    # _adaptflow's 60 s timeout fails the test if MLflow's ~100 s of open retries are not cut short (a
    # wall-clock assertion tighter than that only measured how busy the machine was)
    hint = _assert_one_line_error(_adaptflow(work, "run", "--data", str(work / "data")), "cannot be opened")
    assert "not a folder" in hint


def _read_only(db: Path) -> list[str]:
    """The command prefix under which ``db`` is read-only for the command."""
    if os.geteuid() != 0:
        db.chmod(0o444)
        return []
    # root writes through file modes; a read-only bind mount (a private mount namespace, gone when the
    # command exits) refuses root too, as a read-only volume does
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("running as root without `unshare -m` (CAP_SYS_ADMIN): no honest read-only store")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(db)]


def test_read_only_store_is_one_line_error(tmp_path: Path) -> None:
    work, db = _store(tmp_path)
    _real_store(db)
    before = db.read_bytes()
    result = _adaptflow(work, "run", "--data", str(work / "data"), prefix=_read_only(db))
    hint = _assert_one_line_error(result, "is read-only")
    assert "writable" in hint
    assert db.read_bytes() == before


# --------------------------------------------------------------------------- MLflow server restarted


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """A real ``mlflow server`` on one loopback port and one SQLite backend, stopped and started at will."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)),
            *("--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"),
            *("--default-artifact-root", (self.root / "artifacts").as_uri()),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no workers to outlive it
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the whole group: uvicorn's worker too
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    # MLflow's defaults wait ~4 minutes for a server (7 retries, backoff factor 2); read per request
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return monkeypatch


def _pipeline_run(server: MlflowServer, work: Path):  # type: ignore[no-untyped-def]
    from adaptflow.config import load_settings
    from adaptflow.tracking import start_pipeline_run

    settings = load_settings(overrides=[f"workdir={work}", f"tracking.tracking_uri={server.uri}"])
    return start_pipeline_run(settings, "restart", {"adaptflow.data_uri": "x"}, env={})


@pytest.mark.integration
def test_stage_continues_across_a_server_restart(
    mlflow_server: MlflowServer, fast_retries: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from adaptflow.tracking import end_run, stage_run

    ctx = _pipeline_run(mlflow_server, tmp_path)
    mlflow_server.stop()
    # retries after 0, 2, 4, 8, 16 s: the server (~5 s to start) is back before they run out
    fast_retries.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    restart = threading.Timer(1.0, mlflow_server.start)
    restart.start()
    try:
        with stage_run(ctx, "ingest") as run:  # its first call meets the server down
            mlflow.log_metric("images", 10)
        end_run(ctx.tracking_uri, ctx.parent_run_id)
    finally:
        restart.join()
        mlflow_server.wait_healthy()
    client = MlflowClient(mlflow_server.uri)
    child = client.get_run(run.info.run_id)
    assert child.info.status == "FINISHED" and child.data.metrics["images"] == 10
    assert child.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert client.get_run(ctx.parent_run_id).data.tags["adaptflow.data_uri"] == "x"  # backend kept


@pytest.mark.integration
def test_server_that_stays_down_fails_the_stage_cleanly(
    mlflow_server: MlflowServer, fast_retries: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from adaptflow.errors import describe_error
    from adaptflow.tracking import stage_run

    ctx = _pipeline_run(mlflow_server, tmp_path)
    mlflow_server.stop()
    fast_retries.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    entered = False
    try:
        with pytest.raises(StoreError) as info, stage_run(ctx, "baseline"):
            entered = True
    finally:
        mlflow_server.start()
        mlflow_server.wait_healthy()
    assert not entered  # the stage's work never started against a store it could not write
    message, hint = describe_error(info.value)
    assert mlflow_server.uri in message and "did not answer" in message and "\n" not in message
    assert hint and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in hint
    assert info.value.transient  # a retried task may well find the server back
