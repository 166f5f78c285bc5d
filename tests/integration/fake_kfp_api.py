"""A loopback fake of the Kubeflow Pipelines v2beta1 REST API, for testing ``adaptflow.kfp_client``.

It implements only what ``kfp.Client`` (kfp 2.17) calls for upload / run / schedule, keeps its state
in memory, records every request, and answers with bodies that ``kfp_server_api`` deserializes:

- ``GET  /apis/v2beta1/healthz``
- ``POST /apis/v2beta1/pipelines/upload`` and ``/pipelines/upload_version`` (multipart ``uploadfile``)
- ``GET  /apis/v2beta1/pipelines`` (``filter`` on display_name, as ``Client.get_pipeline_id`` sends it),
  ``GET /pipelines/{id}``, ``GET /pipelines/{id}/versions`` (``sort_by``, paging), ``GET .../versions/{vid}``
- ``POST/GET /apis/v2beta1/experiments``, ``GET /experiments/{id}``
- ``POST /apis/v2beta1/runs``, ``GET /runs/{id}``
- ``POST/GET /apis/v2beta1/recurringruns``, ``GET/DELETE /recurringruns/{id}``

Like the real API server (``backend/src/apiserver``: ``run_server.go``, ``job_server.go``,
``template/template.go`` and ``template/v2_template.go``), it refuses with HTTP 400 (gRPC code 3,
InvalidArgument) and a message worded like the server's:

- a run or recurring run with an empty or missing ``display_name``;
- ``runtime_config.parameters`` that do not match the root ``inputDefinitions.parameters`` of the
  pipeline spec it runs (``validatePipelineJobInputs``): an unknown name, a missing required one
  (neither ``isOptional`` nor a ``defaultValue``), or a value of the wrong JSON type;
- an uploaded package with no pipeline-spec document (``pipelineInfo.name`` and ``root``), more than
  one, or a ``schemaVersion`` other than 2.1.0; other documents (the platform spec that kfp writes
  after the pipeline spec) are skipped;
- a recurring run with no trigger, or a ``cron_schedule`` without a ``cron`` expression.

An inline ``pipeline_spec`` that is no pipeline spec is an HTTP 500, as on the server. One check is
stricter than the server: a fractional number for a NUMBER_INTEGER parameter is refused.

Usage::

    with FakeKfpApi() as api:
        client = kfp.Client(host=api.url)
        ...
        api.requests_to("POST", "/apis/v2beta1/runs")[0].body
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"

# grpc codes the real server puts in its error bodies
_GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}
_FILTER_OPS = {1: "EQUALS", 2: "NOT_EQUALS", 9: "IS_SUBSTRING"}
_SCHEMA_VERSION = "2.1.0"  # the only pipeline-spec schema the API server accepts

# Where the server's error messages come from, outermost wrapper first (util.Wrap joins with ": ").
_RUN_PREFIX = "Failed to create a new run"
_RECURRING_RUN_PREFIX = "Failed to create a recurring run"
_RUN_INPUTS_PREFIX = f"{_RUN_PREFIX}: Failed to generate the ExecutionSpec: invalid pipeline job inputs"
_RECURRING_RUN_INPUTS_PREFIX = (
    f"{_RECURRING_RUN_PREFIX}: Failed to create a recurring run during scheduled workflow creation: "
    "invalid pipeline job inputs"
)
_INVALID_INPUT = "Invalid input error"  # util.NewInvalidInputError's prefix
_RUN_NAME_EMPTY = "The run name is empty. Please specify a valid name"
_RECURRING_RUN_NAME_EMPTY = "Recurring run name is empty. Please specify a valid name"
_CRON_EMPTY = "the cron schedule of a recurring run needs a cron expression"
_UNKNOWN_TEMPLATE = "unknown template format"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any = None  # parsed JSON body, when there is one
    files: dict[str, bytes] = field(default_factory=dict)  # multipart file parts by field name
    filenames: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)  # JSON true is not a number


# parameterType -> (the type as the server's message words it, the JSON value check)
_PARAMETER_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "NUMBER_DOUBLE": ("double or integer", _is_number),
    "NUMBER_INTEGER": ("double or integer", _is_number),
    "STRING": ("string", lambda v: isinstance(v, str)),
    "BOOLEAN": ("bool", lambda v: isinstance(v, bool)),
    "LIST": ("list", lambda v: isinstance(v, list)),
    "STRUCT": ("struct", lambda v: isinstance(v, dict)),
}
_PARAMETER_TYPE_NAMES = {
    0: "PARAMETER_TYPE_ENUM_UNSPECIFIED",
    1: "NUMBER_DOUBLE",
    2: "NUMBER_INTEGER",
    3: "STRING",
    4: "BOOLEAN",
    5: "LIST",
    6: "STRUCT",
    7: "TASK_FINAL_STATUS",
    8: "TASK_CONFIG",
}


def _parameter_type_problem(name: str, parameter_type: Any, value: Any) -> str | None:
    """The API server's type check of one root input parameter (``validatePipelineJobInputs``)."""
    kind = parameter_type
    if isinstance(parameter_type, int):  # protojson also accepts the enum's number
        kind = _PARAMETER_TYPE_NAMES.get(parameter_type, "")
    if kind in (None, "", "PARAMETER_TYPE_ENUM_UNSPECIFIED"):
        return f"input parameter {name} has unspecified type"
    if kind == "TASK_FINAL_STATUS":
        return f"input parameter {name} requires type TASK_FINAL_STATUS, which is invalid for root component"
    if kind not in _PARAMETER_CHECKS:
        return f"input parameter {name} requires type unknown"
    word, check = _PARAMETER_CHECKS[kind]
    if not check(value):
        if kind.startswith("NUMBER_"):
            return (
                f"input parameter {name} requires type {word}, "
                "but the parameter value is not of number value type"
            )
        return f"input parameter {name} requires type {word}, but the input parameter is not of {word} value type"
    if kind == "NUMBER_INTEGER" and isinstance(value, float) and not value.is_integer():
        # Stricter than the API server, whose protobuf Values are all doubles and which lets 2.5
        # through for an integer; a fractional value for an int parameter is always a caller bug.
        return f"input parameter {name} requires type integer, but the parameter value {value!r} is not whole"
    return None


def pipeline_job_inputs_problem(spec: dict[str, Any], runtime_config: Any) -> str | None:
    """Why ``runtime_config`` does not fit the root inputs of ``spec``, or None when it does.

    The checks and their messages follow the API server's ``validatePipelineJobInputs``; parameters are
    visited in the spec's order (the server walks a Go map, so its choice among several problems varies).
    """
    declared = _mapping(_mapping(_mapping(spec.get("root")).get("inputDefinitions")).get("parameters"))
    given = _mapping(runtime_config).get("parameters") or {}
    if not isinstance(given, dict):
        return "runtime_config.parameters must be a JSON object of parameter name to value"
    for name, value in declared.items():
        definition = _mapping(value)
        if name not in given:
            if not definition.get("isOptional") and "defaultValue" not in definition:
                return (
                    f"parameter {name} is not optional, yet has neither default value nor user provided value"
                )
            continue
        problem = _parameter_type_problem(name, definition.get("parameterType"), given[name])
        if problem is not None:
            return problem
    extra = [name for name in given if name not in declared]
    if extra:
        return f"parameter(s) provided are not required by pipeline: {', '.join(extra)}"
    return None


def _is_pipeline_spec(doc: dict[str, Any]) -> bool:
    """The server's ``isPipelineSpec``: a document with a non-empty pipelineInfo.name and a root."""
    info = doc.get("pipelineInfo")
    return isinstance(info, dict) and bool(info.get("name")) and isinstance(doc.get("root"), dict)


def parse_pipeline_package(content: bytes) -> dict[str, Any]:
    """The pipeline spec of a compiled package, refused (400) where ``template.New`` refuses it.

    ``kfp`` compiles to one YAML document, or two when the pipeline has Kubernetes settings: the
    pipeline spec, then a platform spec (``platforms: {kubernetes: ...}``). Like the server, pick the
    one pipeline-spec document, whatever its position, and skip the others.
    """
    try:
        docs = [doc for doc in yaml.safe_load_all(content.decode("utf-8")) if doc is not None]
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _ApiError(400, f"unable to decode yaml document: {exc}") from exc
    if any(not isinstance(doc, dict) for doc in docs):
        raise _ApiError(400, "unable to decode yaml document: a document is not a mapping")
    specs = [doc for doc in docs if _is_pipeline_spec(doc)]
    if not specs:
        raise _ApiError(
            400,
            f"{_UNKNOWN_TEMPLATE}: no document is a v2 pipeline spec (one needs pipelineInfo.name and root)",
        )
    if len(specs) > 1:
        raise _ApiError(400, "multiple pipeline specs provided")
    spec = specs[0]
    version = spec.get("schemaVersion") or ""
    if version != _SCHEMA_VERSION:
        raise _ApiError(
            400,
            f"KFP only supports schema version {_SCHEMA_VERSION}, but the pipeline spec has version {version}",
        )
    return spec


class FakeKfpApi:
    """In-memory KFP API on 127.0.0.1:<free port>; ``start()``/``stop()`` or use as a context manager."""

    def __init__(self, *, multi_user: bool = False) -> None:
        self.multi_user = multi_user
        self.requests: list[RecordedRequest] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}  # version id -> version (with pipeline_id)
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        # (method, path) -> (status, message): answer once with this error instead of the real handler.
        self.fail_next: dict[tuple[str, str], tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._clock = itertools.count()
        self._epoch = datetime.now(UTC).replace(microsecond=0)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeKfpApi:
        fake = self

        class Handler(_Handler):
            api = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-kfp-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeKfpApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """Recorded requests with this method and exact path (no query)."""
        return [r for r in self.requests if r.method == method and r.path == path]

    # ------------------------------------------------------------------ helpers

    def _now(self) -> str:
        """Strictly increasing RFC3339 timestamps, so "created_at desc" ordering is well defined."""
        return (self._epoch + timedelta(seconds=next(self._clock))).strftime("%Y-%m-%dT%H:%M:%SZ")

    @staticmethod
    def _new_id() -> str:
        return str(uuid.uuid4())

    @staticmethod
    def _matches(item: dict[str, Any], raw_filter: str | None) -> bool:
        if not raw_filter:
            return True
        try:
            predicates = json.loads(raw_filter).get("predicates", [])
        except (ValueError, AttributeError) as exc:
            raise _ApiError(400, f"invalid filter: {raw_filter}") from exc
        for predicate in predicates:
            op = predicate.get("operation")
            op = _FILTER_OPS.get(op, op) if isinstance(op, int) else op
            key = predicate.get("key")
            want = predicate.get("stringValue", predicate.get("string_value"))
            have = item.get(key)
            if op == "EQUALS":
                ok = have == want
            elif op == "NOT_EQUALS":
                ok = have != want
            elif op == "IS_SUBSTRING":
                ok = want is not None and have is not None and str(want) in str(have)
            else:
                raise _ApiError(400, f"filter operation {op!r} not supported by the fake")
            if not ok:
                return False
        return True

    @staticmethod
    def _page(
        items: list[dict[str, Any]], query: dict[str, list[str]], key: str, *, total: bool = True
    ) -> dict[str, Any]:
        sort_by = (query.get("sort_by") or [""])[0].strip()
        if sort_by:
            field_name, _, direction = sort_by.partition(" ")
            items = sorted(
                items, key=lambda i: str(i.get(field_name, "")), reverse=direction.lower() == "desc"
            )
        size = int((query.get("page_size") or ["0"])[0] or 0) or len(items) or 1
        offset = int((query.get("page_token") or ["0"])[0] or 0)
        page = items[offset : offset + size]
        body: dict[str, Any] = {key: page}
        if total:
            body["total_size"] = len(items)
        if offset + size < len(items):
            body["next_page_token"] = str(offset + size)
        return body

    # ------------------------------------------------------------------ routes

    def handle(self, req: RecordedRequest) -> tuple[int, Any]:
        method, path, q = req.method, req.path, req.query
        if not path.startswith(API):
            raise _ApiError(404, f"no route for {path}")
        parts = path[len(API) :].strip("/").split("/")
        head = parts[0]

        if method == "GET" and parts == ["healthz"]:
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}

        if head == "pipelines":
            if method == "POST" and parts == ["pipelines", "upload"]:
                return 200, self._upload_pipeline(req)
            if method == "POST" and parts == ["pipelines", "upload_version"]:
                return 200, self._upload_version(req)
            if method == "GET" and len(parts) == 1:
                namespace = req.param("namespace")
                items = [
                    p
                    for p in self.pipelines.values()
                    if self._matches(p, req.param("filter"))
                    and (not namespace or p.get("namespace") == namespace)
                ]
                return 200, self._page(items, q, "pipelines")
            if len(parts) >= 2:
                pipeline = self.pipelines.get(parts[1])
                if pipeline is None:
                    raise _ApiError(404, f"Pipeline {parts[1]} not found")
                if method == "GET" and len(parts) == 2:
                    return 200, pipeline
                if method == "GET" and parts[2:] == ["versions"]:
                    items = [
                        v
                        for v in self.versions.values()
                        if v["pipeline_id"] == parts[1] and self._matches(v, req.param("filter"))
                    ]
                    return 200, self._page(items, q, "pipeline_versions")
                if method == "GET" and len(parts) == 4 and parts[2] == "versions":
                    version = self.versions.get(parts[3])
                    if version is None or version["pipeline_id"] != parts[1]:
                        raise _ApiError(404, f"PipelineVersion {parts[3]} not found")
                    return 200, version

        if head == "experiments":
            if method == "POST" and len(parts) == 1:
                body = req.body or {}
                name = body.get("display_name")
                if not name:
                    raise _ApiError(400, "Experiment must have a non-empty name")
                if any(e["display_name"] == name for e in self.experiments.values()):
                    raise _ApiError(409, f"Experiment {name} already exists")
                experiment = {
                    "experiment_id": self._new_id(),
                    "display_name": name,
                    "description": body.get("description") or "",
                    "created_at": self._now(),
                    "namespace": body.get("namespace") or "",
                    "storage_state": "AVAILABLE",
                }
                self.experiments[experiment["experiment_id"]] = experiment
                return 200, experiment
            if method == "GET" and len(parts) == 1:
                items = [e for e in self.experiments.values() if self._matches(e, req.param("filter"))]
                return 200, self._page(items, q, "experiments")
            if method == "GET" and len(parts) == 2:
                if parts[1] not in self.experiments:
                    raise _ApiError(404, f"Experiment {parts[1]} not found")
                return 200, self.experiments[parts[1]]

        if head == "runs":
            if method == "POST" and len(parts) == 1:
                return 200, self._create_run(req.body or {})
            if method == "GET" and len(parts) == 2:
                if parts[1] not in self.runs:
                    raise _ApiError(404, f"Run {parts[1]} not found")
                return 200, self.runs[parts[1]]

        if head == "recurringruns":
            if method == "POST" and len(parts) == 1:
                return 200, self._create_recurring_run(req.body or {})
            if method == "GET" and len(parts) == 1:
                experiment_id = req.param("experiment_id")
                items = [
                    r
                    for r in self.recurring_runs.values()
                    if (not experiment_id or r["experiment_id"] == experiment_id)
                    and self._matches(r, req.param("filter"))
                ]
                # kfp_server_api maps V2beta1ListRecurringRunsResponse.recurring_runs to "recurringRuns".
                return 200, self._page(items, q, "recurringRuns")
            if len(parts) == 2:
                if parts[1] not in self.recurring_runs:
                    raise _ApiError(404, f"RecurringRun {parts[1]} not found")
                if method == "GET":
                    return 200, self.recurring_runs[parts[1]]
                if method == "DELETE":
                    del self.recurring_runs[parts[1]]
                    return 200, {}

        raise _ApiError(404, f"no route for {method} {path}")

    def _version(
        self, pipeline_id: str, name: str, req: RecordedRequest, spec: dict[str, Any]
    ) -> dict[str, Any]:
        version: dict[str, Any] = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self._new_id(),
            "display_name": name,
            "name": name,
            "description": req.param("description") or "",
            "created_at": self._now(),
            "pipeline_spec": spec,
        }
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _upload_pipeline(self, req: RecordedRequest) -> dict[str, Any]:
        if "uploadfile" not in req.files:
            raise _ApiError(400, "Failed to read pipeline from file: no uploadfile")
        name = req.param("display_name") or req.param("name") or req.filenames.get("uploadfile", "")
        # validated before anything is stored: a refused package leaves no pipeline behind
        spec = parse_pipeline_package(req.files["uploadfile"])
        if any(p["display_name"] == name for p in self.pipelines.values()):
            raise _ApiError(409, f"Failed to create a pipeline: pipeline with name {name} already exists")
        pipeline = {
            "pipeline_id": self._new_id(),
            "display_name": name,
            "name": name,
            "description": req.param("description") or "",
            "created_at": self._now(),
            "namespace": req.param("namespace") or "",
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        # KFP names the first version after the pipeline
        self._version(pipeline["pipeline_id"], name, req, spec)
        return pipeline

    def _upload_version(self, req: RecordedRequest) -> dict[str, Any]:
        if "uploadfile" not in req.files:
            raise _ApiError(400, "Failed to read pipeline version from file: no uploadfile")
        pipeline_id = req.param("pipelineid") or ""
        if pipeline_id not in self.pipelines:
            raise _ApiError(404, f"Pipeline {pipeline_id} not found")
        name = req.param("display_name") or req.param("name") or ""
        if not name:
            raise _ApiError(400, "pipeline version name is empty")
        spec = parse_pipeline_package(req.files["uploadfile"])
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            raise _ApiError(409, f"pipeline version {name} already exists")
        return self._version(pipeline_id, name, req, spec)

    def _check_reference(self, body: dict[str, Any], manifest_error: str) -> dict[str, Any]:
        """The pipeline spec a run or recurring run refers to (a stored version's, or its inline one).

        The server reads an inline spec as a manifest, and a bad one is an internal error (HTTP 500)
        wrapped in ``manifest_error``.
        """
        if body.get("experiment_id") and body["experiment_id"] not in self.experiments:
            raise _ApiError(404, f"Experiment {body['experiment_id']} not found")
        ref = body.get("pipeline_version_reference") or {}
        if ref:
            version = self.versions.get(ref.get("pipeline_version_id", ""))
            if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
                raise _ApiError(404, f"PipelineVersion {ref.get('pipeline_version_id')} not found")
            spec: dict[str, Any] = version["pipeline_spec"]
            return spec
        inline = body.get("pipeline_spec")
        if not inline:
            raise _ApiError(400, "a run needs a pipeline_version_reference or a pipeline_spec")
        # kfp sends {"pipeline_spec": ..., "platform_spec": ...} when the package has a platform spec
        if isinstance(inline, dict) and isinstance(inline.get("pipeline_spec"), dict):
            inline = inline["pipeline_spec"]
        try:
            return parse_pipeline_package(json.dumps(inline).encode())  # JSON is YAML
        except _ApiError as exc:
            raise _ApiError(500, f"{manifest_error}: {exc.message}") from exc

    def _create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("display_name"):
            raise _ApiError(
                400,
                f"{_RUN_PREFIX}: Failed to create a run due to invalid name: {_INVALID_INPUT}: {_RUN_NAME_EMPTY}",
            )
        spec = self._check_reference(
            body, f"{_RUN_PREFIX}: InternalServerError: Failed to create a run due to error fetching manifest"
        )
        problem = pipeline_job_inputs_problem(spec, body.get("runtime_config"))
        if problem is not None:
            raise _ApiError(400, f"{_RUN_INPUTS_PREFIX}: {_INVALID_INPUT}: {problem}")
        run = dict(body)
        run.update(
            run_id=self._new_id(),
            created_at=self._now(),
            state="PENDING",
            storage_state="AVAILABLE",
        )
        self.runs[run["run_id"]] = run
        return run

    def _create_recurring_run(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("display_name"):
            raise _ApiError(400, f"{_RECURRING_RUN_PREFIX}: {_INVALID_INPUT}: {_RECURRING_RUN_NAME_EMPTY}")
        spec = self._check_reference(
            body,
            f"{_RECURRING_RUN_PREFIX}: InternalServerError: "
            "Failed to create a recurring run with an invalid pipeline spec manifest",
        )
        trigger = body.get("trigger") or {}
        cron_schedule = trigger.get("cron_schedule")
        if cron_schedule is None and not trigger.get("periodic_schedule"):
            raise _ApiError(400, "a recurring run needs a trigger")
        if cron_schedule is not None:
            cron = cron_schedule.get("cron") if isinstance(cron_schedule, dict) else None
            if not isinstance(cron, str) or not cron.strip():
                raise _ApiError(400, f"{_RECURRING_RUN_PREFIX}: {_INVALID_INPUT}: {_CRON_EMPTY}")
        concurrency = int(body.get("max_concurrency") or 0)
        if not 1 <= concurrency <= 10:
            raise _ApiError(400, "max concurrency of the recurring run should be in the range of [1, 10]")
        problem = pipeline_job_inputs_problem(spec, body.get("runtime_config"))
        if problem is not None:
            raise _ApiError(400, f"{_RECURRING_RUN_INPUTS_PREFIX}: {_INVALID_INPUT}: {problem}")
        recurring = dict(body)
        now = self._now()
        recurring.update(
            recurring_run_id=self._new_id(),
            created_at=now,
            updated_at=now,
            max_concurrency=str(concurrency),  # int64 fields travel as strings in KFP's JSON
            status="ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED",
        )
        self.recurring_runs[recurring["recurring_run_id"]] = recurring
        return recurring


class _Handler(BaseHTTPRequestHandler):
    api: FakeKfpApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _record(self) -> RecordedRequest:
        parsed = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        req = RecordedRequest(
            method=self.command,
            path=parsed.path,
            query=parse_qs(parsed.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        ctype = self.headers.get("Content-Type", "")
        if raw and ctype.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw
            )
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if isinstance(name, str):
                    payload = part.get_payload(decode=True)
                    req.files[name] = payload if isinstance(payload, bytes) else b""
                    filename = part.get_filename()
                    if filename:
                        req.filenames[name] = filename
        elif raw:
            try:
                req.body = json.loads(raw)
            except ValueError:
                req.body = raw.decode("utf-8", "replace")
        return req

    def _dispatch(self) -> None:
        req = self._record()
        api = self.api
        with api._lock:
            api.requests.append(req)
            failure = api.fail_next.pop((req.method, req.path), None)
            try:
                if failure is not None:
                    raise _ApiError(*failure)
                status, body = api.handle(req)
            except _ApiError as exc:
                status = exc.status
                body = {
                    "error": exc.message,
                    "code": _GRPC.get(exc.status, 2),
                    "message": exc.message,
                    "details": [],
                }
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _dispatch


__all__ = ["API", "FakeKfpApi", "RecordedRequest"]
