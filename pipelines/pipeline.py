"""``build_pipeline(settings)``: the six-stage DAG as a KFP v2 pipeline. A pure factory.

ingest -> [dsl.If changed] baseline -> [dsl.If should_finetune] finetune | [dsl.Else] keep_baseline
                           -> dsl.OneOf(candidate) -> evaluate -> export -> register
       -> [dsl.Else unchanged] report_unchanged

Caching: ingest, evaluate and register never cache (they read mutable state: the source and the
registry). Every other stage takes the data fingerprint and the config hash as input parameters,
so KFP's cache key (parameter values + artifact names) changes whenever the data or the config
does. When the fingerprint is already known at compile time it is also pinned in an explicit
per-task ``cache_key``.
"""

from pathlib import Path
from typing import Any

from adaptflow.components import pipeline_components
from kfp import compiler, dsl, kubernetes

from adaptflow import __version__
from adaptflow.config import ClusterConfig, Settings
from adaptflow.trainjob_render import scale_quantity

PIPELINE_NAME = "adaptflow"
DEFAULT_IMAGE = f"ghcr.io/adaptflow/adaptflow:{__version__}"
CACHEABLE = ("baseline", "shard", "finetune", "keep_baseline", "export")


MAIN_DESCRIPTION = (
    "Adapt a pretrained vision backbone: transfer learning, fine-tuning when it pays, "
    "evaluation against the champion, ONNX export, gated registry promotion."
)


def adaptflow_dag(name: str, description: str, cluster: ClusterConfig) -> Any:
    """``dsl.pipeline`` for an adaptflow DAG: artifacts go under ``cluster.pipeline_root``."""
    return dsl.pipeline(name=name, description=description, pipeline_root=cluster.pipeline_root)


def finetune_placement(cluster: ClusterConfig) -> tuple[int, str | None, str]:
    """(GPUs, /dev/shm size, resources stage) of the finetune *task's own pod*, from ``cluster.finetune``.

    - ``nodes: 1, gpus: N``: the pod runs N torchrun processes, so it asks for N GPUs (``gpus: 1`` keeps
      ``cluster.accelerator_count``) and N times ``cluster.shm_size`` of /dev/shm: each process has its
      own DataLoader workers, and their shared-memory batches add up.
    - ``nodes > 1``: the pod only submits a Trainer job and waits for it; the job's pods hold the GPUs,
      the /dev/shm and the finetune resources, so the pod itself asks for no GPU, no /dev/shm and the
      ``default`` stage's resources.
    """
    scaling = cluster.finetune
    if scaling.nodes > 1:
        return 0, None, "default"
    gpus = scaling.gpus if scaling.gpus > 1 else cluster.accelerator_count
    shm = scale_quantity(cluster.shm_size, scaling.gpus) if cluster.shm_size else None
    return gpus, shm, "finetune"


def apply_cluster_settings(task: Any, stage: str, cluster: ClusterConfig) -> Any:
    """Resources, GPUs, placement, /dev/shm, secrets, env, retries and timeouts for one task."""
    # infra/k8s's NetworkPolicy lets only pods with this label reach the MLflow server
    kubernetes.add_pod_label(task, label_key="adaptflow.io/pipeline", label_value="true")
    gpus, shm_size, resources_stage = cluster.accelerator_count, cluster.shm_size, stage
    if stage == "finetune":
        gpus, shm_size, resources_stage = finetune_placement(cluster)
    res = cluster.resources_for(resources_stage)
    if res.cpu_request:
        task.set_cpu_request(res.cpu_request)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_request:
        task.set_memory_request(res.memory_request)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)
    if stage in cluster.gpu_stages and cluster.accelerator_type and gpus > 0:
        task.set_accelerator_type(cluster.accelerator_type)
        task.set_accelerator_limit(gpus)
        for key, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in cluster.tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    if shm_size and stage in ("baseline", "finetune", "evaluate"):
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=shm_size
        )
    for secret in cluster.secrets:
        kubernetes.use_secret_as_env(
            task,
            secret_name=secret.secret_name,
            secret_key_to_env=dict(secret.keys),
            optional=secret.optional,
        )
    for name, value in cluster.env.items():
        task.set_env_variable(name, value)
    if stage in cluster.retry_stages and cluster.retry.num_retries > 0:
        r = cluster.retry
        task.set_retry(
            num_retries=r.num_retries,
            backoff_duration=r.backoff_duration,
            backoff_factor=r.backoff_factor,
            backoff_max_duration=r.backoff_max_duration,
        )
    timeout = cluster.timeout_for(stage)
    if timeout:
        kubernetes.set_timeout(task, timeout)
    if stage in CACHEABLE:
        task.set_caching_options(enable_caching=True)
    else:
        task.set_caching_options(enable_caching=False)
    return task


def add_ingest_and_baseline(
    c: Any,
    setup: Any,
    data_uri: Any,
    config_json: Any,
    parent_run_id: Any,
    force: Any,
    name: str,
    version: Any,
) -> tuple[Any, Any]:
    """The head every DAG shares: ingest (which opens the MLflow run), then the transfer-learning baseline.

    Returns the ingest task and a function that adds the baseline task: the baseline is created
    where that function is called, so inside a ``dsl.If`` it runs only on that branch.
    ``setup(task, stage, display)`` applies the cluster settings to each.
    """
    ingest = c.ingest(
        data_uri=data_uri,
        config_json=config_json,
        parent_run_id=parent_run_id,
        force=force,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        pipeline_name=name,
        pipeline_version=version,
    )
    setup(ingest, "ingest", "ingest")
    return ingest, lambda: setup(
        c.baseline(
            snapshot=ingest.outputs["snapshot"],
            config_json=config_json,
            parent_run_id=ingest.outputs["parent_run_id"],
            fingerprint=ingest.outputs["fingerprint"],
            config_hash=ingest.outputs["config_hash"],
        ),
        "baseline",
        "baseline (transfer learning)",
    )


def build_pipeline(
    settings: Settings, image: str | None = None, name: str = PIPELINE_NAME, fingerprint: str | None = None
) -> Any:
    """The DAG. ``fingerprint``, when known at compile time, is pinned into each cacheable task's cache key."""
    cluster = settings.cluster
    c = pipeline_components(image or cluster.image or DEFAULT_IMAGE)
    default_config = settings.to_json()
    config_hash = settings.config_hash()

    def setup(task: Any, stage: str, display: str) -> Any:
        apply_cluster_settings(task, stage, cluster).set_display_name(display)
        if fingerprint and stage in CACHEABLE:
            task.set_caching_options(
                enable_caching=True, cache_key=f"{stage}-{fingerprint[:32]}-{config_hash[:32]}"
            )
        return task

    @adaptflow_dag(name, MAIN_DESCRIPTION, cluster)
    def adaptflow_pipeline(
        data_uri: str,
        config_json: str = default_config,
        parent_run_id: str = "",
        force: bool = False,
        pipeline_version: str = "",
    ) -> dsl.Artifact:
        ingest, add_baseline = add_ingest_and_baseline(
            c, setup, data_uri, config_json, parent_run_id, force, name, pipeline_version
        )
        fp, ch = ingest.outputs["fingerprint"], ingest.outputs["config_hash"]
        snapshot = ingest.outputs["snapshot"]
        run = {"config_json": config_json, "parent_run_id": ingest.outputs["parent_run_id"]}
        cached = {"fingerprint": fp, "config_hash": ch}  # cache keys change with data or config
        with dsl.If(ingest.outputs["changed"] == True, name="data-or-config-changed"):  # noqa: E712
            baseline = add_baseline()
            candidates = {"baseline": baseline.outputs["result"]}
            with dsl.If(baseline.outputs["should_finetune"] == True, name="finetune-pays"):  # noqa: E712
                tuned = c.finetune(snapshot=snapshot, **candidates, **run, **cached)
                setup(tuned, "finetune", "finetune")
                if settings.finetune.data_source == "shards":  # streamed from object storage in shards
                    sharded = c.shard(snapshot=snapshot, **run, **cached)
                    tuned.after(setup(sharded, "shard", "shard (webdataset)"))
            with dsl.Else(name="keep-baseline"):
                kept = c.keep_baseline(**candidates, **cached)
                setup(kept, "keep_baseline", "keep baseline")
            candidates["selected"] = dsl.OneOf(tuned.outputs["candidate"], kept.outputs["candidate"])
            evaluate = c.evaluate(snapshot=snapshot, **candidates, **run, fingerprint=fp)
            setup(evaluate, "evaluate", "evaluate vs champion")
            evaluation = evaluate.outputs["evaluation"]
            export = c.export(evaluation=evaluation, **candidates, **run, **cached)
            setup(export, "export", "onnx export")
            onnx_model = export.outputs["onnx_model"]
            register = c.register(
                snapshot=snapshot, **candidates, evaluation=evaluation, onnx_model=onnx_model, **run
            )
            setup(register, "register", "register + gate")
        with dsl.Else(name="unchanged"):
            skipped = c.report_unchanged(snapshot=snapshot, **run, reason=ingest.outputs["reason"])
            setup(skipped, "register", "unchanged: skip training")
        return dsl.OneOf(register.outputs["registration"], skipped.outputs["registration"])

    return adaptflow_pipeline


def compile_pipeline(
    settings: Settings, output: str | Path, image: str | None = None, fingerprint: str | None = None
) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings, image, fingerprint=fingerprint), str(out))
    return out
