"""Ingest's verdict cache, and the checks of the files it misses, run in worker processes.

A verdict is what checking one file found: ok (sha256, width, height and its split bucket) or
quarantined with a reason. It is keyed by the file's URI and a *stamp*, a version key the listing
gives for free: ``size:mtime_ns`` for a local file, ``etag:...`` for an S3 object, and
``sha256:...`` where a manifest row names its content (the check then confirms that sha256, and a
mismatch is never cached; reads at training check it again, so a local file named by its sha256
needs no stat: ``data/presence.py``). A row
without a stamp (an http URL, an S3 key named by a manifest without a sha256) is checked every run.

The cache is one Parquet file per source and per check setting, under ``<workdir>/cache/ingest-verdicts``
or, on a cluster, ``<cluster.pipeline_root>/cache/ingest-verdicts``: the workdir of a pipeline pod
is gone when the pod is, the pipeline root is the storage every run of the pipeline shares. It holds
the verdicts of the latest run only, so removed files leave it. An unreadable cache is a miss.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from adaptflow.config import IngestConfig
from adaptflow.data.checks import fetch
from adaptflow.data.images import ImageDecodeError, decode_image, resize_limit
from adaptflow.errors import StoreError
from adaptflow.storage import (
    is_http,
    is_s3,
    local_path,
    read_bytes,
    s3_client,
    sha256_bytes,
    split_s3,
    write_atomic,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from adaptflow.config import Settings

log = logging.getLogger(__name__)

#: bump when the check itself changes (new limits, another decoder): every cached verdict is then stale
CHECK_VERSION = 1
#: below this many misses the files are checked in this process: a pool costs more than it saves
POOL_THRESHOLD = 256
CHUNK_ROWS = 256


def verdict_cache_root(settings: Settings) -> str:
    """Where verdicts live between runs: the pipeline root when one is set, else the local workdir."""
    if settings.cluster.pipeline_root:
        return settings.cluster.pipeline_root.rstrip("/") + "/cache/ingest-verdicts"
    return str(Path(settings.workdir).resolve() / "cache" / "ingest-verdicts")


def verdict_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("uri", pa.string()),
            ("stamp", pa.string()),
            ("sha256", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("bucket", pa.float64()),
            ("reason", pa.string()),
        ]
    )


@dataclass
class VerdictCache:
    """The verdicts of one source under ``root``; ``hits`` and ``checked`` count the last ingest."""

    root: str
    hits: int = 0
    checked: int = 0
    checked_uris: list[str] = field(default_factory=list)

    def location(self, source_uri: str, cfg: IngestConfig, resize_size: int | None) -> str:
        # the verdict depends on the check's settings and the split on the salt: they are in the key
        settings = [source_uri, CHECK_VERSION, cfg.max_image_pixels, cfg.max_aspect_ratio, resize_size]
        settings.append(cfg.split_salt)
        key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]
        return f"{self.root.rstrip('/')}/{key}.parquet"

    def read(self, location: str) -> pa.Table | None:
        import pyarrow.parquet as pq

        try:
            # ParquetFile, not read_table: read_table goes through pyarrow.dataset, which imports pandas
            if is_s3(location):
                data = read_bytes(location)
                table = pq.ParquetFile(io.BytesIO(data)).read()
            elif local_path(location).exists():
                table = pq.ParquetFile(local_path(location)).read()
            else:
                return None
            return table.select(verdict_schema().names).cast(verdict_schema())
        except StoreError as error:
            log.info("ingest: no verdict cache at %s (%s): checking every file", location, error.message)
        except Exception as error:  # a torn or foreign file: the cache is only ever a shortcut
            log.warning("ingest: verdict cache %s is unreadable (%s); checking every file", location, error)
        return None

    def write(self, location: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        # no dictionaries: URIs, stamps and sha256s are unique, and trying to dictionary-encode them
        # costs as much as writing them. lz4, not zstd: every rerun reads and writes the whole cache,
        # and lz4 halves that time (at a million rows) for a file about twice the size
        pq.write_table(table.cast(verdict_schema()), buffer, compression="lz4", use_dictionary=False)
        try:
            if is_s3(location):
                bucket, key = split_s3(location)
                s3_client().put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
            else:
                write_atomic(local_path(location), lambda handle: handle.write(buffer.getvalue()))
        except Exception as error:  # a cache that cannot be written costs the next run time, not this run
            log.warning("ingest: cannot write the verdict cache %s: %s", location, error)


@dataclass(frozen=True)
class CheckSettings:
    """What a worker process needs to check a file (small: it is pickled with every chunk)."""

    cfg: IngestConfig
    resize_size: int | None


def split_bucket(sha256: str, salt: str) -> float:
    """Where a file's content falls in [0, 1): ``assign_split`` compares it with the fractions."""
    return int(hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()[:12], 16) / float(1 << 48)


Verdict = tuple[str | None, int | None, int | None, float | None, str | None, bool]


def check_file(
    uri: str, expected_sha256: str | None, settings: CheckSettings, data: bytes | StoreError | None = None
) -> Verdict:
    """(sha256, width, height, bucket, reason, cacheable): the full check of one file's bytes."""
    cfg = settings.cfg
    name = PurePosixPath(uri).name or uri  # reasons name the file
    if data is None:
        try:
            data = fetch(uri, cfg)
        except StoreError as error:
            data = error
    if isinstance(data, StoreError):  # perhaps transient: never cached
        return None, None, None, None, f"{name}: unreadable: {data.message}", False
    sha = sha256_bytes(data)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        # not cached: the stamp is the manifest's sha256, and these bytes are not that content (a
        # file restored to it must pass on the next run)
        return sha, None, None, None, f"{name}: sha256 {sha[:12]}… differs from the manifest's", False
    resize, resized_limit = resize_limit(cfg.max_image_pixels, settings.resize_size)
    try:
        image = decode_image(
            data,
            cfg.max_image_pixels,
            max_aspect_ratio=cfg.max_aspect_ratio,
            resize_size=resize,
            max_resized_pixels=resized_limit,
        )
    except ImageDecodeError as error:
        return sha, None, None, None, f"{name}: {error}", True
    return sha, image.size[0], image.size[1], split_bucket(sha, cfg.split_salt), None, True


def check_chunk(rows: list[tuple[str, str | None]], settings: CheckSettings) -> list[Verdict]:
    """A worker's unit: remote bytes are fetched by a few threads (I/O), decoded one by one (CPU)."""
    remote = [uri for uri, _ in rows if is_s3(uri) or is_http(uri)]
    fetched: dict[str, bytes | StoreError] = {}
    if len(remote) > 1 and settings.cfg.download_workers > 1:
        threads = min(len(remote), max(1, settings.cfg.download_workers // 2))

        def get(uri: str) -> bytes | StoreError:
            try:
                return fetch(uri, settings.cfg)
            except StoreError as error:
                return error

        with ThreadPoolExecutor(threads) as pool:
            fetched = dict(zip(remote, pool.map(get, remote), strict=True))
    return [check_file(uri, sha, settings, fetched.get(uri)) for uri, sha in rows]


def iter_checked(
    chunks: Iterable[list[tuple[str, str | None]]], settings: CheckSettings, workers: int, rows: int
) -> Iterator[tuple[int, list[Verdict]]]:
    """(chunk number, its verdicts) for every chunk of (uri, expected sha256), in completion order.

    In this process when there are few rows, else in ``workers`` processes (decoding is CPU work that
    threads would serialise on the GIL), a bounded number of chunks in flight so that the pending
    work never holds every row at once.
    """
    if rows < POOL_THRESHOLD or workers <= 1:
        for number, chunk in enumerate(chunks):
            yield number, check_chunk(chunk, settings)
        return
    # fork, as the training loaders do: workers start at once; storage drops S3 clients at fork
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending: dict[Future[list[Verdict]], int] = {}
        for number, chunk in enumerate(chunks):
            pending[pool.submit(check_chunk, chunk, settings)] = number
            while len(pending) >= 4 * workers:
                yield from _collect(pending)
        while pending:
            yield from _collect(pending)


def _collect(pending: dict[Future[list[Verdict]], int]) -> Iterator[tuple[int, list[Verdict]]]:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        yield pending.pop(future), future.result()


def verdict_batch(verdicts: list[Verdict]) -> pa.RecordBatch:
    import pyarrow as pa

    names = ["sha256", "width", "height", "bucket", "reason", "cacheable"]
    kinds = [pa.string(), pa.int64(), pa.int64(), pa.float64(), pa.string(), pa.bool_()]
    columns = list(zip(*verdicts, strict=True)) if verdicts else [()] * len(names)
    arrays = [pa.array(list(c), kind) for c, kind in zip(columns, kinds, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def cached_verdicts(todo: pa.Table, cached: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(the rows of ``todo`` whose uri is in the cache with the same stamp, with their verdict; the
    others), each in ``todo``'s order. A row without a stamp never hits.

    The cache is written in listing order, and a grown manifest or an unchanged folder lists the
    same files in the same order: the rows where both agree are matched by position (one aligned
    comparison), and only the rest by a hash lookup on the URI against the rest of the cache. Where
    a URI is cached twice (a manifest naming one file with two sha256s) the first row counts; the
    other row misses and is checked again: a wasted check, never a wrong verdict.
    """
    import pyarrow as pa

    aligned = _aligned(todo, cached, "uri")
    # the leading rows that hit are zero-copy slices: no take or filter of a million rows
    head = _aligned(todo.slice(0, aligned), cached.slice(0, aligned), "stamp")
    hits = todo.slice(0, head)
    for name in VERDICT_COLUMNS:
        hits = hits.append_column(name, cached[name].slice(0, head))
    if head == todo.num_rows:
        return hits, todo.slice(head)
    more, misses = _looked_up(todo.slice(head), cached.slice(head), aligned - head)
    return pa.concat_tables([hits, more]) if head else more, misses


VERDICT_COLUMNS = ("sha256", "width", "height", "bucket", "reason")


def _aligned(todo: pa.Table, cached: pa.Table, column: str) -> int:
    """How many leading rows of ``todo`` and ``cached`` agree on ``column``."""
    import numpy as np
    import pyarrow.compute as pc

    both = min(todo.num_rows, cached.num_rows)
    same = pc.equal(todo[column].slice(0, both), cached[column].slice(0, both))
    same_at = np.asarray(pc.fill_null(same, False).to_numpy(zero_copy_only=False), bool)
    return both if same_at.all() else int(np.argmin(same_at))


def _looked_up(todo: pa.Table, cached: pa.Table, aligned: int) -> tuple[pa.Table, pa.Table]:
    """``cached_verdicts`` by position over the ``aligned`` leading rows (their URIs agree), else by
    a hash lookup."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rest = pc.index_in(todo["uri"].slice(aligned), value_set=cached["uri"].slice(aligned).combine_chunks())
    rest = rest.combine_chunks() if isinstance(rest, pa.ChunkedArray) else rest
    shifted = pc.cast(pc.add(rest, aligned), pa.int64())  # a position in the whole cache
    where = pa.concat_arrays([pa.array(np.arange(aligned, dtype=np.int64)), shifted])
    hit = pc.fill_null(pc.equal(todo["stamp"], cached["stamp"].take(where)), False)
    hits = todo.filter(hit)
    found = cached.take(where.filter(hit))
    for name in VERDICT_COLUMNS:
        hits = hits.append_column(name, found[name])
    return hits, todo.filter(pc.invert(hit))
