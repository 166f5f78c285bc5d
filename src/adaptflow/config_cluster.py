"""Kubeflow placement and runtime settings (``cluster:``): they land in the compiled IR, never in a result."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from adaptflow.config_base import Section

STAGES = ("ingest", "baseline", "shard", "finetune", "keep_baseline", "evaluate", "export", "register")
#: cluster.env travels inside the config on every stage's command line and into every pod's
#: environment; Linux refuses one argument over 128 KiB ("Argument list too long")
MAX_ENV_BYTES = 32 * 1024


class Resources(Section):
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None


class Toleration(Section):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class SecretEnv(Section):
    """A Kubernetes secret whose keys become environment variables (``kfp.kubernetes.use_secret_as_env``)."""

    secret_name: str
    keys: dict[str, str] = Field(description="secret key -> env var name")
    optional: bool = Field(False, description="start the pod even if the secret does not exist")


class Retry(Section):
    num_retries: int = Field(2, ge=0)
    backoff_duration: str = "60s"
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max_duration: str = "3600s"


class FinetuneScaling(Section):
    """How the finetune stage scales past one device (``cluster.finetune``). See the README's scaling section.

    - ``gpus: 1, nodes: 1``: one process in the finetune pod (the default).
    - ``gpus: N > 1, nodes: 1``: the finetune pod requests N GPUs and runs N torchrun processes (DDP).
    - ``nodes: M > 1``: the finetune task submits a Kubeflow Trainer job of M nodes x ``gpus`` processes
      and waits for it; the pod itself needs no GPU.
    """

    gpus: int = Field(1, ge=1, description="processes (and GPUs) per node; > 1 runs DDP under torchrun")
    nodes: int = Field(1, ge=1, description="> 1 submits a Kubeflow Trainer job of this many nodes")
    job_api: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob",
        description="trainjob: Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1 TrainJob); pytorchjob: "
        "the older training operator (kubeflow.org/v1 PyTorchJob)",
    )
    runtime: str = Field(
        "torch-distributed", description="the Trainer ClusterTrainingRuntime a TrainJob uses"
    )
    namespace: str | None = Field(
        None, description="where the job runs (default: the pipeline pod's namespace)"
    )
    job_timeout_seconds: int = Field(12 * 3600, ge=60, description="how long the task waits for the job")


class ClusterConfig(Section):
    """Placement and runtime settings for Kubeflow; all of them land in the compiled IR."""

    image: str | None = Field(None, description="component image (default: adaptflow's release image)")
    pipeline_root: str | None = Field(None, description="e.g. s3://bucket/pipeline-root")
    resources: dict[str, Resources] = Field(
        default_factory=lambda: {
            "default": Resources(cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="4Gi"),
            "baseline": Resources(cpu_request="4", cpu_limit="8", memory_request="8Gi", memory_limit="16Gi"),
            "finetune": Resources(cpu_request="4", cpu_limit="8", memory_request="16Gi", memory_limit="32Gi"),
        },
        description="per stage, plus 'default' for the rest",
    )
    # the tuples below may be empty, and empty means something: no GPU stage, no toleration, no
    # secret (e.g. credentials from the node's IAM role), no retried stage
    gpu_stages: tuple[str, ...] = ("baseline", "finetune")
    accelerator_type: str | None = Field("nvidia.com/gpu", description="None runs every stage on CPU nodes")
    accelerator_count: int = Field(1, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict, description="for the GPU stages")
    tolerations: tuple[Toleration, ...] = (
        Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
    )
    shm_size: str | None = Field(
        "2Gi", description="memory-backed /dev/shm for DataLoader workers; None: none"
    )
    secrets: tuple[SecretEnv, ...] = (
        SecretEnv(
            secret_name="adaptflow-s3",
            keys={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
        ),
        SecretEnv(
            secret_name="adaptflow-mlflow",
            keys={
                "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
            },
            optional=True,  # only servers running the basic-auth app need it
        ),
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="plain env for every stage, e.g. MLFLOW_TRACKING_URI, ADAPTFLOW_S3_ENDPOINT_URL",
    )
    finetune: FinetuneScaling = FinetuneScaling()
    retry: Retry = Retry()
    retry_stages: tuple[str, ...] = ("baseline", "finetune", "export")
    timeouts: dict[str, int] = Field(
        default_factory=lambda: {"default": 3600, "baseline": 4 * 3600, "finetune": 12 * 3600},
        description="seconds, per stage, plus 'default'",
    )

    @field_validator("env")
    @classmethod
    def _env_fits_a_command_line(cls, env: dict[str, str]) -> dict[str, str]:
        size = sum(len(f"{key}={value}".encode()) + 1 for key, value in env.items())
        if size > MAX_ENV_BYTES:
            raise ValueError(
                f"{size / 1024:.1f} KiB in total, over the {MAX_ENV_BYTES // 1024} KiB limit: it travels "
                "on every stage's command line; put large values in a Kubernetes secret (cluster.secrets) "
                "or a file the stages read"
            )
        return env

    @model_validator(mode="after")
    def _known_stages(self) -> ClusterConfig:
        known = (*STAGES, "default")
        for field in ("resources", "timeouts"):
            unknown = sorted(set(getattr(self, field)) - set(known))
            if unknown:
                raise ValueError(f"{field}: unknown stage(s) {unknown}; valid: {list(known)}")
        for field in ("gpu_stages", "retry_stages"):
            unknown = sorted(set(getattr(self, field)) - set(STAGES))
            if unknown:
                raise ValueError(f"{field}: unknown stage(s) {unknown}; valid: {list(STAGES)}")
        return self

    def resources_for(self, stage: str) -> Resources:
        return self.resources.get(stage) or self.resources.get("default") or Resources()

    def timeout_for(self, stage: str) -> int | None:
        return self.timeouts.get(stage, self.timeouts.get("default"))
