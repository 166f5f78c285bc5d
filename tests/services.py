"""One rule for tests that need a system service or tool (PostgreSQL, kubectl, chromium, buildah).

Without the tool such a test skips on a developer's machine. With ``ADAPTFLOW_REQUIRE_SERVICES=1``,
which ``.ci/run`` sets unconditionally, it fails instead: CI must never skip what it should test, and
a runner's own ``CI`` value (``1``, ``True``, unset) has no say in it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_SERVICES = "ADAPTFLOW_REQUIRE_SERVICES"


def services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES) == "1"


def require_or_skip(reason: str) -> NoReturn:
    """Skips with ``reason``, or fails when services are required."""
    if services_required():
        pytest.fail(f"{REQUIRE_SERVICES}=1 and {reason}")
    print(f"SKIP: {reason}")
    pytest.skip(reason)
