"""The ``shard`` step: a snapshot split written as WebDataset tar shards, for data that fits no one disk.

Layout, under any root adaptflow.storage reaches (a local folder or ``s3://bucket/prefix``)::

    <root>/shards/<fingerprint>/<split>/shard-000000.tar     one tar per shard
    <root>/shards/<fingerprint>/<split>/shard-000000.done.json   written after its shard: samples, bytes, sha256
    <root>/shards/<fingerprint>/<split>/index.json            written last: the set is complete

Each sample is keyed by the image's sha256 and holds the image bytes **as ingested** (``<ext>``), its
class index (``cls``) and where it came from (``json``). Original bytes, not pixels resized to one
model's input: the shard set then depends on the data alone (the fingerprint), so every backbone and
input size trains from the same shards; the reader verifies each image against its sha256 key; and
the decoded, resized ``uint8`` pixels are cached per shard and per preprocessing on the training
machine (:mod:`adaptflow.training.shard_loader`), so decoding happens once per shard there anyway.

Shards are written with webdataset's :class:`webdataset.TarWriter` (its tar layout is what every
WebDataset reader expects, and ``mtime=0`` makes a shard's bytes reproducible). Not its
``ShardWriter``: that one cuts shards on running byte counts, so a resumed run could not tell which
samples a leftover shard holds. Here shard ``k`` always holds the same samples (a plan fixed by the
data, the seed and the shard size), so a killed run's finished shards are reused, after checking
their recorded size, and the rest are written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel, ConfigDict

from adaptflow.contracts import ManifestEntry, Snapshot, Split
from adaptflow.errors import ConfigError, DataError, StoreError, store_error_from
from adaptflow.storage import is_s3, local_path, s3_client, sha256_file, split_s3, write_atomic

if TYPE_CHECKING:
    from adaptflow.config import FinetuneConfig
    from adaptflow.data.images import ImageStore

log = logging.getLogger(__name__)

FORMAT = "adaptflow-wds/1"
INDEX = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
#: images read at once while a shard is written (S3 reads wait on the network, not the CPU)
READ_THREADS = 8
#: images whose size sets the images per shard when the shard size is given in bytes
SIZE_SAMPLE = 32


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    samples: int
    bytes: int
    sha256: str


class ShardSet(BaseModel):
    """A complete shard set: what ``index.json`` holds, plus where it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = FORMAT
    uri: str  # the split's folder: <root>/shards/<fingerprint>/<split>
    fingerprint: str
    split: Split
    class_names: tuple[str, ...]
    plan: str  # hash of which samples go into which shard
    shards: tuple[ShardInfo, ...]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def url(self, shard: ShardInfo) -> str:
        return _join(self.uri, shard.name)

    @classmethod
    def load(cls, uri: str) -> ShardSet:
        """The set whose index is at ``<uri>/index.json`` (``uri`` is the split's folder)."""
        text = _Place(uri).read_text(INDEX)
        if text is None:
            raise DataError(
                f"no shard index at {_join(uri, INDEX)}",
                hint="run the shard step (write_shards) for this snapshot first",
            )
        return cls.model_validate_json(text)


def shard_set_uri(dest_root_uri: str, fingerprint: str, split: Split) -> str:
    return _join(dest_root_uri, "shards", fingerprint, split)


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


class _Place:
    """One folder on a local disk or under an S3 prefix: the few operations the shard step needs.

    Writes are whole-or-nothing: a local file is renamed into place, and an S3 object appears only
    when its (multipart) upload completes.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.s3 = is_s3(uri)

    def _key(self, name: str) -> tuple[str, str]:
        bucket, prefix = split_s3(self.uri)
        return bucket, str(PurePosixPath(prefix) / name)

    def _error(self, name: str, error: Exception) -> StoreError:
        busy = store_error_from(error)
        if busy is not None:
            return busy
        return StoreError(
            f"cannot reach {_join(self.uri, name)}: {error}",
            hint="check the bucket exists, the credentials and ADAPTFLOW_S3_ENDPOINT_URL",
        )

    def size(self, name: str) -> int | None:
        if not self.s3:
            path = local_path(self.uri) / name
            return path.stat().st_size if path.is_file() else None
        bucket, key = self._key(name)
        try:
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as error:
            if getattr(error, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise self._error(name, error) from error

    def read_text(self, name: str) -> str | None:
        if not self.s3:
            path = local_path(self.uri) / name
            return path.read_text() if path.is_file() else None
        bucket, key = self._key(name)
        try:
            body: bytes = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:
            if getattr(error, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise self._error(name, error) from error
        return body.decode()

    def write_text(self, name: str, text: str) -> None:
        if not self.s3:
            write_atomic(local_path(self.uri) / name, lambda handle: handle.write(text.encode()))
            return
        bucket, key = self._key(name)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=text.encode())
        except Exception as error:
            raise self._error(name, error) from error

    def put_file(self, source: Path, name: str) -> None:
        """Moves a finished local file into place (local: a rename; S3: an upload, then it is removed)."""
        if not self.s3:
            os.replace(source, local_path(self.uri) / name)
            return
        bucket, key = self._key(name)
        try:
            s3_client().upload_file(str(source), bucket, key)
        except Exception as error:
            raise self._error(name, error) from error
        finally:
            source.unlink(missing_ok=True)

    def scratch(self) -> Path:
        """Where a shard is written before it is put in place: beside it locally, so the rename is atomic."""
        if self.s3:
            return Path(tempfile.gettempdir())
        folder = local_path(self.uri)
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _extension(entry: ManifestEntry) -> str:
    """The field name of the image in its sample: its file's extension, as WebDataset readers expect."""
    suffix = PurePosixPath(entry.uri.split("?", 1)[0]).suffix.lower().lstrip(".")
    return suffix if suffix.isalnum() and suffix not in ("cls", "json") else "img"


def plan_order(entries: Sequence[ManifestEntry], seed: int) -> list[ManifestEntry]:
    """The split in a seeded order fixed by content: an ImageFolder split is sorted by class, and a
    shard of one class would make one-class batches. Duplicate contents (ingest quarantines them)
    are kept once."""
    unique = {e.sha256: e for e in reversed(entries)}  # the first entry of a duplicate wins
    return sorted(unique.values(), key=lambda e: hashlib.sha256(f"{seed}:{e.sha256}".encode()).hexdigest())


def images_per_shard(
    order: Sequence[ManifestEntry], store: ImageStore, shard_images: int | None, shard_bytes: int | None
) -> int:
    if (shard_images is None) == (shard_bytes is None):
        raise ConfigError(
            "give exactly one of shard_images and shard_bytes",
            hint="WebDataset suggests shards of 100 MB to 1 GB: e.g. shard_bytes=256_000_000",
        )
    if shard_images is not None:
        if shard_images < 1:
            raise ConfigError(f"shard_images={shard_images} must be at least 1")
        return shard_images
    assert shard_bytes is not None
    # the same first images every run, so the plan (and a resumed run's reuse of shards) is stable
    # measured, not computed: what a tar spends on headers depends on the writer's format
    first = order[:SIZE_SAMPLE]
    buffer = io.BytesIO()
    with _tar_writer(buffer) as writer:
        for entry in first:
            writer.write(_sample(entry, store.read(entry), 0))
    per_sample = (len(buffer.getvalue()) - tarfile.RECORDSIZE) / len(first)  # less the end padding
    return max(1, int((shard_bytes - tarfile.RECORDSIZE) // per_sample))


def _tar_writer(handle: BinaryIO) -> Any:
    import webdataset as wds

    return wds.TarWriter(handle, mtime=0.0)  # a fixed mtime: the same samples make the same bytes


def _sample(entry: ManifestEntry, data: bytes, label: int) -> dict[str, Any]:
    return {
        "__key__": entry.sha256,
        _extension(entry): data,  # the bytes as ingested
        "cls": label,
        "json": {"uri": entry.uri, "label": entry.label},
    }


def _plan_hash(fingerprint: str, split: str, order: Sequence[ManifestEntry], per_shard: int) -> str:
    digest = hashlib.sha256(f"{FORMAT}|{fingerprint}|{split}|{per_shard}".encode())
    for entry in order:
        digest.update(entry.sha256.encode())
    return digest.hexdigest()[:32]


def _complete(place: _Place, shard_set: ShardSet) -> bool:
    """Every shard the index names is there with its recorded size (a cheap HEAD/stat each)."""
    return all(place.size(s.name) == s.bytes for s in shard_set.shards)


def _write_one(
    place: _Place,
    name: str,
    entries: Sequence[ManifestEntry],
    class_index: dict[str, int],
    store: ImageStore,
) -> ShardInfo:
    fd, scratch = tempfile.mkstemp(dir=place.scratch(), prefix=f".{name}.", suffix=".partial")
    tmp = Path(scratch)
    try:
        with (
            os.fdopen(fd, "wb") as handle,
            _tar_writer(handle) as writer,
            ThreadPoolExecutor(READ_THREADS) as pool,
        ):
            for entry, data in zip(entries, pool.map(store.read, entries), strict=True):
                writer.write(_sample(entry, data, class_index[entry.label]))
        info = ShardInfo(name=name, samples=len(entries), bytes=tmp.stat().st_size, sha256=sha256_file(tmp))
        place.put_file(tmp, name)
    finally:
        tmp.unlink(missing_ok=True)
    return info


def write_shards(
    snapshot: Snapshot,
    split: Split,
    dest_root_uri: str,
    *,
    shard_images: int | None = None,
    shard_bytes: int | None = None,
    seed: int = 0,
    store: ImageStore | None = None,
) -> ShardSet:
    """Writes ``split`` of ``snapshot`` as tar shards under ``dest_root_uri`` (local or ``s3://``).

    Cached per fingerprint: when the set's index exists and every shard it names is present with its
    recorded size, nothing is read or written. Otherwise the shards are written one by one, each
    whole-or-nothing, and each followed by a ``.done.json`` record; a shard a killed run finished
    (its record matches this plan and its size) is kept, the rest are written, and the index last.
    """
    from adaptflow.data.images import ImageStore

    place = _Place(shard_set_uri(dest_root_uri, snapshot.fingerprint, split))
    existing = place.read_text(INDEX)
    if existing is not None:
        try:
            cached = ShardSet.model_validate_json(existing)
        except ValueError:
            cached = None
        if cached is not None and cached.format == FORMAT and _complete(place, cached):
            log.info("shards: %s is complete (%d shards); nothing to write", place.uri, len(cached.shards))
            return cached
        log.warning("shards: the index at %s names missing or changed shards; rewriting", place.uri)
    store = store or ImageStore(cache_bytes=0)  # each image is read once: caching it only costs memory
    order = plan_order(snapshot.split(split), seed)
    if not order:
        raise DataError(f"the snapshot's {split} split is empty", hint="check the ingest step's counts")
    per_shard = images_per_shard(order, store, shard_images, shard_bytes)
    plan = _plan_hash(snapshot.fingerprint, split, order, per_shard)
    class_index = {name: i for i, name in enumerate(snapshot.class_names)}
    infos: list[ShardInfo] = []
    reused = 0
    for number, first in enumerate(range(0, len(order), per_shard)):
        name = SHARD_PATTERN % number
        done = _done_record(place, name)
        if done is not None and done.get("plan") == plan:
            info = ShardInfo.model_validate(done["shard"])
            if place.size(name) == info.bytes:
                infos.append(info)
                reused += 1
                continue
        info = _write_one(place, name, order[first : first + per_shard], class_index, store)
        place.write_text(f"{name[:-4]}.done.json", json.dumps({"plan": plan, "shard": info.model_dump()}))
        infos.append(info)
    shard_set = ShardSet(
        uri=place.uri,
        fingerprint=snapshot.fingerprint,
        split=split,
        class_names=tuple(snapshot.class_names),
        plan=plan,
        shards=tuple(infos),
    )
    place.write_text(INDEX, shard_set.model_dump_json(indent=2))
    log.info(
        "shards: wrote %d of %d shards (%d samples, %.1f MB) to %s%s",
        len(infos) - reused,
        len(infos),
        shard_set.samples,
        shard_set.bytes / 1e6,
        place.uri,
        f"; {reused} finished by an earlier run were kept" if reused else "",
    )
    return shard_set


def _done_record(place: _Place, name: str) -> dict[str, Any] | None:
    text = place.read_text(f"{name[:-4]}.done.json")
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write_split_shards(
    snapshot: Snapshot, cfg: FinetuneConfig, store: ImageStore | None = None
) -> list[ShardSet]:
    """The shard step: the train and val splits under ``finetune.shards_root``, written once per fingerprint."""
    if cfg.shards_root is None:
        raise ConfigError(
            "finetune.data_source=shards needs finetune.shards_root",
            hint="set it to where the shards go, e.g. --set finetune.shards_root=s3://bucket/adaptflow",
        )
    root = cfg.shards_root
    return [
        write_shards(snapshot, s, root, shard_bytes=cfg.shard_bytes, store=store) for s in ("train", "val")
    ]
