"""How ingest learns that a listed local file is there, is a plain file (not a symlink, a FIFO or a
folder), and what version of it this is: what a rerun over a million files mostly costs.

- A file a manifest row names by its sha256: that content address is its version key (reads at
  training re-check the sha256, ``images.ImageStore``), so all ingest needs is that the file is
  there. One ``scandir`` of its folder answers that for every entry from the directory's own records
  (``d_type``, no stat where the file system fills it in), at about a fifth of an ``lstat`` per file.
  Folders named by few rows, or holding far more entries than the rows name, are stat'ed instead.
- Any other file: one ``lstat`` gives its size and mtime, the version key. A local ``lstat`` is CPU (a
  syscall, microseconds: 5 µs on a small VM) and holds the GIL for the Python around it, so at a
  million files they run in worker processes; where a stat waits on storage (a network file
  system), in I/O threads.

Files not found either way go through the full checks one by one (``checks.LocalConfinement``),
which name the reason.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from adaptflow.data.checks import is_utf8

if TYPE_CHECKING:
    import pyarrow as pa

#: paths per chunk of stats, and the stat time above which chunks go to I/O threads
STAT_CHUNK = 2048
SLOW_STAT_S = 50e-6
#: fewer chunks than this are stat'ed in this process: starting workers costs more than they save
PROCESS_MIN_CHUNKS = 8
FILE_TYPE_BITS = 0o170000  # what stat.S_IFMT masks


Stats = tuple[np.ndarray, np.ndarray, np.ndarray]  # sizes, mtimes in ns, rows to check one by one


def _stat_chunk(paths: list[str]) -> Stats:
    """A plain file costs one lstat; the loop runs in C (map) unless a path needs a closer look."""
    try:
        if not all(map(str.isascii, paths)):
            raise ValueError("a name that is not ASCII")  # UTF-8, or surrogates from another system
        infos = list(map(os.lstat, paths))
    except (OSError, ValueError):  # a missing file, a NUL byte
        return _stat_each(paths)
    count = len(infos)
    modes = np.fromiter(map(attrgetter("st_mode"), infos), np.int64, count)
    sizes = np.fromiter(map(attrgetter("st_size"), infos), np.int64, count)
    mtimes = np.fromiter(map(attrgetter("st_mtime_ns"), infos), np.int64, count)
    return sizes, mtimes, (modes & FILE_TYPE_BITS) != stat.S_IFREG  # a symlink, a FIFO, a folder


def _stat_each(paths: list[str]) -> Stats:
    sizes, mtimes = np.zeros(len(paths), np.int64), np.zeros(len(paths), np.int64)
    slow = np.ones(len(paths), bool)
    for i, path in enumerate(paths):
        try:
            path.encode("utf-8")  # a name from another system (surrogates) is refused one by one
            info = os.lstat(path)
        except (OSError, ValueError):  # UnicodeEncodeError is a ValueError
            continue
        if stat.S_ISREG(info.st_mode):
            sizes[i], mtimes[i], slow[i] = info.st_size, info.st_mtime_ns, False
    return sizes, mtimes, slow


class StatProcesses:
    """Worker processes for fast local stats, started on first use (see the module's docstring)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, spans: list[list[str]]) -> Iterator[Stats]:
        if self.workers <= 1:
            return map(_stat_chunk, spans)
        return self._executor().map(_stat_chunk, spans)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # fork, as the checks do: the workers need nothing but os, numpy and pyarrow, at once
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        return self._pool

    def map_folders(self, jobs: list[tuple[str, int]]) -> Iterator[pa.Array | None]:
        """``listed_plain_files`` of each (folder, limit), in order."""
        if self.workers <= 1 or len(jobs) < 2:
            return map(listed_plain_files, jobs)
        return self._executor().map(
            listed_plain_files, jobs, chunksize=max(1, len(jobs) // (4 * self.workers))
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


#: a folder named by fewer rows is cheaper to stat row by row
SCAN_MIN_ROWS = 64
#: a scan gives up past this many entries per named row (plus SCAN_BASE_ENTRIES): a huge folder of
#: which a manifest names a few files is cheaper to stat
SCAN_ENTRIES_PER_ROW = 4
SCAN_BASE_ENTRIES = 4096
#: folders named by fewer rows in all are listed in this process
SCAN_PROCESS_MIN_ROWS = 16 * 1024


def plain_files(folder: str, limit: int) -> list[str] | None:
    """The paths of the plain files (not symlinks) in ``folder`` (which ends in ``/``); None when it
    cannot be listed or holds more than ``limit`` entries."""
    try:
        with os.scandir(folder) as scan:
            entries = list(itertools.islice(scan, limit + 1))
    except OSError:
        return None
    if len(entries) > limit:
        return None
    # is_file(follow_symlinks=False) reads d_type; it stats only where the file system leaves it unknown
    return [entry.path for entry in entries if entry.is_file(follow_symlinks=False)]


def _utf8_array(paths: list[str]) -> pa.Array:
    import pyarrow as pa

    try:
        return pa.array(paths, pa.string())
    except (UnicodeEncodeError, pa.ArrowException):  # a name from another system: never a manifest's
        return pa.array([p for p in paths if p.isascii() or is_utf8(p)], pa.string())


def listed_plain_files(job: tuple[str, int]) -> pa.Array | None:
    """``plain_files`` as an Arrow array (what a worker process sends back: buffers, not objects)."""
    paths = plain_files(*job)
    return None if paths is None else _utf8_array(paths)


def found_by_listing(
    uris: pa.Array,
    folders: pa.DictionaryArray,
    bases: list[str | None],
    wanted: np.ndarray,
    processes: StatProcesses | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose folder was listed, rows found there as a plain file), for the rows in ``wanted``.

    ``uris``: each row's resolved path, its folder's base plus its name; ``folders``: each row's
    folder as written, dictionary-encoded; ``bases``: each folder resolved (None: not inside a root,
    never listed)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    indices = folders.indices.to_numpy(zero_copy_only=False)
    rows_per_folder = np.bincount(indices[wanted], minlength=len(bases))
    listed = np.zeros(len(bases), bool)
    scanned = [k for k in np.flatnonzero(rows_per_folder >= SCAN_MIN_ROWS).tolist() if bases[k] is not None]
    jobs = [
        (str(bases[k]), SCAN_ENTRIES_PER_ROW * int(rows_per_folder[k]) + SCAN_BASE_ENTRIES) for k in scanned
    ]
    in_processes = processes is not None and int(rows_per_folder[scanned].sum()) >= SCAN_PROCESS_MIN_ROWS
    results = processes.map_folders(jobs) if in_processes else map(listed_plain_files, jobs)  # type: ignore[union-attr]
    found: list[pa.Array] = []
    for k, paths in zip(scanned, results, strict=True):
        if paths is not None:
            listed[k] = True
            found.append(paths)
    in_listed = listed[indices] & wanted
    if not found:
        return in_listed, np.zeros(len(indices), bool)
    value_set = pa.concat_arrays(found)
    present = pc.fill_null(pc.is_in(uris, value_set=value_set), False).to_numpy(zero_copy_only=False)
    return in_listed, in_listed & present


def pick(paths: list[str] | pa.Array, rows: np.ndarray) -> list[str]:
    """The paths at ``rows``, as Python strings (what a stat takes)."""
    if isinstance(paths, list):
        return [paths[i] for i in rows.tolist()]
    return paths.take(rows).to_pylist()  # type: ignore[no-any-return]


class Presence:
    """Stats, or presence by listing, for the paths of one source (see the module's docstring)."""

    def __init__(self, pool: ThreadPoolExecutor | None, processes: StatProcesses | None) -> None:
        self.pool = pool
        self.processes = processes
        self.threaded: bool | None = None  # decided on the first paths

    def stats(self, paths: list[str]) -> Stats:
        spans = [paths[i : i + STAT_CHUNK] for i in range(0, len(paths), STAT_CHUNK)]
        parts: list[Stats] = []
        if self.threaded is None and spans:
            # threads pay where a stat waits on storage (a network file system); on a local disk a
            # stat is microseconds of CPU, and threads only contend for the GIL
            began = time.perf_counter()
            parts.append(_stat_chunk(spans[0]))
            self.threaded = (time.perf_counter() - began) / len(spans[0]) > SLOW_STAT_S
            spans = spans[1:]
        if self.threaded and self.pool is not None and len(spans) > 1:
            parts += self.pool.map(_stat_chunk, spans)
        elif self.processes is not None and len(spans) >= PROCESS_MIN_CHUNKS:
            parts += self.processes.map(spans)
        else:
            parts += map(_stat_chunk, spans)
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
        return tuple(np.concatenate([part[k] for part in parts]) for k in range(3))  # type: ignore[return-value]

    def of(
        self,
        paths: list[str] | pa.Array,
        uris: pa.Array,
        folders: pa.DictionaryArray,
        bases: list[str | None],
        by_sha: np.ndarray,
    ) -> Stats:
        """Stats of ``paths``, except rows that name their sha256 (``by_sha``) in a folder that could
        be listed: those are only looked for (size and mtime 0), and slow where not found."""
        listed = found = np.zeros(len(paths), bool)
        if by_sha.sum() >= SCAN_MIN_ROWS:
            listed, found = found_by_listing(uris, folders, bases, by_sha, self.processes)
        if not listed.any():
            return self.stats(paths if isinstance(paths, list) else paths.to_pylist())
        sizes, mtimes, slow = np.zeros(len(paths), np.int64), np.zeros(len(paths), np.int64), ~found
        rest = np.flatnonzero(~listed)
        if len(rest):
            sizes[rest], mtimes[rest], slow[rest] = self.stats(pick(paths, rest))
        return sizes, mtimes, slow
