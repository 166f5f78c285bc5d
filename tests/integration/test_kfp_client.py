"""adaptflow.kfp_client against a loopback fake of the KFP v2beta1 REST API (no cluster needed).

No ``from __future__ import annotations`` here: kfp reads the component's annotations as real types.
"""

import hashlib
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
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


@pytest.fixture(scope="module")
def typed_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline with a root input of every parameter type; text, count, items and options are required."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def consume(text: str, count: int, ratio: float, flag: bool, items: list, options: dict) -> str:
        return f"{text}{count}{ratio}{flag}{items}{options}"

    @dsl.pipeline(name="typed")
    def typed(
        text: str, count: int, items: list, options: dict, ratio: float = 0.5, flag: bool = False
    ) -> None:
        consume(text=text, count=count, ratio=ratio, flag=flag, items=items, options=options)

    path = tmp_path_factory.mktemp("kfp") / "typed.yaml"
    compiler.Compiler().compile(pipeline_func=typed, package_path=str(path))
    return path


@pytest.fixture(scope="module")
def k8s_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled with a Kubernetes setting: a pipeline-spec document, then a platform-spec document."""
    from kfp import compiler, dsl, kubernetes

    @dsl.component(base_image="python:3.11-slim")
    def echo(source_uri: str) -> str:
        return source_uri

    @dsl.pipeline(name="labelled")
    def labelled(source_uri: str = "data/") -> None:
        task = echo(source_uri=source_uri)
        kubernetes.add_pod_label(task, label_key="adaptflow.io/pipeline", label_value="true")

    path = tmp_path_factory.mktemp("kfp") / "labelled.yaml"
    compiler.Compiler().compile(pipeline_func=labelled, package_path=str(path))
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


@dataclass
class RetrySpy:
    """What a fast failure must not do: retry connections, sleep between tries, or reach kfp.Client."""

    connects: int = 0  # urllib3 connection attempts
    sleeps: list[float] = field(default_factory=list)  # kfp's healthz retries sleep 5 s between tries
    clients: int = 0  # kfp.Client constructions (its __init__ runs the retrying health check)


@pytest.fixture
def retry_spy(monkeypatch: pytest.MonkeyPatch) -> RetrySpy:
    import kfp
    import kfp.client.client as kfp_client_module
    import urllib3.util.connection as urllib3_connection

    spy = RetrySpy()
    real_time, real_connect, real_init = (
        kfp_client_module.time,
        urllib3_connection.create_connection,
        kfp.Client.__init__,
    )

    class _Time:  # kfp.client.client's `time`, with sleeps recorded instead of slept
        def __getattr__(self, name: str) -> Any:
            return getattr(real_time, name)

        def sleep(self, seconds: float) -> None:
            spy.sleeps.append(seconds)

    def connect(*args: Any, **kwargs: Any) -> Any:
        spy.connects += 1
        return real_connect(*args, **kwargs)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        spy.clients += 1
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(kfp_client_module, "time", _Time())
    monkeypatch.setattr(urllib3_connection, "create_connection", connect)
    monkeypatch.setattr(kfp.Client, "__init__", init)
    return spy


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
        ("0 0 25 * * 1", "the hours field '25' is not valid (values 0-23;"),
        ("0 0 3 * * 8", "the day-of-week field '8' is not valid (values 0-6 or SUN-SAT"),
        ("60 0 3 * * 1", "the seconds field '60' is not valid (values 0-59;"),
        ("0 0 3 0 * 1", "the day-of-month field '0' is not valid (values 1-31"),
        ("0 0 3 * 13 1", "the month field '13' is not valid (values 1-12 or JAN-DEC"),
        ("0 0 3 * * 1 2024", "it has 7 fields, expected 6"),  # croniter would take a year field
        ("0 0 3 * * FUNDAY", "the day-of-week field 'FUNDAY' is not valid"),
        ("0 0 3 1-x * *", "the day-of-month field '1-x' is not valid"),
        ("*/0 0 3 * * *", "the seconds field '*/0' is not valid"),
        ("0 0 3 * * 1,", "the day-of-week field '1,' is not valid"),
        ("? 0 3 * * 1", "the seconds field '?' is not valid"),
        # croniter's Quartz/Jenkins extensions, which robfig/cron (KFP) does not have
        ("0 0 3 L * *", "the day-of-month field 'L' uses L, W, # or H"),
        ("0 0 3 15W * *", "the day-of-month field '15W' uses L, W, # or H"),
        ("0 0 3 * * 1#2", "the day-of-week field '1#2' uses L, W, # or H"),
        ("0 0 3 * * 5L", "the day-of-week field '5L' uses L, W, # or H"),
        ("H 0 3 * * *", "the seconds field 'H' uses L, W, # or H"),
        ("0 0 3 * * 1#1,2", "the day-of-week field '1#1,2' uses L, W, # or H"),
        ("@sometimes", "unknown descriptor"),
        ("@every soon", "@every needs a duration"),
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


def test_hints_name_only_options_the_cli_has() -> None:
    """Every ``--option`` a kfp_client message or hint mentions is an option of some adaptflow command."""
    import typer.main

    from adaptflow.cli import app

    def options(command: Any) -> set[str]:  # a click Command (typer may vendor its own click)
        names = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for sub in getattr(command, "commands", {}).values():
            names |= options(sub)
        return names

    known = options(typer.main.get_command(app))
    sources = Path(kfp_client.__file__).parent.glob("kfp_*.py")  # kfp_client, kfp_connection, kfp_cron
    text = "".join(path.read_text() for path in sources)
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert mentioned, "the hints name options; the pattern found none"
    assert mentioned <= known, f"hints name options no adaptflow command has: {sorted(mentioned - known)}"


@pytest.mark.parametrize(
    "cron",
    [
        "0 0 3 * * 1",
        "0 0 9 ? * 2-6",
        "*/15 * * * * *",
        "0 30 4 * * MON-FRI",
        "0 0 0 1 jan,jul *",
        "0 0 3 * jul,aug wed,thu",
        "0 0 3 1-15/2 * *",
        "@daily",
        "@every 1h30m",
    ],
)
def test_valid_cron(cron: str) -> None:
    assert kfp_client.validate_cron(f"  {cron} ") == cron


def test_unreachable_host_is_a_clear_error(package: Path, retry_spy: RetrySpy) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
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
    # Fast = our one-shot preflight gave up: one connection attempt per call, no retry or backoff,
    # and kfp.Client (whose health check retries 5 times, 5 s apart) never started.
    assert retry_spy.connects == 3
    assert retry_spy.sleeps == []
    assert retry_spy.clients == 0


def test_refused_request_names_the_fix(api: FakeKfpApi, package: Path) -> None:
    api.fail_next[("POST", f"{API}/runs")] = (403, "user is not authorized")
    with pytest.raises(StoreError) as err:
        _submit(api, package)
    assert "HTTP 403" in err.value.message and "user is not authorized" in err.value.message
    assert "token" in (err.value.hint or "")


@pytest.mark.parametrize(
    ("status", "expected"), [(401, "wants authentication"), (404, "is not a Kubeflow Pipelines API")]
)
def test_health_check_failures_are_fast_and_clear(
    api: FakeKfpApi, status: int, expected: str, retry_spy: RetrySpy
) -> None:
    api.fail_next[("GET", f"{API}/healthz")] = (status, "nope")
    with pytest.raises(StoreError, match=expected) as err:
        kfp_client.list_schedules(api.url)
    assert "port-forward" in (err.value.hint or "")
    # must not wait for kfp's 5 x 5 s healthz retries: one request, no sleep, kfp.Client never built
    assert len(api.requests_to("GET", f"{API}/healthz")) == 1
    assert len(api.requests) == 1
    assert retry_spy.connects == 1
    assert retry_spy.sleeps == []
    assert retry_spy.clients == 0


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


# --------------------------------------------------------------------------- the fake refuses what KFP refuses
# Bad payloads posted straight to the fake (no adaptflow, no kfp.Client): each must get the API
# server's answer, HTTP 400 with gRPC code 3 (InvalidArgument) and its message.

CRON = {"cron_schedule": {"cron": "0 0 3 * * 1"}}
TYPED_OK: dict[str, Any] = {"text": "a", "count": 3, "items": ["x"], "options": {"k": 1}}


def _refused(response: requests.Response, message: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == 3, body
    assert message in body["message"], body["message"]


def _upload(api: FakeKfpApi, content: bytes, name: str = "p") -> requests.Response:
    return requests.post(
        f"{api.url}{API}/pipelines/upload",
        params={"name": name},
        files={"uploadfile": (f"{name}.yaml", content)},
        timeout=10,
    )


@dataclass
class Seeded:
    pipeline_id: str
    version_id: str
    experiment_id: str

    def run(self, parameters: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "display_name": "a run",
            "experiment_id": self.experiment_id,
            "pipeline_version_reference": {
                "pipeline_id": self.pipeline_id,
                "pipeline_version_id": self.version_id,
            },
            "runtime_config": {"parameters": parameters or {}},
        }
        body.update(extra)
        return body

    def recurring_run(self, parameters: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        body = self.run(
            parameters, display_name="a schedule", trigger=CRON, max_concurrency="1", mode="ENABLE"
        )
        body.update(extra)
        return body


def _seed(api: FakeKfpApi, package: Path) -> Seeded:
    uploaded = _upload(api, package.read_bytes())
    assert uploaded.status_code == 200, uploaded.text
    pipeline_id = uploaded.json()["pipeline_id"]
    (version_id,) = [v for v, version in api.versions.items() if version["pipeline_id"] == pipeline_id]
    experiment = requests.post(f"{api.url}{API}/experiments", json={"display_name": "e"}, timeout=10)
    assert experiment.status_code == 200, experiment.text
    return Seeded(pipeline_id, version_id, experiment.json()["experiment_id"])


def _post(api: FakeKfpApi, what: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{api.url}{API}/{what}", json=body, timeout=10)


@pytest.mark.parametrize("name", [None, ""], ids=["missing", "empty"])
@pytest.mark.parametrize(
    ("what", "message"),
    [
        (
            "runs",
            "Failed to create a new run: Failed to create a run due to invalid name: "
            "Invalid input error: The run name is empty. Please specify a valid name",
        ),
        (
            "recurringruns",
            "Failed to create a recurring run: Invalid input error: "
            "Recurring run name is empty. Please specify a valid name",
        ),
    ],
    ids=["run", "recurring-run"],
)
def test_fake_refuses_an_empty_display_name(
    api: FakeKfpApi, package: Path, what: str, message: str, name: str | None
) -> None:
    seeded = _seed(api, package)
    body = seeded.run() if what == "runs" else seeded.recurring_run()
    if name is None:
        del body["display_name"]
    else:
        body["display_name"] = name
    _refused(_post(api, what, body), message)
    assert api.runs == {} and api.recurring_runs == {}


_DROP = object()  # a _params() value that leaves the parameter out


def _params(**changes: Any) -> dict[str, Any]:
    """TYPED_OK with some values changed or dropped."""
    params = dict(TYPED_OK, **changes)
    return {k: v for k, v in params.items() if v is not _DROP}


NOT_NUMBER = "requires type double or integer, but the parameter value is not of number value type"


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        (_params(epochs=3), "parameter(s) provided are not required by pipeline: epochs"),
        (
            _params(text=_DROP),
            "parameter text is not optional, yet has neither default value nor user provided value",
        ),
        (
            _params(items=_DROP),
            "parameter items is not optional, yet has neither default value nor user provided value",
        ),
        (
            _params(text=3),
            "input parameter text requires type string, but the input parameter is not of string value type",
        ),
        (_params(text=None), "input parameter text requires type string"),
        (_params(count="3"), f"input parameter count {NOT_NUMBER}"),
        (_params(count=True), f"input parameter count {NOT_NUMBER}"),
        (
            _params(count=2.5),
            "input parameter count requires type integer, but the parameter value 2.5 is not whole",
        ),
        (_params(ratio="0.5"), f"input parameter ratio {NOT_NUMBER}"),
        (
            _params(flag="true"),
            "input parameter flag requires type bool, but the input parameter is not of bool value type",
        ),
        (_params(flag=1), "input parameter flag requires type bool"),
        (
            _params(items="x,y"),
            "input parameter items requires type list, but the input parameter is not of list value type",
        ),
        (
            _params(options=[]),
            "input parameter options requires type struct, but the input parameter is not of struct value type",
        ),
        (_params(options='{"k": 1}'), "input parameter options requires type struct"),
    ],
    ids=[
        "extra",
        "missing-string",
        "missing-list",
        "string-got-number",
        "string-got-null",
        "integer-got-string",
        "integer-got-bool",
        "integer-got-fraction",
        "double-got-string",
        "bool-got-string",
        "bool-got-number",
        "list-got-string",
        "struct-got-list",
        "struct-got-json-text",
    ],
)
@pytest.mark.parametrize(
    ("what", "prefix"),
    [
        (
            "runs",
            "Failed to create a new run: Failed to generate the ExecutionSpec: invalid pipeline job inputs",
        ),
        (
            "recurringruns",
            "Failed to create a recurring run: Failed to create a recurring run during scheduled workflow "
            "creation: invalid pipeline job inputs",
        ),
    ],
    ids=["run", "recurring-run"],
)
def test_fake_refuses_parameters_that_do_not_fit_the_pipeline(
    api: FakeKfpApi, typed_package: Path, what: str, prefix: str, parameters: dict[str, Any], problem: str
) -> None:
    seeded = _seed(api, typed_package)
    body = seeded.run(parameters) if what == "runs" else seeded.recurring_run(parameters)
    _refused(_post(api, what, body), f"{prefix}: Invalid input error: {problem}")
    assert api.runs == {} and api.recurring_runs == {}


@pytest.mark.parametrize("what", ["runs", "recurringruns"])
def test_fake_accepts_parameters_that_fit_the_pipeline(
    api: FakeKfpApi, typed_package: Path, what: str
) -> None:
    seeded = _seed(api, typed_package)
    for parameters in (
        TYPED_OK,  # ratio and flag have defaults
        _params(count=4.0, ratio=1, flag=True, items=[], options={}),  # 4.0 is whole; an integer is a double
    ):
        body = seeded.run(parameters) if what == "runs" else seeded.recurring_run(parameters)
        response = _post(api, what, body)
        assert response.status_code == 200, response.text
    assert len(api.runs) + len(api.recurring_runs) == 2


def test_fake_checks_an_inline_pipeline_spec_too(api: FakeKfpApi, typed_package: Path) -> None:
    experiment = requests.post(f"{api.url}{API}/experiments", json={"display_name": "e"}, timeout=10).json()
    spec = yaml.safe_load(typed_package.read_text())
    # kfp.Client sends the bare spec, or {pipeline_spec, platform_spec} when there is a platform spec
    for inline in (spec, {"pipeline_spec": spec, "platform_spec": {"platforms": {"kubernetes": {}}}}):
        body = {
            "display_name": "inline",
            "experiment_id": experiment["experiment_id"],
            "pipeline_spec": inline,
            "runtime_config": {"parameters": _params(count="3")},
        }
        _refused(_post(api, "runs", body), f"input parameter count {NOT_NUMBER}")
        body["runtime_config"] = {"parameters": TYPED_OK}
        assert _post(api, "runs", body).status_code == 200
    assert len(api.runs) == 2


def _docs(package: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(package.read_text()))


def _without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != key}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda spec: [_without(spec, "schemaVersion")],
            "KFP only supports schema version 2.1.0, but the pipeline spec has version ",
        ),
        (
            lambda spec: [dict(spec, schemaVersion="2.0.0")],
            "KFP only supports schema version 2.1.0, but the pipeline spec has version 2.0.0",
        ),
        (lambda spec: [_without(spec, "root")], "unknown template format"),
        (lambda spec: [_without(spec, "pipelineInfo")], "unknown template format"),
        (lambda spec: [spec, spec], "multiple pipeline specs provided"),
    ],
    ids=["no-schemaVersion", "old-schemaVersion", "no-root", "no-pipelineInfo", "two-specs"],
)
@pytest.mark.parametrize("what", ["upload", "upload_version"])
def test_fake_refuses_a_package_that_is_not_a_pipeline_spec(
    api: FakeKfpApi, package: Path, what: str, mutate: Any, message: str
) -> None:
    (spec,) = _docs(package)
    content = yaml.safe_dump_all(mutate(spec)).encode()
    if what == "upload":
        response = _upload(api, content)
    else:
        pipeline_id = _upload(api, package.read_bytes()).json()["pipeline_id"]
        response = requests.post(
            f"{api.url}{API}/pipelines/upload_version",
            params={"name": "v2", "pipelineid": pipeline_id},
            files={"uploadfile": ("v2.yaml", content)},
            timeout=10,
        )
    _refused(response, message)
    # nothing stored from the refused package
    assert len(api.pipelines) == (0 if what == "upload" else 1)
    assert len(api.versions) == len(api.pipelines)


def test_fake_accepts_the_compilers_two_document_package(api: FakeKfpApi, k8s_package: Path) -> None:
    spec, platform = _docs(k8s_package)
    assert "root" in spec and "kubernetes" in platform["platforms"]
    # as compiled, and with the platform spec first: the server picks the pipeline-spec document
    for name, docs in (("as-compiled", [spec, platform]), ("platform-first", [platform, spec])):
        response = _upload(api, yaml.safe_dump_all(docs).encode(), name=name)
        assert response.status_code == 200, response.text
        (version,) = [v for v in api.versions.values() if v["pipeline_id"] == response.json()["pipeline_id"]]
        assert version["pipeline_spec"] == spec


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        (
            {"cron_schedule": {}},
            "Invalid input error: the cron schedule of a recurring run needs a cron expression",
        ),
        ({"cron_schedule": {"cron": ""}}, "the cron schedule of a recurring run needs a cron expression"),
        ({"cron_schedule": {"cron": "   "}}, "the cron schedule of a recurring run needs a cron expression"),
        ({}, "a recurring run needs a trigger"),
        (None, "a recurring run needs a trigger"),
    ],
    ids=["cron-missing", "cron-empty", "cron-blank", "empty-trigger", "no-trigger"],
)
def test_fake_refuses_a_recurring_run_without_a_cron(
    api: FakeKfpApi, package: Path, trigger: dict[str, Any] | None, message: str
) -> None:
    body = _seed(api, package).recurring_run()
    if trigger is None:
        del body["trigger"]
    else:
        body["trigger"] = trigger
    _refused(_post(api, "recurringruns", body), message)
    assert api.recurring_runs == {}


# --------------------------------------------------------------------------- the client against the stricter fake


def test_a_refused_parameter_is_a_clear_error(api: FakeKfpApi, package: Path) -> None:
    with pytest.raises(StoreError) as err:
        _submit(api, package, parameters={"source_uri": "s3://bucket/images", "epochs": "3"})
    assert "could not start a run of pipeline 'adaptflow-tiny'" in err.value.message
    assert "HTTP 400" in err.value.message
    assert f"input parameter epochs {NOT_NUMBER}" in err.value.message
    assert api.runs == {}

    with pytest.raises(StoreError) as err:
        kfp_client.create_schedule(
            api.url,
            pipeline_name=PIPELINE,
            experiment=EXPERIMENT,
            job_name="nightly",
            cron="0 0 3 * * 1",
            parameters={"source_uri": "s3://bucket/images", "typo": 1},
        )
    assert "could not create schedule 'nightly'" in err.value.message and "HTTP 400" in err.value.message
    assert "parameter(s) provided are not required by pipeline: typo" in err.value.message
    assert api.recurring_runs == {}
