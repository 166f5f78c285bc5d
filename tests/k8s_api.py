"""A loopback Kubernetes API for tests: the few paths adaptflow's job client calls, with scripted statuses.

Implements, for any group/version/plural under ``/apis``: create, get and delete of a namespaced custom
object; and ``/api/v1`` lists of Events and Pods (label selector on pods). Each GET of a job moves it one
step along its script (a list of statuses; the last one sticks), and a step may run a callback (a test
uses one to play the worker: write the candidate to the artifact store). Started and stopped by the test.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CUSTOM = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)
CORE_LIST = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<what>events|pods)$")
TIME = "2026-01-01T00:00:00Z"


def condition(kind: str, reason: str, message: str, status: str = "True") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": TIME}


def event(
    name: str, reason: str, message: str, kind: str = "TrainJob", type_: str = "Normal"
) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{name}.{reason.lower()}", "uid": f"uid-{name}-{reason}"},
        "involvedObject": {"kind": kind, "name": name},
        "reason": reason,
        "message": message,
        "type": type_,
        "count": 1,
    }


def pod(name: str, labels: dict[str, str], reason: str | None = None, message: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Failed" if reason else "Running"}
    if reason:
        status.update(reason=reason, message=message)
    return {"metadata": {"name": name, "labels": labels}, "status": status}


@dataclass
class Step:
    """What the job looks like on one GET; ``then`` runs once, when the step is reached."""

    status: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    then: Callable[[], None] | None = None


@dataclass
class FakeCluster:
    script: list[Step] = field(default_factory=list)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    #: plural -> HTTP status every call on it gets: 404 (no such CRD installed), 403 (no RBAC)
    refuse: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _step: int = 0

    def advance(self, obj: dict[str, Any]) -> None:
        if not self.script:
            return
        step = self.script[min(self._step, len(self.script) - 1)]
        if self._step < len(self.script):
            self.events.extend(step.events)
            self.pods.extend(step.pods)
            if step.then:
                step.then()
        self._step += 1
        obj["status"] = step.status


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }


class _Handler(BaseHTTPRequestHandler):
    cluster: FakeCluster

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        c = self.cluster
        with c.lock:
            c.calls.append((method, url.path))
            if m := CUSTOM.match(url.path):
                key = (m["plural"], m["ns"], m["name"] or "")
                if code := c.refuse.get(m["plural"]):
                    reason = "NotFound" if code == 404 else "Forbidden"
                    return self._send(code, _status(code, reason, f"{method} {m['plural']}: {reason}"))
                if method == "POST" and not m["name"]:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    key = (m["plural"], m["ns"], body["metadata"]["name"])
                    if key in c.objects:
                        return self._send(409, _status(409, "AlreadyExists", f"{key[2]} already exists"))
                    body["metadata"].update(uid=f"uid-{key[2]}", resourceVersion="1", creationTimestamp=TIME)
                    c.objects[key] = body
                    c.created.append(json.loads(json.dumps(body)))
                    return self._send(201, body)
                if key not in c.objects:
                    return self._send(404, _status(404, "NotFound", f'{m["plural"]} "{key[2]}" not found'))
                if method == "GET":
                    c.advance(c.objects[key])
                    return self._send(200, c.objects[key])
                if method == "DELETE":
                    c.deleted.append(key[2])
                    del c.objects[key]
                    return self._send(200, _status(200, "", "deleted") | {"status": "Success"})
            if (m := CORE_LIST.match(url.path)) and method == "GET":
                if m["what"] == "events":
                    return self._send(
                        200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": c.events}
                    )
                selector = dict(s.split("=", 1) for s in query.get("labelSelector", [""])[0].split(",") if s)
                items = [p for p in c.pods if selector.items() <= p["metadata"].get("labels", {}).items()]
                return self._send(
                    200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                )
        self._send(404, _status(404, "NotFound", f"no route for {method} {url.path}"))

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")


@contextlib.contextmanager
def fake_kube_api(cluster: FakeCluster) -> Iterator[str]:
    """Serves ``cluster`` on a free loopback port; yields its URL."""
    handler = type("Handler", (_Handler,), {"cluster": cluster})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def write_kubeconfig(path: Path, server: str, namespace: str) -> Path:
    """A kubeconfig pointing at ``server``, as ``kubectl config`` would write it."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [
            {"name": "loopback", "context": {"cluster": "loopback", "user": "tester", "namespace": namespace}}
        ],
        "current-context": "loopback",
    }
    path.write_text(json.dumps(config))
    return path
