"""Stage processes under kfp.local: signals forwarded, nothing left behind, only transient failures retried.

kfp.local's SubprocessRunner starts each stage with ``subprocess.Popen`` and retries any non-zero exit
as the task's ``set_retry`` policy says. Inside :func:`stage_processes` adaptflow runs the stage its
own way instead (``subprocess_task_handler.run_local_subprocess``, the one function kfp calls):

- Each stage runs in a session of its own, so the terminal's Ctrl-C reaches only this process,
  and the stage's own children (DataLoader workers) can be found and killed as one group. On Linux
  the stage also gets SIGTERM when this process dies, even by SIGKILL (``PR_SET_PDEATHSIG``).
- SIGTERM or SIGINT to this process is forwarded as SIGTERM to the running stage's process group;
  the stage checkpoints and exits; after ``STOP_GRACE_SECONDS`` the group is killed. Then :class:`Interrupted` is raised.
- When a stage exits, whatever it left in its group is killed.
- With a run log, the stage's output goes there; the terminal gets one line when the stage starts
  and one when it ends, with its time, and what :class:`adaptflow.run_output.StageOutput` passes on
  (progress bars, the stage's console lines, warnings and errors).
- The stage's environment bounds OpenMP's spinning (:func:`adaptflow.cpus.openmp_env`), unless the
  user set their own ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``.
- A stage's exit status says whether a retry can help (:data:`adaptflow.errors.RETRYABLE_EXITS`):
  transient failures go back to kfp.local, which retries them; any other failure raises
  :class:`StageFailed` at once, so a config or data error is not retried for minutes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from adaptflow.cpus import openmp_env
from adaptflow.errors import RETRYABLE_EXITS, AdaptflowError, Interrupted
from adaptflow.progress import PROGRESS_EVENTS_ENV
from adaptflow.run_output import StageOutput, say
from adaptflow.signals import stop_with_parent

#: how long a stage gets to checkpoint after SIGTERM before its process group is killed
STOP_GRACE_SECONDS = 25.0


class StageFailed(AdaptflowError):
    """A stage exited with a status that a retry cannot fix; the error file says why."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"stage exited with status {returncode}")
        self.returncode = returncode


class _Stages:
    """The running stage processes and whether a stop was asked for."""

    def __init__(self, log_file: TextIO | None = None, verbose: bool = True) -> None:
        self.log_file, self.verbose = log_file, verbose
        self.lock = threading.Lock()
        self.live: dict[int, subprocess.Popen[str]] = {}
        self.stopped_by: int | None = None

    def stop(self, signum: int) -> None:
        with self.lock:
            self.stopped_by = signum
            processes = list(self.live.values())
        for process in processes:
            # the group: KFP runs each stage as `sh -c` with Python as its child, and sh does not pass it on
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        if processes:
            timer = threading.Timer(STOP_GRACE_SECONDS, self.kill_all)
            timer.daemon = True
            timer.start()

    def kill_all(self) -> None:
        with self.lock:
            processes = list(self.live.values())
        for process in processes:
            _kill_group(process.pid)

    def interrupted(self) -> Interrupted:
        name = signal.Signals(self.stopped_by).name if self.stopped_by else "a signal"
        return Interrupted(
            f"run stopped by {name}; a training stage that was running saved a checkpoint",
            hint="run the same command again: training resumes from its checkpoint",
        )


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stage_env(environ: Mapping[str, str], env_vars: dict[str, str] | None = None) -> dict[str, str]:
    """A stage process's environment: ``environ``, kfp's ``env_vars``, and adaptflow's settings."""
    env = {**environ, **(env_vars or {})}
    # bounded OpenMP spinning (cpus.openmp_env): concurrent stages and runs do not starve each other
    env.update(openmp_env(env))
    # unbuffered: the stage's log reaches the terminal as it is written, not when the stage ends
    env["PYTHONUNBUFFERED"] = "1"
    env[PROGRESS_EVENTS_ENV] = "1"  # this process draws the stage's bars (adaptflow.run_output)
    return env


def stage_name(full_command: list[str]) -> str:
    """The component's function (kfp passes ``--function_to_execute NAME``), else "stage"."""
    for flag, value in itertools.pairwise(full_command):
        if flag == "--function_to_execute":
            return value
    return "stage"


def _run_stage(stages: _Stages, full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's ``run_local_subprocess``, with the behaviour this module's docstring describes."""
    env = stage_env(os.environ, env_vars)
    with stages.lock:
        if stages.stopped_by is not None:
            raise stages.interrupted()
        process = subprocess.Popen(
            full_command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,
            preexec_fn=stop_with_parent,
        )
        stages.live[process.pid] = process
    stage = stage_name(full_command)
    output = StageOutput(stage, stages.log_file, stages.verbose) if stages.log_file is not None else None
    if output is not None:
        say(f"{stage} started")
    started = time.perf_counter()
    try:
        with process:
            if process.stdout:
                for line in iter(process.stdout.readline, ""):
                    if output is not None:
                        output.feed(line)
                    else:
                        print(line, end="")
                if output is None:
                    print("\n")
            returncode = process.wait()
    finally:
        if output is not None:
            output.close()
        with stages.lock:
            stages.live.pop(process.pid, None)
        _kill_group(process.pid)  # DataLoader workers or anything else the stage left behind
    if output is not None:
        seconds = time.perf_counter() - started
        say(
            f"{stage} done in {seconds:.1f} s" if returncode == 0 else f"{stage} failed after {seconds:.1f} s"
        )
    if stages.stopped_by is not None:
        raise stages.interrupted()
    if returncode != 0 and returncode not in RETRYABLE_EXITS:
        raise StageFailed(returncode)
    return returncode


@contextlib.contextmanager
def stage_processes(log_file: TextIO | None = None, verbose: bool = True) -> Iterator[None]:
    """Within the block, kfp.local runs stages as described above; SIGTERM/SIGINT stop the run.
    ``log_file``: where the stages' output goes (else this process's stdout, every line)."""
    from kfp.local import subprocess_task_handler

    stages = _Stages(log_file, verbose)

    def run_local_subprocess(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        return _run_stage(stages, full_command, env_vars)

    def on_signal(signum: int, frame: Any) -> None:
        stages.stop(signum)
        with stages.lock:
            idle = not stages.live
        if idle:  # between stages (or in a retry's back-off): nothing to wait for
            raise stages.interrupted()

    original = subprocess_task_handler.run_local_subprocess
    subprocess_task_handler.run_local_subprocess = run_local_subprocess
    handlers: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            handlers[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        subprocess_task_handler.run_local_subprocess = original
        for signum, previous in handlers.items():
            signal.signal(signum, previous)
        stages.kill_all()  # nothing outlives the run, whatever ended it
