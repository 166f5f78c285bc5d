"""Training from WebDataset shards (:mod:`adaptflow.data.shards`), streamed from S3 or a local folder.

Each epoch the shard list is shuffled with ``seed`` and the epoch (the same order on every rank),
then split with webdataset's ``split_by_node`` (torch.distributed rank, or ``RANK``/``WORLD_SIZE``)
and ``split_by_worker`` (the DataLoader worker): every shard goes to exactly one worker of one rank,
so every sample is seen once per epoch. A shard is read with webdataset's tar iterators from a
boto3 stream (no AWS CLI, no ``pipe:``), each image is checked against its sha256 key, decoded and
resized once (``ResizeCrop``), and the shard's ``uint8`` pixels are kept in a :class:`ShardCache`:
memory-mapped ``.npy`` files with a byte limit and least-recently-used eviction by shard, so a
dataset larger than the cache still trains (an evicted shard is streamed again).

Not ``webdataset.WebDataset`` itself: its pipeline works sample by sample, and its own cache keeps
raw tar files without a limit; here the unit of caching is a decoded shard.

The loader yields what :mod:`adaptflow.training.batches` yields: ``(uint8 [B, 3, S, S], long [B])``
batches for the device-side :class:`~adaptflow.training.batches.BatchTransform`.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, IterableDataset

from adaptflow.contracts import Preprocessing
from adaptflow.data.images import ImageDecodeError, ResizeCrop, decode_image
from adaptflow.data.shards import ShardInfo, ShardSet
from adaptflow.errors import AdaptflowError, DataError
from adaptflow.storage import is_s3, local_path, s3_client, sha256_bytes, split_s3
from adaptflow.training.decoded import decoded_namespace

log = logging.getLogger(__name__)

#: room for the two ``.npy`` headers of a cached shard (numpy pads each to a multiple of 64 bytes)
_HEADER_ROOM = 2 * 4096
_STATS = "stats.json"


class ShardCache:
    """Decoded shards as ``<root>/<key>.npy`` (pixels) and ``<key>.labels.npy``, at most ``limit_bytes``.

    Shared by the loader's worker processes: eviction and writing happen under one file lock, so the
    files on disk never add up to more than the limit, temporary files included. Reading maps a file
    without the lock; a shard evicted while mapped stays readable until it is unmapped (POSIX).
    ``stats.json`` counts, per shard, streams from the store, cache hits and evictions.
    """

    def __init__(self, root: str | Path, limit_bytes: int) -> None:
        self.root = Path(root)
        self.limit_bytes = limit_bytes

    def _lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.labels.npy"

    def usage(self) -> int:
        """Bytes of decoded shards on disk (what the limit bounds)."""
        return sum(p.stat().st_size for p in self.root.rglob("*.npy") if p.is_file())

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        images_path, labels_path = self._paths(key)
        try:
            labels = np.load(labels_path)
            images = np.load(images_path, mmap_mode="r")
            os.utime(images_path)  # least recently used = oldest mtime (atime is often off: noatime)
        except (OSError, ValueError):  # absent, evicted meanwhile, or half-written by a killed run
            return None
        self.count("hits", key)
        return images, labels

    def put(self, key: str, images: np.ndarray, labels: np.ndarray) -> bool:
        """Keeps a decoded shard, evicting the least recently used ones to make room. False when the
        shard alone is above the limit (it is streamed every epoch then)."""
        needed = images.nbytes + labels.nbytes + _HEADER_ROOM
        if needed > self.limit_bytes:
            log.warning("shard %s (%d bytes decoded) is above the cache limit; not cached", key, needed)
            return False
        images_path, labels_path = self._paths(key)
        with self._lock():
            self._evict(needed, keep=images_path)
            images_path.parent.mkdir(parents=True, exist_ok=True)
            # labels first: a pixel file without its labels is never read (``get`` loads labels first)
            for path, array in ((labels_path, labels), (images_path, images)):
                tmp = path.with_name(path.name + ".partial")
                with open(tmp, "wb") as handle:
                    np.save(handle, array)
                os.replace(tmp, path)
        return True

    def _evict(self, needed: int, keep: Path) -> None:
        pixels = sorted(
            (p for p in self.root.rglob("*.npy") if not p.name.endswith(".labels.npy") and p != keep),
            key=lambda p: p.stat().st_mtime_ns,
        )
        usage = self.usage()
        for path in pixels:
            if usage + needed <= self.limit_bytes:
                break
            labels = path.with_name(path.name[: -len(".npy")] + ".labels.npy")
            for victim in (path, labels):
                if victim.exists():
                    usage -= victim.stat().st_size
                    victim.unlink()
            self._count_locked("evictions", str(path.relative_to(self.root))[: -len(".npy")])

    def count(self, what: str, key: str) -> None:
        with self._lock():
            self._count_locked(what, key)

    def _count_locked(self, what: str, key: str) -> None:
        path = self.root / _STATS
        stats = self.stats()
        per_shard = stats.setdefault(what, {})
        per_shard[key] = per_shard.get(key, 0) + 1
        tmp = path.with_name(_STATS + ".partial")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, path)

    def stats(self) -> dict[str, dict[str, int]]:
        """``{"streamed"|"hits"|"evictions": {shard key: count}}`` across every process that used it."""
        path = self.root / _STATS
        try:
            loaded: dict[str, dict[str, int]] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return loaded


class _CountingReader:
    """A stream's bytes counted and hashed as tarfile reads them: a shard cut short at a member
    boundary reads as a clean end of archive, and only its length and sha256 give it away."""

    def __init__(self, stream: IO[bytes] | Any) -> None:
        import hashlib

        self.stream, self.count, self.digest = stream, 0, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.count += len(data)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def open_shard(url: str) -> IO[bytes] | Any:
    """A readable stream of a shard: boto3's streaming body for ``s3://``, else a local file."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as error:
            from adaptflow.errors import StoreError, store_error_from

            busy = store_error_from(error)
            raise busy or StoreError(
                f"cannot stream shard {url}: {error}",
                hint="check the bucket, the credentials and ADAPTFLOW_S3_ENDPOINT_URL",
            ) from error
    return open(local_path(url), "rb")


def _corrupt(url: str, why: str) -> DataError:
    return DataError(
        f"shard {url} is truncated or corrupt: {why}",
        hint="delete the shard set's index.json and run the shard step again: it rewrites what is "
        "missing or damaged",
    )


def decode_shard(url: str, shard: ShardInfo, pre: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Streams one shard and decodes it: (``uint8 [n, 3, S, S]``, ``int64 [n]`` class indices)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    transform = ResizeCrop(pre)
    images, labels = [], []
    stream = open_shard(url)
    reader = _CountingReader(stream)
    try:
        files = tar_file_expander([{"url": url, "stream": reader}])
        for sample in group_by_keys(files):
            key = sample["__key__"]
            fields = [k for k in sample if not k.startswith("__") and k not in ("cls", "json")]
            if "cls" not in sample or len(fields) != 1:
                raise _corrupt(url, f"sample {key} has fields {sorted(sample)}")
            data = sample[fields[0]]
            if sha256_bytes(data) != key:
                raise _corrupt(url, f"sample {key}'s image does not match its sha256")
            images.append(transform(decode_image(data, resize_size=pre.resize_size)).numpy())
            labels.append(int(sample["cls"]))
        reader.drain()  # the tar's trailing padding, so the length and hash cover the whole object
    except (tarfile.TarError, EOFError, ValueError, ImageDecodeError) as error:
        raise _corrupt(url, f"{type(error).__name__}: {error.args[0] if error.args else error}") from None
    finally:
        stream.close()
    if reader.count != shard.bytes or reader.digest.hexdigest() != shard.sha256:
        raise _corrupt(url, f"read {reader.count} bytes, the index records {shard.bytes} and its sha256")
    if len(labels) != shard.samples:
        raise _corrupt(url, f"{len(labels)} samples, the index records {shard.samples}")
    size = (0, 3, pre.input_size, pre.input_size)
    return (np.stack(images) if images else np.empty(size, np.uint8)), np.asarray(labels, dtype=np.int64)


def assigned_shards(shard_set: ShardSet, *, seed: int, epoch: int, shuffle: bool = True) -> list[ShardInfo]:
    """This process's shards for ``epoch``: the shuffled list split by rank, then by loader worker,
    with webdataset's splitters (they read torch.distributed, or ``RANK``/``WORLD_SIZE`` and
    ``WORKER``/``NUM_WORKERS``, and the DataLoader's worker info)."""
    from webdataset.shardlists import SimpleShardList, split_by_node, split_by_worker
    from webdataset.utils import make_seed

    by_name = {s.name: s for s in shard_set.shards}
    # every rank shuffles alike (same seed and epoch), so the rank split stays disjoint
    listing = SimpleShardList(
        [s.name for s in shard_set.shards], seed=make_seed(seed, epoch) if shuffle else None
    )
    return [by_name[item["url"]] for item in split_by_worker(split_by_node(iter(listing)))]


class ShardDataset(IterableDataset[Any]):
    """Samples ``(uint8 [3, S, S] tensor, class index)`` from this rank's and worker's shards.

    Within a shard the samples are permuted per epoch too (the shard step already mixed classes
    across shards). An adaptflow error is yielded as the sample, and :class:`ShardLoader` raises it
    whole in the training process (a DataLoader would re-wrap it as a traceback string).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        pre: Preprocessing,
        cache: ShardCache,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.shard_set, self.pre, self.cache = shard_set, pre, cache
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def cache_key(self, shard: ShardInfo) -> str:
        """Fingerprint, preprocessing, split and the shard's name and content: a rewritten set never
        matches a stale decoded shard."""
        s = self.shard_set
        return (
            f"{s.fingerprint}/{decoded_namespace(self.pre)}/{s.split}/{shard.name[:-4]}-{shard.sha256[:12]}"
        )

    def _decoded(self, shard: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
        key = self.cache_key(shard)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        images, labels = decode_shard(self.shard_set.url(shard), shard, self.pre)
        self.cache.count("streamed", key)
        self.cache.put(key, images, labels)
        return images, labels

    def __iter__(self) -> Iterator[Any]:
        for number, shard in enumerate(assigned_shards(self.shard_set, seed=self.seed, epoch=self.epoch)):
            try:
                images, labels = self._decoded(shard)
            except AdaptflowError as error:
                yield error
                return
            rows = np.arange(len(labels))
            if self.shuffle:
                rows = np.random.default_rng([self.seed, self.epoch, number, len(labels)]).permutation(rows)
            for row in rows:
                yield torch.from_numpy(np.array(images[row])), int(labels[row])


def _stack(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, AdaptflowError):
            return item
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


class ShardLoader(DataLoader[Any]):
    """A DataLoader over a :class:`ShardDataset`: ``(uint8 [B, 3, S, S], long [B])`` batches.

    Each ``iter()`` is one epoch; the epoch number advances by itself, or is set with
    :meth:`set_epoch` (as ``DistributedSampler``'s) so a resumed run replays the same order. Workers
    are not persistent, so each epoch's workers get the current epoch. A worker's last batch may be
    short (batches never mix workers' shards).
    """

    dataset: ShardDataset

    def __init__(self, dataset: ShardDataset, *, batch_size: int, num_workers: int = 0) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_stack,
            pin_memory=torch.cuda.is_available(),
        )
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.dataset.epoch = self._next_epoch
        self._next_epoch += 1
        for batch in super().__iter__():
            if isinstance(batch, AdaptflowError):
                raise batch
            yield batch


def shard_loader(
    shard_set: ShardSet,
    pre: Preprocessing,
    cache_dir: str | Path,
    cache_limit_bytes: int,
    *,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    shuffle: bool = True,
) -> ShardLoader:
    """The loader fine-tuning trains from when the data lives in shards."""
    cache = ShardCache(cache_dir, cache_limit_bytes)
    return ShardLoader(
        ShardDataset(shard_set, pre, cache, seed=seed, shuffle=shuffle),
        batch_size=batch_size,
        num_workers=num_workers,
    )
