"""A disk that fills: a real ENOSPC (writes to /dev/full), a clear error, and nothing already saved damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adaptflow.contracts import QuarantineEntry, Snapshot
from adaptflow.steps import ERROR_FILE_ENV, reports_errors

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def _snapshot(fingerprint: str) -> Snapshot:
    return Snapshot(
        source_uri="x",
        class_names=("a", "b"),
        entries=(),
        fingerprint=fingerprint,
        counts={},
        class_counts={},
        quarantined=(QuarantineEntry(uri="u", reason="r"),),
    )


def test_full_disk_is_reported_clearly_and_the_saved_result_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "snapshot"
    _snapshot("old").save(out)
    # the next write lands on a device that is always full
    (out / "snapshot.tmp").symlink_to("/dev/full")
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(error_file))

    @reports_errors("ingest")
    def write_new() -> None:
        _snapshot("new").save(out)

    with pytest.raises(OSError) as info:
        write_new()
    assert info.value.errno == 28  # ENOSPC, from the kernel
    report = json.loads(error_file.read_text())
    assert report["stage"] == "ingest"
    assert report["message"].startswith("disk full while writing")
    assert "free space" in report["hint"] and "nothing already saved was damaged" in report["hint"]
    assert Snapshot.load(out).fingerprint == "old"
