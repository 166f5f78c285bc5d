"""adaptflow.kfp_client against a loopback fake of the KFP v2beta1 REST API (no cluster needed).

No ``from __future__ import annotations`` here: kfp reads the component's annotations as real types.
"""

import hashlib
import re
import socket
import time
from pathlib import Path

import pytest
from fake_kfp_api import API, FakeKfpApi  # tests/integration is on sys.path (pytest "prepend" mode)

from adaptflow import kfp_client
from adaptflow.errors import AdaptflowError, ConfigError, StoreError

pytestmark = pytest.mark.integration

PIPELINE = "adaptflow-tiny"
EXPERIMENT = "adaptflow-test"
PARAMS = {"source_uri": "s3://bucket/images", "epochs": 3}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny compiled KFP pipeline (the real adaptflow pipeline is plugged in elsewhere)."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def echo(source_uri: str, epochs: int) -> str:
        return f"{source_uri}:{epochs}"

    @dsl.pipeline(name="tiny")
    def tiny(source_uri: str = "data/", epochs: int = 1) -> None:
        echo(source_uri=source_uri, epochs=epochs)

    path = tmp_path_factory.mktemp("kfp") / "tiny.yaml"
    compiler.Compiler().compile(pipeline_func=tiny, package_path=str(path))
    return path


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    import kfp

    # Hermetic: no developer kfp context file (namespace / auth cookies), no KFP env overrides.
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID"):
        monkeypatch.delenv(var, raising=False)
    with FakeKfpApi() as fake:
        yield fake


def _submit(api: FakeKfpApi, package: Path, **kw: object) -> kfp_client.SubmitResult:
    args: dict[str, object] = {
        "pipeline_name": PIPELINE,
        "version_name": None,
        "experiment": EXPERIMENT,
        "run_name": None,
        "parameters": PARAMS,
    }
    args.update(kw)
    return kfp_client.submit(api.url, package, **args)  # type: ignore[arg-type]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_submit_uploads_pipeline_then_a_version(api: FakeKfpApi, package: Path) -> None:
    yaml_bytes = package.read_bytes()

    first = _submit(api, package, run_name="first run", existing_token="s3cret")
    assert first.pipeline_created and first.experiment_created
    uploads = api.requests_to("POST", f"{API}/pipelines/upload")
    assert len(uploads) == 1
    assert uploads[0].files["uploadfile"] == yaml_bytes
    assert uploads[0].param("name") == PIPELINE
    assert uploads[0].headers["authorization"] == "Bearer s3cret"
    assert first.pipeline_id in api.pipelines
    assert api.versions[first.pipeline_version_id]["pipeline_id"] == first.pipeline_id

    runs = api.requests_to("POST", f"{API}/runs")
    assert len(runs) == 1
    body = runs[0].body
    assert body["display_name"] == "first run"
    assert body["experiment_id"] == first.experiment_id
    assert body["pipeline_version_reference"] == {
        "pipeline_id": first.pipeline_id,
        "pipeline_version_id": first.pipeline_version_id,
    }
    assert body["runtime_config"]["parameters"] == PARAMS
    assert first.run_id in api.runs
    assert first.run_url == f"{api.url}/#/runs/details/{first.run_id}"

    second = _submit(api, package, parameters={"epochs": 5})
    assert not second.pipeline_created and not second.experiment_created
    assert len(api.requests_to("POST", f"{API}/pipelines/upload")) == 1, "existing pipeline re-uploaded"
    versions = api.requests_to("POST", f"{API}/pipelines/upload_version")
    assert len(versions) == 1
    assert versions[0].param("pipelineid") == first.pipeline_id
    assert versions[0].files["uploadfile"] == yaml_bytes
    digest = hashlib.sha256(yaml_bytes).hexdigest()[:8]
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-{digest}", versions[0].param("name") or "")
    assert second.version_name == versions[0].param("name")
    assert second.pipeline_id == first.pipeline_id
    assert second.pipeline_version_id != first.pipeline_version_id
    assert second.experiment_id == first.experiment_id
    assert len(api.requests_to("POST", f"{API}/experiments")) == 1

    run2 = api.requests_to("POST", f"{API}/runs")[1].body
    assert run2["pipeline_version_reference"]["pipeline_version_id"] == second.pipeline_version_id
    assert run2["runtime_config"]["parameters"] == {"epochs": 5}
    assert run2["display_name"].startswith(PIPELINE)


def test_schedule_create_list_delete(api: FakeKfpApi, package: Path) -> None:
    _submit(api, package)
    latest = _submit(api, package, version_name="v2")
    assert latest.version_name == "v2"

    rr_id = kfp_client.create_schedule(
        api.url,
        pipeline_name=PIPELINE,
        experiment=EXPERIMENT,
        job_name="nightly",
        cron="0 0 3 * * 1",
        parameters={"source_uri": "s3://bucket/images"},
    )
    created = api.requests_to("POST", f"{API}/recurringruns")
    assert len(created) == 1
    body = created[0].body
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert str(body["max_concurrency"]) == "1"
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["display_name"] == "nightly"
    assert body["experiment_id"] == latest.experiment_id
    assert body["pipeline_version_reference"] == {
        "pipeline_id": latest.pipeline_id,
        "pipeline_version_id": latest.pipeline_version_id,
    }
    assert body["runtime_config"]["parameters"] == {"source_uri": "s3://bucket/images"}
    listed_versions = api.requests_to("GET", f"{API}/pipelines/{latest.pipeline_id}/versions")
    assert listed_versions[-1].param("sort_by") == "created_at desc"

    schedules = kfp_client.list_schedules(api.url)
    assert [s.recurring_run_id for s in schedules] == [rr_id]
    info = schedules[0]
    assert (info.name, info.cron, info.max_concurrency, info.no_catchup, info.enabled) == (
        "nightly",
        "0 0 3 * * 1",
        1,
        True,
        True,
    )
    assert info.pipeline_version_id == latest.pipeline_version_id
    assert info.created_at is not None and info.to_dict()["created_at"]
    assert [s.recurring_run_id for s in kfp_client.list_schedules(api.url, EXPERIMENT)] == [rr_id]
    with pytest.raises(StoreError, match="no experiment named 'missing'"):
        kfp_client.list_schedules(api.url, "missing")

    # The same name twice would double every run: refused, unless replacing.
    with pytest.raises(StoreError, match="already has a schedule named 'nightly'"):
        kfp_client.create_schedule(
            api.url,
            pipeline_name=PIPELINE,
            experiment=EXPERIMENT,
            job_name="nightly",
            cron="0 0 4 * * *",
            parameters={},
        )
    new_id = kfp_client.create_schedule(
        api.url,
        pipeline_name=PIPELINE,
        experiment=EXPERIMENT,
        job_name="nightly",
        cron="0 30 4 * * MON-FRI",
        parameters={},
        replace=True,
    )
    assert list(api.recurring_runs) == [new_id]

    kfp_client.delete_schedule(api.url, new_id)
    assert api.requests_to("DELETE", f"{API}/recurringruns/{new_id}")
    assert kfp_client.list_schedules(api.url) == []
    with pytest.raises(StoreError, match="no schedule"):
        kfp_client.delete_schedule(api.url, new_id)


def test_schedule_needs_an_uploaded_pipeline(api: FakeKfpApi) -> None:
    with pytest.raises(StoreError, match="no pipeline named 'nope'") as err:
        kfp_client.create_schedule(
            api.url,
            pipeline_name="nope",
            experiment=EXPERIMENT,
            job_name="n",
            cron="0 0 3 * * 1",
            parameters={},
        )
    assert "adaptflow submit" in (err.value.hint or "")
    assert not api.requests_to("POST", f"{API}/recurringruns")


@pytest.mark.parametrize(
    ("cron", "problem"),
    [
        ("0 3 * * 1", "it has 5 fields"),
        ("0 0 25 * * 1", "hours value 25 is out of range 0-23"),
        ("0 0 3 * * 8", "day-of-week value 8 is out of range 0-6"),
        ("60 0 3 * * 1", "seconds value 60 is out of range 0-59"),
        ("0 0 3 0 * 1", "day-of-month value 0 is out of range 1-31"),
        ("0 0 3 * 13 1", "month value 13 is out of range 1-12"),
        ("0 0 3 * * 1 2024", "it has 7 fields, expected 6"),
        ("0 0 3 * * FUNDAY", "'FUNDAY' is not a valid day-of-week value"),
        ("0 0 3 10-2 * *", "day-of-month range '10-2' runs backwards"),
        ("*/0 0 3 * * *", "step '0' in the seconds field"),
        ("0 0 3 * * 1,", "empty list item"),
        ("? 0 3 * * 1", "'?' is only allowed"),
        ("@sometimes", "unknown descriptor"),
        ("", "it is empty"),
    ],
)
def test_invalid_cron_is_a_clear_error(api: FakeKfpApi, cron: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        kfp_client.create_schedule(
            api.url, pipeline_name=PIPELINE, experiment=EXPERIMENT, job_name="n", cron=cron, parameters={}
        )
    text = str(err.value)
    assert f"invalid cron expression {cron!r}" in text
    assert problem in text
    assert "seconds first" in text and "'0 0 3 * * 1'" in text
    assert api.requests == [], "validation must happen before any request"


def test_five_field_cron_suggests_the_six_field_form() -> None:
    with pytest.raises(AdaptflowError) as err:
        kfp_client.validate_cron("30 3 * * 1-5")
    assert "'0 30 3 * * 1-5'" in (err.value.hint or "")


@pytest.mark.parametrize(
    "cron",
    ["0 0 3 * * 1", "0 0 9 ? * 2-6", "*/15 * * * * *", "0 30 4 * * MON-FRI", "0 0 0 1 jan,jul *", "@daily"],
)
def test_valid_cron(cron: str) -> None:
    assert kfp_client.validate_cron(f"  {cron} ") == cron


def test_unreachable_host_is_a_clear_error(package: Path) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    for call in (
        lambda: kfp_client.submit(
            host,
            package,
            pipeline_name=PIPELINE,
            version_name=None,
            experiment=EXPERIMENT,
            run_name=None,
            parameters={},
        ),
        lambda: kfp_client.list_schedules(host),
        lambda: kfp_client.delete_schedule(host, "some-id"),
    ):
        with pytest.raises(StoreError) as err:
            call()
        assert f"cannot reach the Kubeflow Pipelines API at {host}" in err.value.message
        assert "--host" in (err.value.hint or "")
        assert "kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow" in (err.value.hint or "")
    assert time.monotonic() - started < 10


def test_refused_request_names_the_fix(api: FakeKfpApi, package: Path) -> None:
    api.fail_next[("POST", f"{API}/runs")] = (403, "user is not authorized")
    with pytest.raises(StoreError) as err:
        _submit(api, package)
    assert "HTTP 403" in err.value.message and "user is not authorized" in err.value.message
    assert "token" in (err.value.hint or "")


@pytest.mark.parametrize(
    ("status", "expected"), [(401, "wants authentication"), (404, "is not a Kubeflow Pipelines API")]
)
def test_health_check_failures_are_fast_and_clear(api: FakeKfpApi, status: int, expected: str) -> None:
    api.fail_next[("GET", f"{API}/healthz")] = (status, "nope")
    started = time.monotonic()
    with pytest.raises(StoreError, match=expected) as err:
        kfp_client.list_schedules(api.url)
    assert time.monotonic() - started < 5, "must not wait for kfp's 5 x 5 s healthz retries"
    assert "port-forward" in (err.value.hint or "")
    assert len(api.requests_to("GET", f"{API}/healthz")) == 1


def test_missing_package_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        kfp_client.submit(
            "http://127.0.0.1:1",
            tmp_path / "nope.yaml",
            pipeline_name=PIPELINE,
            version_name=None,
            experiment=EXPERIMENT,
            run_name=None,
            parameters={},
        )


def test_host_and_token_helpers(tmp_path: Path) -> None:
    assert kfp_client.normalize_host("localhost:8080/") == "http://localhost:8080"
    assert kfp_client.normalize_host("kubeflow.example.com") == "https://kubeflow.example.com"
    with pytest.raises(ConfigError):
        kfp_client.normalize_host("http://localhost:notaport")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert kfp_client.resolve_token("explicit", {"KFP_TOKEN": "env"}) == "explicit"
    assert kfp_client.resolve_token(None, {"KFP_TOKEN": "env"}) == "env"
    assert kfp_client.resolve_token(None, {"KF_PIPELINES_SA_TOKEN_PATH": str(token_file)}) == "from-file"
    assert kfp_client.resolve_token(None, {}) is None
    with pytest.raises(ConfigError, match="cannot read the KFP token file"):
        kfp_client.resolve_token(None, {"KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "missing")})
