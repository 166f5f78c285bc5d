"""One rule for tests that need a system service or tool (PostgreSQL, kubectl, chromium, buildah).

Without the tool such a test skips on a developer's machine. With ``ADAPTFLOW_REQUIRE_SERVICES=1``,
which ``.ci/run`` sets unconditionally, it fails instead: CI must never skip what it should test, and
a runner's own ``CI`` value (``1``, ``True``, unset) has no say in it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def moto_s3(extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """A real moto S3 server on a free port, with adaptflow's (and boto3's) env pointing at it.

    Cached S3 clients are dropped on the way in and out, so none outlives the server.
    """
    from moto.server import ThreadedMotoServer

    from adaptflow.storage import S3_ENDPOINT_ENV, s3_client

    mp = pytest.MonkeyPatch()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        S3_ENDPOINT_ENV: endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        **{key: value.format(endpoint=endpoint) for key, value in (extra_env or {}).items()},
    }
    for key, value in env.items():
        mp.setenv(key, value)
    s3_client.cache_clear()
    try:
        yield endpoint
    finally:
        server.stop()
        mp.undo()
        s3_client.cache_clear()
