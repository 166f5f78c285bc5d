"""SIGTERM and SIGKILL to `adaptflow run` mid fine-tune: nothing left running, nothing RUNNING, resumed.

Driven through the real CLI and kfp.local, checked from the outside: the process table, the MLflow
store and the checkpoint folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ADAPTFLOW = [sys.executable, "-m", "adaptflow.cli"]
EPOCHS = 4  # the signal lands after epoch 1: three more epochs are margin enough, and the rerun resumes


def _command(tiny_assets, work: Path) -> list[str]:  # type: ignore[no-untyped-def]
    overrides = [
        *tiny_assets.overrides(work),
        "baseline.advisor.force=true",
        f"finetune.epochs={EPOCHS}",
        f"finetune.patience={EPOCHS}",
        "finetune.checkpoint_min_seconds=0",  # a checkpoint at every epoch end
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [*ADAPTFLOW, "run", "--data", str(tiny_assets.target), *sets, "--json"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_"))}


def _start_and_wait_for_checkpoint(command: list[str], log: Path, work: Path) -> subprocess.Popen[bytes]:
    """Starts the run; returns once fine-tuning has written its first checkpoint (after epoch 1)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=_env())
    deadline = time.monotonic() + 600
    while not list((work / "checkpoints").glob("finetune-*.pt")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no checkpoint was written:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return process


def _processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line names ``marker`` (every stage's carries the workdir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


def _runs(work: Path) -> list:  # type: ignore[type-arg]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids, max_results=500))


def _resume_and_check(command: list[str], work: Path, checkpoint: Path) -> dict:  # type: ignore[type-arg]
    rerun = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    resumed = summary["finetune"]["resumed_from"]
    assert resumed is not None and resumed.startswith("epoch "), summary["finetune"]
    assert int(resumed.split()[1]) >= 2  # not from the start: at least epoch 1 was done
    assert not checkpoint.exists()  # the candidate is saved: the checkpoint is gone
    assert summary["registered_version"] is not None
    return summary


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_checkpoints_leaves_nothing_running_and_the_rerun_resumes(
    tiny_assets, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "state"
    command = _command(tiny_assets, work)
    log = tmp_path / "first.log"
    process = _start_and_wait_for_checkpoint(command, log, work)
    stages = [pid for pid in _processes_mentioning(str(work)) if pid != process.pid]
    assert stages  # the fine-tuning stage, and the `sh -c` KFP wraps it in
    for pid in stages:  # the config reaches stages as a file, not on their command line
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert '\\"finetune\\":' not in cmdline and '"finetune":' not in cmdline
        assert str(work / "configs") in cmdline
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    err = log.read_text()
    last_lines = err.strip().splitlines()[-2:]
    assert last_lines[0].startswith("error: run stopped by SIGTERM"), last_lines
    assert last_lines[1].startswith("hint: "), last_lines
    assert "Traceback" not in err
    time.sleep(1)
    assert _processes_mentioning(str(work)) == []
    statuses = {(r.info.run_name, r.info.status) for r in _runs(work)}
    assert not [s for s in statuses if s[1] == "RUNNING"], statuses
    assert ("finetune", "KILLED") in statuses
    checkpoints = list((work / "checkpoints").glob("finetune-*.pt"))
    assert len(checkpoints) == 1
    _resume_and_check(command, work, checkpoints[0])


# slow (make test-all): two whole runs; SIGTERM's checkpoint and resume run in CI (test above)
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_sigkill_stops_the_stage_and_the_next_run_cleans_up_and_resumes(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "state"
    command = _command(tiny_assets, work)
    process = _start_and_wait_for_checkpoint(command, tmp_path / "first.log", work)
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 60
    while _processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(work)) == []  # the stage got SIGTERM when its parent died
    assert any(r.info.status == "RUNNING" for r in _runs(work))  # nobody could end the pipeline run
    checkpoints = list((work / "checkpoints").glob("finetune-*.pt"))
    assert len(checkpoints) == 1
    _resume_and_check(command, work, checkpoints[0])
    runs = _runs(work)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # the killed pipeline run, swept by the next one, is named for what happened to it
    assert any(r.info.status == "KILLED" and r.info.run_name.endswith(": killed") for r in runs)
