"""The ingest stage: source URI -> validated, split, fingerprinted snapshot.

Sources: a local ImageFolder directory, ``s3://bucket/prefix`` in ImageFolder layout, or a
CSV/JSONL manifest whose rows name an image (``uri`` or ``path``), its ``label`` and optionally its
``sha256``. Every new or changed image is fully decoded, in worker processes; a file whose stamp
(size and mtime, ETag, the manifest's sha256) matches the verdict cache keeps its earlier verdict
(``data/verdicts.py``). Unreadable files are quarantined with a reason, never fatal, and so are
files outside the allowed roots, schemes and hosts (``data/checks.py``), never opened. The listing
(``data/listing.py``) is built and held as Arrow columns, a batch at a time, so a million files cost
columns and one ``lstat`` each, not a million Python objects.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from adaptflow.config import IngestConfig
from adaptflow.contracts import SPLITS, ManifestEntry, QuarantineEntry, Snapshot, Split
from adaptflow.cpus import cpu_budget
from adaptflow.data.assemble import assemble
from adaptflow.data.listing import MANIFEST_SUFFIXES, class_folders, list_source, missing_source
from adaptflow.data.snapshot_store import Rows, filtered
from adaptflow.data.verdicts import (
    CHUNK_ROWS,
    CheckSettings,
    VerdictCache,
    cached_verdicts,
    iter_checked,
    split_bucket,
    verdict_batch,
    verdict_schema,
)
from adaptflow.errors import DataError
from adaptflow.logs import console
from adaptflow.progress import track
from adaptflow.storage import is_s3, local_path

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


def check_source(source_uri: str) -> None:
    """Before a run starts anything: a local ``--data`` exists and is a manifest file or a folder
    with class folders. (An S3 source is listed by ingest; reaching it costs a request.)"""
    if is_s3(source_uri) or source_uri.startswith(("http://", "https://")):
        return
    path = local_path(source_uri)
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return
    if not path.is_dir():
        raise missing_source(source_uri)
    class_folders(path)


def assign_split(sha256: str, cfg: IngestConfig) -> Split:
    """Deterministic by content: a file keeps its split as the dataset grows; duplicates never straddle."""
    bucket = split_bucket(sha256, cfg.split_salt)
    if bucket < cfg.test_fraction:
        return "test"
    if bucket < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted (sha256, label) pairs: same content and labels, same fingerprint."""
    digest = hashlib.sha256()
    for sha, label in sorted(pairs):
        digest.update(f"{sha}\t{label}\n".encode())
    return digest.hexdigest()


def _verdicts(
    listing: pa.Table,
    cfg: IngestConfig,
    resize_size: int | None,
    cache: VerdictCache | None,
    cached_table: Future[pa.Table | None] | None,
    location: str,
    writer: ThreadPoolExecutor,
) -> pa.Table:
    """Every listed file that was not refused, with its verdict: cached where its stamp matches,
    else checked now (in worker processes). Writes the new cache on ``writer``'s thread, while
    ingest goes on assembling (Parquet encoding releases the GIL)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    todo = filtered(listing, pc.is_null(listing["reason"])).drop_columns(["reason"])
    cached = cached_table.result() if cached_table is not None else None  # read() never raises
    hits, misses = cached_verdicts(todo, cached) if cached is not None else (None, todo)
    settings = CheckSettings(cfg, resize_size)
    workers = max(1, min(cpu_budget().cpus, 32))
    chunks = (
        list(zip(part["uri"].to_pylist(), part["expected"].to_pylist(), strict=True))
        for part in (misses.slice(i, CHUNK_ROWS) for i in range(0, misses.num_rows, CHUNK_ROWS))
    )
    total = -(-misses.num_rows // CHUNK_ROWS)
    checked: dict[int, pa.RecordBatch] = {}
    for start, verdicts in track(
        iter_checked(chunks, settings, workers, misses.num_rows), total=total, description="ingest"
    ):
        checked[start] = verdict_batch(verdicts)
    columns = ["sha256", "width", "height", "bucket", "reason", "cacheable"]
    new = pa.Table.from_batches([checked[i] for i in sorted(checked)], schema=verdict_batch([]).schema)
    misses = misses.select(["uri", "label", "stamp", "etag"])
    for name in columns:
        misses = misses.append_column(name, new[name])
    if cache is not None:
        cache.hits, cache.checked = (hits.num_rows if hits is not None else 0), misses.num_rows
        cache.checked_uris = misses["uri"].to_pylist() if misses.num_rows <= 100_000 else []
        fresh = misses.filter(pc.and_(misses["cacheable"], pc.is_valid(misses["stamp"])))
        keep = [fresh.select(verdict_schema().names)]
        if hits is not None:
            keep.insert(0, hits.select(verdict_schema().names))
        # not de-duplicated: a file a manifest lists twice is cached twice with one verdict, and a
        # lookup takes the first (de-duplicating a million keys cost more than the rest of the write)
        table = pa.concat_tables(keep).cast(verdict_schema())
        writer.submit(cache.write, location, table)  # never raises: a failed write is a warning
        log.info("ingest: %d verdicts from the cache, %d files checked", cache.hits, cache.checked)
    misses = misses.drop_columns(["cacheable"])
    if hits is None:
        return misses
    return pa.concat_tables([hits.select(misses.column_names).cast(misses.schema), misses])


def _classes(source_uri: str, listing: pa.Table, declared: list[str] | None) -> list[str]:
    """The class names (the layout's, else the manifest's labels); at least two, or a DataError."""
    import pyarrow.compute as pc

    classes = declared if declared is not None else sorted(pc.unique(listing["label"]).to_pylist())
    if not classes:
        raise DataError(
            f"no images found under {source_uri}"
            if is_s3(source_uri)
            else f"manifest {source_uri} has no rows",
            hint="expected s3://bucket/prefix/<class name>/<image files>, or a manifest with uri,label rows",
        )
    if len(classes) < 2:
        raise DataError(
            f"{source_uri} has only one class ({', '.join(map(repr, classes))}); a classifier needs at least two",
            hint="add a folder (or manifest label) per class, each with ingest.min_images_per_class images",
        )
    return classes


def ingest(
    source_uri: str, cfg: IngestConfig, resize_size: int | None = None, verdicts: VerdictCache | None = None
) -> Snapshot:
    """Validates, de-duplicates, splits and fingerprints the images at ``source_uri``.

    ``resize_size``: the run's ``Preprocessing.resize_size`` where known, so images whose resized
    size would exceed ``max_image_pixels`` are quarantined exactly; without it, see ``resize_limit``.
    ``verdicts``: where the previous runs' verdicts are kept; only files new or changed since are
    opened. The files are held as Arrow columns throughout, never as a Python object each.
    """
    import pyarrow.compute as pc

    location = verdicts.location(source_uri, cfg, resize_size) if verdicts is not None else ""
    # one thread for the verdict cache: read while the source is listed, written while assembling
    with ThreadPoolExecutor(1, thread_name_prefix="verdict-cache") as cache_io:
        cached = cache_io.submit(verdicts.read, location) if verdicts is not None else None
        listing, declared = list_source(source_uri, cfg)
        declared_classes = _classes(source_uri, listing, declared)
        log.info(
            "ingest: %d candidate files in %d classes from %s",
            listing.num_rows,
            len(declared_classes),
            source_uri,
        )
        checked = _verdicts(listing, cfg, resize_size, verdicts, cached, location, cache_io)
        refused = filtered(listing, pc.is_valid(listing["reason"])).select(["uri", "reason"])
        parts = assemble(checked, refused, cfg)

    per_class = parts.class_counts_total()
    problems = [
        f"class {name!r} has {per_class.get(name, 0)} valid images (minimum {cfg.min_images_per_class})"
        for name in declared_classes
        if per_class.get(name, 0) < cfg.min_images_per_class
    ]
    if problems:
        raise DataError(
            "not enough data: " + "; ".join(problems),
            hint="add images to those classes, remove the class folders, or lower ingest.min_images_per_class",
        )
    class_counts = parts.class_counts(declared_classes)
    for split in ("train", "test"):
        missing = [c for c, n in class_counts[split].items() if n == 0]
        if missing:
            log.warning(
                "ingest: classes %s have no %s images; metrics for them will be undefined", missing, split
            )
    snapshot = Snapshot(
        source_uri=source_uri,
        class_names=tuple(declared_classes),
        entries=Rows(ManifestEntry, table=parts.entries),
        quarantined=Rows(QuarantineEntry, table=parts.quarantined),
        fingerprint=parts.fingerprint(),
        counts={s: sum(class_counts[s].values()) for s in SPLITS},
        class_counts=class_counts,
    )
    console().info(
        "ingest: %d images (%s), %d quarantined, fingerprint %s",
        parts.entries.num_rows,
        ", ".join(f"{k}={v}" for k, v in snapshot.counts.items()),
        parts.quarantined.num_rows,
        snapshot.fingerprint[:12],
    )
    return snapshot if cfg.train_per_class is None else subsample_train(snapshot, cfg.train_per_class)


def subsample_train(snapshot: Snapshot, per_class: int) -> Snapshot:
    """The few-images condition: keep ``per_class`` training images per class (val and test unchanged).

    Deterministic: within each class the images with the smallest sha256 are kept, so the subset
    depends on the content only. The fingerprint records the subsample.
    """
    chosen: set[str] = set()
    for label in snapshot.class_names:
        train = sorted((e for e in snapshot.split("train") if e.label == label), key=lambda e: e.sha256)
        chosen.update(e.uri for e in train[:per_class])
    entries = [e for e in snapshot.entries if e.split != "train" or e.uri in chosen]  # original order
    counts = {split: sum(1 for e in entries if e.split == split) for split in SPLITS}
    class_counts = {
        split: {c: sum(1 for e in entries if e.split == split and e.label == c) for c in snapshot.class_names}
        for split in SPLITS
    }
    subset = hashlib.sha256(f"{snapshot.fingerprint}|train-per-class={per_class}".encode()).hexdigest()
    log.info("ingest: kept %d training images per class (ingest.train_per_class)", per_class)
    update = {
        "entries": tuple(entries),
        "counts": counts,
        "class_counts": class_counts,
        "fingerprint": subset,
    }
    return snapshot.model_copy(update=update)


def write_quarantine_report(snapshot: Snapshot, folder: str | Path) -> Path:
    path = Path(folder) / "quarantine.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "reason"])
        writer.writerows((q.uri, q.reason) for q in snapshot.quarantined)
    return path
