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

    def _version(self, pipeline_id: str, name: str, req: RecordedRequest) -> dict[str, Any]:
        content = req.files.get("uploadfile", b"")
        try:
            # a compiled package is the pipeline spec, optionally followed by a platform (Kubernetes) spec
            spec = next(yaml.safe_load_all(content.decode("utf-8")))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise _ApiError(400, f"invalid pipeline spec: {exc}") from exc
        if not isinstance(spec, dict) or "pipelineInfo" not in spec:
            raise _ApiError(400, "invalid pipeline spec: no pipelineInfo")
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
        self._version(pipeline["pipeline_id"], name, req)  # KFP names the first version after the pipeline
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
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            raise _ApiError(409, f"pipeline version {name} already exists")
        return self._version(pipeline_id, name, req)

    def _check_reference(self, body: dict[str, Any]) -> None:
        if body.get("experiment_id") and body["experiment_id"] not in self.experiments:
            raise _ApiError(404, f"Experiment {body['experiment_id']} not found")
        ref = body.get("pipeline_version_reference") or {}
        if ref:
            version = self.versions.get(ref.get("pipeline_version_id", ""))
            if version is None or version["pipeline_id"] != ref.get("pipeline_id"):
                raise _ApiError(404, f"PipelineVersion {ref.get('pipeline_version_id')} not found")
        elif not body.get("pipeline_spec"):
            raise _ApiError(400, "a run needs a pipeline_version_reference or a pipeline_spec")

    def _create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_reference(body)
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
        self._check_reference(body)
        trigger = body.get("trigger") or {}
        if not trigger.get("cron_schedule") and not trigger.get("periodic_schedule"):
            raise _ApiError(400, "a recurring run needs a trigger")
        concurrency = int(body.get("max_concurrency") or 0)
        if not 1 <= concurrency <= 10:
            raise _ApiError(400, "max concurrency of the recurring run should be in the range of [1, 10]")
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
