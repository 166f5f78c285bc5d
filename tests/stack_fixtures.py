"""The production-like stack (PostgreSQL + moto S3 + mlflow server) as a session fixture.

Load it with ``pytest_plugins = ["stack_fixtures"]`` in tests/conftest.py (tests/ on the
pythonpath), or ``-p stack_fixtures``. Without PostgreSQL binaries the fixture skips, or fails
when ``ADAPTFLOW_REQUIRE_SERVICES=1`` (tests/services.py): CI must not silently skip the stack tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adaptflow.localstack import StackConfig, StackInfo, find_pg_bin_dir, stack_down, stack_up
from services import require_or_skip


@contextlib.contextmanager
def fresh_stack_folder() -> Iterator[Path]:
    """An empty folder to hold a stack root (``<folder>/stack``); whatever stack runs there is stopped
    at the end and the folder removed. Skips without PostgreSQL."""
    if find_pg_bin_dir() is None:
        require_or_skip(
            "PostgreSQL server binaries (postgres, initdb, pg_isready) not found: "
            "apt-get install postgresql, or set ADAPTFLOW_PG_BIN"
        )
    # Not under pytest's basetemp: /tmp/pytest-of-root is mode 0700, and when the tests run as
    # root PostgreSQL runs as an unprivileged user who must be able to enter the stack folder.
    base = Path(tempfile.mkdtemp(prefix="adaptflow-stack-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        try:
            stack_down(StackConfig(root=base / "stack"))
        finally:
            # stack_down refuses to stop an S3 it could not snapshot; a test's stack goes regardless
            pid_file = base / "stack" / "supervisord.pid"
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)  # supervisord stops its programs
                deadline = time.monotonic() + 60
                while pid_file.exists() and time.monotonic() < deadline:  # removed as it exits
                    time.sleep(0.2)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def stack_folder() -> Iterator[Path]:
    with fresh_stack_folder() as base:
        yield base


@pytest.fixture(scope="session")
def production_stack() -> Iterator[StackInfo]:
    """A running stack on free loopback ports in a fresh folder; stopped (data and all) at the end."""
    with fresh_stack_folder() as base:
        yield stack_up(StackConfig(root=base / "stack", startup_timeout_s=120.0))


@pytest.fixture
def production_stack_env(production_stack: StackInfo, monkeypatch: pytest.MonkeyPatch) -> StackInfo:
    """The stack, with its env vars (MLFLOW_TRACKING_URI, ADAPTFLOW_S3_ENDPOINT_URL, ...) set for one test."""
    for key, value in production_stack.env.items():
        monkeypatch.setenv(key, value)
    return production_stack
