"""Talk to a Kubeflow Pipelines cluster: upload the compiled pipeline, start runs, manage schedules.

This is the library half of ``adaptflow submit`` / ``adaptflow schedule ...``; the CLI only parses
options and calls these functions. Everything goes through ``kfp.Client`` (KFP v2beta1 REST API), so
authentication is kfp's own: an explicit bearer token (``existing_token``, see :func:`resolve_token`),
or, when no host is given, the in-cluster service account / the kube config.

Errors a user can act on are :class:`~adaptflow.errors.AdaptflowError` subclasses with a hint:
an unreachable host or a refused request is a :class:`StoreError`, a bad cron expression or option a
:class:`ConfigError`. Nothing here reads the environment or touches the network at import time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adaptflow.errors import ConfigError, StoreError
from adaptflow.kfp_connection import (
    connect,
    default_version_name,
    kfp_call,
    normalize_host,
    resolve_token,
)
from adaptflow.kfp_cron import CRON_EXAMPLE, CRON_FORMAT, validate_cron

log = logging.getLogger(__name__)

__all__ = [
    "CRON_EXAMPLE",
    "CRON_FORMAT",
    "ScheduleInfo",
    "SubmitResult",
    "create_schedule",
    "delete_schedule",
    "list_schedules",
    "normalize_host",
    "resolve_token",
    "submit",
    "validate_cron",
]


_PAGE_SIZE = 100
_MAX_CONCURRENCY = 10  # the KFP API server refuses larger values
# The filter KFP's own ``Client.get_pipeline_id`` sends (operation 1 is EQUALS).
_EQUALS = 1


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SubmitResult:
    """What ``submit`` uploaded and started."""

    pipeline_id: str
    pipeline_version_id: str
    version_name: str
    experiment_id: str
    run_id: str
    run_url: str
    pipeline_created: bool
    experiment_created: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScheduleInfo:
    """One recurring run, flattened from KFP's ``V2beta1RecurringRun``."""

    recurring_run_id: str
    name: str
    cron: str | None
    interval_seconds: int | None
    enabled: bool
    status: str | None
    max_concurrency: int | None
    no_catchup: bool
    experiment_id: str | None
    pipeline_id: str | None
    pipeline_version_id: str | None
    created_at: datetime | None
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat() if self.created_at else None
        return data


# --------------------------------------------------------------------------- lookups


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": "display_name", "stringValue": name}]})


def _find_pipeline_id(client: Any, host: str, name: str, namespace: str | None) -> str | None:
    with kfp_call(host, f"list pipelines named {name!r}"):
        response = client.list_pipelines(filter=_name_filter(name), namespace=namespace, page_size=_PAGE_SIZE)
    matches = [p for p in (response.pipelines or []) if p.display_name in (None, name)]
    if len(matches) > 1:
        ids = ", ".join(str(p.pipeline_id) for p in matches)
        raise StoreError(
            f"{len(matches)} pipelines are named {name!r} on {host} ({ids})",
            hint="`adaptflow submit` and `adaptflow schedule create` find the pipeline by its name, so it must "
            "be unique: delete the extra ones in the KFP UI (or check --namespace)",
        )
    return str(matches[0].pipeline_id) if matches else None


def _latest_version(client: Any, host: str, pipeline_id: str, pipeline_name: str) -> Any:
    with kfp_call(host, f"list the versions of pipeline {pipeline_name!r}"):
        response = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    versions = response.pipeline_versions or []
    if not versions:
        raise StoreError(
            f"pipeline {pipeline_name!r} ({pipeline_id}) on {host} has no versions",
            hint="upload one with `adaptflow submit`",
        )
    return versions[0]


def _require_pipeline_id(client: Any, host: str, name: str, namespace: str | None) -> str:
    pipeline_id = _find_pipeline_id(client, host, name, namespace)
    if pipeline_id is None:
        raise StoreError(
            f"no pipeline named {name!r} on {host}",
            hint="upload it first with `adaptflow submit` (same --host and --namespace), or check --namespace",
        )
    return pipeline_id


def _find_experiment_id(client: Any, host: str, name: str, namespace: str | None) -> str | None:
    with kfp_call(host, f"look up experiment {name!r}"):
        try:
            experiment = client.get_experiment(experiment_name=name, namespace=namespace)
        except ValueError as exc:
            if str(exc).startswith("No experiment is found"):
                return None
            raise StoreError(f"experiment lookup on {host} failed: {exc}") from exc
    return str(experiment.experiment_id)


def _ensure_experiment(client: Any, host: str, name: str, namespace: str | None) -> tuple[str, bool]:
    experiment_id = _find_experiment_id(client, host, name, namespace)
    if experiment_id is not None:
        return experiment_id, False
    log.info("creating experiment %r on %s", name, host)
    with kfp_call(host, f"create experiment {name!r}"):
        experiment = client.create_experiment(name, namespace=namespace)
    return str(experiment.experiment_id), True


def _schedule_info(rr: Any) -> ScheduleInfo:
    trigger = rr.trigger
    cron = trigger.cron_schedule.cron if trigger is not None and trigger.cron_schedule is not None else None
    periodic = trigger.periodic_schedule if trigger is not None else None
    interval = periodic.interval_second if periodic is not None else None
    ref = rr.pipeline_version_reference
    runtime = rr.runtime_config
    return ScheduleInfo(
        recurring_run_id=str(rr.recurring_run_id),
        name=str(rr.display_name or ""),
        cron=cron,
        interval_seconds=int(interval) if interval is not None else None,
        enabled=rr.mode == "ENABLE",
        status=rr.status,
        max_concurrency=int(rr.max_concurrency) if rr.max_concurrency not in (None, "") else None,
        no_catchup=bool(rr.no_catchup),
        experiment_id=rr.experiment_id,
        pipeline_id=ref.pipeline_id if ref is not None else None,
        pipeline_version_id=(ref.pipeline_version_id if ref is not None else None) or rr.pipeline_version_id,
        created_at=rr.created_at,
        parameters=dict(runtime.parameters or {}) if runtime is not None else {},
    )


def _iter_recurring_runs(
    client: Any, host: str, experiment_id: str | None, namespace: str | None
) -> Iterator[Any]:
    token = ""
    while True:
        with kfp_call(host, "list recurring runs"):
            response = client.list_recurring_runs(
                page_token=token, page_size=_PAGE_SIZE, experiment_id=experiment_id, namespace=namespace
            )
        yield from response.recurring_runs or []
        token = response.next_page_token or ""
        if not token:
            return


# --------------------------------------------------------------------------- public operations


def submit(
    host: str,
    package_path: str | Path,
    *,
    pipeline_name: str,
    version_name: str | None,
    experiment: str,
    run_name: str | None,
    parameters: dict[str, Any],
    namespace: str | None = None,
    existing_token: str | None = None,
    service_account: str | None = None,
) -> SubmitResult:
    """Upload ``package_path`` as pipeline ``pipeline_name`` (or a new version of it) and start a run.

    The first upload creates the pipeline; KFP names its first version after the pipeline, so
    ``version_name`` only applies to later uploads (default: UTC timestamp + short hash of the package).
    The experiment is created when missing. The run pins the exact version just uploaded.
    """
    path = Path(package_path)
    if not path.is_file():
        raise ConfigError(
            f"pipeline package {path} does not exist", hint="compile it first with `adaptflow compile`"
        )
    if not pipeline_name.strip():
        raise ConfigError(
            "the pipeline name is empty",
            hint="pass pipeline_name; the CLI always uses adaptflow.pipelines.PIPELINE_NAME ('adaptflow')",
        )
    if not experiment.strip():
        raise ConfigError("the experiment name is empty", hint="pass --experiment adaptflow")
    client, url = connect(host, namespace=namespace, existing_token=existing_token)

    pipeline_id = _find_pipeline_id(client, url, pipeline_name, namespace)
    pipeline_created = pipeline_id is None
    if pipeline_id is None:
        if version_name:
            log.info("first upload of %r: KFP names its first version after the pipeline", pipeline_name)
        with kfp_call(url, f"upload pipeline {pipeline_name!r}"):
            pipeline = client.upload_pipeline(str(path), pipeline_name=pipeline_name, namespace=namespace)
        pipeline_id = str(pipeline.pipeline_id)
        version = _latest_version(client, url, pipeline_id, pipeline_name)
        log.info("uploaded new pipeline %r (%s)", pipeline_name, pipeline_id)
    else:
        name = version_name or default_version_name(path)
        with kfp_call(url, f"upload version {name!r} of pipeline {pipeline_name!r}"):
            version = client.upload_pipeline_version(
                str(path), pipeline_version_name=name, pipeline_id=pipeline_id
            )
        log.info("uploaded version %r of pipeline %r (%s)", name, pipeline_name, pipeline_id)
    version_id = str(version.pipeline_version_id)

    experiment_id, experiment_created = _ensure_experiment(client, url, experiment, namespace)
    job_name = run_name or f"{pipeline_name} {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S')}"
    with kfp_call(url, f"start a run of pipeline {pipeline_name!r}"):
        run = client.run_pipeline(
            experiment_id,
            job_name,
            params=dict(parameters),
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=service_account,
        )
    run_id = str(run.run_id)
    result = SubmitResult(
        pipeline_id=pipeline_id,
        pipeline_version_id=version_id,
        version_name=str(version.display_name or version_name or ""),
        experiment_id=experiment_id,
        run_id=run_id,
        run_url=f"{url}/#/runs/details/{run_id}",
        pipeline_created=pipeline_created,
        experiment_created=experiment_created,
    )
    log.info("started run %s: %s", run_id, result.run_url)
    return result


def create_schedule(
    host: str,
    *,
    pipeline_name: str,
    experiment: str,
    job_name: str,
    cron: str,
    parameters: dict[str, Any],
    max_concurrency: int = 1,
    no_catchup: bool = True,
    namespace: str | None = None,
    existing_token: str | None = None,
    description: str | None = None,
    service_account: str | None = None,
    replace: bool = False,
) -> str:
    """Create a recurring run of the latest version of ``pipeline_name``; return its id.

    ``cron`` is KFP's 6-field format, seconds first (e.g. ``"0 0 3 * * 1"``). A schedule with the same
    ``job_name`` in the experiment is an error (two schedules would double every run) unless
    ``replace``: then the new one is created first and the old ones are deleted.
    """
    expression = validate_cron(cron)
    if not 1 <= max_concurrency <= _MAX_CONCURRENCY:
        raise ConfigError(
            f"max_concurrency must be between 1 and {_MAX_CONCURRENCY}, got {max_concurrency}",
            hint="1 (the default) never lets two scheduled runs overlap",
        )
    if not job_name.strip():
        raise ConfigError("the schedule name is empty", hint="pass --name nightly-adaptflow")
    client, url = connect(host, namespace=namespace, existing_token=existing_token)

    pipeline_id = _require_pipeline_id(client, url, pipeline_name, namespace)
    version = _latest_version(client, url, pipeline_id, pipeline_name)
    experiment_id, _ = _ensure_experiment(client, url, experiment, namespace)
    existing = [
        rr.recurring_run_id
        for rr in _iter_recurring_runs(client, url, experiment_id, None)
        if rr.display_name == job_name
    ]
    if existing and not replace:
        raise StoreError(
            f"experiment {experiment!r} on {url} already has a schedule named {job_name!r} ({', '.join(existing)})",
            hint="delete it first (`adaptflow schedule delete ID`), pick another name, or replace it",
        )
    with kfp_call(url, f"create schedule {job_name!r}"):
        recurring = client.create_recurring_run(
            experiment_id,
            job_name,
            description=description,
            cron_expression=expression,
            max_concurrency=max_concurrency,
            no_catchup=no_catchup,
            params=dict(parameters),
            pipeline_id=pipeline_id,
            version_id=str(version.pipeline_version_id),
            enabled=True,
            service_account=service_account,
        )
    recurring_run_id = str(recurring.recurring_run_id)
    log.info(
        "created schedule %r (%s): cron %r, pipeline %r version %s",
        job_name,
        recurring_run_id,
        expression,
        pipeline_name,
        version.pipeline_version_id,
    )
    for old in existing:
        _delete_recurring_run(client, url, str(old))
    return recurring_run_id


def list_schedules(
    host: str,
    experiment: str | None = None,
    *,
    namespace: str | None = None,
    existing_token: str | None = None,
) -> list[ScheduleInfo]:
    """All recurring runs (of one experiment when ``experiment`` is given), following every page."""
    client, url = connect(host, namespace=namespace, existing_token=existing_token)
    experiment_id: str | None = None
    if experiment is not None:
        experiment_id = _find_experiment_id(client, url, experiment, namespace)
        if experiment_id is None:
            raise StoreError(
                f"no experiment named {experiment!r} on {url}",
                hint="leave out the experiment to list every schedule, or check --namespace",
            )
    return [_schedule_info(rr) for rr in _iter_recurring_runs(client, url, experiment_id, namespace)]


def delete_schedule(
    host: str,
    recurring_run_id: str,
    *,
    namespace: str | None = None,
    existing_token: str | None = None,
) -> None:
    """Delete one recurring run; an unknown id is a StoreError."""
    if not recurring_run_id.strip():
        raise ConfigError("the schedule id is empty", hint="find ids with `adaptflow schedule list`")
    client, url = connect(host, namespace=namespace, existing_token=existing_token)
    _delete_recurring_run(client, url, recurring_run_id)


def _delete_recurring_run(client: Any, host: str, recurring_run_id: str) -> None:
    with kfp_call(
        host,
        f"delete schedule {recurring_run_id}",
        not_found=f"no schedule (recurring run) with id {recurring_run_id!r}",
    ):
        client.delete_recurring_run(recurring_run_id)
    log.info("deleted schedule %s on %s", recurring_run_id, host)
