"""The CLI in-process, as the unit tests drive it (typer's CliRunner)."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from adaptflow.cli import app


def invoke(*args: str) -> Any:
    """``adaptflow ARGS``; re-raises what the command raised (but an exit), asserts exit status 0."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result
