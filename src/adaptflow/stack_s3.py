"""The local stack's S3 on disk: moto keeps S3 in memory only, so stack-down snapshots it and stack-up
restores it, through the S3 API. moto's request recorder cannot stand in: on replay a multipart upload
gets a new random id, so its parts are refused and big objects are lost.

A snapshot: ``COMPLETE`` and, per bucket, ``manifest.json`` (a list of ``{"key", "blob"}``) and the
objects in ``blobs/<sha256(key)>``. A new one is written beside the last, then swapped in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

TEST_KEY = "testing"  # moto accepts any credentials: these are dummies, not secrets


def s3_client(endpoint_url: str, region: str = "us-east-1", timeout: float = 10.0, attempts: int = 3) -> Any:
    """A boto3 S3 client for a moto endpoint: path-style, the dummy credentials."""
    import boto3
    from botocore.config import Config

    retries = {"max_attempts": attempts, "mode": "standard"}
    config = Config(
        s3={"addressing_style": "path"},
        connect_timeout=timeout,
        read_timeout=max(timeout, 30),
        retries=retries,
    )
    session = boto3.session.Session(aws_access_key_id=TEST_KEY, aws_secret_access_key=TEST_KEY)
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def snapshot_s3(client: Any, folder: Path) -> None:
    """Copies every object of every bucket into a new snapshot, then swaps it in for ``folder``."""
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)  # an S3 without buckets is a snapshot too
    for bucket in [entry["Name"] for entry in client.list_buckets()["Buckets"]]:
        (new / bucket / "blobs").mkdir(parents=True)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
        manifest = [{"key": key, "blob": hashlib.sha256(key.encode()).hexdigest()} for key in keys]
        for entry in manifest:
            client.download_file(bucket, entry["key"], str(new / bucket / "blobs" / entry["blob"]))
        (new / bucket / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (new / "COMPLETE").touch()
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)  # a swap cut short here leaves the last snapshot as .old: restore_s3 reads it
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def restore_s3(client: Any, folder: Path, buckets: list[str]) -> None:
    """Creates ``buckets`` and those of the last complete snapshot, then uploads its objects."""
    candidates = (folder, folder.with_name(folder.name + ".old"))
    snapshot = next((path for path in candidates if (path / "COMPLETE").is_file()), None)
    manifests = sorted(snapshot.glob("*/manifest.json")) if snapshot else []
    for bucket in sorted({*buckets, *(manifest.parent.name for manifest in manifests)}):
        client.create_bucket(Bucket=bucket)
    for manifest in manifests:
        for entry in json.loads(manifest.read_text()):
            client.upload_file(
                str(manifest.parent / "blobs" / entry["blob"]), manifest.parent.name, entry["key"]
            )
