"""Cleaning up after a run that was killed outright (SIGKILL, a lost node): nothing stays RUNNING.

A run killed by SIGKILL cannot end its MLflow runs or finish the gate. The next local run does it:

- a RUNNING pipeline run whose owner process (``adaptflow.host``/``adaptflow.pid`` tags, with the
  process's start time, so a reused pid is not mistaken for it) is gone is marked KILLED, and so
  are its stage runs;
- a model version without a gate decision whose run is no longer running gets one:
  ``interrupted before the gate`` (it was never promoted, and now says why).

Runs owned by another host are left alone: from here nobody can tell whether they still run.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from adaptflow.registry import GATE_DECISION_TAG, GATE_REASONS_TAG

log = logging.getLogger(__name__)

HOST_TAG = "adaptflow.host"
PID_TAG = "adaptflow.pid"
INTERRUPTED_DECISION = "interrupted before the gate"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def owner_tags() -> dict[str, str]:
    """Tags naming the process that owns a pipeline run: ``host`` and ``pid:start-time``."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: f"{pid}:{_start_time(pid) or '?'}"}


def _owner_alive(tags: dict[str, str]) -> bool | None:
    """True/False for a run owned on this host; None when it cannot be told (another host, no tags)."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return None
    pid, _, started = tags[PID_TAG].partition(":")
    if not pid.isdigit():
        return None
    now = _start_time(int(pid))
    return now is not None and (started == "?" or now == started)


def kill_running_children(tracking_uri: str, parent_run_id: str) -> list[str]:
    """Marks the stage runs of ``parent_run_id`` still RUNNING as KILLED; their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    running = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=100,
    )
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in running]


def sweep_stale_runs(tracking_uri: str, experiment_id: str) -> list[str]:
    """Marks RUNNING pipeline runs of dead local owners KILLED, with their stage runs; their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    swept = []
    for run in running:
        if _owner_alive(run.data.tags) is False:
            client.set_terminated(run.info.run_id, status="KILLED")
            if (run.info.run_name or "").endswith(": running"):  # named by its outcome, as ended runs are
                client.set_tag(
                    run.info.run_id, "mlflow.runName", run.info.run_name.removesuffix("running") + "killed"
                )
            killed = kill_running_children(tracking_uri, run.info.run_id)
            log.warning(
                "marked run %s KILLED (its process is gone), and %d stage run(s)",
                run.info.run_id,
                len(killed),
            )
            swept.append(run.info.run_id)
    return swept


def decide_interrupted_versions(tracking_uri: str, model_name: str) -> list[str]:
    """Gives every version of ``model_name`` left without a gate decision, whose run has ended, one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return []  # no such model yet
    decided = []
    for version in versions:
        if GATE_DECISION_TAG in (version.tags or {}):
            continue
        if version.run_id:
            try:
                if client.get_run(version.run_id).info.status == "RUNNING":
                    continue  # a promoter may be at work right now
            except MlflowException:
                pass  # its run is gone: nobody will decide it
        client.set_model_version_tag(model_name, version.version, GATE_DECISION_TAG, INTERRUPTED_DECISION)
        client.set_model_version_tag(
            model_name,
            version.version,
            GATE_REASONS_TAG,
            "the run stopped after registering this version and before the gate; it was never promoted",
        )
        log.warning("version %s of %s: %s", version.version, model_name, INTERRUPTED_DECISION)
        decided.append(str(version.version))
    return decided
