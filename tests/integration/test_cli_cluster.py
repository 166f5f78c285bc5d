"""`adaptflow submit` and `adaptflow schedule` against a loopback KFP v2beta1 API, end to end via the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_kfp_api import FakeKfpApi

pytestmark = pytest.mark.integration
API = "/apis/v2beta1"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KFP_"))}
    return subprocess.run(
        [sys.executable, "-m", "adaptflow.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_submit_then_schedule_with_the_real_pipeline(tmp_path: Path) -> None:
    with FakeKfpApi() as api:
        common = [
            "--host",
            api.url,
            "--data",
            "s3://team-bucket/images",
            "--set",
            "finetune.strategy=partial",
            "--set",
            "cluster.image=registry.example/adaptflow:9.9",
        ]
        first = cli(
            "submit", *common, "--experiment", "vision", "--version-name", "v1", "--json", cwd=tmp_path
        )
        assert first.returncode == 0, first.stderr
        result = json.loads(first.stdout)
        upload = api.requests_to("POST", f"{API}/pipelines/upload")[0]
        ir = next(yaml.safe_load_all(upload.files["uploadfile"]))
        assert ir["pipelineInfo"]["name"] == "adaptflow"
        assert {e["container"]["image"] for e in ir["deploymentSpec"]["executors"].values()} == {
            "registry.example/adaptflow:9.9"
        }
        params = api.requests_to("POST", f"{API}/runs")[0].body["runtime_config"]["parameters"]
        assert params["data_uri"] == "s3://team-bucket/images"
        assert json.loads(params["config_json"])["finetune"]["strategy"] == "partial"
        assert params["force"] is False

        second = cli(
            "submit",
            *common,
            "--experiment",
            "vision",
            "--version-name",
            "v2",
            "--force",
            "--json",
            cwd=tmp_path,
        )
        assert second.returncode == 0, second.stderr
        assert api.requests_to(
            "POST", f"{API}/pipelines/upload_version"
        )  # a new version of the same pipeline
        assert (
            api.requests_to("POST", f"{API}/runs")[1].body["runtime_config"]["parameters"]["pipeline_version"]
            == "v2"
        )

        created = cli(
            "schedule",
            "create",
            "--host",
            api.url,
            "--cron",
            "0 0 3 * * 1",
            "--data",
            "s3://team-bucket/images",
            "--experiment",
            "vision",
            "--json",
            cwd=tmp_path,
        )
        assert created.returncode == 0, created.stderr
        body = api.requests_to("POST", f"{API}/recurringruns")[0].body
        assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
        assert str(body["max_concurrency"]) == "1" and body["no_catchup"] is True
        latest = json.loads(second.stdout)["pipeline_version_id"]
        assert body["pipeline_version_reference"]["pipeline_version_id"] == latest
        rid = json.loads(created.stdout)["recurring_run_id"]

        listed = json.loads(cli("schedule", "list", "--host", api.url, "--json", cwd=tmp_path).stdout)
        assert [s["recurring_run_id"] for s in listed] == [rid]
        assert cli("schedule", "delete", "--host", api.url, rid, cwd=tmp_path).returncode == 0
        assert result["run_id"]


def test_five_field_cron_is_refused_with_the_fix(tmp_path: Path) -> None:
    out = cli(
        "schedule",
        "create",
        "--host",
        "http://127.0.0.1:9",
        "--cron",
        "30 3 * * 1-5",
        "--data",
        "s3://b/p",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "0 30 3 * * 1-5" in out.stderr


def test_unreachable_host_is_a_clear_error(tmp_path: Path) -> None:
    image = ["--set", "cluster.image=registry.example/adaptflow:9.9"]  # submit never guesses one
    out = cli("submit", "--host", "http://127.0.0.1:9", "--data", "s3://b/p", *image, cwd=tmp_path)
    assert out.returncode == 1
    assert "127.0.0.1:9" in out.stderr and "port-forward" in out.stderr
