"""The local stack's S3: moto's server, with its buckets kept on disk across restarts.

moto keeps S3 in memory only (moto 5's request recorder is no substitute: concurrent multipart
uploads corrupt its log). So ``python -m adaptflow.stack_s3 PORT FOLDER BUCKET...``, which supervisord
runs, first restores the snapshot in FOLDER into moto on a private port, then serves it on PORT; on
SIGTERM or SIGINT it writes the snapshot again and exits (1 when the restore or the snapshot failed).

Snapshot layout: ``COMPLETE`` and ``<bucket>/manifest.json`` (a list of ``{"key", "blob"}``) with the
objects in ``<bucket>/blobs/<sha256(key)>``. A new one is written beside the last and swapped in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TEST_KEY = "testing"  # moto accepts any credentials: these are dummies, not secrets


def s3_client(endpoint_url: str, region: str = "us-east-1", timeout: float = 10.0, attempts: int = 3) -> Any:
    """A boto3 S3 client for a moto endpoint: path-style, the dummy credentials."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        connect_timeout=timeout,
        read_timeout=max(timeout, 30.0),
        retries={"max_attempts": attempts, "mode": "standard"},
    )
    session = boto3.session.Session(aws_access_key_id=TEST_KEY, aws_secret_access_key=TEST_KEY)
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def snapshot_s3(folder: Path, client: Any) -> int:
    """Copies every object of every bucket into ``folder``; returns how many."""
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    count = 0
    for bucket in (entry["Name"] for entry in client.list_buckets()["Buckets"]):
        (new / bucket / "blobs").mkdir(parents=True)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
        manifest = [{"key": key, "blob": hashlib.sha256(key.encode()).hexdigest()} for key in keys]
        for entry in manifest:
            client.download_file(bucket, entry["key"], str(new / bucket / "blobs" / entry["blob"]))
        (new / bucket / "manifest.json").write_text(json.dumps(manifest, indent=1))
        count += len(manifest)
    (new / "COMPLETE").touch()
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return count


def restore_s3(folder: Path, client: Any, buckets: Iterable[str]) -> int:
    """Creates ``buckets`` and the last complete snapshot's buckets (``folder``, or ``folder.old``
    when a swap was cut short), then uploads its objects; returns how many."""
    snapshot = next(
        (f for f in (folder, folder.with_name(folder.name + ".old")) if (f / "COMPLETE").is_file()), None
    )
    manifests = sorted(snapshot.glob("*/manifest.json")) if snapshot else []
    for bucket in sorted({*buckets, *(manifest.parent.name for manifest in manifests)}):
        client.create_bucket(Bucket=bucket)
    count = 0
    for manifest in manifests:
        for entry in json.loads(manifest.read_text()):
            client.upload_file(
                str(manifest.parent / "blobs" / entry["blob"]), manifest.parent.name, entry["key"]
            )
            count += 1
    return count


def serve(port: int, folder: Path, buckets: list[str]) -> None:
    from moto.server import ThreadedMotoServer

    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # held until sigwait; the server threads inherit it
    loader = ThreadedMotoServer("127.0.0.1", 0, verbose=False)  # moto's state is per process, not per server
    loader.start()
    try:
        restored = restore_s3(folder, s3_client(f"http://127.0.0.1:{loader.get_host_and_port()[1]}"), buckets)
    finally:
        loader.stop()
    server = ThreadedMotoServer("127.0.0.1", port)
    server.start()
    print(f"restored {restored} objects from {folder}; serving S3 on 127.0.0.1:{port}", flush=True)
    signal.sigwait(stop)
    try:
        print(
            f"snapshotted {snapshot_s3(folder, s3_client(f'http://127.0.0.1:{port}', attempts=5))} objects",
            flush=True,
        )
    finally:
        server.stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
