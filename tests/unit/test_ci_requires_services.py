"""CI cannot skip a service test by what it inherits from the runner's environment."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from services import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("inherited", [{}, {"CI": "1"}, {"CI": "True"}, {"CI": ""}, {REQUIRE_SERVICES: "0"}])
def test_ci_run_requires_services_whatever_it_inherits(tmp_path: Path, inherited: dict[str, str]) -> None:
    """.ci/run runs `make test` with ADAPTFLOW_REQUIRE_SERVICES=1; a stub `make` records what it got."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    seen = tmp_path / "seen"
    (stubs / "make").write_text(
        f'#!/bin/sh\necho "$* {REQUIRE_SERVICES}=${{{REQUIRE_SERVICES}-unset}}" > {seen}\n'
    )
    for tool in ("apt-get", "kubectl", "chromium"):  # never install anything from a unit test
        (stubs / tool).write_text("#!/bin/sh\nexit 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    pg = os.environ.get("ADAPTFLOW_PG_BIN")
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), **inherited}
    if pg:
        env["ADAPTFLOW_PG_BIN"] = pg
    subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, check=True, capture_output=True, timeout=60)
    assert seen.read_text().split() == ["test", f"{REQUIRE_SERVICES}=1"]


def test_no_test_decides_by_the_ci_variable() -> None:
    """Service tests go through services.require_or_skip, never through the runner's CI value."""
    reads_ci = re.compile(r"""environ(\.get\(|\[)\s*["']CI["']""")
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("*.py")
        if reads_ci.search(path.read_text())
    ]
    assert offenders == []
