"""The ingest stage: source URI -> validated, split, fingerprinted snapshot.

Sources: a local ImageFolder directory, ``s3://bucket/prefix`` in ImageFolder layout, or a
CSV/JSONL manifest whose rows name an image (``uri`` or ``path``) and its ``label``.
Every image is fully decoded; unreadable files are quarantined with a reason, never fatal, and so
are files outside the allowed roots, schemes and hosts (``data/checks.py``), never opened.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from adaptflow.config import IngestConfig
from adaptflow.contracts import SPLITS, ManifestEntry, QuarantineEntry, Snapshot, Split
from adaptflow.data.checks import allowed_roots, confine_local, fetch, is_utf8, manifest_target, printable
from adaptflow.data.images import ImageDecodeError, decode_image, resize_limit
from adaptflow.errors import DataError, StoreError
from adaptflow.logs import console
from adaptflow.progress import track
from adaptflow.storage import is_s3, iter_s3_objects, local_path, sha256_bytes

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class SourceItem:
    uri: str
    label: str
    etag: str | None = None
    reason: str | None = None  # refused before reading: quarantined, never opened


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def _class_folders(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no class folders",
            hint="lay images out as ImageFolder: <root>/<class name>/<image files>, or pass a manifest",
        )
    bad_names = [printable(name) for name in classes if not is_utf8(name)]
    if bad_names:  # a class name goes into JSON, MLflow and the model's metadata
        raise DataError(
            f"class folder names are not valid UTF-8: {', '.join(bad_names)}",
            hint="rename those folders; the folder name is the class name",
        )
    return classes


def _scan_local_imagefolder(root: Path, cfg: IngestConfig) -> tuple[list[SourceItem], list[str]]:
    classes = _class_folders(root)
    roots = allowed_roots(root, cfg)
    items: list[SourceItem] = []
    for name in classes:
        folder = root / name
        if not any(folder.resolve().is_relative_to(r) for r in roots):
            # the folder itself is a symlink out of the data root: do not even list it
            _, reason = confine_local(folder, roots)
            items.append(SourceItem(printable(folder), name, reason=reason))
            continue
        for path in sorted(folder.rglob("*")):
            if path.name.startswith(".") or not _has_extension(path.name, cfg.extensions):
                continue
            if path.is_dir() and not path.is_symlink():
                continue
            # symlinks (loops, links out of the root) and FIFOs are quarantined, not skipped or read
            target, reason = confine_local(path, roots)
            if target is None:
                items.append(SourceItem(printable(path), name, reason=reason))
            else:
                items.append(SourceItem(str(target), name))
    return items, classes


def _scan_s3_imagefolder(prefix_uri: str, cfg: IngestConfig) -> tuple[list[SourceItem], list[str]]:
    base = prefix_uri.rstrip("/") + "/"
    items: list[SourceItem] = []
    for obj in iter_s3_objects(prefix_uri, cfg.s3_max_attempts):
        relative = PurePosixPath(obj.uri[len(base) :])
        if len(relative.parts) < 2 or not _has_extension(relative.name, cfg.extensions):
            continue  # objects at the prefix root have no class; non-images are skipped
        items.append(SourceItem(obj.uri, relative.parts[0], obj.etag))
    classes = sorted({item.label for item in items})
    if not classes:
        raise DataError(
            f"no images found under {prefix_uri}",
            hint="expected s3://bucket/prefix/<class name>/<image files>",
        )
    return items, classes


def _manifest_rows(path: Path) -> Iterator[dict[str, object]]:
    try:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as error:
                            raise DataError(f"{path}:{number}: not valid JSON: {error}") from None
                        if not isinstance(row, dict):
                            raise DataError(
                                f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
                            )
                        yield row
        else:
            with open(path, newline="", encoding="utf-8") as handle:
                yield from csv.DictReader(handle)
    except UnicodeDecodeError as error:
        raise DataError(f"manifest {path} is not valid UTF-8: {error}", hint="save it as UTF-8") from None


def _scan_manifest(path: Path, cfg: IngestConfig) -> tuple[list[SourceItem], list[str]]:
    roots = allowed_roots(path.parent, cfg)
    items: list[SourceItem] = []
    for number, row in enumerate(_manifest_rows(path), start=1):
        raw = str(row.get("uri") or row.get("path") or "").strip()
        label = str(row.get("label") or "").strip()
        if not raw or not label:
            raise DataError(
                f"{path}: row {number} needs a 'uri' (or 'path') and a 'label'",
                hint='manifest columns: uri,label (CSV header) or {"uri": ..., "label": ...} per JSONL line',
            )
        uri, reason = manifest_target(raw, path, roots, cfg)
        items.append(SourceItem(uri, label, reason=reason and f"{path.name} row {number}: {reason}"))
    classes = sorted({item.label for item in items})
    if not classes:
        raise DataError(f"manifest {path} has no rows")
    return items, classes


def _missing_source(source_uri: str) -> DataError:
    return DataError(
        f"data source {source_uri} does not exist or is not a folder or a .csv/.jsonl manifest",
        hint="pass --data with an ImageFolder directory, s3://bucket/prefix, or a manifest file",
    )


def check_source(source_uri: str) -> None:
    """Before a run starts anything: a local ``--data`` exists and is a manifest file or a folder
    with class folders. (An S3 source is listed by ingest; reaching it costs a request.)"""
    if is_s3(source_uri) or source_uri.startswith(("http://", "https://")):
        return
    path = local_path(source_uri)
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return
    if not path.is_dir():
        raise _missing_source(source_uri)
    _class_folders(path)


def scan_source(source_uri: str, cfg: IngestConfig) -> tuple[list[SourceItem], list[str]]:
    """Lists (uri, label) for every candidate image, and the class names."""
    if is_s3(source_uri):
        if source_uri.lower().endswith(MANIFEST_SUFFIXES):
            raise DataError(f"{source_uri}: download S3 manifests first or list them locally")
        return _scan_s3_imagefolder(source_uri, cfg)
    path = local_path(source_uri)
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return _scan_manifest(path, cfg)
    if path.is_dir():
        return _scan_local_imagefolder(path, cfg)
    raise _missing_source(source_uri)


def assign_split(sha256: str, cfg: IngestConfig) -> Split:
    """Deterministic by content: a file keeps its split as the dataset grows; duplicates never straddle."""
    bucket = int(hashlib.sha256(f"{cfg.split_salt}:{sha256}".encode()).hexdigest()[:12], 16) / float(1 << 48)
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


@dataclass(frozen=True)
class _Checked:
    item: SourceItem
    sha256: str | None
    size: tuple[int, int] | None
    reason: str | None


def _check(item: SourceItem, cfg: IngestConfig, resize_size: int | None) -> _Checked:
    if item.reason is not None:
        return _Checked(item, None, None, item.reason)
    name = PurePosixPath(item.uri).name or item.uri  # reasons name the file
    try:
        data = fetch(item.uri, cfg)
    except StoreError as error:
        return _Checked(item, None, None, f"{name}: unreadable: {error.message}")
    sha = sha256_bytes(data)
    resize, resized_limit = resize_limit(cfg.max_image_pixels, resize_size)
    try:
        image = decode_image(
            data,
            cfg.max_image_pixels,
            max_aspect_ratio=cfg.max_aspect_ratio,
            resize_size=resize,
            max_resized_pixels=resized_limit,
        )
    except ImageDecodeError as error:
        return _Checked(item, sha, None, f"{name}: {error}")
    return _Checked(item, sha, image.size, None)


def ingest(source_uri: str, cfg: IngestConfig, resize_size: int | None = None) -> Snapshot:
    """Validates, de-duplicates, splits and fingerprints the images at ``source_uri``.

    ``resize_size``: the run's ``Preprocessing.resize_size`` where known, so images whose resized
    size would exceed ``max_image_pixels`` are quarantined exactly; without it, see ``resize_limit``.
    """
    items, declared_classes = scan_source(source_uri, cfg)
    if len(declared_classes) < 2:
        raise DataError(
            f"{source_uri} has only one class ({', '.join(map(repr, declared_classes))}); "
            "a classifier needs at least two",
            hint="add a folder (or manifest label) per class, each with ingest.min_images_per_class images",
        )
    log.info(
        "ingest: %d candidate files in %d classes from %s", len(items), len(declared_classes), source_uri
    )
    with ThreadPoolExecutor(max_workers=cfg.download_workers) as pool:
        checked = list(
            track(
                pool.map(lambda it: _check(it, cfg, resize_size), items),
                total=len(items),
                description="ingest",
            )
        )

    quarantined: list[QuarantineEntry] = []
    by_sha: dict[str, list[_Checked]] = {}
    for result in checked:
        if result.reason is not None:
            quarantined.append(QuarantineEntry(uri=result.item.uri, reason=result.reason))
        else:
            assert result.sha256 is not None
            by_sha.setdefault(result.sha256, []).append(result)

    entries: list[ManifestEntry] = []
    for sha, copies in sorted(by_sha.items()):
        labels = sorted({c.item.label for c in copies})
        if len(labels) > 1:
            for c in copies:
                quarantined.append(
                    QuarantineEntry(uri=c.item.uri, reason=f"same content labelled {' and '.join(labels)}")
                )
            continue
        keep, *dupes = sorted(copies, key=lambda c: c.item.uri)
        for d in dupes:
            quarantined.append(
                QuarantineEntry(uri=d.item.uri, reason=f"duplicate content of {keep.item.uri}")
            )
        assert keep.size is not None
        entries.append(
            ManifestEntry(
                uri=keep.item.uri,
                sha256=sha,
                label=keep.item.label,
                split=assign_split(sha, cfg),
                width=keep.size[0],
                height=keep.size[1],
                etag=keep.item.etag,
            )
        )

    per_class = Counter(e.label for e in entries)
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

    entries.sort(key=lambda e: (e.label, e.uri))
    class_counts: dict[str, dict[str, int]] = {s: dict.fromkeys(declared_classes, 0) for s in SPLITS}
    for e in entries:
        class_counts[e.split][e.label] += 1
    for split in ("train", "test"):
        missing = [c for c, n in class_counts[split].items() if n == 0]
        if missing:
            log.warning(
                "ingest: classes %s have no %s images; metrics for them will be undefined", missing, split
            )
    snapshot = Snapshot(
        source_uri=source_uri,
        class_names=tuple(declared_classes),
        entries=tuple(entries),
        quarantined=tuple(sorted(quarantined, key=lambda q: q.uri)),
        fingerprint=fingerprint((e.sha256, e.label) for e in entries),
        counts={s: sum(class_counts[s].values()) for s in SPLITS},
        class_counts=class_counts,
    )
    console().info(
        "ingest: %d images (%s), %d quarantined, fingerprint %s",
        len(entries),
        ", ".join(f"{k}={v}" for k, v in snapshot.counts.items()),
        len(quarantined),
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
