"""How many CPUs this process may really use, and torch's thread pool sized to it.

torch sizes its intra-op pool from the host's cores. A pod limited to 4 CPUs on a 64-core node then
runs 64 spinning OpenMP threads on 4 cores' worth of quota, and is throttled many times over. The
figure here is the smallest of the affinity mask (``taskset``, cpusets) and the CFS quota (cgroup v2
``cpu.max``, or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``) on the process's cgroup path and its
ancestors, rounded up and at least 1.

:func:`openmp_env` bounds how long OpenMP's idle threads spin, so jobs sharing cores do not starve
each other; it has to reach a process's environment before torch is imported.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    cpus: int
    source: str  # what decided it, for the log line

    def __str__(self) -> str:
        return f"{self.cpus} ({self.source})"


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cgroup_path(cgroup_file: Path, controller: str | None) -> str | None:
    """The process's cgroup path: v2's ``0::/path`` (controller None), or v1's line naming ``controller``."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if (controller is None and number == "0" and controllers == "") or (
            controller is not None and controller in controllers.split(",")
        ):
            return path
    return None


def _tightest(mount: Path, path: str, read: Callable[[Path], float | None]) -> float | None:
    """The smallest quota from the cgroup at ``path`` under ``mount`` up to the mount's root.

    In a container the path names the host's hierarchy, which is not mounted: then only the
    folders that exist (the container's own root) are read.
    """
    folder, quotas = mount / path.lstrip("/"), []
    while True:
        quota = read(folder)
        if quota is not None:
            quotas.append(quota)
        if folder == mount or mount not in folder.parents:
            break
        folder = folder.parent
    return min(quotas) if quotas else None


def _read_v2(folder: Path) -> float | None:
    try:
        limit, period = (folder / "cpu.max").read_text().split()
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _read_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v2_quota(root: Path, cgroup_file: Path) -> float | None:
    path = _cgroup_path(cgroup_file, None)
    return None if path is None else _tightest(root, path, _read_v2)


def _v1_quota(root: Path, cgroup_file: Path) -> float | None:
    path = _cgroup_path(cgroup_file, "cpu")
    for name in ("cpu,cpuacct", "cpu"):
        if (root / name).is_dir():
            return _tightest(root / name, path or "/", _read_v1)
    return None


def cpu_budget(root: Path = CGROUP_ROOT, cgroup_file: Path = Path("/proc/self/cgroup")) -> CpuBudget:
    """The CPUs this process may use: the affinity mask, capped by a cgroup CPU quota if there is one."""
    affinity = _affinity()
    quota = _v2_quota(root, cgroup_file)
    kind = "cgroup v2 cpu.max"
    if quota is None:
        quota, kind = _v1_quota(root, cgroup_file), "cgroup v1 cfs quota"
    if quota is not None and math.ceil(quota) < affinity:
        return CpuBudget(max(1, math.ceil(quota)), f"{kind} {quota:g} CPUs")
    return CpuBudget(affinity, "affinity mask")


def configure_threads(requested: int | None = None) -> int:
    """Sets torch's intra-op threads to ``requested``, or to :func:`cpu_budget`; returns the number."""
    import torch

    budget = CpuBudget(requested, "threads setting") if requested else cpu_budget()
    if torch.get_num_threads() != budget.cpus:
        torch.set_num_threads(budget.cpus)
    log.info("torch threads: %s", budget)
    return budget.cpus


#: OpenMP settings adaptflow's processes get unless the user chose their own (see :func:`openmp_env`)
OPENMP_ENV = {"GOMP_SPINCOUNT": "10000"}
#: a user who set any of these chose how OpenMP threads wait: adaptflow adds nothing then
OPENMP_USER_KEYS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def openmp_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The entries of :data:`OPENMP_ENV` to add to ``environ``: all of them, or none if the user set one.

    torch's OpenMP runtime (libgomp) lets an idle worker thread spin about 300,000 times before it
    sleeps. Alone, that saves a wake-up per parallel region; when several jobs share the cores, the
    spinning threads take the CPU from the threads with work to do. Measured on 2 cores (ResNet-18,
    32 px, batch 64, fwd+bwd+AdamW, 2 torch threads per job), aggregate images/s:

    - libgomp's default: ~483 alone, ~86 with 4 jobs (0.18x);
    - ``GOMP_SPINCOUNT=10000``: ~472 alone, ~346 with 4 jobs;
    - ``GOMP_SPINCOUNT=1000``: ~392 alone, ~457 with 4 jobs;
    - ``OMP_WAIT_POLICY=PASSIVE``: ~375 alone, ~482 with 4 jobs.

    A bounded spin of 10,000 costs ~1 % alone and recovers most of the loss under contention;
    shorter spins trade more of the job alone for more of the shared case. A user's
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` wins, so nothing is added if either is set.
    libgomp reads these once, when it is loaded (the first ``import torch``): they must be in the
    environment before that, which is why they go into a process's environment, not torch's API.
    LLVM's libomp (macOS wheels) ignores them.
    """
    if any(environ.get(key) for key in OPENMP_USER_KEYS):
        return {}
    return dict(OPENMP_ENV)


def use_openmp_defaults() -> dict[str, str]:
    """Puts :func:`openmp_env` into ``os.environ`` if torch is not loaded yet; returns what it added.

    Once torch is imported, libgomp has read its settings: the environment would then claim a
    setting this process does not use (stage processes get theirs from their launcher).
    """
    if "torch" in sys.modules:
        return {}
    added = openmp_env(os.environ)
    os.environ.update(added)
    return added
