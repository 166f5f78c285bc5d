"""Leases that serialise champion moves (``set_registered_model_alias`` has no compare-and-set).

- :class:`FileLease`: an OS file lock, for the embedded store on one machine. The kernel drops
  it when the holder dies, so a crashed holder never blocks the next one.
- :class:`S3Lease`: a lease object created with a conditional put (``If-None-Match: *``) next to
  the artifacts; it names its holder and expires after a TTL. An expired lease is taken over with
  a conditional delete (``If-Match`` its ETag), so two takers cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from adaptflow.config import RegistryConfig
from adaptflow.errors import LeaseError

log = logging.getLogger(__name__)


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease(ABC):
    def __init__(self, uri: str, ttl_seconds: float, wait_seconds: float) -> None:
        #: the lease's URI (``s3://bucket/key`` or ``file:///path``): tagged on what it guarded
        self.uri = uri
        self.ttl = ttl_seconds
        self.wait = wait_seconds
        self.holder = holder_id()

    @abstractmethod
    def acquire(self) -> None: ...

    @abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class FileLease(Lease):
    def __init__(self, path: str | Path, ttl_seconds: float = 120.0, wait_seconds: float = 300.0) -> None:
        super().__init__(Path(path).resolve().as_uri(), ttl_seconds, wait_seconds)
        self.path = Path(path).resolve()
        self._lock: Any = None

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path))
        try:
            self._lock.acquire(timeout=self.wait)
        except Timeout:
            raise LeaseError(
                f"promotion lease {self.path} still held after {self.wait:.0f}s",
                hint="another promotion is running; retry later, or raise registry.lease_wait_seconds",
            ) from None
        self.path.with_suffix(".holder").write_text(json.dumps({"holder": self.holder, "since": time.time()}))

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class S3Lease(Lease):
    """Conditional-put lease at ``s3://bucket/key``."""

    def __init__(
        self,
        bucket: str,
        key: str,
        ttl_seconds: float = 120.0,
        wait_seconds: float = 300.0,
        client: Any = None,
    ) -> None:
        super().__init__(f"s3://{bucket}/{key}", ttl_seconds, wait_seconds)
        from adaptflow.storage import s3_client

        self.bucket, self.key = bucket, key
        self.client = client or s3_client()
        self._etag: str | None = None

    def _try_create(self) -> bool:
        from botocore.exceptions import ClientError

        body = json.dumps({"holder": self.holder, "expires_at": time.time() + self.ttl}).encode()
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            raise
        self._etag = response.get("ETag")
        return True

    def _take_over_if_expired(self) -> None:
        from botocore.exceptions import ClientError

        try:
            current = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError:
            return  # gone already: the next create attempt decides
        state = json.loads(current["Body"].read() or b"{}")
        if float(state.get("expires_at", 0)) > time.time():
            return
        log.warning("lease %s held by %s expired; taking it over", self.uri, state.get("holder"))
        # if someone else took it over first, the delete fails and we go back to waiting
        with contextlib.suppress(ClientError):
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=current["ETag"])

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        delay = 0.05
        while True:
            if self._try_create():
                return
            self._take_over_if_expired()
            if time.monotonic() > deadline:
                raise LeaseError(
                    f"promotion lease {self.uri} still held after {self.wait:.0f}s",
                    hint="another promotion is running; if its holder crashed the lease expires after its TTL",
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def release(self) -> None:
        from botocore.exceptions import ClientError

        if self._etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
        except ClientError as error:
            log.warning(
                "lease %s was not ours to release any more (expired and taken over?): %s", self.uri, error
            )
        self._etag = None


LEASE_TAG = "adaptflow.lease"


def is_remote_tracking(tracking_uri: str) -> bool:
    """A tracking store other processes and machines share (a server or a database), not a local file."""
    if tracking_uri.startswith("databricks"):  # "databricks" or "databricks://profile"
        return True
    scheme = urlparse(tracking_uri).scheme.lower()
    return scheme not in ("", "file", "sqlite") and len(scheme) > 1  # a one-letter scheme is a drive


def lease_for(
    model_name: str,
    cfg: RegistryConfig,
    workdir: str | Path,
    tracking_uri: str,
    artifact_location: str | None = None,
) -> Lease:
    """The lease every promoter of ``model_name`` must share.

    ``registry.lease_uri`` wins: ``s3://bucket/prefix`` (conditional puts) or a folder on a shared
    filesystem (``file:///…`` or an absolute path). Without it, S3 artifacts get a lease beside them,
    and anything else an OS file lock under the workdir, which guards this machine only: with a
    remote tracking server that is said as a warning, since a pod or laptop elsewhere would not wait.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    ttl, wait = cfg.lease_ttl_seconds, cfg.lease_wait_seconds
    location = cfg.lease_uri
    if location is None and artifact_location and artifact_location.startswith("s3://"):
        location = artifact_location.rstrip("/") + "/_leases"
    if location is not None and location.startswith("s3://"):
        from adaptflow.storage import split_s3

        bucket, prefix = split_s3(location)
        return S3Lease(bucket, f"{prefix.strip('/')}/{safe}.json".lstrip("/"), ttl, wait)
    if location is not None:
        folder = Path(urlparse(location).path if location.startswith("file:") else location)
        return FileLease(folder / f"{safe}.lock", ttl, wait)
    lease = FileLease(Path(workdir) / "locks" / f"{safe}.lock", ttl, wait)
    if is_remote_tracking(tracking_uri):
        log.warning(
            "promotion of %s is guarded only on this machine (%s): promoters elsewhere sharing %s "
            "would not wait for it; set registry.lease_uri=s3://BUCKET/PREFIX (or a shared folder) "
            "so every promoter takes the same lease",
            model_name,
            lease.uri,
            tracking_uri,
        )
    return lease
