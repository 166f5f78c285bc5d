"""S3 data, weights and leases against a real HTTP S3 endpoint (moto in server mode) on loopback."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from adaptflow.config import BackboneSpec, IngestConfig
from adaptflow.data.ingest import ingest
from adaptflow.errors import LeaseError, StoreError, WeightsError
from adaptflow.lease import S3Lease
from adaptflow.models.weights import resolve_weights
from adaptflow.storage import S3_ENDPOINT_ENV, s3_client
from concurrency import peak_concurrency
from services import moto_s3

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, (value // 256) % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    client = s3_client()
    client.create_bucket(Bucket="data")
    # 1,050 objects: listing must paginate past S3's 1,000-key pages
    for i in range(1050):
        client.put_object(Bucket="data", Key=f"digits/{'abc'[i % 3]}/{i:05d}.png", Body=_png(i))
    client.put_object(Bucket="data", Key="digits/a/broken.png", Body=b"\x89PNG not really")
    client.put_object(Bucket="data", Key="digits/README.txt", Body=b"not an image, not in a class")
    return "data"


def test_ingest_from_s3_paginates_and_records_etags(bucket: str) -> None:
    snap = ingest(f"s3://{bucket}/digits", IngestConfig())
    assert snap.class_names == ("a", "b", "c")
    assert len(snap.entries) == 1050
    assert all(e.uri.startswith("s3://data/digits/") and e.etag for e in snap.entries)
    assert [Path(q.uri).name for q in snap.quarantined] == ["broken.png"]
    again = ingest(f"s3://{bucket}/digits/", IngestConfig())
    assert again.fingerprint == snap.fingerprint


def test_manifest_rows_pointing_at_s3(bucket: str, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    rows = [f"s3://{bucket}/digits/{'abc'[i % 3]}/{i:05d}.png,{'abc'[i % 3]}" for i in range(30)]
    manifest.write_text("uri,label\n" + "\n".join(rows) + "\n")
    snap = ingest(str(manifest), IngestConfig())
    assert len(snap.entries) == 30 and snap.class_names == ("a", "b", "c")


def test_missing_bucket_is_a_clear_error(s3_endpoint: str) -> None:
    with pytest.raises(StoreError, match="no-such-bucket") as info:
        ingest("s3://no-such-bucket/x", IngestConfig())
    assert info.value.hint and S3_ENDPOINT_ENV in info.value.hint


def test_weights_from_s3_verified_and_cached(s3_endpoint: str, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = s3_client()
    client.create_bucket(Bucket="mirror")
    key = f"torchvision/resnet18-{tiny_assets.sha256[:8]}.safetensors"
    client.upload_file(str(tiny_assets.weights), "mirror", key)
    resolved = resolve_weights(
        BackboneSpec(name="resnet18", weights_uri=f"s3://mirror/{key}"), tmp_path / "cache"
    )
    assert resolved.sha256 == tiny_assets.sha256
    # a second resolve is served from the verified cache, even with the object gone
    client.delete_object(Bucket="mirror", Key=key)
    again = resolve_weights(
        BackboneSpec(name="resnet18", weights_uri=f"s3://mirror/{key}"), tmp_path / "cache"
    )
    assert again.sha256 == tiny_assets.sha256
    client.upload_file(str(tiny_assets.weights), "mirror", "torchvision/resnet18-00000000.safetensors")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve_weights(
            BackboneSpec(
                name="resnet18", weights_uri="s3://mirror/torchvision/resnet18-00000000.safetensors"
            ),
            tmp_path / "c2",
        )
    assert list((tmp_path / "c2").iterdir()) == []


def test_s3_lease_is_exclusive_and_released(s3_endpoint: str) -> None:
    s3_client().create_bucket(Bucket="leases")
    first = S3Lease("leases", "m.json", ttl_seconds=30, wait_seconds=5)
    first.acquire()
    second = S3Lease("leases", "m.json", ttl_seconds=30, wait_seconds=0.3)
    with pytest.raises(LeaseError, match="still held"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_expired_lease_of_a_crashed_holder_is_taken_over(s3_endpoint: str) -> None:
    s3_client().create_bucket(Bucket="leases2")
    crashed = S3Lease("leases2", "m.json", ttl_seconds=0.5, wait_seconds=1)
    crashed.acquire()  # and never released
    time.sleep(0.6)
    taker = S3Lease("leases2", "m.json", ttl_seconds=30, wait_seconds=5)
    taker.acquire()
    body = s3_client().get_object(Bucket="leases2", Key="m.json")["Body"].read().decode()
    assert taker.holder in body
    crashed.release()  # the crashed holder's late release must not free the new holder's lease
    assert taker.holder in s3_client().get_object(Bucket="leases2", Key="m.json")["Body"].read().decode()
    taker.release()


def test_s3_lease_serialises_concurrent_holders(s3_endpoint: str) -> None:
    s3_client().create_bucket(Bucket="leases3")
    assert (
        peak_concurrency(lambda: S3Lease("leases3", "m.json", ttl_seconds=30, wait_seconds=60), 8, 0.05) == 1
    )
