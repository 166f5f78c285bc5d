"""Proving that ingest never opens a file: a FIFO with no writer blocks whoever opens it for reading."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest

from adaptflow.config import IngestConfig
from adaptflow.contracts import Snapshot
from adaptflow.data.ingest import ingest


def ingest_without_opening(source: Path, cfg: IngestConfig, fifo: Path, outside: str) -> Snapshot:
    """Ingests ``source`` in a thread; fails the test if it blocks on ``fifo`` (which lies ``outside``)."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["snapshot"] = ingest(str(source), cfg)
        except BaseException as error:  # re-raised below, in the test's thread
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        with contextlib.suppress(OSError):  # let the blocked reader go (it reads EOF): no thread left behind
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"ingest opened {fifo}, which is outside {outside}")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    snapshot = result["snapshot"]
    assert isinstance(snapshot, Snapshot)
    return snapshot
