"""Only what can succeed is retried: a stage's exit status decides, under the real kfp.local runner."""

import errno
from pathlib import Path

import pytest
from adaptflow.pipelines.local import kfp_local_run
from adaptflow.pipelines.local_process import StageFailed
from botocore.exceptions import ClientError, EndpointConnectionError

from adaptflow.errors import (
    EXIT_FAILED,
    EXIT_PERMANENT,
    EXIT_PREEMPTED,
    EXIT_TRANSIENT,
    ConfigError,
    DataError,
    Interrupted,
    StoreError,
    exit_status,
)


def _throttled() -> ClientError:
    return ClientError(
        {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (DataError("one class"), EXIT_PERMANENT),
        (ConfigError("bad key"), EXIT_PERMANENT),
        (StoreError("corrupt store"), EXIT_PERMANENT),
        (StoreError("server unreachable", transient=True), EXIT_TRANSIENT),
        (ConnectionRefusedError("refused"), EXIT_TRANSIENT),
        (TimeoutError("slow"), EXIT_TRANSIENT),
        (EndpointConnectionError(endpoint_url="http://s3"), EXIT_TRANSIENT),
        (_throttled(), EXIT_TRANSIENT),
        (ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"), EXIT_FAILED),
        (Interrupted("SIGTERM"), EXIT_PREEMPTED),
        (OSError(errno.ENOSPC, "No space left on device"), EXIT_PERMANENT),
        (ValueError("a bug"), EXIT_FAILED),
    ],
)
def test_exit_status_says_whether_a_retry_can_help(error: BaseException, status: int) -> None:
    assert exit_status(error) == status


def _pipeline(exit_code: int, counter: str):  # type: ignore[no-untyped-def]
    from kfp import dsl

    @dsl.component(base_image="python:3.11")
    def flaky(counter: str, exit_code: int) -> str:
        import pathlib
        import sys

        path = pathlib.Path(counter)
        attempts = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(attempts))
        if attempts < 3:
            sys.exit(exit_code)
        return "ok"

    @dsl.pipeline(name="retry-policy")
    def pipeline() -> str:
        task = flaky(counter=counter, exit_code=exit_code)
        task.set_retry(num_retries=2, backoff_duration="0s", backoff_factor=1.0)
        task.set_caching_options(enable_caching=False)
        return task.output

    return pipeline


@pytest.mark.parametrize(
    ("exit_code", "attempts", "succeeds"),
    [
        (EXIT_TRANSIENT, 3, True),
        (EXIT_PREEMPTED, 3, True),
        (EXIT_PERMANENT, 1, False),
        (EXIT_FAILED, 1, False),
    ],
)
def test_the_local_runner_retries_only_transient_exits(
    tmp_path: Path, exit_code: int, attempts: int, succeeds: bool
) -> None:
    counter = tmp_path / "attempts"
    pipeline = _pipeline(exit_code, str(counter))
    with kfp_local_run(tmp_path / "root"):
        if succeeds:
            assert pipeline().output == "ok"
        else:
            with pytest.raises(StageFailed) as failed:
                pipeline()
            assert failed.value.returncode == exit_code
    assert int(counter.read_text()) == attempts
