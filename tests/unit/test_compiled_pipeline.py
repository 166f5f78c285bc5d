"""The compiled IR carries every cluster setting, each where it belongs (parsed, not grepped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from adaptflow.pipelines import compile_pipeline

from adaptflow.config import load_settings

CLUSTER = [
    "cluster.image=registry.example/adaptflow@sha256:" + "a" * 64,
    "cluster.pipeline_root=s3://ml-artifacts/pipeline-root",
    "cluster.node_selector={cloud.google.com/gke-accelerator: nvidia-h100-80gb}",
    "cluster.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}, {key: team, value: vision, effect: NoExecute}]",
    "cluster.env={MLFLOW_TRACKING_URI: 'http://mlflow.adaptflow.svc:5000', ADAPTFLOW_S3_ENDPOINT_URL: ''}",
    "cluster.timeouts={default: 1800, finetune: 7200}",
    "cluster.retry.num_retries=3",
]


def compile_ir(tmp_path: Path, overrides: list[str], fingerprint: str | None = None) -> tuple[dict, dict]:
    path = compile_pipeline(
        load_settings(overrides=overrides), tmp_path / f"p-{fingerprint}.yaml", fingerprint=fingerprint
    )
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (
        docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    )


def all_tasks(ir: dict) -> dict[str, dict[str, Any]]:
    """Every task in the pipeline, nested condition DAGs included, by task name."""
    tasks: dict[str, dict[str, Any]] = dict(ir["root"]["dag"]["tasks"])
    for comp in ir["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    ir, k8s = compile_ir(tmp_path_factory.mktemp("ir"), CLUSTER)
    return ir, k8s, all_tasks(ir)


def executor(ir: dict, tasks: dict, name: str) -> tuple[str, dict]:
    comp = ir["components"][tasks[name]["componentRef"]["name"]]
    label = comp["executorLabel"]
    return label, ir["deploymentSpec"]["executors"][label]


def test_image_and_pipeline_root(compiled) -> None:  # type: ignore[no-untyped-def]
    ir, _, _ = compiled
    images = {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/adaptflow@sha256:" + "a" * 64}
    assert ir["defaultPipelineRoot"] == "s3://ml-artifacts/pipeline-root"


def test_resources_per_stage(compiled) -> None:  # type: ignore[no-untyped-def]
    ir, _, tasks = compiled
    _, finetune = executor(ir, tasks, "finetune")
    res = finetune["container"]["resources"]
    assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == ("4", "8")
    assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == ("16Gi", "32Gi")
    _, ingest = executor(ir, tasks, "ingest")
    assert ingest["container"]["resources"]["resourceMemoryLimit"] == "4Gi"


def test_gpus_only_on_training_stages(compiled) -> None:  # type: ignore[no-untyped-def]
    ir, k8s, tasks = compiled
    for stage in ("baseline", "finetune"):
        label, ex = executor(ir, tasks, stage)
        accel = ex["container"]["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu" and accel["resourceCount"] == "1"
        assert k8s[label]["nodeSelector"]["labels"] == {
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"
        }
        tolerations = {(t["key"], t.get("effect")) for t in k8s[label]["tolerations"]}
        assert tolerations == {("nvidia.com/gpu", "NoSchedule"), ("team", "NoExecute")}
    for stage in ("ingest", "evaluate", "export", "register"):
        label, ex = executor(ir, tasks, stage)
        assert "accelerator" not in ex["container"].get("resources", {})
        assert "nodeSelector" not in k8s[label]


def test_shm_secrets_env_labels_and_timeouts(compiled) -> None:  # type: ignore[no-untyped-def]
    ir, k8s, tasks = compiled
    label, ex = executor(ir, tasks, "finetune")
    assert k8s[label]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "2Gi", "volumeName": "dshm"}
    ]
    assert k8s[label]["activeDeadlineSeconds"] in ("7200", 7200)
    ingest_label, _ingest_ex = executor(ir, tasks, "ingest")
    assert k8s[ingest_label]["activeDeadlineSeconds"] in ("1800", 1800)
    for lbl in (label, ingest_label):
        secrets = {s["secretName"]: s for s in k8s[lbl]["secretAsEnv"]}
        assert {k["envVar"] for k in secrets["adaptflow-s3"]["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
        assert secrets["adaptflow-mlflow"]["optional"] is True
        assert k8s[lbl]["podMetadata"]["labels"]["adaptflow.io/pipeline"] == "true"
    env = {e["name"]: e.get("value", "") for e in ex["container"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.adaptflow.svc:5000"


def test_retries_with_backoff_on_training_stages_only(compiled) -> None:  # type: ignore[no-untyped-def]
    _, _, tasks = compiled
    policy = tasks["finetune"]["retryPolicy"]
    assert policy["maxRetryCount"] == 3
    assert policy["backoffFactor"] == 2.0
    assert policy["backoffDuration"] == "60s"
    assert "retryPolicy" not in tasks["register"]
    assert "retryPolicy" not in tasks["ingest"]


def test_caching_never_on_stages_that_read_mutable_state(compiled) -> None:  # type: ignore[no-untyped-def]
    _, _, tasks = compiled
    for stage in ("ingest", "evaluate", "register", "report-unchanged"):
        assert tasks[stage].get("cachingOptions", {}).get("enableCache") is not True, stage
    for stage in ("baseline", "finetune", "export"):
        assert tasks[stage]["cachingOptions"]["enableCache"] is True
        # the fingerprint and config hash flow in as parameters: new data -> new cache key
        params = tasks[stage]["inputs"]["parameters"]
        # inside condition DAGs, ingest's outputs arrive as pipeline channels
        assert params["fingerprint"]["componentInputParameter"] == "pipelinechannel--ingest-fingerprint"
        assert params["config_hash"]["componentInputParameter"] == "pipelinechannel--ingest-config_hash"


def test_cache_keys_differ_with_the_fingerprint(tmp_path: Path) -> None:
    ir_a, _ = compile_ir(tmp_path, [], fingerprint="a" * 64)
    ir_b, _ = compile_ir(tmp_path, [], fingerprint="b" * 64)
    ir_c, _ = compile_ir(tmp_path, ["finetune.epochs=30"], fingerprint="a" * 64)
    keys = {
        name: [all_tasks(ir)[s]["cachingOptions"]["cacheKey"] for s in ("baseline", "finetune", "export")]
        for name, ir in (("a", ir_a), ("b", ir_b), ("c", ir_c))
    }
    assert all(x != y for x, y in zip(keys["a"], keys["b"], strict=True))  # new data
    assert all(x != y for x, y in zip(keys["a"], keys["c"], strict=True))  # new config
    (tmp_path / "again").mkdir()
    ir_a2, _ = compile_ir(tmp_path / "again", [], fingerprint="a" * 64)
    assert [
        all_tasks(ir_a2)[s]["cachingOptions"]["cacheKey"] for s in ("baseline", "finetune", "export")
    ] == keys["a"]


def test_cpu_only_cluster(tmp_path: Path) -> None:
    ir, _ = compile_ir(tmp_path, ["cluster.accelerator_type=null"])
    assert all(
        "accelerator" not in e["container"].get("resources", {})
        for e in ir["deploymentSpec"]["executors"].values()
    )


def test_unknown_stage_in_cluster_settings_is_rejected() -> None:
    from adaptflow.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage"):
        load_settings(overrides=["cluster.timeouts={trian: 10}"])


def test_skip_branch_and_force_parameter(compiled) -> None:  # type: ignore[no-untyped-def]
    ir, _, tasks = compiled
    assert "report-unchanged" in tasks
    assert ir["root"]["inputDefinitions"]["parameters"]["force"]["defaultValue"] is False
    params = tasks["ingest"]["inputs"]["parameters"]
    assert params["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_a_shard_task_precedes_finetune_only_when_training_reads_shards(tmp_path: Path) -> None:
    default_ir, _ = compile_ir(tmp_path, CLUSTER)
    assert not any(name.startswith("shard") for name in all_tasks(default_ir))
    sharded = [*CLUSTER, "finetune.data_source=shards", "finetune.shards_root=s3://ml-artifacts/shards"]
    tasks = all_tasks(compile_ir(tmp_path, sharded)[0])
    assert "shard" in tasks and "shard" in tasks["finetune"].get("dependentTasks", [])
    assert tasks["shard"]["taskInfo"]["name"] == "shard (webdataset)"
