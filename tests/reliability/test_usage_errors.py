"""Common mistakes on the command line: one ``error:`` line, one ``hint:`` line, no traceback, exit 2,
and nothing started (no MLflow run, no pipeline) when ``--data`` is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ADAPTFLOW = [sys.executable, "-m", "adaptflow.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_"))}
    return subprocess.run([*ADAPTFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _one_error(result: subprocess.CompletedProcess[str], words: str, status: int) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    hints = [line for line in lines if line.startswith("hint: ")]
    assert len(errors) == 1 and len(hints) == 1 and len(lines) == 2, result.stderr
    assert words in errors[0], errors[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--log-level", "foo", "backbones"], "'foo' is not one of DEBUG, INFO, WARNING, ERROR"),
        (["run", "--data", "x", "--bogus"], "No such option: --bogus"),
        (["demo", "--dataset", "nope"], "--dataset must be one of"),
        (["compile", "-o", "dag.yaml"], "no component image"),  # never a made-up image
    ],
)
def test_usage_mistakes(args: list[str], words: str, tmp_path: Path) -> None:
    _one_error(_run(*args, cwd=tmp_path), words, status=2)  # usage and config mistakes exit 2


@pytest.mark.parametrize("layout", ["missing", "no class folders"])
def test_wrong_data_stops_before_any_run_exists(layout: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    if layout == "no class folders":
        data.mkdir()
        (data / "a.png").write_bytes(b"not really")
    result = _run("run", "--data", str(data), "--set", f"workdir={tmp_path / 'work'}", cwd=tmp_path)
    _one_error(result, "does not exist" if layout == "missing" else "has no class folders", status=1)
    assert not (tmp_path / "work" / "mlflow.db").exists()  # no MLflow run was created
    assert not (tmp_path / "work" / "kfp-local").exists()  # no pipeline started


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = _run("--debug", "run", "--data", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "error: data source" in result.stderr
