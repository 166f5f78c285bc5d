"""Multi-GPU and multi-node finetune: the IR's placement, and the Kubeflow job manifests against their CRDs.

The manifests are checked with ``jsonschema`` against excerpts of the CRDs' OpenAPI v3 schemas kept in
tests/data/crds (its README names their source and commit), closed the way the API server's strict
field validation is; embedded core/v1 types use Kubernetes' own strict schemas (kubernetes-validate).
"""

import copy
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from adaptflow.pipelines import compile_pipeline

from adaptflow.config import load_settings
from adaptflow.errors import ConfigError
from adaptflow.trainjob import KINDS
from adaptflow.trainjob_render import (
    JOB_LABEL,
    PIPELINE_LABEL,
    job_name,
    plan_job,
    render_pytorchjob,
    render_trainjob,
    scale_quantity,
    staging_uri,
    worker_command,
)
from services import require_or_skip

CRDS = Path(__file__).resolve().parents[1] / "data" / "crds"
K8S_DIR = Path(__file__).resolve().parents[2] / "infra" / "k8s"
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
K8S_SCHEMA_VERSION = "1.30.0"
STAGING = "s3://ml-artifacts/pipeline-root/trainjobs/x"

CONFIGS = {
    "2 nodes x 2 GPUs": ["cluster.finetune.nodes=2", "cluster.finetune.gpus=2"],
    "4 nodes x 8 GPUs, env, node selector, more secrets": [
        "cluster.finetune.nodes=4",
        "cluster.finetune.gpus=8",
        "cluster.env={MLFLOW_TRACKING_URI: 'http://mlflow.adaptflow.svc:5000', ADAPTFLOW_S3_ENDPOINT_URL: ''}",
        "cluster.node_selector={cloud.google.com/gke-accelerator: nvidia-h100-80gb}",
        "cluster.secrets=[{secret_name: s3, keys: {ak: AWS_ACCESS_KEY_ID, sk: AWS_SECRET_ACCESS_KEY}}, "
        "{secret_name: hf, keys: {token: HF_TOKEN}, optional: true}]",
    ],
    "CPU only, no /dev/shm, no secrets": [
        "cluster.finetune.nodes=3",
        "cluster.accelerator_type=null",
        "cluster.shm_size=null",
        "cluster.secrets=[]",
        "cluster.tolerations=[]",
    ],
}


# --------------------------------------------------------------------------- the schemas


@cache
def _k8s_definitions() -> dict[str, Any]:
    import json

    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return json.loads((folder / f"v{K8S_SCHEMA_VERSION}-local-strict" / "_definitions.json").read_text())


def _prepare(node: Any) -> Any:
    """Core-type markers become refs to Kubernetes' strict schemas; objects close like strict validation."""
    if isinstance(node, list):
        return [_prepare(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "x-adaptflow-core" in node:
        return {"$ref": f"{K8S_DEFS}#/$defs/{node['x-adaptflow-core']}"}
    out = {key: _prepare(value) for key, value in node.items()}
    closable = "properties" in out and "additionalProperties" not in out
    if closable and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    from referencing import Registry, Resource

    file = {
        "TrainJob": "trainjob.trainer.kubeflow.org-v1alpha1.yaml",
        "PyTorchJob": "pytorchjob.kubeflow.org-v1.yaml",
    }
    schema = _prepare(yaml.safe_load((CRDS / file[kind]).read_text())["openAPIV3Schema"])
    registry = Registry().with_resource(K8S_DEFS, Resource.from_contents(_k8s_definitions()))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    """Every way ``manifest`` breaks its CRD (schema, and the TrainJob's CEL name rules)."""
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator(manifest["kind"]).iter_errors(manifest)
    ]
    name = manifest["metadata"]["name"]
    if manifest["kind"] == "TrainJob":
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
            errors.append("metadata.name must match RFC 1035 DNS label format")
        if len(name) > 63:
            errors.append("metadata.name must be no more than 63 characters")
    return errors


# --------------------------------------------------------------------------- rendering


def plan_for(overrides: list[str], name: str = "adaptflow-ft-test") -> Any:
    settings = load_settings(overrides=overrides)
    command = worker_command(STAGING, "run-1", "f" * 64)
    return plan_job(
        settings, name=name, namespace="team-a", image="registry.example/adaptflow:1", command=command
    )


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("render", [render_trainjob, render_pytorchjob], ids=["TrainJob", "PyTorchJob"])
def test_rendered_jobs_validate_against_their_crds(render: Any, config: str) -> None:
    manifest = render(plan_for(CONFIGS[config]))
    assert crd_errors(manifest) == []


def test_trainjob_fields() -> None:
    plan = plan_for(CONFIGS["4 nodes x 8 GPUs, env, node selector, more secrets"])
    job = render_trainjob(plan)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["resourcesPerNode"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.adaptflow.svc:5000"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token", "optional": True}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    template = pod["template"]["spec"]["template"]
    assert template["metadata"]["labels"] == {PIPELINE_LABEL: "true", JOB_LABEL: plan.name}
    assert template["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert template["spec"]["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    ]
    assert template["spec"]["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    ]
    assert spec["activeDeadlineSeconds"] == 12 * 3600
    script = trainer["command"][-1]
    assert "remote_worker stage-in --staging " + STAGING in script
    assert "exec torchrun --module adaptflow.training.remote_worker train" in script


def test_pytorchjob_fields() -> None:
    plan = plan_for(CONFIGS["2 nodes x 2 GPUs"])
    job = render_pytorchjob(plan)
    assert job["apiVersion"] == "kubeflow.org/v1"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "2"
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    pod = replicas["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "4Gi"
    assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu"}
    assert spec["runPolicy"]["backoffLimit"] == 0


def test_cpu_only_jobs_ask_for_no_gpu() -> None:
    plan = plan_for(CONFIGS["CPU only, no /dev/shm, no secrets"])
    trainer = render_trainjob(plan)["spec"]["trainer"]
    assert "nvidia.com/gpu" not in trainer["resourcesPerNode"]["limits"]
    pod = render_pytorchjob(plan)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert "volumes" not in pod and "tolerations" not in pod
    assert render_pytorchjob(plan)["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2


@pytest.mark.parametrize(
    ("render", "breaks"),
    [
        (render_trainjob, lambda j: j["spec"]["trainer"].update(numProcsPerNode=2)),  # a misspelt field
        (render_trainjob, lambda j: j["spec"]["trainer"].update(numProcPerNode="2")),  # int32, not string
        (render_trainjob, lambda j: j["spec"].pop("runtimeRef")),
        (render_trainjob, lambda j: j["spec"]["trainer"]["env"].append({"value": "no name"})),
        (render_trainjob, lambda j: j["metadata"].update(name="Adaptflow_FT")),
        (render_trainjob, lambda j: j["spec"]["runtimePatches"][0].pop("manager")),
        (render_pytorchjob, lambda j: j["spec"].update(nprocPerNode=2)),  # a string in v1
        (
            render_pytorchjob,
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"].pop("containers"),
        ),
        (
            render_pytorchjob,
            lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["tolerations"][0].update(
                effect=3
            ),
        ),
    ],
)
def test_invalid_manifests_fail_validation(render: Any, breaks: Any) -> None:
    manifest = render(plan_for(CONFIGS["2 nodes x 2 GPUs"]))
    assert crd_errors(manifest) == []
    broken = copy.deepcopy(manifest)
    breaks(broken)
    assert crd_errors(broken), "the check must be able to fail"


def test_scripted_statuses_of_the_lifecycle_test_are_valid() -> None:
    from k8s_api import condition

    job = render_trainjob(plan_for(CONFIGS["2 nodes x 2 GPUs"]))
    job["status"] = {"conditions": [condition("Complete", "JobSetCompleted", "done")]}
    assert crd_errors(job) == []
    job["status"] = {"conditions": [condition("Failed", "not a CamelCase reason!", "x")]}
    assert crd_errors(job)


def test_job_name_is_deterministic_and_a_dns_label() -> None:
    name = job_name("run-1", "f" * 64, "c" * 64)
    assert name == job_name("run-1", "f" * 64, "c" * 64)
    assert name != job_name("run-2", "f" * 64, "c" * 64)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert staging_uri("s3://b/root/", name) == f"s3://b/root/trainjobs/{name}"
    with pytest.raises(ConfigError, match="pipeline_root"):
        staging_uri(None, name)


def test_scale_quantity() -> None:
    assert scale_quantity("2Gi", 4) == "8Gi"
    assert scale_quantity("512Mi", 3) == "1536Mi"
    assert scale_quantity("1.5Gi", 2) == "3Gi"
    assert scale_quantity("1.5Gi", 3) == "4.5Gi"
    with pytest.raises(ConfigError, match="cannot scale"):
        scale_quantity("two gigs", 2)


# --------------------------------------------------------------------------- the compiled IR


def _compile(tmp_path: Path, overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    path = compile_pipeline(load_settings(overrides=overrides), tmp_path / "p.yaml")
    ir, platform = list(yaml.safe_load_all(path.read_text()))
    tasks = dict(ir["root"]["dag"]["tasks"])
    for comp in ir["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    def executor(stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
        label = ir["components"][tasks[stage]["componentRef"]["name"]]["executorLabel"]
        return ir["deploymentSpec"]["executors"][label]["container"], executors[label]

    return (*executor("finetune"), executor("baseline")[0])


def test_one_node_several_gpus_asks_for_them_and_their_shm(tmp_path: Path) -> None:
    container, k8s, baseline = _compile(
        tmp_path, ["cluster.finetune.gpus=4", "cluster.node_selector={pool: a100}"]
    )
    assert container["resources"]["accelerator"]["resourceCount"] == "4"
    assert k8s["emptyDirMounts"][0]["sizeLimit"] == "8Gi"  # 4 x cluster.shm_size (2Gi)
    assert k8s["nodeSelector"]["labels"] == {"pool": "a100"}
    assert baseline["resources"]["accelerator"]["resourceCount"] == "1"  # only finetune scales


def test_several_nodes_leave_the_gpus_to_the_job(tmp_path: Path) -> None:
    container, k8s, baseline = _compile(
        tmp_path,
        ["cluster.finetune.nodes=2", "cluster.finetune.gpus=8", "cluster.node_selector={pool: a100}"],
    )
    assert "accelerator" not in container.get("resources", {})
    assert "nodeSelector" not in k8s and "tolerations" not in k8s and "emptyDirMounts" not in k8s
    assert container["resources"]["resourceMemoryLimit"] == "4Gi"  # the default stage's: it only waits
    assert baseline["resources"]["accelerator"]["resourceCount"] == "1"


# --------------------------------------------------------------------------- RBAC


def _render_rbac() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        require_or_skip("kubectl not found (Debian: apt-get install kubernetes-client)")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR / "pipeline-rbac")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_rbac_grants_what_the_job_client_calls() -> None:
    import kubernetes_validate

    docs = _render_rbac()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    (role,) = [d for d in docs if d["kind"] == "Role"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}
    ]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
            for r in role["rules"]
        )

    for kind in KINDS.values():
        for verb in ("create", "get", "list", "watch", "delete"):
            assert allowed(kind.group, kind.plural, verb), (kind.plural, verb)
    for resource in ("events", "pods", "pods/log"):
        assert allowed("", resource, "list") and allowed("", resource, "watch")
        assert not allowed("", resource, "delete")
