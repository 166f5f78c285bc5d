"""Reading bytes from where data and weights live: local paths, ``file://``, ``s3://``, ``http(s)://``.

S3 goes through boto3 with retries configured; the endpoint comes from ``ADAPTFLOW_S3_ENDPOINT_URL``
(or boto3's own ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``), read when a client is made, never at import.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from adaptflow.errors import StoreError, store_error_from

S3_ENDPOINT_ENV = "ADAPTFLOW_S3_ENDPOINT_URL"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes ``path`` through ``write`` into a temporary file beside it, then renames it into place:
    a concurrent reader (another stage, another run) sees the old file or the whole new one."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """``file:///x`` or a plain path -> Path."""
    if uri.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return Path(uri)


@lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None = None, max_attempts: int = 8) -> Any:
    """A boto3 S3 client with adaptive retries. Cached per endpoint: clients are thread-safe.

    botocore retries 5xx, SlowDown/throttling and dropped connections with jittered exponential backoff
    (adaptive mode also slows this client while S3 throttles); ``max_attempts`` counts the retries
    after the first try. What still fails becomes one StoreError (``_s3_error``).
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get(S3_ENDPOINT_ENV) or None
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "adaptive"}, connect_timeout=10, read_timeout=60
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


# a forked process (a decoding worker) opens its own connections, never its parent's
os.register_at_fork(after_in_child=s3_client.cache_clear)


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str | None


def iter_s3_objects(prefix_uri: str, max_attempts: int = 8) -> Iterator[ObjectInfo]:
    """Streams every object under an s3:// prefix, page by page (no whole listing in memory)."""
    bucket, prefix = split_s3(prefix_uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = s3_client(None, max_attempts)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                yield ObjectInfo(
                    f"s3://{bucket}/{item['Key']}", int(item["Size"]), item.get("ETag", "").strip('"')
                )
    except Exception as error:  # botocore raises many types; all mean the same to the user
        raise _s3_error(prefix_uri, error) from error


def _s3_error(uri: str, error: Exception) -> StoreError:
    endpoint = os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS default"
    busy = store_error_from(error)  # 5xx or throttling that outlasted the client's retries
    if busy is not None:
        return StoreError(
            f"cannot read {uri} from S3 (endpoint {endpoint}): {error}", busy.hint, transient=True
        )
    return StoreError(
        f"cannot read {uri} from S3 (endpoint {endpoint}): {error}",
        hint=f"check the bucket exists, credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and {S3_ENDPOINT_ENV}",
    )


def read_bytes(uri: str, *, timeout: float = 60.0, max_attempts: int = 8) -> bytes:
    """The whole object at ``uri``. Errors name the URI and what to check."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            body: bytes = s3_client(None, max_attempts).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:
            raise _s3_error(uri, error) from error
        return body
    if is_http(uri):
        try:
            with urllib.request.urlopen(uri, timeout=timeout) as response:
                data: bytes = response.read()
                return data
        except (urllib.error.URLError, OSError) as error:
            raise StoreError(
                f"cannot download {uri}: {error}", hint="check the URL and the network"
            ) from error
    path = local_path(uri)
    try:
        return path.read_bytes()
    except OSError as error:
        raise StoreError(f"cannot read {path}: {error.strerror or error}") from error


def download_to(uri: str, dest: Path, *, timeout: float = 60.0, max_attempts: int = 8) -> None:
    """Streams ``uri`` into ``dest`` (parent must exist). Used for large weight files."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(None, max_attempts).download_file(bucket, key, str(dest))
        except Exception as error:
            raise _s3_error(uri, error) from error
        return
    if is_http(uri):
        try:
            with urllib.request.urlopen(uri, timeout=timeout) as response, open(dest, "wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
        except (urllib.error.URLError, OSError) as error:
            raise StoreError(
                f"cannot download {uri}: {error}", hint="check the URL and the network"
            ) from error
        return
    src = local_path(uri)
    if not src.is_file():
        raise StoreError(f"weights file {src} does not exist", hint="check backbone.weights_uri")
    with open(src, "rb") as handle, open(dest, "wb") as out:
        while block := handle.read(1 << 20):
            out.write(block)
