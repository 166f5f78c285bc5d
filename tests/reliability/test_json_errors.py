"""``--json`` on failure: an error object on stdout, ``{"status": "failed", "stage", "error", "hint"}``,
with the exit status a failure without ``--json`` has. ``stage`` names the pipeline stage that failed; it
is null when the command failed before any stage ran (config, weights, the tracking store).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adaptflow import cli_shared

ADAPTFLOW = [sys.executable, "-m", "adaptflow.cli"]


def _adaptflow(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*ADAPTFLOW, *args], capture_output=True, text=True, timeout=300, env=env)


def _error_object(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    record = json.loads(result.stdout)  # the whole of stdout: one JSON document, nothing else
    assert record["status"] == "failed" and set(record) == {"status", "stage", "error", "hint"}
    assert f"error: {record['error']}" in result.stderr  # the same words as for a person reading stderr
    return dict(record)


@pytest.mark.integration
def test_run_json_names_the_stage_that_failed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for label in ("a", "b"):  # class folders without images: ingest itself fails
        (data / label).mkdir(parents=True)
    result = _adaptflow(
        "run",
        "--json",
        "--data",
        str(data),
        "--set",
        f"workdir={tmp_path / 'w'}",
        "--set",
        "backbone.weights=none",
    )
    assert result.returncode == 1, result.stderr[-3000:]  # PipelineFailed's status, as without --json
    record = _error_object(result)
    assert record["stage"] == "ingest"
    assert record["error"].startswith("stage ingest failed: ")
    assert record["hint"]


def test_a_missing_data_folder_fails_before_any_stage(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = _adaptflow("run", "--json", "--data", str(missing), "--set", f"workdir={tmp_path / 'w'}")
    assert result.returncode == 1, result.stderr[-3000:]
    record = _error_object(result)
    assert record["stage"] is None and str(missing) in record["error"] and "--data" in record["hint"]


def test_json_error_before_any_stage_has_a_null_stage(tmp_path: Path) -> None:
    args = ["run", "--data", str(tmp_path), "--set", "baseline.epochs=-1", "--set", f"workdir={tmp_path}"]
    plain, as_json = _adaptflow(*args), _adaptflow(*args, "--json")
    assert plain.returncode == as_json.returncode == 2 and plain.stdout == ""
    record = _error_object(as_json)
    assert record["stage"] is None and "baseline.epochs" in record["error"]


def test_other_json_commands_print_the_error_object_too(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"not a database at all" * 100)
    result = _adaptflow("history", "--json", "--set", f"workdir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    record = _error_object(result)
    assert (
        record["stage"] is None
        and "is corrupt" in record["error"]
        and "move the file aside" in record["hint"]
    )


def test_a_bug_prints_the_error_object_and_keeps_its_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    cli_shared._remember_json(True)
    try:
        with pytest.raises(ZeroDivisionError):
            cli_shared.fail(ZeroDivisionError("division by zero"))
    finally:
        cli_shared._remember_json(False)
    record = json.loads(capsys.readouterr().out)
    assert record == {
        "status": "failed",
        "stage": None,
        "error": "ZeroDivisionError: division by zero",
        "hint": None,
    }
