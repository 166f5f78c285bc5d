"""MLflow: where to track, one parent run per pipeline run, one nested run per stage.

The embedded default is SQLite plus a local artifact folder under the workdir; MLFLOW_TRACKING_URI
(or ``tracking.tracking_uri``) points elsewhere. KFP's MLflow plugin injects MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_ID and MLFLOW_RUN_ID: when set, they are honoured and stage runs nest under
the injected run. All environment reads happen in functions, never at import.
"""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptflow.config import Settings
from adaptflow.errors import Interrupted, StoreError, store_error_from
from adaptflow.recovery import kill_running_children, owner_tags

log = logging.getLogger(__name__)

TAG_PREFIX = "adaptflow."


def embedded_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db')}"


def resolve_tracking_uri(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return (
        settings.tracking.tracking_uri
        or env.get("MLFLOW_TRACKING_URI")
        or embedded_tracking_uri(settings.workdir)
    )


def check_tracking_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fails fast, with a hint, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            raise StoreError(
                f"MLflow tracking server {uri} is unreachable: {getattr(error, 'reason', error)}",
                hint="start it (make stack-up), fix MLFLOW_TRACKING_URI, or unset it to use the embedded store",
            ) from None
        raise StoreError(f"MLflow tracking server {uri} is not healthy")
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :].split("?")[0])
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the embedded MLflow store in {folder}: {error}") from None
        if not os.access(folder, os.W_OK):
            raise StoreError(
                f"the embedded MLflow store folder {folder} is not writable",
                hint="make it writable by this user, or point workdir or tracking.tracking_uri elsewhere",
            )
        probe_sqlite_store(path, timeout)


def probe_sqlite_store(path: Path, timeout: float = 5.0) -> None:
    """Reads an existing SQLite store's schema, and checks it can be written.

    A corrupt, truncated, unopenable or read-only file fails here in milliseconds, as one StoreError;
    in MLflow it would retry opening for ~100 s, or fail at the first write with SQLAlchemy's traceback.
    """
    import sqlite3
    from contextlib import closing

    if not path.exists():
        return  # MLflow creates it
    problem: Exception | None = None
    try:
        # mode=rw: never creates a file; a hot journal left by a crash is rolled back as MLflow would
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=timeout)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as error:
        problem = error
    else:
        if not os.access(path, os.W_OK):  # a read-only mount (EROFS) answers this even for root
            problem = sqlite3.OperationalError("attempt to write a readonly database")
    if problem is not None:
        where = f"the embedded MLflow store {path}"
        raise store_error_from(problem, where) or StoreError(f"{where} cannot be used: {problem}") from None


def _store_name(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"the embedded MLflow store {uri[len('sqlite:///') :]}"
    return f"the MLflow tracking store {uri}"


class _OneLineSqlErrors(logging.Filter):
    """MLflow logs each SQL error it re-raises with its traceback and SQL statement; the re-raised error
    reaches the user as one StoreError (store_errors), so its log record is cut to one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            lines = record.getMessage().splitlines() or [""]
            detail = next((line for line in lines if "sqlite3." in line or "psycopg" in line), lines[-1])
            record.msg, record.args = "%s %s", (lines[0], detail)
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_sql_tracebacks() -> None:
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _OneLineSqlErrors) for f in logger.filters):
        logger.addFilter(_OneLineSqlErrors())


@contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Raises what a broken tracking store throws (SQLAlchemy, sqlite3, MLflow's REST client after its
    retries) as one StoreError with a hint; anything else passes unchanged."""
    _quiet_sql_tracebacks()
    try:
        yield
    except StoreError:
        raise
    except Exception as error:
        translated = store_error_from(error, _store_name(uri))
        if translated is None:
            raise
        raise translated from error


#: the experiment's kind: MLflow's UI opens a model-training experiment on its runs, not GenAI traces
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in MLflow's UI when the store is a tracking server, else None (no UI serves it).

    ``workflowType=machine_learning`` because MLflow 3.17's UI ignores :data:`EXPERIMENT_KIND` on its own
    links and opens the GenAI pages unless the link names the workflow.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ensure_experiment(tracking_uri: str, name: str, workdir: str | Path) -> str:
    """The experiment id; for embedded stores, artifacts go under the workdir, not ./mlruns."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(experiment.experiment_id)
    location = None
    if tracking_uri.startswith("sqlite:"):
        location = (Path(workdir).resolve() / "mlartifacts").as_uri()
    try:
        return str(
            client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        )
    except Exception:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


@dataclass(frozen=True)
class TrackingContext:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def git_commit() -> str:
    """The source commit: baked into images as ADAPTFLOW_GIT_COMMIT, else asked of git."""
    baked = os.environ.get("ADAPTFLOW_GIT_COMMIT")
    if baked:
        return baked
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage_tags(tracking_uri: str, parent_run_id: str) -> dict[str, str]:
    """The KFP run facts (``kfp.*`` tags) that ingest recorded on the pipeline run."""
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri).get_run(parent_run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith("kfp.")}


def start_pipeline_run(
    settings: Settings, run_name: str, tags: dict[str, str], env: Mapping[str, str] | None = None
) -> TrackingContext:
    """Resolves the parent run: KFP's injected MLFLOW_RUN_ID if present, else a new one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    env = os.environ if env is None else env
    uri = resolve_tracking_uri(settings, env)
    check_tracking_reachable(uri)
    injected_run = env.get("MLFLOW_RUN_ID")
    with store_errors(uri):
        experiment_id = env.get("MLFLOW_EXPERIMENT_ID") or ensure_experiment(
            uri, settings.tracking.experiment, settings.workdir
        )
        client = MlflowClient(uri)
        if injected_run:
            run_id = injected_run
            log.info("tracking: nesting under the injected MLflow run %s", run_id)
        else:
            run = client.create_run(
                experiment_id,
                run_name=run_name,
                # the owner, so that a later run can tell this one was killed (adaptflow.recovery)
                tags={"mlflow.source.git.commit": git_commit(), **owner_tags()},
            )
            run_id = run.info.run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    mlflow.set_tracking_uri(uri)
    return TrackingContext(uri, experiment_id, run_id)


@contextmanager
def stage_run(ctx: TrackingContext, stage: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A nested MLflow run for one stage; a failure marks it FAILED and re-raises.

    The child is created explicitly: ``mlflow.start_run()`` alone would resume MLFLOW_RUN_ID
    (injected by KFP's plugin) instead of nesting a new run under it.
    """
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    mlflow.set_tracking_uri(ctx.tracking_uri)
    with store_errors(ctx.tracking_uri):  # the stage's own errors, in the block below, pass untouched
        all_tags = {
            f"{TAG_PREFIX}stage": stage,
            MLFLOW_PARENT_RUN_ID: ctx.parent_run_id,
            **lineage_tags(ctx.tracking_uri, ctx.parent_run_id),
            **(tags or {}),
        }
        child = MlflowClient(ctx.tracking_uri).create_run(ctx.experiment_id, run_name=stage, tags=all_tags)
    with mlflow.start_run(run_id=child.info.run_id) as run:
        try:
            yield run
        except Interrupted:
            mlflow.end_run("KILLED")  # stopped by a signal, not failed: a rerun resumes it
            raise


def name_run(ctx: TrackingContext, name: str) -> None:
    """Renames the pipeline run (best effort: the store may be what failed)."""
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(ctx.tracking_uri).set_tag(ctx.parent_run_id, "mlflow.runName", name)
    except Exception as error:  # the run's name is not worth a second error
        log.warning("could not name run %s: %s", ctx.parent_run_id, error)


def finish_pipeline_run(ctx: TrackingContext, status: str = "FINISHED") -> None:
    end_run(ctx.tracking_uri, ctx.parent_run_id, status)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    if os.environ.get("MLFLOW_RUN_ID") == run_id:
        return  # KFP owns an injected run's lifecycle
    with store_errors(tracking_uri):
        MlflowClient(tracking_uri).set_terminated(run_id, status=status)


@contextmanager
def run_lifecycle(tracking_uri: str, run_id: str, *, finish: bool = True) -> Iterator[None]:
    """Owns how an MLflow run ends; every caller that ends a run goes through here.

    The block's success ends it FINISHED (unless ``finish`` is False: a later stage ends it), an
    interruption (Ctrl-C, or a signal handler's ``SystemExit``) KILLED, any other error FAILED; the
    error is re-raised. A run injected by KFP's MLflow plugin is left to KFP.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit, Interrupted):
        end_run(tracking_uri, run_id, "KILLED")
        kill_running_children(tracking_uri, run_id)  # a stage killed before it could end its own run
        raise
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    if finish:
        end_run(tracking_uri, run_id)


def flat_params(prefix: str, data: Mapping[str, Any]) -> dict[str, str]:
    """Nested config -> ``section.key`` params (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_params(name, value))
        else:
            out[name] = str(value)[:6000]
    return out


def stage_timings(tracking_uri: str, parent_run_id: str) -> dict[str, float]:
    """Wall seconds of each stage's nested run, in start order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=100,
    )
    timed = sorted((r.info.start_time, r.info.run_name, r.info.end_time) for r in runs if r.info.end_time)
    return {name: round((end - start) / 1000.0, 2) for start, name, end in timed}
