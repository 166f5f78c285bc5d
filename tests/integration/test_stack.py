"""The production setup on one machine: PostgreSQL + moto S3 + mlflow server, started by the tests.

The pipeline reads its images from S3, tracks to the server (artifacts land in S3 through
--serve-artifacts), and promotes under the S3 lease named by ``registry.lease_uri`` from two
different workdirs, as two pipeline pods would; predict, rollback and history work against it;
8 concurrent promoters, each in its own workdir, leave the best model as champion.

The lease bucket is versioned, so S3 itself keeps one object version per lease taken, naming its
holder: that is how the tests see which promoters went through the one lease.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_promotion_race import run_promoters

pytestmark = [pytest.mark.stack, pytest.mark.integration]


def cli(env: dict[str, str], cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "adaptflow.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"adaptflow {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


LEASE_BUCKET = "adaptflow-leases"


@pytest.fixture(scope="module")
def stack_env(production_stack) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_", "AWS_"))}
    env.update(production_stack.env)
    return env


@pytest.fixture(scope="module")
def lease_bucket(production_stack) -> str:  # type: ignore[no-untyped-def]
    s3 = production_stack.s3_client()
    s3.create_bucket(Bucket=LEASE_BUCKET)
    s3.put_bucket_versioning(Bucket=LEASE_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return LEASE_BUCKET


def lease_holders(s3, bucket: str, key: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The holder of every lease ever taken at ``key`` (one object version each), oldest first."""
    listing = s3.list_object_versions(Bucket=bucket, Prefix=key)
    versions = sorted(
        (v for v in listing.get("Versions", []) if v["Key"] == key), key=lambda v: v["LastModified"]
    )
    return [
        json.loads(s3.get_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])["Body"].read())["holder"]
        for v in versions
    ]


# slow (make test-all): a whole run on the stack; the stack itself (PostgreSQL, moto, mlflow server) runs in CI below
@pytest.mark.slow
def test_pipeline_predict_rollback_against_the_stack(
    production_stack, stack_env, lease_bucket, tiny_assets, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    from adaptflow.lease import LEASE_TAG

    s3 = production_stack.s3_client()
    bucket = production_stack.data_bucket
    for f in sorted(tiny_assets.target.rglob("*.png")):
        s3.upload_file(str(f), bucket, f"digits/{f.parent.name}/{f.name}")
    lease_key = "promotion/stack-digits.json"
    lease_uri = f"s3://{lease_bucket}/{lease_key}"

    def run(pod: str, *extra: str) -> dict:
        """One pipeline run from its own workdir, as a pod of its own would have."""
        overrides = [
            *tiny_assets.overrides(tmp_path / pod),
            f"registry.lease_uri=s3://{lease_bucket}/promotion",
            "registry.model_name=stack-digits",
            "baseline.advisor.force=false",
        ]
        sets = [a for o in overrides for a in ("--set", o)]
        args = ["run", "--data", f"s3://{bucket}/digits", *sets, "--json", *extra]
        return json.loads(cli(stack_env, tmp_path, *args).stdout)

    first = run("pod-a")
    assert first["mlflow"]["tracking_uri"] == production_stack.tracking_uri
    assert first["promoted"] is True and first["registered_version"] == "1"
    assert all(e.startswith("s3://") for e in [first["dataset"]["source"]])
    assert sum(first["dataset"]["counts"].values()) == len(list(tiny_assets.target.rglob("*.png")))
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=production_stack.artifacts_bucket)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("model.onnx") for k in keys), "the registered ONNX model must live in S3"

    second = run("pod-b", "--force")
    assert second["promoted"] is False and second["champion_before"] == "1"
    # Both runs, from two workdirs, went through the one S3 lease: the tag says so, and so does S3.
    client = MlflowClient(production_stack.tracking_uri)
    for version in ("1", "2"):
        assert client.get_model_version("stack-digits", version).tags[LEASE_TAG] == lease_uri
    holders = lease_holders(s3, lease_bucket, lease_key)
    assert len(holders) == 2 and len(set(holders)) == 2

    # predict fetches the champion from the registry (server + S3) and uses its own preprocessing
    rows = json.loads(
        cli(
            stack_env,
            tmp_path,
            "predict",
            str(tiny_assets.target / "8"),
            "--model",
            "models:/stack-digits@champion",
            "--json",
        ).stdout
    )
    assert len(rows) == len(list((tiny_assets.target / "8").glob("*.png")))
    assert {r["label"] for r in rows} <= {"5", "6", "7", "8", "9"}
    unknown = cli(
        stack_env,
        tmp_path,
        "predict",
        str(tiny_assets.target / "8"),
        "--model",
        "models:/stack-digits@nope",
        check=False,
    )
    assert unknown.returncode == 1 and "stack-digits@nope" in unknown.stderr

    admin = ["--set", "registry.model_name=stack-digits", "--set", f"workdir={tmp_path / 'admin'}"]
    shared = ["--set", f"registry.lease_uri=s3://{lease_bucket}/promotion"]
    to_rejected = ["rollback", "--to", "2", "--reason", "canary", *admin, *shared]
    refused = cli(stack_env, tmp_path, *to_rejected, check=False)  # the gate rejected v2
    assert refused.returncode == 2 and "needs --force" in refused.stderr, refused.stderr
    assert "the gate did not promote v2 (rejected:" in refused.stderr
    forced = cli(stack_env, tmp_path, *to_rejected, "--force", "--json")
    record = json.loads(forced.stdout)
    assert record["new_champion"] == "2" and record["previous_champion"] == "1"
    assert "forced: the gate did not promote v2" in record["reason"]
    assert "WARNING" in forced.stderr and "the gate did not promote v2" in forced.stderr
    assert record["lease"] == lease_uri
    # Without registry.lease_uri the lease is a file lock on this machine, and the command says so.
    local = cli(stack_env, tmp_path, "rollback", *admin, "--json")  # one step back
    back = json.loads(local.stdout)
    assert back["new_champion"] == "1" and back["lease"].startswith("file:///")
    assert "guarded only on this machine" in local.stderr and "registry.lease_uri" in local.stderr
    trail = json.loads(cli(stack_env, tmp_path, "history", *admin, "--json").stdout)
    assert [(t["action"], t["new_champion"], t["lease"]) for t in trail] == [
        ("promote", "1", lease_uri),
        ("rollback", "2", lease_uri),
        ("rollback", "1", back["lease"]),
    ]
    assert (
        trail[0]["holder"] == holders[0]
        # [2] is the refused rollback's lease (it took the lease, then found what differs); [3] the forced one
        and trail[1]["holder"] == lease_holders(s3, lease_bucket, lease_key)[3]
    )


def test_eight_concurrent_promoters_against_the_server(
    production_stack, stack_env, lease_bucket, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Eight promoters, eight workdirs, one S3 lease: the best ends as champion, S3 saw every holder."""
    scores = [0.71, 0.94, 0.66, 0.89, 0.98, 0.62, 0.91, 0.83]
    outputs = run_promoters(
        production_stack.tracking_uri, tmp_path, f"s3://{lease_bucket}/race", stack_env, scores
    )
    key = "race/race-model.json"
    assert {o["lease"] for o in outputs} == {f"s3://{lease_bucket}/{key}"}
    assert sorted(lease_holders(production_stack.s3_client(), lease_bucket, key)) == sorted(
        o["holder"] for o in outputs
    )
