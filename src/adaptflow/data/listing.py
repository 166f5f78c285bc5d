"""Ingest's listing: a source's candidate files as Arrow tables, a batch of rows at a time.

A listed file is its URI, label, *stamp* (the version key of the verdict cache), ETag, the sha256 a
manifest names, and the reason it is refused (``data/checks.py``), if it is. At a million files the
listing is what a rerun mostly costs, so a local file costs one ``lstat``, or a share of one listing
of its folder where a manifest names its sha256 (``data/presence.py``), and everything else is an
Arrow kernel over the batch: a CSV or JSONL manifest is read by pyarrow, paths are joined and
split as columns and each folder is resolved once. Only rows that are not plain files inside a root
(a symlink, a missing file, a URL, a name that is not UTF-8) go one by one through the checks that
name the reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from adaptflow.config import IngestConfig
from adaptflow.cpus import cpu_budget
from adaptflow.data.checks import LocalConfinement, allowed_roots, is_utf8, manifest_target, printable
from adaptflow.data.manifests import manifest_batches
from adaptflow.data.presence import Presence, StatProcesses, pick
from adaptflow.data.snapshot_store import filtered
from adaptflow.errors import DataError
from adaptflow.storage import is_s3, iter_s3_objects, local_path

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST_SUFFIXES = (".csv", ".jsonl")
#: one listed file: uri, label, stamp (its version key), etag, the manifest's sha256, refusal reason
Listed = tuple[str, str, str | None, str | None, str | None, str | None]
LISTING_COLUMNS = ("uri", "label", "stamp", "etag", "expected", "reason")
BATCH_ROWS = 64 * 1024


def listing_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in LISTING_COLUMNS])


def listed_table(rows: list[Listed]) -> pa.Table:
    import pyarrow as pa

    columns = list(zip(*rows, strict=True)) if rows else [()] * len(LISTING_COLUMNS)
    return pa.table([pa.array(list(c), pa.string()) for c in columns], schema=listing_schema())


def _in_order(parts: list[tuple[np.ndarray, pa.Table]]) -> pa.Table:
    """Tables of rows taken from one batch at ``positions`` -> one table in the batch's order."""
    import pyarrow as pa

    parts = [(positions, table) for positions, table in parts if len(positions)]
    if len(parts) == 1:
        return parts[0][1]
    if not parts:
        return listing_schema().empty_table()
    order = np.argsort(np.concatenate([positions for positions, _ in parts]), kind="stable")
    return pa.concat_tables([table for _, table in parts]).take(order)


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def _folder_and_name(paths: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Each path split at its last slash, as ``os.path.split`` does, but the folder keeps a trailing
    slash (so that ``/x`` is in ``/``) and is empty for a bare name (which is in the working folder)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = pc.split_pattern(paths, "/", max_splits=1, reverse=True)  # [folder, name] or [name]
    offsets = parts.offsets.to_numpy()[: len(paths) + 1]  # a fresh array: no slice offset to undo
    flat = parts.values
    names = flat.take(offsets[1:] - 1)
    in_folder = pa.array(np.diff(offsets) == 2)
    heads = pc.binary_join_element_wise(flat.take(offsets[:-1]), pa.scalar(""), "/")
    return pc.if_else(in_folder, heads, pa.scalar("")), names


class LocalFiles:
    """Local paths -> listed rows, a batch at a time (see the module's docstring)."""

    def __init__(
        self,
        confinement: LocalConfinement,
        pool: ThreadPoolExecutor | None,
        refused_prefix: Callable[[int], str] | None = None,
        processes: StatProcesses | None = None,
    ) -> None:
        self.confinement = confinement
        self.presence = Presence(pool, processes)
        self.refused_prefix = refused_prefix  # row number -> what a manifest's refusals start with

    def table(
        self,
        paths: list[str] | pa.Array,
        labels: pa.Array,
        expected: pa.Array | None,
        numbers: np.ndarray | None,
    ) -> pa.Table:
        """``paths``: a folder's walk (Python strings, any name) or a manifest's (Arrow, UTF-8);
        ``numbers``: each path's manifest row number, for the refusal reasons."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not isinstance(paths, list):
            path_array = paths
        else:
            try:
                path_array = pa.array(paths, pa.string())
            except (UnicodeEncodeError, pa.ArrowException):  # a name from another system: refused below
                path_array = pa.array([p if p.isascii() or is_utf8(p) else "" for p in paths], pa.string())
        folders, names = _folder_and_name(path_array)
        folders = folders.dictionary_encode()
        bases = [self.confinement.folder_base(folder) for folder in folders.dictionary.to_pylist()]
        inside = pc.take(pa.array([b is not None for b in bases]), folders.indices)
        plain_name = pc.invert(pc.is_in(names, value_set=pa.array(["", ".", ".."])))
        uri = pc.binary_join_element_wise(pc.take(pa.array(bases, pa.string()), folders.indices), names, "")
        if expected is None:
            expected = pa.nulls(len(paths), pa.string())
        by_sha = pc.is_valid(expected).to_numpy(zero_copy_only=False)
        sizes, mtimes, slow = self.presence.of(paths, uri, folders, bases, by_sha)
        fast = pc.fill_null(pc.and_(inside, plain_name), False).to_numpy(zero_copy_only=False) & ~slow
        # a manifest's sha256 is the version key where it names one: no size or mtime needed
        stamp = pc.if_else(
            pa.array(by_sha),
            pc.binary_join_element_wise(pa.scalar("sha256:"), expected, ""),
            pc.binary_join_element_wise(pc.cast(sizes, pa.string()), pc.cast(mtimes, pa.string()), ":"),
        )
        nulls = pa.nulls(len(paths), pa.string())
        columns = [uri, labels, stamp, nulls, expected, nulls]
        listed = filtered(pa.table(columns, schema=listing_schema()), pa.array(fast))
        others = np.flatnonzero(~fast)
        if not len(others):
            return listed
        label_list, expected_list = labels.take(others).to_pylist(), expected.take(others).to_pylist()
        rows = []
        path_list = pick(paths, others)
        for i, path, label, sha in zip(others.tolist(), path_list, label_list, expected_list, strict=True):
            row = self.row(path, label, sha)
            if row[5] is not None and numbers is not None and self.refused_prefix is not None:
                row = (*row[:5], self.refused_prefix(int(numbers[i])) + row[5])
            rows.append(row)
        return _in_order([(np.flatnonzero(fast), listed), (others, listed_table(rows))])

    def row(self, path: str, label: str, expected: str | None = None) -> Listed:
        """One file through the full checks, which name why it is refused."""
        target, info, reason = self.confinement.check(path)
        if target is None or info is None:
            return printable(Path(path)), label, None, None, None, reason
        stamp = f"sha256:{expected.lower()}" if expected else f"{info.st_size}:{info.st_mtime_ns}"
        return target, label, stamp, None, expected, None


def class_folders(root: Path) -> list[str]:
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


def _walk(folder: str, extensions: tuple[str, ...]) -> Iterator[str]:
    """What ``sorted(Path(folder).rglob("*"))`` gave, filtered as ingest always did (no dot files,
    image extensions, no real folders; symlinks kept for the checks to refuse), without a Path each:
    a depth-first walk with each folder's entries sorted, which is the same order."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except PermissionError:  # rglob skipped unreadable folders too
        return
    for entry in entries:
        real_folder = entry.is_dir(follow_symlinks=False)
        name = entry.name
        if not real_folder and not name.startswith(".") and _has_extension(name, extensions):
            yield f"{folder}/{name}"
        if real_folder:  # rglob does not follow symlinked folders
            yield from _walk(f"{folder}/{name}", extensions)


def _list_local_imagefolder(
    root: Path, classes: list[str], cfg: IngestConfig, pool: ThreadPoolExecutor, processes: StatProcesses
) -> Iterator[pa.Table]:
    import pyarrow as pa

    files = LocalFiles(LocalConfinement(allowed_roots(root, cfg)), pool, processes=processes)
    paths: list[str] = []
    labels: list[str] = []
    for name in classes:
        folder = root / name
        if not any(folder.resolve().is_relative_to(r) for r in files.confinement.roots):
            # the folder itself is a symlink out of the data root: do not even list it
            yield listed_table([files.row(str(folder), name)])
            continue
        for path in _walk(str(folder), cfg.extensions):
            paths.append(path)
            labels.append(name)
            if len(paths) == BATCH_ROWS:
                yield files.table(paths, pa.array(labels, pa.string()), None, None)
                paths, labels = [], []
    if paths:
        yield files.table(paths, pa.array(labels, pa.string()), None, None)


def _list_s3_imagefolder(prefix_uri: str, cfg: IngestConfig) -> Iterator[pa.Table]:
    base = prefix_uri.rstrip("/") + "/"
    rows: list[Listed] = []
    for obj in iter_s3_objects(prefix_uri, cfg.s3_max_attempts):
        relative = PurePosixPath(obj.uri[len(base) :])
        if len(relative.parts) < 2 or not _has_extension(relative.name, cfg.extensions):
            continue  # objects at the prefix root have no class; non-images are skipped
        stamp = f"etag:{obj.etag}:{obj.size}" if obj.etag else None
        rows.append((obj.uri, relative.parts[0], stamp, obj.etag, None, None))
        if len(rows) == BATCH_ROWS:
            yield listed_table(rows)
            rows = []
    if rows:
        yield listed_table(rows)


def _list_manifest(
    path: Path, cfg: IngestConfig, pool: ThreadPoolExecutor, processes: StatProcesses
) -> Iterator[pa.Table]:
    """A batch of rows at a time. An optional ``sha256`` column names each file's content: it keys
    the verdict cache and the check confirms it. Relative paths are relative to the manifest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    roots = allowed_roots(path.parent, cfg)
    files = LocalFiles(LocalConfinement(roots), pool, lambda number: f"{path.name} row {number}: ", processes)
    folder = str(path.parent)
    folder = folder if folder.endswith("/") else folder + "/"
    first = 1
    for raw, label, sha in manifest_batches(path, BATCH_ROWS):
        incomplete = pc.or_(pc.equal(pc.utf8_length(raw), 0), pc.equal(pc.utf8_length(label), 0))
        if pc.any(incomplete).as_py():
            number = first + int(np.flatnonzero(incomplete.to_numpy(zero_copy_only=False))[0])
            raise DataError(
                f"{path}: row {number} needs a 'uri' (or 'path') and a 'label'",
                hint='manifest columns: uri,label (CSV header) or {"uri": ..., "label": ...} per JSONL line',
            )
        remote = pc.match_substring(raw, "://").to_numpy(zero_copy_only=False)
        local, urls = np.flatnonzero(~remote), np.flatnonzero(remote)
        parts = []
        if len(local):
            plain = raw.take(local) if len(urls) else raw
            joined = pc.binary_join_element_wise(pa.scalar(folder), plain, "")
            full = pc.if_else(pc.starts_with(plain, "/"), plain, joined)
            numbers = local + first
            parts.append((local, files.table(full, label.take(local), sha.take(local), numbers)))
        if len(urls):
            rows = [
                _url_row(files, path, roots, cfg, r, lab, s, number)
                for r, lab, s, number in zip(
                    raw.take(urls).to_pylist(),
                    label.take(urls).to_pylist(),
                    sha.take(urls).to_pylist(),
                    (urls + first).tolist(),
                    strict=True,
                )
            ]
            parts.append((urls, listed_table(rows)))
        yield _in_order(parts)
        first += len(raw)


def _url_row(
    files: LocalFiles,
    manifest: Path,
    roots: tuple[Path, ...],
    cfg: IngestConfig,
    raw: str,
    label: str,
    expected: str | None,
    number: int,
) -> Listed:
    uri, reason = manifest_target(raw, manifest, roots, cfg)
    if reason is None and not (is_s3(uri) or uri.startswith(("http://", "https://"))):
        listed = files.row(uri, label, expected)  # file://
    else:
        stamp = f"sha256:{expected}" if expected and reason is None else None
        listed = uri, label, stamp, None, expected, reason
    if listed[5] is not None:
        listed = (*listed[:5], f"{manifest.name} row {number}: {listed[5]}")
    return listed


def missing_source(source_uri: str) -> DataError:
    return DataError(
        f"data source {source_uri} does not exist or is not a folder or a .csv/.jsonl manifest",
        hint="pass --data with an ImageFolder directory, s3://bucket/prefix, or a manifest file",
    )


def list_source(source_uri: str, cfg: IngestConfig) -> tuple[pa.Table, list[str] | None]:
    """(the candidate files, the class names where the layout declares them)."""
    import pyarrow as pa

    declared = None
    processes = StatProcesses(max(1, min(cpu_budget().cpus, 32)))
    with (
        ThreadPoolExecutor(cfg.download_workers, thread_name_prefix="ingest-stat") as pool,
        contextlib.closing(processes),
    ):
        if is_s3(source_uri):
            if source_uri.lower().endswith(MANIFEST_SUFFIXES):
                raise DataError(f"{source_uri}: download S3 manifests first or list them locally")
            tables = _list_s3_imagefolder(source_uri, cfg)
        else:
            path = local_path(source_uri)
            if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
                tables = _list_manifest(path, cfg, pool, processes)
            elif path.is_dir():
                declared = class_folders(path)
                tables = _list_local_imagefolder(path, declared, cfg, pool, processes)
            else:
                raise missing_source(source_uri)
        listing = pa.concat_tables([listing_schema().empty_table(), *tables])
    return listing.combine_chunks(), declared
