"""After a SIGKILL: the next run marks the dead run KILLED and gives an undecided version a decision."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from adaptflow.recovery import (
    HOST_TAG,
    INTERRUPTED_DECISION,
    PID_TAG,
    decide_interrupted_versions,
    owner_tags,
    sweep_stale_runs,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture()
def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    return client, uri, experiment


def test_a_dead_owners_runs_are_killed_and_live_or_foreign_ones_are_left(store) -> None:  # type: ignore[no-untyped-def]
    client, uri, experiment = store
    dead = client.create_run(experiment, tags={HOST_TAG: socket.gethostname(), PID_TAG: f"{_dead_pid()}:1"})
    stage = client.create_run(experiment, tags={"mlflow.parentRunId": dead.info.run_id})
    alive = client.create_run(experiment, tags=owner_tags())  # this very process
    foreign = client.create_run(experiment, tags={HOST_TAG: "another-node", PID_TAG: "1:1"})
    untagged = client.create_run(experiment)

    assert sweep_stale_runs(uri, experiment) == [dead.info.run_id]
    status = {r: client.get_run(r).info.status for r in (dead.info.run_id, stage.info.run_id)}
    assert status == {dead.info.run_id: "KILLED", stage.info.run_id: "KILLED"}
    for run in (alive, foreign, untagged):
        assert client.get_run(run.info.run_id).info.status == "RUNNING"


def test_a_reused_pid_is_not_mistaken_for_the_owner(store) -> None:  # type: ignore[no-untyped-def]
    client, uri, experiment = store
    import os

    # our own pid, but another start time: the process that owned the run is gone
    run = client.create_run(experiment, tags={HOST_TAG: socket.gethostname(), PID_TAG: f"{os.getpid()}:1"})
    assert sweep_stale_runs(uri, experiment) == [run.info.run_id]


def test_a_version_left_without_a_gate_decision_gets_one(store) -> None:  # type: ignore[no-untyped-def]
    client, uri, experiment = store
    client.create_registered_model("m")
    ended = client.create_run(experiment)
    client.set_terminated(ended.info.run_id, "KILLED")
    running = client.create_run(experiment)  # a promoter at work right now
    decided = client.create_run(experiment)
    undecided = client.create_model_version("m", "file:///x", run_id=ended.info.run_id)
    in_progress = client.create_model_version("m", "file:///x", run_id=running.info.run_id)
    done = client.create_model_version("m", "file:///x", run_id=decided.info.run_id)
    client.set_model_version_tag("m", done.version, "adaptflow.gate.decision", "promoted")

    assert decide_interrupted_versions(uri, "m") == [str(undecided.version)]
    tags = client.get_model_version("m", undecided.version).tags
    assert tags["adaptflow.gate.decision"] == INTERRUPTED_DECISION
    assert "never promoted" in tags["adaptflow.gate.reasons"]
    assert "adaptflow.gate.decision" not in client.get_model_version("m", in_progress.version).tags
    assert client.get_model_version("m", done.version).tags["adaptflow.gate.decision"] == "promoted"
    assert decide_interrupted_versions(uri, "no-such-model") == []
