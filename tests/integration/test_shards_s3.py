"""Training streamed from WebDataset shards on S3 (moto in server mode), with a cache smaller than the data."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adaptflow.config import IngestConfig
from adaptflow.contracts import Snapshot
from adaptflow.data.ingest import ingest
from adaptflow.data.shards import write_shards
from adaptflow.storage import s3_client
from adaptflow.training.batches import eval_batches, train_batches
from adaptflow.training.loop import fit
from adaptflow.training.shard_loader import ShardCache, shard_loader
from services import moto_s3
from shard_images import PRE, expected_digests, make_image_folder, pixel_digest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    """Images on S3, ingested from there: the shard step reads them through adaptflow.storage."""
    folder = make_image_folder(tmp_path_factory.mktemp("images"), per_class=24, seed=11)
    with moto_s3():
        client = s3_client()
        client.create_bucket(Bucket="data")
        for path in sorted(folder.rglob("*.png")):
            client.upload_file(str(path), "data", f"images/{path.parent.name}/{path.name}")
        yield ingest("s3://data/images", IngestConfig())


class Requests:
    """moto's request log (its recorder), read back as (method, path) pairs."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from moto.moto_api import recorder

        self.path, self.recorder = path, recorder
        monkeypatch.setattr(recorder, "_location", str(path))  # MOTO_RECORDER_FILEPATH, read at import
        recorder.reset_recording()
        recorder.start_recording()

    def stop(self) -> list[tuple[str, str]]:
        self.recorder.stop_recording()
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [(row["method"], row["url"].split("?", 1)[0]) for row in rows]


def test_training_streams_shards_from_s3_through_a_cache_smaller_than_the_data(
    s3_snapshot: Snapshot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    shard_set = write_shards(s3_snapshot, "train", "s3://data/root", shard_images=6)
    assert shard_set.uri == f"s3://data/root/shards/{s3_snapshot.fingerprint}/train"
    assert len(shard_set.shards) >= 6

    requests = Requests(tmp_path / "moto-requests.jsonl", monkeypatch)
    assert write_shards(s3_snapshot, "train", "s3://data/root", shard_images=6) == shard_set
    rewrite = requests.stop()
    assert rewrite and not [r for r in rewrite if r[0] in ("PUT", "POST")]  # cached: nothing uploaded

    decoded_bytes = shard_set.samples * 3 * 16 * 16
    limit = decoded_bytes // 2  # the cache holds about half the decoded split
    cache_dir = tmp_path / "cache"
    cache = ShardCache(cache_dir, limit)
    loader = shard_loader(shard_set, PRE, cache_dir, limit, batch_size=8, seed=5, num_workers=2)
    want = expected_digests(s3_snapshot)
    requests = Requests(tmp_path / "moto-requests-training.jsonl", monkeypatch)
    for _ in range(2):
        seen: Counter[str] = Counter()
        for images, _labels in loader:
            seen.update(pixel_digest(image) for image in images)
            assert cache.usage() <= limit
        assert seen == want  # every training image exactly once per epoch, across both workers
    shard_gets = Counter(path.rsplit("/", 1)[-1] for method, path in requests.stop() if method == "GET")
    shard_gets = Counter({name: n for name, n in shard_gets.items() if name.endswith(".tar")})

    files = list(cache_dir.rglob("*.npy"))
    assert files and sum(p.stat().st_size for p in files) <= limit
    stats = cache.stats()
    assert sum(stats["streamed"].values()) == sum(shard_gets.values())  # the loader's count is S3's
    assert set(shard_gets) == {s.name for s in shard_set.shards}
    assert sum(shard_gets.values()) > len(shard_set.shards)  # evicted shards were streamed again
    for key, n in stats["streamed"].items():  # ...and only those: a shard streams again after eviction
        assert n <= 1 + stats.get("evictions", {}).get(key, 0)
    # every other read was served by the cache: each shard is read once per epoch, from one or the
    # other (whether any read hits depends on how the two workers interleave with the evictions)
    reads = sum(stats.get("hits", {}).values()) + sum(stats["streamed"].values())
    assert reads == 2 * len(shard_set.shards)

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, len(s3_snapshot.class_names)),
    )
    val = shard_loader(
        write_shards(s3_snapshot, "val", "s3://data/root", shard_images=6),
        PRE,
        cache_dir,
        limit,
        batch_size=16,
        shuffle=False,
    )
    result = fit(
        model,
        loader,
        val,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        epochs=2,
        patience=2,
        device=torch.device("cpu"),
        train_transform=train_batches(PRE, augment=False),
        val_transform=eval_batches(PRE),
    )
    assert len(result.history) == 2
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in result.history)
    assert result.train_images == 2 * shard_set.samples
