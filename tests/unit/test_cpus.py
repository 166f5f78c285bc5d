"""The CPUs a process may use: affinity, capped by a cgroup v2 or v1 quota (fake cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adaptflow.config import load_settings
from adaptflow.cpus import configure_threads, cpu_budget

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# a quota of one CPU only shows below an affinity mask of two or more
needs_two = pytest.mark.skipif(AFFINITY < 2, reason="one CPU visible: a 1-CPU quota changes nothing")


def _v2(tmp_path: Path, quotas: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for folder, value in quotas.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(value + "\n")
    leaf = max(quotas, key=len)
    cgroup = tmp_path / "self-cgroup"
    cgroup.write_text(f"0::/{leaf}\n")
    return root, cgroup


@needs_two
def test_a_v2_quota_below_the_affinity_mask_decides(tmp_path: Path) -> None:
    root, cgroup = _v2(tmp_path, {"kubepods": "max 100000", "kubepods/pod1": "50000 100000"})
    budget = cpu_budget(root, cgroup)
    assert budget.cpus == 1 and "cpu.max 0.5" in budget.source


@needs_two
def test_the_tightest_ancestor_quota_wins(tmp_path: Path) -> None:
    root, cgroup = _v2(tmp_path, {"a": "100000 100000", "a/b": "max 100000"})
    assert cpu_budget(root, cgroup).cpus == 1


def test_no_quota_leaves_the_affinity_mask(tmp_path: Path) -> None:
    root, cgroup = _v2(tmp_path, {"a": "max 100000"})
    budget = cpu_budget(root, cgroup)
    assert budget.cpus == AFFINITY and budget.source == "affinity mask"


@needs_two
def test_a_v1_quota_is_read_too(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    job = root / "cpu,cpuacct" / "jobs" / "one"
    job.mkdir(parents=True)
    for folder, quota in ((root / "cpu,cpuacct", "-1"), (job, "100000")):
        (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")
    cgroup = tmp_path / "self-cgroup"
    cgroup.write_text("3:cpuset:/\n2:cpu,cpuacct:/jobs/one\n0::/\n")
    budget = cpu_budget(root, cgroup)
    assert budget.cpus == 1 and "v1" in budget.source
    cgroup.write_text("2:cpu,cpuacct:/\n0::/\n")  # the root: no quota
    assert cpu_budget(root, cgroup).source == "affinity mask"


def test_threads_setting_overrides_and_is_not_part_of_the_config_hash() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert load_settings(overrides=["threads=3"]).config_hash() == load_settings().config_hash()
    with pytest.raises(Exception, match="threads"):
        load_settings(overrides=["threads=0"])
