"""S3 that fails: 500s and SlowDown (503) are retried, faults that persist end in one StoreError with a
hint, and an upload cut off mid-way leaves no object and (unless the process dies outright) no upload.

Against a real HTTP S3 (moto in server mode). Faults are injected in the client with botocore's
``before-send`` hook: the hook answers instead of the server, the first N times, as an overloaded S3 would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adaptflow.errors import StoreError, describe_error
from adaptflow.lease import S3Lease
from adaptflow.storage import download_to, read_bytes, s3_client
from services import moto_s3

pytestmark = pytest.mark.integration

BUCKET = "faults"
SLOW_DOWN = (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (
    500,
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>",
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3({"MLFLOW_S3_ENDPOINT_URL": "{endpoint}"}) as endpoint:
        s3_client().create_bucket(Bucket=BUCKET)
        s3_client().put_object(Bucket=BUCKET, Key="weights.bin", Body=b"w" * 4096)
        yield endpoint


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


class Faults:
    """Answers ``operation`` with ``reply`` (status, XML body) the first ``times`` times, then lets it by."""

    def __init__(self, client: Any, operation: str, reply: tuple[int, bytes], times: int) -> None:
        self.client, self.event = client, f"before-send.s3.{operation}"
        self.reply, self.left, self.seen = reply, times, 0

    def __call__(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        self.seen += 1
        if self.left <= 0:
            return None  # the request goes to the server
        self.left -= 1
        return AWSResponse(request.url, self.reply[0], {}, _Body(self.reply[1]))

    def __enter__(self) -> Faults:
        self.client.meta.events.register(self.event, self)
        return self

    def __exit__(self, *_: object) -> None:
        self.client.meta.events.unregister(self.event, self)


# max_attempts is botocore's: retries after the first try
READS: dict[str, Callable[[Path, int], bytes]] = {
    "read_bytes": lambda _, attempts: read_bytes(f"s3://{BUCKET}/weights.bin", max_attempts=attempts),
    "download_to": lambda dest, attempts: (
        download_to(f"s3://{BUCKET}/weights.bin", dest, max_attempts=attempts),
        dest.read_bytes(),
    )[1],
}


@pytest.mark.parametrize("reply", [SLOW_DOWN, INTERNAL], ids=["503-SlowDown", "500"])
@pytest.mark.parametrize("read", sorted(READS))
def test_transient_faults_on_a_download_are_retried(
    s3_endpoint: str, tmp_path: Path, read: str, reply: tuple[int, bytes]
) -> None:
    with Faults(s3_client(None, 2), "GetObject", reply, times=2) as faults:
        assert READS[read](tmp_path / "w.bin", 2) == b"w" * 4096
    assert faults.seen == 3  # two faults, then the real answer


@pytest.mark.parametrize("read", sorted(READS))
def test_faults_that_persist_end_in_one_store_error(s3_endpoint: str, tmp_path: Path, read: str) -> None:
    with (
        Faults(s3_client(None, 1), "GetObject", SLOW_DOWN, times=100) as faults,
        pytest.raises(StoreError) as info,
    ):
        READS[read](tmp_path / "w.bin", 1)
    assert faults.seen == 2  # tried, retried once, gave up
    message, hint = describe_error(info.value)
    assert "s3://faults/weights.bin" in message and "SlowDown" in message and "\n" not in message
    assert hint and "transient" in hint and info.value.transient


def test_transient_faults_on_an_upload_are_retried(s3_endpoint: str) -> None:
    """The promotion lease's conditional put (adaptflow's own S3 write) rides out 500s."""
    lease = S3Lease(BUCKET, "leases/m.json", ttl_seconds=30, wait_seconds=5)
    with Faults(lease.client, "PutObject", INTERNAL, times=2) as faults:
        lease.acquire()
    assert faults.seen == 3
    lease.release()


def test_upload_faults_that_persist_are_described_in_one_line(s3_endpoint: str) -> None:
    from botocore.exceptions import ClientError

    lease = S3Lease(BUCKET, "leases/n.json", ttl_seconds=30, wait_seconds=5, client=s3_client(None, 1))
    with Faults(lease.client, "PutObject", SLOW_DOWN, times=100), pytest.raises(ClientError) as info:
        lease.acquire()  # lease.py lets botocore's error through; the CLI and the stages describe it
    message, hint = describe_error(info.value)
    assert "SlowDown" in message and "\n" not in message
    assert hint and "transient" in hint


# --------------------------------------------------------------------------- multipart cut off

MB = 1 << 20


def _big_file(path: Path, size: int = 9 * MB) -> Path:
    path.write_bytes(os.urandom(size))  # > boto3's 8 MB multipart threshold: two parts
    return path


def _uploads(prefix: str) -> list[str]:
    listing = s3_client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    return [upload["Key"] for upload in listing.get("Uploads", [])]


def _keys(prefix: str) -> list[str]:
    return [
        item["Key"] for item in s3_client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    ]


class _CutAfterFirstPart:
    """Lets the first part through, then the connection 'dies'."""

    def __init__(self) -> None:
        self.parts = 0
        self.lock = threading.Lock()  # parts go out from several threads at once

    def __call__(self, **_: Any) -> None:
        with self.lock:
            self.parts += 1
            first = self.parts == 1
        if not first:
            raise RuntimeError("connection cut mid-upload")


def test_artifact_upload_cut_mid_way_leaves_no_object_and_no_upload(s3_endpoint: str, tmp_path: Path) -> None:
    """MLflow's S3 artifact store (what the stack's server writes through) aborts the multipart upload."""
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    repo = S3ArtifactRepository(f"s3://{BUCKET}/mlflow/1/run/artifacts")
    client, cut = repo._get_s3_client(), _CutAfterFirstPart()
    client.meta.events.register("before-send.s3.UploadPart", cut)
    try:
        with pytest.raises(Exception, match="connection cut"):
            repo.log_artifact(str(_big_file(tmp_path / "model.onnx")), "model")
    finally:
        client.meta.events.unregister("before-send.s3.UploadPart", cut)
    assert cut.parts >= 2
    assert _keys("mlflow/1/run/") == []  # S3 shows an object only on CompleteMultipartUpload
    assert _uploads("mlflow/1/run/") == []  # and the parts already sent were aborted, not left billed


# slow (make test-all): flaky in 2 of 7 runs here. Once log_model did not raise at all (its upload
# went through a client without the hook), and once the .onnx object appeared after the cut (see below)
@pytest.mark.slow
def test_model_is_not_registered_when_its_upload_is_cut(s3_endpoint: str, tmp_path: Path) -> None:
    """``log_model(registered_model_name=...)`` (publish_model) registers only after the upload: no model
    version points at an artifact that is not there."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((1024, 2400), dtype=np.float32), "w")  # ~9.4 MB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2400])],
        [weight],
    )
    model = helper.make_model(graph)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment("cut", artifact_location=f"s3://{BUCKET}/cut")
    client, cut = S3ArtifactRepository(f"s3://{BUCKET}/cut")._get_s3_client(), _CutAfterFirstPart()
    client.meta.events.register("before-send.s3.UploadPart", cut)
    try:
        with mlflow.start_run(experiment_id=experiment), pytest.raises(Exception, match="connection cut"):
            mlflow.onnx.log_model(onnx_model=model, name="model", registered_model_name="cut-model")
    finally:
        client.meta.events.unregister("before-send.s3.UploadPart", cut)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    assert mlflow.MlflowClient(uri).search_model_versions("name='cut-model'") == []
    # no multipart upload is left open. The .onnx object itself may exist: about one run in three
    # here (not explained: probably a retried part completing the upload after log_model has
    # already failed). That object is an orphan no model version points at, so it is not asserted.
    assert _uploads("cut/") == []


def test_process_killed_mid_upload_leaves_no_object(s3_endpoint: str, tmp_path: Path) -> None:
    """SIGKILL-like death after the first part: no object appears. Nothing can abort the upload then; a
    bucket lifecycle rule (AbortIncompleteMultipartUpload) is what reclaims its parts."""
    big = _big_file(tmp_path / "big.bin")
    script = textwrap.dedent(
        f"""
        import os
        from adaptflow.storage import s3_client
        client = s3_client()
        sent = []
        def die(**_):
            sent.append(1)
            if len(sent) > 1:
                os._exit(9)  # no exception handler, no abort: the process is simply gone
        client.meta.events.register("before-send.s3.UploadPart", die)
        client.upload_file({str(big)!r}, {BUCKET!r}, "killed/big.bin")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]
    assert _keys("killed/") == []
    assert _uploads("killed/") == ["killed/big.bin"]  # left for the lifecycle rule
