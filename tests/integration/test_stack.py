"""The production setup on one machine: PostgreSQL + moto S3 + mlflow server, started by the tests.

The pipeline reads its images from S3, tracks to the server (artifacts land in S3 through
--serve-artifacts), promotes under an S3 lease; predict, rollback and history work against it;
8 concurrent promoters leave the best model as champion.
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


@pytest.fixture(scope="module")
def stack_env(production_stack) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_", "AWS_"))}
    env.update(production_stack.env)
    return env


def test_pipeline_predict_rollback_against_the_stack(
    production_stack, stack_env, tiny_assets, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s3 = production_stack.s3_client()
    bucket = production_stack.data_bucket
    for f in sorted(tiny_assets.target.rglob("*.png")):
        s3.upload_file(str(f), bucket, f"digits/{f.parent.name}/{f.name}")
    overrides = [
        *tiny_assets.overrides(tmp_path / "state"),
        f"registry.lease_uri=s3://{production_stack.artifacts_bucket}/leases",
        "registry.model_name=stack-digits",
        "baseline.advisor.force=false",
    ]
    sets = [a for o in overrides for a in ("--set", o)]
    run = ["run", "--data", f"s3://{bucket}/digits", *sets, "--json"]
    first = json.loads(cli(stack_env, tmp_path, *run).stdout)
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

    second = json.loads(cli(stack_env, tmp_path, *run, "--force").stdout)
    assert second["promoted"] is False and second["champion_before"] == "1"

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
    assert unknown.returncode == 2 and "stack-digits@nope" in unknown.stderr

    admin = [
        "--set",
        "registry.model_name=stack-digits",
        "--set",
        f"registry.lease_uri=s3://{production_stack.artifacts_bucket}/leases",
        "--set",
        f"workdir={tmp_path / 'state'}",
    ]
    record = json.loads(
        cli(stack_env, tmp_path, "rollback", "--to", "2", "--reason", "canary", *admin, "--json").stdout
    )
    assert record["new_champion"] == "2" and record["previous_champion"] == "1"
    back = json.loads(cli(stack_env, tmp_path, "rollback", *admin, "--json").stdout)  # one step back
    assert back["new_champion"] == "1"
    trail = json.loads(cli(stack_env, tmp_path, "history", *admin, "--json").stdout)
    assert [(t["action"], t["new_champion"]) for t in trail] == [
        ("promote", "1"),
        ("rollback", "2"),
        ("rollback", "1"),
    ]


def test_eight_concurrent_promoters_against_the_server(production_stack, stack_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = dict(stack_env)
    scores = [0.71, 0.94, 0.66, 0.89, 0.98, 0.62, 0.91, 0.83]
    old = {k: os.environ.get(k) for k in production_stack.env}
    os.environ.update(production_stack.env)  # the S3 lease and MlflowClient in this process
    try:
        from adaptflow.storage import s3_client

        s3_client.cache_clear()
        outputs = run_promoters(
            production_stack.tracking_uri,
            tmp_path,
            f"s3://{production_stack.artifacts_bucket}/leases",
            env,
            scores,
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3_client.cache_clear()
    assert sum(o["promoted"] for o in outputs) >= 1
