"""``adaptflow gc``: removes the local scratch a workdir piles up, beyond a retention.

What goes, all under ``<workdir>``:

* ``kfp-local/<run>/`` and ``runs/<attempt>/`` beyond the ``keep_runs`` newest of each;
* ``cache/decoded/`` files, ``cache/features/<namespace>/`` folders and ``checkpoints/`` files (left
  by interrupted runs) not modified within ``older_than_days``.

What never goes: ``mlflow.db`` and ``mlartifacts/`` (the tracking store), ``cache/weights/`` (the
downloaded backbones), ``configs/``, ``locks/`` and anything else not listed above. Nothing modified
within the last hour goes either: a run may still be writing it (runs take no lock a cleaner could
test). "Modified" is the newest mtime anywhere inside a folder. Symbolic links are never followed: a
link is neither a candidate nor walked into, and a path that resolves outside the workdir (or into a
protected part of it) is left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import RenderableType

log = logging.getLogger(__name__)

#: a folder or file modified more recently than this may belong to a running pipeline: never removed
ACTIVE_SECONDS = 3600
#: the run folders kept to ``keep_runs`` newest, each pruned on its own
RUN_FOLDERS = ("kfp-local", "runs")
#: scratch aged out by ``older_than_days``: (folder, depth of the removed units below it)
AGED_FOLDERS = (("cache/decoded", 2), ("cache/features", 1), ("checkpoints", 1))
#: never removed, whatever a link or a layout change would make them look like
PROTECTED = ("mlflow.db", "mlartifacts", "cache/weights", "configs", "locks")
DAY = 86400


@dataclass(frozen=True)
class Removal:
    path: Path
    bytes: int


@dataclass
class GcResult:
    """What ``collect_garbage`` removed (or, on a dry run, would remove)."""

    workdir: Path
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    #: beyond the retention, but modified within the last hour: kept, a run may be using them
    kept_active: list[Path] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "removed": [{"path": str(r.path), "bytes": r.bytes} for r in self.removed],
            "freed_bytes": self.freed_bytes,
            "dry_run": self.dry_run,
            "kept_active": [str(p) for p in self.kept_active],
        }


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(path.lstat().st_mode)
    except OSError:
        return True  # gone or unreadable: not ours to touch


def _is_dir(path: Path) -> bool:
    """A real directory (a link to one is not)."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _walk(path: Path) -> Iterator[os.stat_result]:
    """The lstat of ``path`` and of everything below it; links are reported, never followed."""
    try:
        info = path.lstat()
    except OSError:
        return
    yield info
    if not stat.S_ISDIR(info.st_mode):
        return
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files):
            try:
                yield os.lstat(os.path.join(folder, name))
            except OSError:
                continue


def newest_mtime(path: Path) -> float:
    """The newest modification time of ``path`` or of anything inside it."""
    return max((info.st_mtime for info in _walk(path)), default=0.0)


def disk_bytes(path: Path) -> int:
    """The size of ``path``'s regular files (links count as nothing)."""
    return sum(info.st_size for info in _walk(path) if stat.S_ISREG(info.st_mode))


class _Scope:
    """The workdir, resolved, and what inside it is off limits."""

    def __init__(self, workdir: Path) -> None:
        self.root = workdir.resolve()
        self.protected = [(self.root / p).resolve() for p in PROTECTED]

    def allows(self, path: Path) -> bool:
        """``path`` is no link, lies inside the workdir (its parents resolved) and in no protected part."""
        if _is_link(path):
            return False
        real = path.resolve()
        if real == self.root or not real.is_relative_to(self.root):
            return False
        return not any(real == p or real.is_relative_to(p) for p in self.protected)

    def units(self, folder: Path, depth: int) -> Iterator[Path]:
        """The entries ``depth`` levels below ``folder`` (a file higher up counts as one); links skipped."""
        if not _is_dir(folder) or not self.allows(folder):
            return
        for child in sorted(folder.iterdir()):
            if not self.allows(child):
                continue
            if depth > 1 and _is_dir(child):
                yield from self.units(child, depth - 1)
            else:
                yield child


def plan_gc(
    workdir: Path, keep_runs: int = 5, older_than_days: float = 7, now: float | None = None
) -> tuple[list[Path], list[Path]]:
    """(what to remove, what is past the retention but kept as possibly active); removes nothing."""
    if keep_runs < 0 or older_than_days < 0:
        raise ValueError("keep_runs and older_than_days must not be negative")
    now = time.time() if now is None else now
    scope = _Scope(workdir)
    remove: list[Path] = []
    active: list[Path] = []
    for name in RUN_FOLDERS:
        folders = [p for p in scope.units(scope.root / name, 1) if _is_dir(p)]
        ages = {p: newest_mtime(p) for p in folders}
        for path in sorted(folders, key=lambda p: ages[p], reverse=True)[keep_runs:]:
            (active if now - ages[path] < ACTIVE_SECONDS else remove).append(path)
    max_age = max(older_than_days * DAY, ACTIVE_SECONDS)
    for name, depth in AGED_FOLDERS:
        remove.extend(p for p in scope.units(scope.root / name, depth) if now - newest_mtime(p) >= max_age)
    return remove, active


def _delete(path: Path) -> None:
    if _is_dir(path):
        shutil.rmtree(path)  # removes links inside, never what they point to
    else:
        path.unlink()


def collect_garbage(
    workdir: str | Path,
    keep_runs: int = 5,
    older_than_days: float = 7,
    dry_run: bool = False,
    now: float | None = None,
) -> GcResult:
    """Removes the workdir's old run folders and stale caches (see the module docstring for what
    goes and what never does); ``dry_run`` only lists them."""
    scope = _Scope(Path(workdir))
    result = GcResult(scope.root, dry_run)
    remove, result.kept_active = plan_gc(scope.root, keep_runs, older_than_days, now)
    for path in remove:
        size = disk_bytes(path)
        if not dry_run:
            if not scope.allows(path):  # checked again: the tree may have changed since the plan
                continue
            try:
                _delete(path)
            except OSError as error:
                log.warning("gc: could not remove %s: %s", path, error)
                continue
        result.removed.append(Removal(path, size))
    return result


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def gc_view(data: dict[str, Any]) -> RenderableType:
    """The table of ``collect_garbage(...).as_dict()``: each removed path (relative to the workdir) and
    its size, the total freed, and the folders kept because they are recent."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    root = Path(data["workdir"])
    verb = "would free" if data["dry_run"] else "freed"
    parts: list[RenderableType] = []
    if data["removed"]:
        table = Table(title=f"adaptflow gc{' --dry-run' if data['dry_run'] else ''}: {root}")
        table.add_column("would remove" if data["dry_run"] else "removed")
        table.add_column("size", justify="right")
        for row in data["removed"]:
            path = Path(row["path"])
            table.add_row(
                str(path.relative_to(root) if path.is_relative_to(root) else path), _megabytes(row["bytes"])
            )
        table.add_section()
        table.add_row(f"total {verb}", _megabytes(data["freed_bytes"]), style="bold")
        parts.append(table)
    else:
        parts.append(Text(f"nothing to remove under {root}"))
    if data["kept_active"]:
        parts.append(
            Text(
                f"kept {len(data['kept_active'])} folder(s) past --keep-runs: modified within the last hour "
                "(a run may be active)",
                style="yellow",
            )
        )
    return Group(*parts)
