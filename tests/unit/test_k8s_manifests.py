"""infra/k8s: render each kustomize overlay, schema-check it offline, and check what matters.

Needs `kubectl` (its built-in `kustomize`). Debian 12 ships it as package `kubernetes-client`
(kubectl 1.20, kustomize v2.0.3); the overlays are written for that version and render the same
with newer kubectl. Without kubectl the tests skip, except with ADAPTFLOW_REQUIRE_SERVICES=1 (CI), where they fail.
Set KUBECTL to use another binary.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import require_or_skip

K8S_DIR = Path(__file__).resolve().parents[2] / "infra" / "k8s"
OVERLAYS = ("dev", "prod")
# Schema version for kubernetes-validate (bundled, offline). Oldest Kubernetes we target.
K8S_SCHEMA_VERSION = "1.30.0"
PLACEHOLDER = "CHANGE_ME"
NAMESPACE = "adaptflow"
PIPELINE_SECRETS = {
    "adaptflow-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "adaptflow-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if found:
        return found
    require_or_skip("kubectl not found (Debian: apt-get install kubernetes-client); infra/k8s not rendered")


def _render(overlay: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _render(request.param)


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return _render("dev")


@pytest.fixture(scope="module")
def prod() -> list[dict[str, Any]]:
    return _render("prod")


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def _mlflow_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = _pod_spec(_one(docs, "Deployment", "mlflow"))
    return next(c for c in spec["containers"] if c["name"] == "mlflow")


def _resolve(container: dict[str, Any], docs: list[dict[str, Any]], text: str) -> str:
    """Expand $(VAR) the way the kubelet does, from literal env and ConfigMap refs in the output."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in _of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif ref := var.get("valueFrom", {}).get("configMapKeyRef"):
            value = configmaps.get(ref["name"], {}).get(ref["key"])
            assert value is not None or ref.get("optional"), f"{var['name']}: missing ConfigMap key {ref}"
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = f"<{var['name']}>"  # a Secret: never rendered, keep a marker
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# --- both overlays ---------------------------------------------------------------------------------


def test_every_document_passes_the_kubernetes_schema(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    name, docs = rendered
    assert docs, f"{name} rendered nothing"
    for doc in docs:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {'.'.join(map(str, e.path))}")


def test_everything_lives_in_the_adaptflow_namespace(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    _one(docs, "Namespace", NAMESPACE)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


def test_every_container_has_limits_and_a_locked_down_security_context(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = rendered
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert {w["metadata"]["name"] for w in workloads} >= {"mlflow", "postgres"}
    for workload in workloads:
        spec = _pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, workload["metadata"]["name"]
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for c in _containers(spec):
            where = f"{name}: {workload['metadata']['name']}/{c['name']}"
            limits = c.get("resources", {}).get("limits", {})
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= limits.keys(), f"{where}: limits {limits}"
            assert {"cpu", "memory"} <= requests.keys(), f"{where}: requests {requests}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, where
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, where
            assert c["securityContext"].get("allowPrivilegeEscalation") is False, where
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, where
            assert c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"], where
            assert "add" not in c["securityContext"].get("capabilities", {}), where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert not c["securityContext"].get("privileged", False), where


def test_mlflow_server_command_line(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    c = _mlflow_container(docs)
    image = c["image"]
    tag = re.fullmatch(r"ghcr\.io/mlflow/mlflow:v(\d+)\.(\d+)\.(\d+)(-full)?(@sha256:[0-9a-f]{64})?", image)
    assert tag, f"MLflow image must be a pinned ghcr.io/mlflow/mlflow:vX.Y.Z tag, got {image}"
    assert tuple(int(x) for x in tag.groups()[:3]) >= (3, 16, 1), "MLflow < 3.16.1 has a default admin pw"
    assert c["command"][-1] == "server"
    args = c["args"]
    assert "--serve-artifacts" in args
    assert "--no-serve-artifacts" not in args
    assert "--default-artifact-root" not in args
    assert "--disable-security-middleware" not in args

    backend = _arg_value(args, "--backend-store-uri")
    assert backend.startswith("postgresql")
    assert "$(POSTGRES_PASSWORD)" in backend, "the DB password must come from env, not the manifest"
    resolved = _resolve(c, docs, backend)
    assert re.fullmatch(r"postgresql(\+\w+)?://\w+:<POSTGRES_PASSWORD>@postgres:5432/\w+", resolved), resolved

    destination = _resolve(c, docs, _arg_value(args, "--artifacts-destination"))
    assert destination.startswith("s3://"), destination

    hosts = _resolve(c, docs, _arg_value(args, "--allowed-hosts")).split(",")
    assert "*" not in hosts
    assert f"mlflow.{NAMESPACE}.svc.cluster.local:5000" in hosts

    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe


def test_credentials_only_come_from_secrets(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(_pod_spec(workload)):
            for var in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|ACCESS_KEY", var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{c['name']}: {var['name']}"


def test_no_secret_holds_anything_but_placeholders(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    for secret in _of_kind(docs, "Secret"):
        assert "data" not in secret or not secret["data"], f"{name}: use stringData placeholders only"
        for key, value in secret.get("stringData", {}).items():
            assert value == PLACEHOLDER, (
                f"{name}: Secret {secret['metadata']['name']}.{key} is not a placeholder"
            )
    for cm in _of_kind(docs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", key), f"{key} in a ConfigMap"


def test_every_referenced_secret_has_a_template(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """prod renders no Secrets; each secretKeyRef must still name a template with that key."""
    _, docs = rendered
    templates = _template_keys()
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        for c in _containers(_pod_spec(workload)):
            for var in c.get("env", []):
                if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["key"] in templates.get(ref["name"], set()), f"no template for {ref}"


def test_postgres_is_a_statefulset_with_a_volume_claim(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "postgres"]
    sts = _one(docs, "StatefulSet", "postgres")
    claims = sts["spec"]["volumeClaimTemplates"]
    assert claims and claims[0]["spec"]["resources"]["requests"]["storage"]
    c = next(c for c in _pod_spec(sts)["containers"] if c["name"] == "postgres")
    assert any(m["name"] == claims[0]["metadata"]["name"] for m in c["volumeMounts"])
    password = next(v for v in c["env"] if v["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"]["name"] == "postgres-credentials"
    _one(docs, "Service", "postgres")


def test_network_policies_fence_postgres_and_mlflow(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    policies = _of_kind(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and "Ingress" in p["spec"]["policyTypes"] for p in policies)

    def selecting(app: str) -> list[dict[str, Any]]:
        return [
            p
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": app}
        ]

    (pg,) = selecting("postgres")
    assert "Ingress" in pg["spec"]["policyTypes"]
    peers = [peer for rule in pg["spec"]["ingress"] for peer in rule["from"]]
    assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    assert [p["port"] for rule in pg["spec"]["ingress"] for p in rule["ports"]] == [5432]

    (mlflow,) = selecting("mlflow")
    for rule in mlflow["spec"]["ingress"]:
        assert rule.get("from"), "MLflow ingress must name its peers"
        assert [p["port"] for p in rule["ports"]] == [5000]
        for peer in rule["from"]:
            assert peer.get("podSelector", {}).get("matchLabels") or peer.get("namespaceSelector", {}).get(
                "matchLabels"
            ), f"unrestricted MLflow peer {peer}"


# --- dev vs prod ------------------------------------------------------------------------------------


def test_basic_auth_is_on_in_prod_only(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    assert "--app-name" not in _mlflow_container(dev)["args"]
    prod_c = _mlflow_container(prod)
    assert _arg_value(prod_c["args"], "--app-name") == "basic-auth"
    env = {v["name"]: v for v in prod_c["env"]}
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-basic-auth"
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    # the auth store must be shared by the replicas: PostgreSQL, never the default per-pod SQLite file
    init = _pod_spec(_one(prod, "Deployment", "mlflow"))["initContainers"]
    script = "\n".join(c["command"][-1] for c in init)
    assert config_path in script and "database_uri = postgresql://" in script


def test_s3_store_in_dev_only(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    _one(dev, "Deployment", "s3-store")
    _one(dev, "Service", "s3-store")
    assert len([p for p in _of_kind(dev, "NetworkPolicy") if p["metadata"]["name"] == "s3-store"]) == 1
    assert not [d for d in prod if d["metadata"]["name"].startswith("s3-store")]
    dev_c, prod_c = _mlflow_container(dev), _mlflow_container(prod)
    assert _resolve(dev_c, dev, "$(MLFLOW_S3_ENDPOINT_URL)") == "http://s3-store:5000"
    assert _resolve(prod_c, prod, "$(MLFLOW_S3_ENDPOINT_URL)") == "$(MLFLOW_S3_ENDPOINT_URL)"  # real AWS S3


def test_secrets_rendered_in_dev_and_never_in_prod(
    dev: list[dict[str, Any]], prod: list[dict[str, Any]]
) -> None:
    assert _of_kind(prod, "Secret") == [], "prod must not overwrite real Secrets with placeholders"
    dev_secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in _of_kind(dev, "Secret")}
    assert set(dev_secrets) == set(_template_keys())
    for name, keys in PIPELINE_SECRETS.items():
        assert dev_secrets[name] == keys, name


def test_prod_is_sized_up(dev: list[dict[str, Any]], prod: list[dict[str, Any]]) -> None:
    assert _one(dev, "Deployment", "mlflow")["spec"]["replicas"] == 1
    assert _one(prod, "Deployment", "mlflow")["spec"]["replicas"] == 2
    _one(prod, "PodDisruptionBudget", "mlflow")

    def storage(docs: list[dict[str, Any]]) -> int:
        size = _one(docs, "StatefulSet", "postgres")["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]
        return int(size["requests"]["storage"].removesuffix("Gi"))

    assert storage(prod) > storage(dev)

    def memory_limit(docs: list[dict[str, Any]]) -> str:
        return _mlflow_container(docs)["resources"]["limits"]["memory"]

    assert memory_limit(prod) != memory_limit(dev)


# --- the templates themselves ------------------------------------------------------------------------


def _template_keys() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for path in sorted((K8S_DIR / "secrets").glob("*.secret.example.yaml")):
        doc = yaml.safe_load(path.read_text())
        keys[doc["metadata"]["name"]] = set(doc["stringData"])
    return keys


def test_secret_templates_are_placeholders_for_every_needed_secret() -> None:
    import kubernetes_validate

    templates = _template_keys()
    for name, keys in PIPELINE_SECRETS.items():
        assert templates.get(name) == keys, name
    assert templates["postgres-credentials"] == {"POSTGRES_PASSWORD"}
    assert templates["mlflow-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"} <= templates["mlflow-basic-auth"]
    for path in (K8S_DIR / "secrets").glob("*.secret.example.yaml"):
        doc = yaml.safe_load(path.read_text())
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
        assert "data" not in doc
        assert set(doc["stringData"].values()) == {PLACEHOLDER}, path.name
