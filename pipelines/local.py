"""Running the DAG on one machine through ``kfp.local`` (SubprocessRunner, no venv, no pip)."""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from adaptflow.pipelines.kfp_local_compat import kfp_local_fixes
from adaptflow.pipelines.local_process import stage_processes

from adaptflow.config import Settings
from adaptflow.contracts import CompareResult
from adaptflow.data.ingest import check_source
from adaptflow.errors import AdaptflowError, Interrupted
from adaptflow.recovery import decide_interrupted_versions, sweep_stale_runs
from adaptflow.steps import ERROR_FILE_ENV, SUMMARY_FILE
from adaptflow.tracking import TrackingContext, name_run, run_lifecycle, start_pipeline_run

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _env_var(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _kfp_local_noise_hidden() -> Iterator[None]:
    """Hide the two kfp.local warnings that are expected here; every other warning still shows."""
    with warnings.catch_warnings():
        # adaptflow's base_image is its own image, not "python:*"; use_venv=False runs in this environment.
        warnings.filterwarnings(
            "ignore", "You may be attem.* non-Python base image", RuntimeWarning, r"kfp\.local\."
        )
        # CPU/memory/GPU limits in the IR are for the cluster; the local runner ignores them.
        warnings.filterwarnings(
            "ignore",
            r"Task .*: settings .* have no effect in the current local runner",
            UserWarning,
            r"kfp\.local\.",
        )
        yield


@contextlib.contextmanager
def _builtin_print_kept() -> Iterator[None]:
    # kfp.local runs ParallelFor iterations in threads, each swapping builtins.print for an indenting
    # one and back (kfp.local.logging_utils.indented_print); interleaved, the last restore can leave
    # an indenting print behind in this process.
    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original


class _RunLogWriter:
    """stdout during a run: kfp.local's own lines into the run log without colour codes (and, with
    ``-v``, onto stderr as well)."""

    def __init__(self, log_file: TextIO, echo: bool) -> None:
        self.log_file, self.echo = log_file, echo

    def write(self, text: str) -> int:
        from adaptflow.run_output import strip_ansi

        self.log_file.write(strip_ansi(text))
        if self.echo:
            sys.stderr.write(text)
        return len(text)

    def flush(self) -> None:
        self.log_file.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[TextIO]:
    """The run's log file, and this process's own log records in it, for the block."""
    from adaptflow.logs import log_to_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8", buffering=1) as log_file:
        handler = log_to_file(path)
        try:
            yield log_file
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


@contextlib.contextmanager
def kfp_local_run(
    pipeline_root: Path,
    error_file: Path | None = None,
    checkpoint_root: Path | None = None,
    log_path: Path | None = None,
) -> Iterator[None]:
    """kfp.local set up for adaptflow for the block; nothing it changes in this process outlives it.

    Inside: ``local.init`` with ``SubprocessRunner(use_venv=False)``, the kfp.local fixes
    (:mod:`adaptflow.pipelines.kfp_local_compat`), ``$ADAPTFLOW_ERROR_FILE`` (components run in
    subprocesses that inherit it), ``$ADAPTFLOW_CHECKPOINT_ROOT`` (where training stages checkpoint, so a
    rerun resumes), stage processes run by :mod:`adaptflow.pipelines.local_process` (signals forwarded,
    only transient failures retried, nothing left behind), stdout sent to stderr (kfp.local prints task logs on stdout; stdout
    stays for the summary, ``--json``), and kfp.local's expected warnings hidden. After: kfp.local's
    previous configuration, kfp's own functions, os.environ, warnings.filters, sys.stdout and
    builtins.print are as they were. With ``log_path``, kfp.local's output and the stages' go to that
    file instead, and the terminal gets adaptflow's own lines (:mod:`adaptflow.run_output`).
    """
    from kfp import local
    from kfp.local import config as local_config

    from adaptflow.logs import is_verbose
    from adaptflow.run_output import say
    from adaptflow.training.checkpoint import CHECKPOINT_ROOT_ENV  # here: that module imports torch

    with contextlib.ExitStack() as stack:
        stack.enter_context(_builtin_print_kept())
        log_file = stack.enter_context(_run_log(log_path)) if log_path is not None else None
        if log_file is not None:
            say(f"run log: {log_path}")
            stack.enter_context(contextlib.redirect_stdout(_RunLogWriter(log_file, is_verbose())))  # type: ignore[type-var]
        else:
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        stack.enter_context(_kfp_local_noise_hidden())
        if error_file is not None:
            stack.enter_context(_env_var(ERROR_FILE_ENV, str(error_file)))
        if checkpoint_root is not None:
            stack.enter_context(_env_var(CHECKPOINT_ROOT_ENV, str(checkpoint_root)))
        stack.enter_context(stage_processes(log_file, is_verbose()))
        stack.enter_context(kfp_local_fixes())
        stack.callback(
            setattr, local_config.LocalExecutionConfig, "instance", local_config.LocalExecutionConfig.instance
        )
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(pipeline_root),
            raise_on_error=True,
        )
        yield


class PipelineFailed(AdaptflowError):
    stage: str | None = None  # the stage that failed, for ``--json``'s error object


def _failure(error: Exception, error_file: Path) -> PipelineFailed:
    if error_file.exists():
        info = json.loads(error_file.read_text())
        failed = PipelineFailed(f"stage {info['stage']} failed: {info['message']}", hint=info.get("hint"))
        failed.stage = info["stage"]
        return failed
    return PipelineFailed(f"pipeline failed: {error}", hint="the stage's log is printed above")


def _attempt(settings: Settings) -> tuple[Path, Path, str]:
    """(workdir, error file, attempt name) of one local run; the error file's folder exists.

    The backbone's weights are resolved first (downloaded into the cache the baseline stage reads),
    so a run that cannot get them stops before any work, with the ways out in its hint.
    """
    from adaptflow.models.weights import resolve_weights

    workdir = Path(settings.workdir).resolve()
    resolve_weights(settings.backbone, workdir / "cache" / "weights")
    attempt = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    error_file = workdir / "runs" / attempt / "error.json"
    error_file.parent.mkdir(parents=True, exist_ok=True)
    return workdir, error_file, attempt


def write_run_config(settings: Settings, workdir: Path) -> Path:
    """The resolved config as a file the stages read (named by its content, so caching still works)."""
    import hashlib

    text = settings.to_json()
    path = workdir / "configs" / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def _run_dag(
    pipeline: Any, ctx: TrackingContext, workdir: Path, error_file: Path, finish: bool, **arguments: Any
) -> Path:
    """Runs a DAG under kfp.local; returns its output artifact's folder. The parent run ``ctx`` ends
    FAILED on an error and KILLED on an interrupt; FINISHED on success only when ``finish``."""
    with (
        run_lifecycle(ctx.tracking_uri, ctx.parent_run_id, finish=finish),
        kfp_local_run(
            workdir / "kfp-local", error_file, workdir / "checkpoints", error_file.parent / "run.log"
        ),
    ):
        try:
            task = pipeline(parent_run_id=ctx.parent_run_id, **arguments)
        except Interrupted:
            raise
        except Exception as error:
            raise _failure(error, error_file) from None
    return Path(task.output.path)


def run_local(settings: Settings, data_uri: str, force: bool = False) -> dict[str, Any]:
    """Runs the compiled DAG locally and returns the run summary."""
    from adaptflow.pipelines.pipeline import build_pipeline

    from adaptflow.tracking import lineage_tags

    check_source(data_uri)  # a wrong --data stops here, before any run exists
    workdir, error_file, attempt = _attempt(settings)
    ctx = start_pipeline_run(
        settings,
        f"{settings.registry.model_name}: running",  # named by its outcome when it ends
        {"adaptflow.data_uri": data_uri, "adaptflow.attempt": attempt},
    )
    # an earlier run killed outright (SIGKILL) left runs RUNNING and maybe a version undecided
    sweep_stale_runs(ctx.tracking_uri, ctx.experiment_id)
    decide_interrupted_versions(ctx.tracking_uri, settings.registry.model_name)
    started = time.perf_counter()
    # A successful run is ended (and named by its outcome) by the register or report stage.
    try:
        output = _run_dag(
            build_pipeline(settings),
            ctx,
            workdir,
            error_file,
            finish=False,
            data_uri=data_uri,
            config_json=str(write_run_config(settings, workdir)),  # a file: off the command line
            force=force,
            pipeline_version="local",
        )
    except BaseException as error:
        outcome = "stopped" if isinstance(error, Interrupted | KeyboardInterrupt) else "failed"
        name_run(ctx, f"{settings.registry.model_name}: {outcome}")
        raise
    summary: dict[str, Any] = json.loads((output / SUMMARY_FILE).read_text())
    lineage = lineage_tags(ctx.tracking_uri, ctx.parent_run_id)
    summary["kfp"] = {
        "run_id": lineage.get("kfp.run_id"),
        "pipeline_root": str(workdir / "kfp-local"),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    return summary


def run_compare_local(
    settings: Settings, data_uri: str, strategies: Sequence[str], out_dir: str | Path
) -> CompareResult:
    """Runs the compare DAG locally (the cluster's ParallelFor fan-out) and copies its report to ``out_dir``.

    The strategies run one at a time: on one machine they would share its cores, and each row's
    cost figures (wall seconds, images/s, peak memory) must describe the strategy alone.
    """
    from adaptflow.pipelines.compare import build_compare_pipeline

    from adaptflow.compare import copy_compare_output

    check_source(data_uri)
    workdir, error_file, _ = _attempt(settings)
    tags = {"adaptflow.stage": "compare", "adaptflow.data_uri": data_uri}
    ctx = start_pipeline_run(settings, "compare", {**tags, "adaptflow.strategies": ",".join(strategies)})
    output = _run_dag(
        build_compare_pipeline(settings, parallelism=1),
        ctx,
        workdir,
        error_file,
        finish=True,
        data_uri=data_uri,
        strategies=list(strategies),
        config_json=str(write_run_config(settings, workdir)),  # a file: off the command line
    )
    return copy_compare_output(output, Path(out_dir))
