"""A multi-node finetune: submit a Kubeflow Trainer job, follow it, and collect the model it trained.

``submit_and_wait`` is what the finetune step calls when ``cluster.finetune.nodes > 1``:

1. stage the snapshot, the baseline and the config in the artifact store (the pods share no disk);
2. create the job (:mod:`adaptflow.trainjob_render`) through the Kubernetes API, named from the run
   identity: a retried task finds its own job and follows it (running), collects it (succeeded) or
   replaces it (failed);
3. poll it, logging each new status condition and each Event of the job and its pods;
4. on success copy the candidate from the artifact store into ``out_dir`` and delete the job.

A failed job, an evicted pod, the timeout (``cluster.finetune.job_timeout_seconds``) and SIGTERM each
delete the job and raise one :class:`TrainJobFailed` (or :class:`~adaptflow.errors.Interrupted`) with a
hint. The worker checkpoints under the pipeline root, so the job a retried task makes resumes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptflow.config import Settings
from adaptflow.errors import AdaptflowError, ConfigError, Interrupted, StoreError
from adaptflow.training.remote_worker import (
    download_tree,
    exists,
    staging_layout,
    upload_tree,
    write_text,
)
from adaptflow.trainjob_render import (
    JOB_LABEL,
    PYTORCHJOB_GROUP,
    PYTORCHJOB_PLURAL,
    PYTORCHJOB_VERSION,
    TRAINJOB_GROUP,
    TRAINJOB_PLURAL,
    TRAINJOB_VERSION,
    job_name,
    plan_job,
    render_job,
    staging_uri,
    worker_command,
)

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: handed from the submitting pod to the job's, when set there and not in cluster.env
PASSTHROUGH_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "ADAPTFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
)
RBAC_HINT = "apply infra/k8s/pipeline-rbac (a Role and RoleBinding for the pipeline's service account)"
RETRY_HINT = "the task's retry makes the job again and resumes from the checkpoint under the pipeline root"


class TrainJobFailed(AdaptflowError):
    """The Kubeflow job failed, was evicted or ran out of time; it has been deleted."""


@dataclass(frozen=True)
class JobKind:
    group: str
    version: str
    plural: str
    succeeded: str  # the condition type that means done
    failed: str = "Failed"


KINDS = {
    "trainjob": JobKind(TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL, succeeded="Complete"),
    "pytorchjob": JobKind(PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL, succeeded="Succeeded"),
}


def kube_api_client() -> Any:
    """In a pod, its service account; elsewhere ``$KUBECONFIG`` or ``~/.kube/config``."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        # the client reads $KUBECONFIG once, at its import: pass it, so the current value counts
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def default_namespace() -> str:
    """The namespace this pod runs in (its service account says), else the kubeconfig context's."""
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip()
    try:
        from kubernetes import config

        _, context = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        return str(context.get("context", {}).get("namespace") or "default")
    except Exception:  # no kubeconfig: the API client will say so more clearly
        return "default"


def _true(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def job_outcome(job: dict[str, Any], kind: JobKind) -> tuple[str, dict[str, Any] | None]:
    """("succeeded" | "failed" | "running", the deciding condition)."""
    conditions = list((job.get("status") or {}).get("conditions") or [])
    if failed := _true(conditions, kind.failed):
        return "failed", failed
    if done := _true(conditions, kind.succeeded):
        return "succeeded", done
    return "running", None


def evicted_pod(pods: list[Any]) -> str | None:
    """The first pod the node or the scheduler took away (evicted, preempted, drained), described."""
    for pod in pods:
        status = pod.status
        if status is None:
            continue
        if status.reason == "Evicted":
            return f"pod {pod.metadata.name} was evicted: {status.message or ''}".strip()
        for cond in status.conditions or []:
            if cond.type == "DisruptionTarget" and cond.status == "True":
                return f"pod {pod.metadata.name} was disrupted ({cond.reason}): {cond.message or ''}".strip()
    return None


class JobClient:
    """The few Kubernetes API calls a job needs, each turning API errors into adaptflow errors."""

    def __init__(self, api_client: Any, kind: JobKind, namespace: str, name: str) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.kind, self.namespace, self.name = kind, namespace, name

    def _call(self, verb: str, call: Callable[[], Any], missing_ok: bool = False) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        what = f"{verb} {self.kind.plural}.{self.kind.group} {self.name!r} in namespace {self.namespace!r}"
        try:
            return call()
        except ApiException as error:
            if error.status == 404 and missing_ok:
                return None
            if error.status in (401, 403):
                raise ConfigError(
                    f"the Kubernetes API refused to {what}: {error.reason}", hint=RBAC_HINT
                ) from error
            if error.status == 404:
                raise ConfigError(
                    f"cannot {what}: the API has no such resource ({error.reason})",
                    hint="install Kubeflow Trainer v2 for job_api: trainjob, or the training operator and "
                    "set cluster.finetune.job_api: pytorchjob",
                ) from error
            if error.status in (400, 422):
                raise ConfigError(
                    f"the Kubernetes API rejected the job: {error.body}",
                    hint="the installed CRD differs from the one adaptflow renders for "
                    "(tests/data/crds/README.md names its version); upgrade the operator or switch job_api",
                ) from error
            raise StoreError(
                f"cannot {what}: HTTP {error.status} {error.reason}",
                hint="the Kubernetes API is busy or down; the task's retry tries again",
                transient=True,
            ) from error
        except (OSError, HTTPError) as error:  # refused, reset, timed out: after urllib3's own retries
            raise StoreError(
                f"cannot reach the Kubernetes API to {what}: {error}",
                hint="check the cluster is reachable from this pod",
                transient=True,
            ) from error

    def _args(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def get(self) -> dict[str, Any] | None:
        return self._call(  # type: ignore[no-any-return]
            "get", lambda: self.custom.get_namespaced_custom_object(*self._args(), self.name), missing_ok=True
        )

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self._call(  # type: ignore[no-any-return]
            "create", lambda: self.custom.create_namespaced_custom_object(*self._args(), manifest)
        )

    def delete(self) -> None:
        self._call(
            "delete",
            lambda: self.custom.delete_namespaced_custom_object(
                *self._args(), self.name, propagation_policy="Background"
            ),
            missing_ok=True,
        )

    def events(self) -> list[Any]:
        items = self._call("list events of", lambda: self.core.list_namespaced_event(self.namespace)).items
        return [
            e for e in items if e.involved_object and (e.involved_object.name or "").startswith(self.name)
        ]

    def pods(self) -> list[Any]:
        selector = f"{JOB_LABEL}={self.name}"
        found = self._call(
            "list pods of", lambda: self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        )
        return list(found.items)


class Follower:
    """Logs what is new in the job's conditions and events since the last look."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._conditions: set[tuple[Any, ...]] = set()
        self._events: set[tuple[Any, ...]] = set()

    def conditions(self, job: dict[str, Any]) -> None:
        for c in (job.get("status") or {}).get("conditions") or []:
            key = (c.get("type"), c.get("status"), c.get("reason"), c.get("lastTransitionTime"))
            if key not in self._conditions:
                self._conditions.add(key)
                log.info("job %s: %s=%s %s %s", self.name, *key[:3], c.get("message") or "")

    def events(self, events: list[Any]) -> None:
        for e in events:
            key = (e.metadata.uid if e.metadata else None, e.count, e.reason, e.message)
            if key not in self._events:
                self._events.add(key)
                obj = e.involved_object
                log.info("event %s %s/%s: %s %s", e.type, obj.kind, obj.name, e.reason, e.message or "")


def _wait_gone(jobs: JobClient, poll_seconds: float, limit_seconds: float = 300.0) -> None:
    deadline = time.monotonic() + limit_seconds
    while jobs.get() is not None:
        if time.monotonic() > deadline:
            raise TrainJobFailed(
                f"job {jobs.name} is still being deleted after {limit_seconds:.0f}s",
                hint="look at its finalizers (kubectl describe); the task's retry tries again",
                transient=True,
            )
        time.sleep(poll_seconds)


def _fail(jobs: JobClient, message: str, hint: str, *, transient: bool) -> TrainJobFailed:
    log.error("%s; deleting job %s", message, jobs.name)
    jobs.delete()
    return TrainJobFailed(message, hint=hint, transient=transient)


def wait_for_job(
    jobs: JobClient, timeout_seconds: float, poll_seconds: float, stop: Callable[[], bool] = lambda: False
) -> None:
    """Returns when the job succeeds; otherwise deletes it and raises."""
    follow = Follower(jobs.name)
    deadline = time.monotonic() + timeout_seconds
    while True:
        job = jobs.get()
        if job is None:
            raise TrainJobFailed(
                f"job {jobs.name} disappeared while it ran",
                hint=f"someone deleted it; {RETRY_HINT}",
                transient=True,
            )
        follow.conditions(job)
        follow.events(jobs.events())
        outcome, condition = job_outcome(job, jobs.kind)
        if outcome == "succeeded":
            return
        if outcome == "failed":
            cond = condition or {}
            raise _fail(
                jobs,
                f"job {jobs.name} failed: {cond.get('reason', '')} {cond.get('message', '')}".strip(),
                hint=f"the events above say why; `kubectl logs -l {JOB_LABEL}={jobs.name}` shows the workers'",
                transient=cond.get("reason") == "DeadlineExceeded",
            )
        if evicted := evicted_pod(jobs.pods()):
            raise _fail(jobs, f"job {jobs.name}: {evicted}", hint=RETRY_HINT, transient=True)
        if stop():
            jobs.delete()
            raise Interrupted(f"stopped while job {jobs.name} ran; it was deleted", hint=RETRY_HINT)
        if time.monotonic() > deadline:
            raise _fail(
                jobs,
                f"job {jobs.name} did not finish within {timeout_seconds:.0f}s",
                hint=f"raise cluster.finetune.job_timeout_seconds, or add nodes; {RETRY_HINT}",
                transient=True,
            )
        _sleep_unless_stopped(poll_seconds, stop)


def _sleep_unless_stopped(seconds: float, stop: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while not stop() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def submit_and_wait(
    settings: Settings,
    *,
    snapshot_dir: str | Path,
    baseline_dir: str | Path,
    config_json: str,
    parent_run_id: str,
    fingerprint: str,
    out_dir: str | Path,
    image: str,
    api_client: Any = None,
    poll_seconds: float = 10.0,
) -> Path:
    """Runs the finetune as a Kubeflow job and puts the candidate in ``out_dir``. Returns ``out_dir``."""
    from adaptflow.signals import stop_on_sigterm

    scaling = settings.cluster.finetune
    name = job_name(parent_run_id, fingerprint, settings.config_hash())
    staging = staging_uri(settings.cluster.pipeline_root, name)
    layout = staging_layout(staging)
    namespace = scaling.namespace or default_namespace()
    extra_env = {k: os.environ[k] for k in PASSTHROUGH_ENV if os.environ.get(k)}
    plan = plan_job(
        settings,
        name=name,
        namespace=namespace,
        image=image,
        command=worker_command(staging, parent_run_id, fingerprint),
        extra_env=extra_env,
    )
    jobs = JobClient(api_client or kube_api_client(), KINDS[scaling.job_api], namespace, name)
    out = Path(out_dir)
    with stop_on_sigterm() as stop:
        existing = jobs.get()
        state = job_outcome(existing, jobs.kind)[0] if existing else None
        if state == "failed":
            log.info("job %s failed on an earlier try: replacing it", name)
            jobs.delete()
            _wait_gone(jobs, poll_seconds)
        if state in (None, "failed"):
            upload_tree(Path(snapshot_dir), layout.snapshot)
            upload_tree(Path(baseline_dir), layout.baseline)
            write_text(layout.config, config_json, out.parent / ".staging")
            jobs.create(render_job(plan))
            log.info("created %s %s/%s: %d node(s) x %d process(es)", jobs.kind.plural, namespace, name,
                     plan.nodes, plan.procs_per_node)  # fmt: skip
        else:
            log.info("job %s already exists (%s): following it", name, state)
        wait_for_job(jobs, scaling.job_timeout_seconds, poll_seconds, stop=lambda: bool(stop))
        collect(staging, out)
        jobs.delete()
    return out


def collect(staging: str, out_dir: Path) -> None:
    """Copies the candidate rank 0 staged out into ``out_dir``; only a whole output (marker last) counts."""
    layout = staging_layout(staging)
    if not exists(layout.success):
        raise TrainJobFailed(
            f"the job succeeded but left no finished candidate at {layout.candidate}",
            hint="rank 0 writes it last; look at the rank-0 pod's log",
        )
    count = download_tree(layout.candidate, out_dir)
    log.info("collected %d candidate files from %s into %s", count, layout.candidate, out_dir)
