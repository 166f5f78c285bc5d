"""The shard step and the shard loader on a local folder: caching, resuming, splits, corruption."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from adaptflow.config import IngestConfig
from adaptflow.contracts import Snapshot
from adaptflow.data import shards as shards_module
from adaptflow.data.ingest import ingest
from adaptflow.data.shards import INDEX, ShardSet, write_shards
from adaptflow.errors import DataError
from adaptflow.training.batches import train_batches
from adaptflow.training.shard_loader import ShardCache, assigned_shards, shard_loader
from adaptflow.training.step import train_step
from shard_images import PRE, expected_digests, make_image_folder, pixel_digest


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    folder = make_image_folder(tmp_path_factory.mktemp("images"))
    return ingest(str(folder), IngestConfig())


def test_shards_are_written_once_per_fingerprint_and_a_killed_run_is_finished(
    snapshot: Snapshot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard_set = write_shards(snapshot, "train", str(tmp_path), shard_images=5)
    folder = tmp_path / "shards" / snapshot.fingerprint / "train"
    assert shard_set.uri == str(folder)
    assert shard_set.samples == len(snapshot.split("train"))
    assert [s.name for s in shard_set.shards] == [f"shard-{i:06d}.tar" for i in range(len(shard_set.shards))]
    assert ShardSet.load(str(folder)) == shard_set
    assert shard_set.class_names == snapshot.class_names

    written: list[str] = []
    real_write = shards_module._write_one

    def counting_write(place, name, entries, class_index, store):  # type: ignore[no-untyped-def]
        written.append(name)
        return real_write(place, name, entries, class_index, store)

    monkeypatch.setattr(shards_module, "_write_one", counting_write)
    assert write_shards(snapshot, "train", str(tmp_path), shard_images=5) == shard_set
    assert written == []  # complete: nothing rewritten

    # a run killed before its index, with one shard never written: that one alone is written
    (folder / INDEX).unlink()
    (folder / "shard-000002.tar").unlink()
    again = write_shards(snapshot, "train", str(tmp_path), shard_images=5)
    assert written == ["shard-000002.tar"]
    assert again.shards == shard_set.shards  # mtime=0: the rewritten shard has the same bytes

    # a truncated shard under a complete-looking index is not trusted either
    shard = folder / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    write_shards(snapshot, "train", str(tmp_path), shard_images=5)
    assert written == ["shard-000002.tar", "shard-000001.tar"]


def test_shard_bytes_sets_images_per_shard(snapshot: Snapshot, tmp_path: Path) -> None:
    shard_set = write_shards(snapshot, "train", str(tmp_path), shard_bytes=40_000)
    assert len(shard_set.shards) > 1
    sizes = [s.bytes for s in shard_set.shards]
    assert max(sizes) <= 40_000 * 1.25 and max(sizes[:-1]) >= 40_000 * 0.75, sizes
    with pytest.raises(Exception, match="exactly one of shard_images and shard_bytes"):
        write_shards(snapshot, "val", str(tmp_path))


def test_rank_and_worker_splits_are_disjoint_complete_and_seeded(
    snapshot: Snapshot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard_set = write_shards(snapshot, "train", str(tmp_path), shard_images=3)
    names = {s.name for s in shard_set.shards}
    assert len(names) >= 8

    def split(epoch: int) -> dict[tuple[int, int], list[str]]:
        parts = {}
        for rank in (0, 1):
            for worker in (0, 1):
                # what torchrun and a DataLoader worker would say; webdataset's splitters read these
                monkeypatch.setenv("RANK", str(rank))
                monkeypatch.setenv("WORLD_SIZE", "2")
                monkeypatch.setenv("WORKER", str(worker))
                monkeypatch.setenv("NUM_WORKERS", "2")
                parts[rank, worker] = [s.name for s in assigned_shards(shard_set, seed=3, epoch=epoch)]
        return parts

    first = split(0)
    everything = [name for part in first.values() for name in part]
    assert sorted(everything) == sorted(names)  # complete, and no shard twice
    assert all(first.values())
    assert split(0) == first  # deterministic given seed and epoch
    assert split(1) != first  # and reshuffled per epoch


def test_local_loader_sees_every_image_once_per_epoch_and_trains(snapshot: Snapshot, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    shard_set = write_shards(snapshot, "train", str(tmp_path / "store"), shard_images=4)
    decoded_bytes = shard_set.samples * 3 * 16 * 16
    limit = decoded_bytes // 2 + 2 * 4096  # about half the decoded split
    loader = shard_loader(shard_set, PRE, tmp_path / "cache", limit, batch_size=8, seed=1)
    cache = ShardCache(tmp_path / "cache", limit)
    want = expected_digests(snapshot)
    orders = []
    for _ in range(2):
        seen: Counter[str] = Counter()
        labels: list[int] = []
        for images, y in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
            seen.update(pixel_digest(image) for image in images)
            labels += y.tolist()
            assert cache.usage() <= limit
        assert seen == want
        assert Counter(labels) == Counter(
            snapshot.class_names.index(e.label) for e in snapshot.split("train")
        )
        orders.append(labels)
    assert orders[0] != orders[1]  # the second epoch is shuffled afresh
    stats = cache.stats()
    assert sum(stats["streamed"].values()) > len(shard_set.shards)  # evicted shards were streamed again
    assert stats["hits"] and stats["evictions"]

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, len(snapshot.class_names)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    transform = train_batches(PRE, augment=False)
    images, y = next(iter(loader))
    loss, logits = train_step(
        model, transform(images), y, optimizer, torch.nn.CrossEntropyLoss(), torch.device("cpu")
    )
    assert torch.isfinite(loss) and logits.shape == (len(y), len(snapshot.class_names))


def test_a_truncated_shard_is_a_data_error_with_a_hint(snapshot: Snapshot, tmp_path: Path) -> None:
    shard_set = write_shards(snapshot, "train", str(tmp_path / "store"), shard_images=50)
    path = Path(shard_set.url(shard_set.shards[0]))
    whole = path.read_bytes()
    for cut in (len(whole) // 2, 1536):  # mid-member, and right after the first member
        path.write_bytes(whole[:cut])
        loader = shard_loader(shard_set, PRE, tmp_path / f"cache-{cut}", 1 << 20, batch_size=4)
        with pytest.raises(DataError, match="truncated or corrupt") as info:
            list(loader)
        assert info.value.hint and "shard step" in info.value.hint
