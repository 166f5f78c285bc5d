"""``adaptflow gc``: old run folders and stale caches go; the tracking store, the weights, anything
recent and anything outside the workdir (through a symlink too) stay."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adaptflow.cleanup import collect_garbage, gc_view, newest_mtime, plan_gc
from adaptflow.cli import app
from cli_invoke import invoke

NOW = time.time()
DAY = 86400.0


def touch(path: Path, size: int = 100, days_old: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    age(path, days_old)
    return path


def age(path: Path, days_old: float) -> None:
    """Sets the mtime of ``path`` and of everything inside it (links themselves, not their targets)."""
    when = NOW - days_old * DAY
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path, topdown=False):
            for name in (*files, *dirs):
                os.utime(os.path.join(folder, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when), follow_symlinks=False)


def run_folder(parent: Path, name: str, days_old: float, size: int = 1000) -> Path:
    folder = parent / name
    touch(folder / "task" / "output.bin", size)
    age(folder, days_old)
    return folder


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A workdir with 7 kfp-local runs and 7 attempts (1 to 7 days old), old and fresh caches, an old
    checkpoint, and the parts gc never touches, all made old."""
    root = tmp_path / "wd"
    for i in range(1, 8):
        run_folder(root / "kfp-local", f"adaptflow-2026-11-{10 + i:02d}-00-00-00-000000", days_old=i)
        run_folder(root / "runs", f"202611{10 + i:02d}-000000-abc{i:03d}", days_old=i)
    touch(root / "cache" / "decoded" / "ns1" / "old.npy", 500, days_old=30)
    touch(root / "cache" / "decoded" / "ns1" / "new.npy", 500, days_old=1)
    run_folder(root / "cache" / "features", "ns-old", days_old=10)
    run_folder(root / "cache" / "features", "ns-new", days_old=2)
    touch(root / "checkpoints" / "finetune-abc.pt", 300, days_old=20)
    for kept in ("mlflow.db", "mlartifacts/1/abc/model.onnx", "cache/weights/resnet18.pth", "configs/a.json"):
        touch(root / kept, days_old=400)
    age(root / "mlartifacts", 400)
    return root


def names(paths: list[Any], root: Path) -> set[str]:
    return {str(Path(p).relative_to(root)) for p in paths}


def removed(result: Any) -> set[str]:
    return names([r.path for r in result.removed], result.workdir)


def test_old_runs_beyond_the_retention_and_stale_caches_go(workdir: Path) -> None:
    result = collect_garbage(workdir, keep_runs=5, older_than_days=7)
    assert removed(result) == {
        "kfp-local/adaptflow-2026-11-16-00-00-00-000000",
        "kfp-local/adaptflow-2026-11-17-00-00-00-000000",
        "runs/20261116-000000-abc006",
        "runs/20261117-000000-abc007",
        "cache/decoded/ns1/old.npy",
        "cache/features/ns-old",
        "checkpoints/finetune-abc.pt",
    }
    assert all(not r.path.exists() for r in result.removed)
    assert len(list((workdir / "kfp-local").iterdir())) == 5
    assert (workdir / "cache" / "decoded" / "ns1" / "new.npy").exists()
    assert (workdir / "cache" / "features" / "ns-new").exists()
    assert result.freed_bytes == 4 * 1000 + 500 + 1000 + 300
    for kept in ("mlflow.db", "mlartifacts/1/abc/model.onnx", "cache/weights/resnet18.pth", "configs/a.json"):
        assert (workdir / kept).exists(), kept


def test_a_dry_run_lists_the_same_and_removes_nothing(workdir: Path) -> None:
    before = sorted(p for p in workdir.rglob("*"))
    dry = collect_garbage(workdir, keep_runs=2, older_than_days=0, dry_run=True)
    assert sorted(p for p in workdir.rglob("*")) == before
    assert dry.dry_run and dry.freed_bytes > 0
    real = collect_garbage(workdir, keep_runs=2, older_than_days=0)
    assert removed(real) == removed(dry)
    assert real.freed_bytes == dry.freed_bytes


def test_nothing_modified_within_the_hour_goes(workdir: Path) -> None:
    """--keep-runs 0 --older-than 0 still keeps what a running pipeline may be writing."""
    fresh_run = run_folder(workdir / "kfp-local", "adaptflow-now", days_old=0)
    old_run = run_folder(workdir / "runs", "20261101-000000-active", days_old=30)
    touch(old_run / "run.log")  # a long run still appending to its log
    age(old_run, 30)
    os.utime(old_run / "run.log", (NOW - 60, NOW - 60))
    fresh_cache = touch(workdir / "cache" / "decoded" / "ns1" / "fresh.npy", days_old=0)
    result = collect_garbage(workdir, keep_runs=0, older_than_days=0)
    assert fresh_run.exists() and old_run.exists() and fresh_cache.exists()
    assert names(result.kept_active, workdir) == {"kfp-local/adaptflow-now", "runs/20261101-000000-active"}
    assert "kfp-local/adaptflow-2026-11-11-00-00-00-000000" in removed(result)
    assert newest_mtime(old_run) == pytest.approx(NOW - 60)


def test_runs_are_ordered_by_their_newest_file(workdir: Path) -> None:
    """A folder created long ago but written to since counts as recent."""
    oldest = workdir / "kfp-local" / "adaptflow-2026-11-17-00-00-00-000000"
    os.utime(oldest / "task" / "output.bin", (NOW - 0.5 * DAY, NOW - 0.5 * DAY))
    remove, _ = plan_gc(workdir, keep_runs=1, older_than_days=7)
    assert "kfp-local/adaptflow-2026-11-17-00-00-00-000000" not in names(remove, workdir)
    assert "kfp-local/adaptflow-2026-11-11-00-00-00-000000" in names(remove, workdir)


def test_symlinks_are_never_followed_out_of_the_workdir(workdir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    precious = touch(outside / "old-run" / "data.bin", 5000, days_old=100)
    precious_file = touch(outside / "weights.npy", 5000, days_old=100)
    links = [
        workdir / "kfp-local" / "adaptflow-linked",  # a run folder that is a link
        workdir / "cache" / "features" / "ns-linked",
    ]
    links[0].symlink_to(outside / "old-run", target_is_directory=True)
    links[1].symlink_to(outside, target_is_directory=True)
    (workdir / "cache" / "decoded" / "ns1" / "linked.npy").symlink_to(precious_file)
    # a link inside an old run folder: the folder goes, the link's target stays
    (workdir / "runs" / "20261117-000000-abc007" / "escape").symlink_to(outside, target_is_directory=True)
    # a whole folder gc prunes, linked out of the workdir: its old contents are not ours
    other = tmp_path / "other-checkpoints"
    touch(other / "finetune-x.pt", days_old=100)
    (workdir / "checkpoints").rename(workdir / "checkpoints-moved")
    (workdir / "checkpoints").symlink_to(other, target_is_directory=True)
    for link in [*links, workdir / "cache" / "decoded" / "ns1" / "linked.npy", workdir / "checkpoints"]:
        os.utime(link, (NOW - 100 * DAY,) * 2, follow_symlinks=False)
    age(workdir / "runs" / "20261117-000000-abc007", 7)

    result = collect_garbage(workdir, keep_runs=0, older_than_days=0)
    assert precious.exists() and precious_file.exists() and (other / "finetune-x.pt").exists()
    assert all(not r.path.is_relative_to(tmp_path / "outside") for r in result.removed)
    assert "runs/20261117-000000-abc007" in removed(result)
    assert all(link.is_symlink() for link in links)  # gc never removes a link it finds as a candidate
    assert not any(name.startswith("checkpoints/") for name in removed(result))


def test_a_link_into_the_tracking_store_is_not_a_way_in(workdir: Path) -> None:
    """cache/ linked to mlartifacts/: what looks like stale decoded images and features there is
    the tracking store's, and so is a kfp-local/ linked there."""
    store = workdir / "mlartifacts"
    touch(store / "decoded" / "ns" / "old.npy", days_old=400)
    run_folder(store / "features", "ns", days_old=400)
    (workdir / "cache").rename(workdir / "cache-moved")
    (workdir / "cache").symlink_to(store, target_is_directory=True)
    (workdir / "kfp-local").rename(workdir / "kfp-local-moved")
    (workdir / "kfp-local").symlink_to(store, target_is_directory=True)
    result = collect_garbage(workdir, keep_runs=0, older_than_days=0)
    assert not any(r.path.resolve().is_relative_to(store) for r in result.removed)
    assert (store / "decoded" / "ns" / "old.npy").exists() and (store / "features" / "ns").exists()
    assert (store / "1" / "abc" / "model.onnx").exists() and (workdir / "mlflow.db").exists()


def test_a_missing_workdir_frees_nothing(tmp_path: Path) -> None:
    result = collect_garbage(tmp_path / "nowhere")
    assert result.removed == [] and result.freed_bytes == 0


def test_the_view_lists_paths_relative_to_the_workdir(workdir: Path) -> None:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(gc_view(collect_garbage(workdir, dry_run=True).as_dict()))
    text = console.export_text()
    assert "cache/features/ns-old" in text and "would free" in text and "MB" in text
    console.print(gc_view(collect_garbage(workdir / "cache" / "weights").as_dict()))
    assert "nothing to remove" in console.export_text()


def test_the_command_prints_json(workdir: Path) -> None:
    out = json.loads(invoke("gc", "--dry-run", "--json", "--set", f"workdir={workdir}").stdout)
    assert out["dry_run"] is True
    assert set(out) >= {"removed", "freed_bytes", "dry_run"}
    assert all(set(row) == {"path", "bytes"} for row in out["removed"])
    assert out["freed_bytes"] == sum(row["bytes"] for row in out["removed"]) > 0
    assert (workdir / "cache" / "features" / "ns-old").exists()  # a dry run

    out = json.loads(
        invoke("gc", "--keep-runs", "6", "--older-than", "15", "--json", "--set", f"workdir={workdir}").stdout
    )
    assert names([row["path"] for row in out["removed"]], workdir) == {
        "kfp-local/adaptflow-2026-11-17-00-00-00-000000",
        "runs/20261117-000000-abc007",
        "cache/decoded/ns1/old.npy",
        "checkpoints/finetune-abc.pt",
    }
    assert not out["dry_run"] and not (workdir / "checkpoints" / "finetune-abc.pt").exists()


def test_the_command_prints_a_table(workdir: Path) -> None:
    output = invoke("gc", "--set", f"workdir={workdir}").stdout
    assert "kfp-local/adaptflow-2026-11-17-00-00-00-000000" in output
    assert "total freed" in output and "MB" in output


def test_a_negative_retention_is_a_usage_error(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["gc", "--keep-runs", "-1", "--set", f"workdir={workdir}"])
    assert result.exit_code == 2
    assert len(list((workdir / "kfp-local").iterdir())) == 7
