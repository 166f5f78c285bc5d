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

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adaptflow.errors import AdaptflowError, ConfigError, StoreError

log = logging.getLogger(__name__)

CRON_FORMAT = "SECONDS MINUTES HOURS DAY-OF-MONTH MONTH DAY-OF-WEEK"
CRON_EXAMPLE = "0 0 3 * * 1"
PORT_FORWARD_HINT = "kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow"
TOKEN_ENV = "KFP_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # the variable kfp's own volume credentials read

_CONNECT_TIMEOUT_S = 5.0
_HEALTHZ = "/apis/v2beta1/healthz"
_PAGE_SIZE = 100
_MAX_CONCURRENCY = 10  # the KFP API server refuses larger values
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}
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


# --------------------------------------------------------------------------- small helpers


def normalize_host(host: str) -> str:
    """``localhost:8080`` -> ``http://localhost:8080``; other hosts without a scheme get ``https://``.

    kfp itself defaults every scheme-less host to https, which breaks the usual port-forward address.
    """
    value = host.strip().rstrip("/")
    if not value:
        raise ConfigError(
            "no Kubeflow Pipelines host given",
            hint=f"pass --host http://localhost:8080 after `{PORT_FORWARD_HINT}`",
        )
    if "://" not in value:
        hostname = urlsplit("//" + value).hostname or ""
        scheme = "http" if hostname in _LOOPBACK or hostname.startswith("127.") else "https"
        value = f"{scheme}://{value}"
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"invalid Kubeflow Pipelines host {host!r}",
            hint="use a URL such as http://localhost:8080 or https://kubeflow.example.com/pipeline",
        )
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"invalid Kubeflow Pipelines host {host!r}: {exc}") from exc
    return value


def resolve_token(token: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token to send: ``token``, else ``$KFP_TOKEN``, else the file ``$KF_PIPELINES_SA_TOKEN_PATH``.

    Meant for the CLI layer (called at command time, never at import). ``None`` means "no token": kfp
    then sends no credentials to an explicit host (fine for a port-forward).
    """
    if token:
        return token.strip()
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip()
    path = env.get(SA_TOKEN_PATH_ENV)
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"cannot read the KFP token file {path} (from ${SA_TOKEN_PATH_ENV}): {exc}",
                hint=f"fix or unset ${SA_TOKEN_PATH_ENV}, or pass the token in ${TOKEN_ENV}",
            ) from exc
    return None


def default_version_name(package_path: str | Path, now: datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS-<sha256[:8]>`` of the package: sortable, and different for different YAML."""
    digest = hashlib.sha256(Path(package_path).read_bytes()).hexdigest()[:8]
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{digest}"


# --------------------------------------------------------------------------- cron

# KFP's API server checks a schedule with robfig/cron v1's ``cron.Parse``: 6 fields, seconds first, or a
# descriptor. croniter (maintained under pallets-eco, used by Airflow) does the field checking here:
# values, ranges, lists, steps and month/day names, seconds first through ``second_at_beginning``.
# It also knows Quartz/Jenkins syntax robfig does not (L, W, #, H, a 7th year field), which is refused
# below. Two small differences remain and are left to the server, which refuses them with robfig's own
# message: croniter reads day-of-week 7 as Sunday and wraps backwards ranges (SAT-SUN, 10-2).
_CRON_FIELDS = (  # name, the values it takes
    ("seconds", "0-59"),
    ("minutes", "0-59"),
    ("hours", "0-23"),
    ("day-of-month", "1-31 or ?"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-6 or SUN-SAT, or ?"),
)
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_NOT_ROBFIG = re.compile(r"#|(?<![a-z])[lwh]+(?![a-z])", re.IGNORECASE)  # 1#2, L, 15W, 5L, H


def _cron_error(cron: str, problem: str) -> ConfigError:
    return ConfigError(
        f"invalid cron expression {cron!r}: {problem}",
        hint=f"Kubeflow Pipelines wants 6 fields, seconds first: '{CRON_FORMAT}', "
        f"e.g. '{CRON_EXAMPLE}' (every Monday at 03:00:00)",
    )


def _croniter_problem(expression: str) -> str | None:
    """croniter's objection to a seconds-first expression, or None when it accepts it."""
    from croniter import croniter

    try:
        croniter.expand(expression, second_at_beginning=True)
    except ValueError as exc:  # CroniterError and its subclasses are ValueErrors
        return str(exc)
    return None


def validate_cron(cron: str) -> str:
    """Check a KFP cron expression (robfig/cron with seconds) and return it with single spaces.

    A 5-field crontab line is refused: KFP would read its first field as the seconds, so
    ``0 3 * * 1`` would run at second 0 of minute 3 of every hour, every day in January,
    instead of Mondays at 03:00.
    """
    text = " ".join(cron.split())
    if not text:
        raise _cron_error(cron, "it is empty")
    if text.startswith("@"):
        if text in _DESCRIPTORS:
            return text
        if text.startswith("@every "):  # robfig's own; croniter has no equivalent
            if _GO_DURATION.match(text.removeprefix("@every ").strip()):
                return text
            raise _cron_error(cron, "@every needs a duration such as '@every 6h' or '@every 90m'")
        raise _cron_error(cron, f"unknown descriptor; known ones are {', '.join(sorted(_DESCRIPTORS))}")
    fields = text.split(" ")
    if len(fields) == 5:
        raise ConfigError(
            f"invalid cron expression {cron!r}: it has 5 fields, but Kubeflow Pipelines needs 6, seconds first "
            f"('{CRON_FORMAT}'); read as KFP reads it, the first field would be the seconds",
            hint=f"for the crontab line {text!r} write '0 {text}'; e.g. '{CRON_EXAMPLE}' runs every Monday at 03:00:00",
        )
    if len(fields) != 6:
        raise _cron_error(cron, f"it has {len(fields)} fields, expected 6")
    for index, (expr, (name, values)) in enumerate(zip(fields, _CRON_FIELDS, strict=True)):
        if _NOT_ROBFIG.search(expr):
            raise _cron_error(
                cron,
                f"the {name} field {expr!r} uses L, W, # or H, which Kubeflow Pipelines' scheduler lacks",
            )
        # Check each field alone (the others '*') so that the error names the field.
        if _croniter_problem(" ".join(expr if i == index else "*" for i in range(6))) is not None:
            raise _cron_error(
                cron, f"the {name} field {expr!r} is not valid (values {values}; also *, a,b, a-b and */n)"
            )
    problem = _croniter_problem(text)
    if problem is not None:
        raise _cron_error(cron, problem)
    return text


# --------------------------------------------------------------------------- connection and errors


def _unreachable(host: str, reason: object) -> StoreError:
    return StoreError(
        f"cannot reach the Kubeflow Pipelines API at {host}: {reason}",
        hint=f"check --host and that the API is reachable; for a local cluster run `{PORT_FORWARD_HINT}` "
        "and use --host http://localhost:8080",
    )


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            data = json.loads(body)
        except ValueError:
            return body.strip()[:300]
        if isinstance(data, dict):
            return str(data.get("message") or data.get("error") or body)[:300]
    return str(getattr(exc, "reason", "") or exc)


def _api_error(host: str, action: str, exc: Any, not_found: str | None) -> StoreError:
    status = int(getattr(exc, "status", 0) or 0)
    message = _api_message(exc)
    if status == 0:
        return _unreachable(host, message)
    if status in (401, 403):
        return StoreError(
            f"Kubeflow Pipelines at {host} refused to {action} (HTTP {status}): {message}",
            hint=f"pass a bearer token (--token or ${TOKEN_ENV}, or a token file in ${SA_TOKEN_PATH_ENV}), "
            "or check --namespace and your RBAC in a multi-user deployment",
        )
    if status == 404 and not_found:
        return StoreError(
            f"{not_found} (HTTP 404 from {host})", hint="list what exists with `adaptflow schedule list`"
        )
    if status == 404:
        return StoreError(
            f"{host} answered 404 to {action}: {message}",
            hint="is --host the KFP API / UI address (it must serve /apis/v2beta1)? "
            f"For a local cluster use `{PORT_FORWARD_HINT}`",
        )
    if status == 409:
        return StoreError(
            f"Kubeflow Pipelines at {host} could not {action}: it already exists (HTTP 409): {message}",
            hint="another submit may have raced this one; run the command again",
        )
    return StoreError(f"Kubeflow Pipelines at {host} could not {action} (HTTP {status}): {message}")


@contextlib.contextmanager
def _kfp_call(host: str, action: str, *, not_found: str | None = None) -> Iterator[None]:
    """Turn kfp / urllib3 failures into StoreErrors; keep kfp's ``print`` chatter out of stdout."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    except AdaptflowError:
        raise
    except ApiException as exc:
        raise _api_error(host, action, exc, not_found) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:  # MaxRetryError, ConnectionError, TimeoutError
        reason = getattr(exc, "reason", None) or exc
        raise _unreachable(host, reason) from exc
    except ValueError as exc:  # kfp's own argument checks (empty names, ambiguous lookups)
        raise StoreError(f"could not {action} on {host}: {exc}") from exc
    finally:
        for line in chatter.getvalue().splitlines():
            if line.strip():
                log.debug("kfp: %s", line)


def _preflight(host: str, token: str | None, timeout: float = _CONNECT_TIMEOUT_S) -> None:
    """One health check with timeouts and no retries, before ``kfp.Client`` runs its own.

    kfp's check has no connect timeout (a blackholed host hangs for minutes) and retries refusals
    5 times, 5 s apart; this one fails in seconds and tells an auth problem from a wrong address.
    """
    import certifi
    import urllib3

    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    try:
        response = pool.request(
            "GET",
            f"{host}{_HEALTHZ}",
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=3 * timeout),
            retries=False,
            redirect=False,
        )
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _unreachable(host, getattr(exc, "reason", None) or exc) from exc
    finally:
        pool.clear()
    status = response.status
    if 300 <= status < 400 or status in (401, 403):
        raise StoreError(
            f"Kubeflow Pipelines at {host} wants authentication (HTTP {status} on {_HEALTHZ})",
            hint=f"pass a bearer token (--token or ${TOKEN_ENV}, or a token file in ${SA_TOKEN_PATH_ENV}); "
            f"behind a login page, port-forward the API instead: `{PORT_FORWARD_HINT}`",
        )
    if status == 404:
        raise StoreError(
            f"{host} is not a Kubeflow Pipelines API: {_HEALTHZ} answered 404",
            hint=f"use the ml-pipeline-ui address; for a local cluster `{PORT_FORWARD_HINT}` and "
            "--host http://localhost:8080",
        )
    if status >= 400:
        raise StoreError(f"Kubeflow Pipelines at {host} is not healthy: {_HEALTHZ} answered HTTP {status}")


def connect(host: str, *, namespace: str | None = None, existing_token: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host``, after a fast health check of our own (see :func:`_preflight`)."""
    import kfp

    url = normalize_host(host)
    _preflight(url, existing_token)
    kwargs: dict[str, Any] = {"host": url, "existing_token": existing_token}
    if namespace:
        kwargs["namespace"] = namespace
    log.debug("connecting to Kubeflow Pipelines at %s (namespace=%s)", url, namespace)
    with _kfp_call(url, "answer the health check"):
        return kfp.Client(**kwargs)


# --------------------------------------------------------------------------- lookups


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": "display_name", "stringValue": name}]})


def _find_pipeline_id(client: Any, host: str, name: str, namespace: str | None) -> str | None:
    with _kfp_call(host, f"list pipelines named {name!r}"):
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
    with _kfp_call(host, f"list the versions of pipeline {pipeline_name!r}"):
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
    with _kfp_call(host, f"look up experiment {name!r}"):
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
    with _kfp_call(host, f"create experiment {name!r}"):
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
        with _kfp_call(host, "list recurring runs"):
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
    client = connect(host, namespace=namespace, existing_token=existing_token)
    url = normalize_host(host)

    pipeline_id = _find_pipeline_id(client, url, pipeline_name, namespace)
    pipeline_created = pipeline_id is None
    if pipeline_id is None:
        if version_name:
            log.info("first upload of %r: KFP names its first version after the pipeline", pipeline_name)
        with _kfp_call(url, f"upload pipeline {pipeline_name!r}"):
            pipeline = client.upload_pipeline(str(path), pipeline_name=pipeline_name, namespace=namespace)
        pipeline_id = str(pipeline.pipeline_id)
        version = _latest_version(client, url, pipeline_id, pipeline_name)
        log.info("uploaded new pipeline %r (%s)", pipeline_name, pipeline_id)
    else:
        name = version_name or default_version_name(path)
        with _kfp_call(url, f"upload version {name!r} of pipeline {pipeline_name!r}"):
            version = client.upload_pipeline_version(
                str(path), pipeline_version_name=name, pipeline_id=pipeline_id
            )
        log.info("uploaded version %r of pipeline %r (%s)", name, pipeline_name, pipeline_id)
    version_id = str(version.pipeline_version_id)

    experiment_id, experiment_created = _ensure_experiment(client, url, experiment, namespace)
    job_name = run_name or f"{pipeline_name} {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S')}"
    with _kfp_call(url, f"start a run of pipeline {pipeline_name!r}"):
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
    client = connect(host, namespace=namespace, existing_token=existing_token)
    url = normalize_host(host)

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
    with _kfp_call(url, f"create schedule {job_name!r}"):
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
    client = connect(host, namespace=namespace, existing_token=existing_token)
    url = normalize_host(host)
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
    client = connect(host, namespace=namespace, existing_token=existing_token)
    _delete_recurring_run(client, normalize_host(host), recurring_run_id)


def _delete_recurring_run(client: Any, host: str, recurring_run_id: str) -> None:
    with _kfp_call(
        host,
        f"delete schedule {recurring_run_id}",
        not_found=f"no schedule (recurring run) with id {recurring_run_id!r}",
    ):
        client.delete_recurring_run(recurring_run_id)
    log.info("deleted schedule %s on %s", recurring_run_id, host)
