"""A multi-node finetune's job, end to end against a loopback Kubernetes API (tests/k8s_api.py).

The kubernetes client is pointed at the loopback server by a generated kubeconfig, exactly as on a
developer's machine. The server scripts the job's status; a step plays rank 0 of the job by writing the
candidate to the artifact store (a local folder, or S3 on a moto server). Time is a fake clock, so the
timeout is reached without waiting for it.
"""

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from adaptflow.config import load_settings
from adaptflow.errors import ConfigError, Interrupted
from adaptflow.training.remote_worker import download_tree, staging_layout, upload_tree, write_text
from adaptflow.trainjob import TrainJobFailed, submit_and_wait
from adaptflow.trainjob_render import job_name, staging_uri
from k8s_api import FakeCluster, Step, condition, event, fake_kube_api, pod, write_kubeconfig
from services import moto_s3

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
RUN_ID, FINGERPRINT = "run-1", "f" * 64
TRAINJOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"


class FakeClock:
    """``time`` for adaptflow.trainjob: sleeping moves the clock, at once."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr("adaptflow.trainjob.time", FakeClock())
    inputs = {}
    for name in ("snapshot", "baseline"):
        folder = tmp_path / name
        (folder / "candidate").mkdir(parents=True)
        (folder / "candidate" / f"{name}.json").write_text("{}")
        inputs[name] = folder
    return {"tmp": tmp_path, "monkeypatch": monkeypatch, **inputs}


def run(env: dict[str, Any], cluster: FakeCluster, root: str, *extra: str) -> tuple[Path, Any]:
    settings = load_settings(
        overrides=[
            f"cluster.pipeline_root={root}",
            "cluster.finetune.nodes=2",
            "cluster.finetune.gpus=2",
            *extra,
        ]
    )
    out = env["tmp"] / "out" / "candidate"
    out.mkdir(parents=True, exist_ok=True)
    with fake_kube_api(cluster) as url:
        kubeconfig = write_kubeconfig(env["tmp"] / "kubeconfig", url, NAMESPACE)
        env["monkeypatch"].setenv("KUBECONFIG", str(kubeconfig))
        submit_and_wait(
            settings,
            snapshot_dir=env["snapshot"],
            baseline_dir=env["baseline"],
            config_json=settings.to_json(),
            parent_run_id=RUN_ID,
            fingerprint=FINGERPRINT,
            out_dir=out,
            image="registry.example/adaptflow:1",
            poll_seconds=5.0,
        )
    return out, settings


def staging_for(root: str, *extra: str) -> str:
    settings = load_settings(
        overrides=[
            f"cluster.pipeline_root={root}",
            "cluster.finetune.nodes=2",
            "cluster.finetune.gpus=2",
            *extra,
        ]
    )
    return staging_uri(root, job_name(RUN_ID, FINGERPRINT, settings.config_hash()))


def play_rank0(staging: str, scratch: Path) -> Any:
    """What rank 0 does at the end of the job: the candidate, then the marker."""

    def write() -> None:
        model = scratch / "rank0" / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "weights.safetensors").write_bytes(b"\x00" * 128)
        (model / "candidate.json").write_text('{"name": "finetune"}')
        layout = staging_layout(staging)
        upload_tree(model, layout.candidate)
        write_text(layout.success, "2\n", scratch)

    return write


def succeeding_script(name: str, staging: str, scratch: Path) -> list[Step]:
    return [
        Step({}, events=[event(name, "Created", "JobSet created")]),
        Step(
            {"conditions": [condition("Created", "JobsCreationSucceeded", "jobs created", "True")]},
            pods=[pod(f"{name}-node-0-0", {"adaptflow.io/trainjob": name})],
            events=[event(f"{name}-node-0-0", "Started", "container started", kind="Pod")],
        ),
        Step(
            {"conditions": [condition("Complete", "JobSetCompleted", "all jobs succeeded")]},
            then=play_rank0(staging, scratch),
        ),
    ]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_create_wait_succeed_collect(
    env: dict[str, Any], store: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adaptflow.trainjob")
    with moto_s3() if store == "s3" else _nothing():
        if store == "s3":
            from adaptflow.storage import s3_client

            s3_client().create_bucket(Bucket="artifacts")
        root = "s3://artifacts/pipeline-root" if store == "s3" else str(env["tmp"] / "store")
        staging = staging_for(root)
        name = staging.rsplit("/", 1)[-1]
        cluster = FakeCluster(script=succeeding_script(name, staging, env["tmp"]))
        out, _ = run(env, cluster, root)

        assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
            "candidate.json",
            "weights.safetensors",
        ]
        assert (out / "weights.safetensors").read_bytes() == b"\x00" * 128
        # the job's pods find their inputs where the worker's stage-in looks
        staged = env["tmp"] / "staged"
        download_tree(staging_layout(staging).snapshot, staged)
        assert (staged / "candidate" / "snapshot.json").is_file()

    (job,) = cluster.created
    assert job["kind"] == "TrainJob" and job["metadata"]["name"] == name
    assert job["metadata"]["namespace"] == NAMESPACE  # the kubeconfig context's
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert ("POST", TRAINJOBS) in cluster.calls
    assert cluster.deleted == [name]  # cleaned up once collected
    logged = caplog.text
    assert "Complete=True JobSetCompleted" in logged
    assert "Started" in logged and "container started" in logged


def test_a_failed_job_is_one_clear_error_and_is_deleted(env: dict[str, Any]) -> None:
    root = str(env["tmp"] / "store")
    name = staging_for(root).rsplit("/", 1)[-1]
    cluster = FakeCluster(
        script=[
            Step({}),
            Step(
                {"conditions": [condition("Failed", "FailedJobs", "jobset failed: node-0 exited 1")]},
                events=[
                    event(f"{name}-node-0-0", "BackOff", "container exited 1", kind="Pod", type_="Warning")
                ],
            ),
        ]
    )
    with pytest.raises(TrainJobFailed) as caught:
        run(env, cluster, root)
    assert "FailedJobs" in caught.value.message and "node-0 exited 1" in caught.value.message
    assert caught.value.hint and f"adaptflow.io/trainjob={name}" in caught.value.hint
    assert cluster.deleted == [name] and not cluster.objects


def test_an_evicted_pod_fails_the_job_as_transient(env: dict[str, Any]) -> None:
    root = str(env["tmp"] / "store")
    name = staging_for(root).rsplit("/", 1)[-1]
    evicted = pod(f"{name}-node-1-0", {"adaptflow.io/trainjob": name}, "Evicted", "node was low on memory")
    cluster = FakeCluster(script=[Step({}), Step({}, pods=[evicted])])
    with pytest.raises(TrainJobFailed, match="evicted: node was low on memory") as caught:
        run(env, cluster, root)
    assert caught.value.transient is True  # the KFP retry resumes from the checkpoint
    assert cluster.deleted == [name]


def test_timeout_deletes_the_job(env: dict[str, Any]) -> None:
    root = str(env["tmp"] / "store")
    cluster = FakeCluster(script=[Step({})])  # runs for ever
    with pytest.raises(TrainJobFailed, match="did not finish within 60s"):
        run(env, cluster, root, "cluster.finetune.job_timeout_seconds=60")
    assert len(cluster.deleted) == 1 and not cluster.objects


def test_sigterm_deletes_the_job(env: dict[str, Any]) -> None:
    root = str(env["tmp"] / "store")
    cluster = FakeCluster(
        script=[Step({}), Step({}, then=lambda: os.kill(os.getpid(), signal.SIGTERM)), Step({})]
    )
    with pytest.raises(Interrupted, match="deleted"):
        run(env, cluster, root)
    assert len(cluster.deleted) == 1 and not cluster.objects


def test_a_retry_replaces_a_failed_job_and_follows_a_running_one(env: dict[str, Any]) -> None:
    root = str(env["tmp"] / "store")
    staging = staging_for(root)
    name = staging.rsplit("/", 1)[-1]
    key = ("trainjobs", NAMESPACE, name)
    failed = {"metadata": {"name": name}, "status": {"conditions": [condition("Failed", "FailedJobs", "x")]}}

    # the first try left a failed job: the retry deletes it and makes it again
    cluster = FakeCluster(objects={key: failed})
    cluster.script = [Step(failed["status"]), *succeeding_script(name, staging, env["tmp"])]
    out, _ = run(env, cluster, root)
    assert len(cluster.created) == 1 and cluster.deleted == [name, name]
    assert (out / "weights.safetensors").is_file()

    # the first try's pod died while its job ran on: the retry follows that job, making none
    running = {"metadata": {"name": name}, "status": {}}
    cluster = FakeCluster(
        objects={key: running}, script=[Step({}), *succeeding_script(name, staging, env["tmp"])]
    )
    run(env, cluster, root)
    assert cluster.created == [] and cluster.deleted == [name]


def test_pytorchjob_fallback(env: dict[str, Any]) -> None:
    root = str(env["tmp"] / "store")
    staging = staging_for(root, "cluster.finetune.job_api=pytorchjob")
    name = staging.rsplit("/", 1)[-1]
    done = Step(
        {"conditions": [condition("Succeeded", "PyTorchJobSucceeded", "ok")]},
        then=play_rank0(staging, env["tmp"]),
    )
    cluster = FakeCluster(script=[Step({}), done])
    out, _ = run(env, cluster, root, "cluster.finetune.job_api=pytorchjob")
    (job,) = cluster.created
    assert job["kind"] == "PyTorchJob" and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert (out / "candidate.json").is_file() and cluster.deleted == [name]


@pytest.mark.parametrize(
    ("code", "says", "hint"),
    [(404, "no such resource", "job_api: pytorchjob"), (403, "refused", "infra/k8s/pipeline-rbac")],
)
def test_a_missing_crd_or_rbac_says_what_to_do(env: dict[str, Any], code: int, says: str, hint: str) -> None:
    cluster = FakeCluster(refuse={"trainjobs": code})
    with pytest.raises(ConfigError, match=says) as caught:
        run(env, cluster, str(env["tmp"] / "store"))
    assert hint in (caught.value.hint or "")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
