"""Kubeflow job manifests for a multi-node finetune, rendered from settings: pure data, no cluster calls.

Two APIs, chosen by ``cluster.finetune.job_api``:

- ``trainjob``: Kubeflow Trainer v2, ``trainer.kubeflow.org/v1alpha1`` ``TrainJob`` referring to the
  ``torch-distributed`` ClusterTrainingRuntime (``runtimeRef``), with ``trainer.numNodes``,
  ``numProcPerNode``, ``resourcesPerNode``; placement, /dev/shm and pod labels go in one
  ``runtimePatches`` entry owned by adaptflow (the runtime's replicated job and container are ``node``).
- ``pytorchjob``: the older training operator, ``kubeflow.org/v1`` ``PyTorchJob`` with a Master and
  ``nodes - 1`` Workers, ``nprocPerNode``; the container must be called ``pytorch``.

Field names follow the CRDs kept in tests/data/crds (their source and commit are in its README).
Both operators give every pod torchrun's ``PET_NNODES``/``PET_NPROC_PER_NODE``/``PET_NODE_RANK``/
``PET_MASTER_ADDR``/``PET_MASTER_PORT``, so the container runs a plain ``torchrun`` with no flags.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from adaptflow.config import Settings
from adaptflow.errors import ConfigError

TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
#: the torch-distributed runtime's replicated job and trainer container are both called "node"
TRAINJOB_NODE = "node"
PYTORCHJOB_CONTAINER = "pytorch"  # the training operator finds the container by this name
PATCH_MANAGER = "adaptflow.io/finetune"
#: on every pod of the job: the MLflow NetworkPolicy admits it (infra/k8s), and it finds the job's pods
PIPELINE_LABEL = "adaptflow.io/pipeline"
JOB_LABEL = "adaptflow.io/trainjob"
WORK_DIR = "/tmp/adaptflow-job"

JobApi = Literal["trainjob", "pytorchjob"]
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)([KMGTPE]i?|m|k)?$")


def scale_quantity(quantity: str, factor: int) -> str:
    """``factor`` times a Kubernetes quantity, in its own unit: ``scale_quantity("2Gi", 4) == "8Gi"``."""
    match = _QUANTITY.match(quantity.strip())
    if not match:
        raise ConfigError(
            f"cannot scale the quantity {quantity!r}",
            hint="write cluster.shm_size as a number with an optional unit, e.g. 2Gi or 512Mi",
        )
    value = float(match.group(1)) * factor
    number = str(int(value)) if value.is_integer() else f"{value:g}"
    return number + (match.group(2) or "")


def job_name(parent_run_id: str, fingerprint: str, config_hash: str) -> str:
    """One name per run, data and config: a retried task finds (or replaces) the job its first try made.

    An RFC 1035 label under 63 characters, which both CRDs demand.
    """
    digest = hashlib.sha256(f"{parent_run_id}|{fingerprint}|{config_hash}".encode()).hexdigest()
    return f"adaptflow-ft-{digest[:20]}"


def staging_uri(pipeline_root: str | None, name: str) -> str:
    """Where the job's inputs and the candidate it trains pass through: the pods share no disk with us."""
    if not pipeline_root:
        raise ConfigError(
            "cluster.finetune.nodes > 1 needs cluster.pipeline_root",
            hint="set cluster.pipeline_root (e.g. s3://bucket/pipeline-root): the job's pods read the "
            "snapshot and write the model there",
        )
    return f"{pipeline_root.rstrip('/')}/trainjobs/{name}"


@dataclass(frozen=True)
class JobPlan:
    """Everything a manifest needs, already resolved from settings."""

    api: JobApi
    name: str
    namespace: str
    image: str
    runtime: str
    nodes: int
    procs_per_node: int
    gpus_per_node: int
    accelerator_type: str | None
    command: tuple[str, ...]
    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    env: tuple[dict[str, Any], ...] = ()
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()
    shm_size: str | None = None
    deadline_seconds: int = 12 * 3600


def worker_command(staging: str, parent_run_id: str, fingerprint: str) -> tuple[str, ...]:
    """Each pod stages the inputs in once, then torchrun starts one worker per process (rank 0 stages out)."""
    common = ["--staging", staging, "--work-dir", WORK_DIR]
    stage_in = ["python", "-m", "adaptflow.training.remote_worker", "stage-in", *common]
    train = ["torchrun", "--module", "adaptflow.training.remote_worker", "train", *common]
    train += ["--parent-run-id", parent_run_id, "--fingerprint", fingerprint]
    return ("/bin/sh", "-c", f"set -e; {shlex.join(stage_in)}; exec {shlex.join(train)}")


def container_env(settings: Settings, extra: dict[str, str] | None = None) -> tuple[dict[str, Any], ...]:
    """``cluster.env`` (then ``extra``, values the submitting pod was given), and the secrets as refs."""
    cluster = settings.cluster
    plain = {**(extra or {}), **cluster.env}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(plain.items())]
    for secret in cluster.secrets:
        for key, var in sorted(secret.keys.items()):
            ref = {"name": secret.secret_name, "key": key, "optional": secret.optional}
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return tuple(env)


def plan_job(
    settings: Settings,
    *,
    name: str,
    namespace: str,
    image: str,
    command: tuple[str, ...],
    extra_env: dict[str, str] | None = None,
) -> JobPlan:
    cluster = settings.cluster
    scaling = cluster.finetune
    res = cluster.resources_for("finetune")
    requests = {k: v for k, v in (("cpu", res.cpu_request), ("memory", res.memory_request)) if v}
    limits = {k: v for k, v in (("cpu", res.cpu_limit), ("memory", res.memory_limit)) if v}
    on_gpus = bool(cluster.accelerator_type) and "finetune" in cluster.gpu_stages
    gpus = scaling.gpus if on_gpus else 0
    if gpus and cluster.accelerator_type:
        limits[cluster.accelerator_type] = str(gpus)
    shm = None
    if cluster.shm_size:
        shm = scale_quantity(cluster.shm_size, scaling.gpus)  # the same rule as a one-node pod's
    return JobPlan(
        api=scaling.job_api,
        name=name,
        namespace=namespace,
        image=image,
        runtime=scaling.runtime,
        nodes=scaling.nodes,
        procs_per_node=scaling.gpus,
        gpus_per_node=gpus,
        accelerator_type=cluster.accelerator_type if gpus else None,
        command=command,
        requests=requests,
        limits=limits,
        env=container_env(settings, extra_env),
        node_selector=dict(cluster.node_selector) if gpus else {},
        tolerations=tuple(_toleration(t.model_dump()) for t in cluster.tolerations) if gpus else (),
        shm_size=shm,
        deadline_seconds=scaling.job_timeout_seconds,
    )


def _toleration(t: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in t.items() if v is not None}


def _pod_labels(plan: JobPlan) -> dict[str, str]:
    return {PIPELINE_LABEL: "true", JOB_LABEL: plan.name}


def _shm(plan: JobPlan) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not plan.shm_size:
        return [], []
    volume = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": plan.shm_size}}
    return [volume], [{"name": "dshm", "mountPath": "/dev/shm"}]


def _metadata(plan: JobPlan) -> dict[str, Any]:
    return {
        "name": plan.name,
        "namespace": plan.namespace,
        "labels": {JOB_LABEL: plan.name, "app.kubernetes.io/managed-by": "adaptflow"},
    }


def _resources(plan: JobPlan) -> dict[str, Any]:
    return {k: v for k, v in (("requests", plan.requests), ("limits", plan.limits)) if v}


def _placement(plan: JobPlan, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec's node selector, tolerations and /dev/shm volume (each only when set)."""
    pod_spec: dict[str, Any] = {}
    if plan.node_selector:
        pod_spec["nodeSelector"] = dict(plan.node_selector)
    if plan.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in plan.tolerations]
    if volumes:
        pod_spec["volumes"] = volumes
    return pod_spec


def render_trainjob(plan: JobPlan) -> dict[str, Any]:
    volumes, mounts = _shm(plan)
    pod_spec = _placement(plan, volumes)
    if volumes:
        pod_spec["containers"] = [{"name": TRAINJOB_NODE, "volumeMounts": mounts}]
    pod_template = {"metadata": {"labels": _pod_labels(plan)}, "spec": pod_spec}
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {"name": TRAINJOB_NODE, "template": {"spec": {"template": pod_template}}}
                    ]
                }
            }
        },
    }
    trainer: dict[str, Any] = {
        "image": plan.image,
        "command": list(plan.command),
        "env": [dict(e) for e in plan.env],
        "numNodes": plan.nodes,
        "numProcPerNode": plan.procs_per_node,
    }
    if _resources(plan):
        trainer["resourcesPerNode"] = _resources(plan)
    return {
        "apiVersion": f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}",
        "kind": "TrainJob",
        "metadata": _metadata(plan),
        "spec": {
            "runtimeRef": {
                "apiGroup": TRAINJOB_GROUP,
                "kind": "ClusterTrainingRuntime",
                "name": plan.runtime,
            },
            "trainer": trainer,
            "runtimePatches": [patch],
            "activeDeadlineSeconds": plan.deadline_seconds,
        },
    }


def render_pytorchjob(plan: JobPlan) -> dict[str, Any]:
    volumes, mounts = _shm(plan)
    container: dict[str, Any] = {
        "name": PYTORCHJOB_CONTAINER,
        "image": plan.image,
        "command": list(plan.command),
        "env": [dict(e) for e in plan.env],
    }
    if _resources(plan):
        container["resources"] = _resources(plan)
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec = {"containers": [container], **_placement(plan, volumes)}

    def replica(count: int) -> dict[str, Any]:
        # Never + backoffLimit 0: a failed pod fails the job at once, and the KFP retry resumes it
        # from the checkpoint instead of the operator restarting one rank of a broken gang
        template = {"metadata": {"labels": _pod_labels(plan)}, "spec": pod_spec}
        return {"replicas": count, "restartPolicy": "Never", "template": template}

    replicas = {"Master": replica(1)}
    if plan.nodes > 1:
        replicas["Worker"] = replica(plan.nodes - 1)
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": _metadata(plan),
        "spec": {
            "nprocPerNode": str(plan.procs_per_node),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {
                "activeDeadlineSeconds": plan.deadline_seconds,
                "backoffLimit": 0,
                "cleanPodPolicy": "Running",
            },
        },
    }


def render_job(plan: JobPlan) -> dict[str, Any]:
    return render_trainjob(plan) if plan.api == "trainjob" else render_pytorchjob(plan)
