"""Manifests are confined: local rows stay inside the manifest's folder (or ingest.allowed_roots), remote
rows use allowed schemes and hosts. A refused row is quarantined with its reason and never opened or
fetched: checked with a real FIFO (reading it would block) and a real HTTP server that counts requests.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptflow.config import IngestConfig, load_settings
from adaptflow.contracts import Snapshot
from adaptflow.data.ingest import ingest
from adaptflow.errors import ConfigError, DataError
from fifo_guard import ingest_without_opening


def _png(path: Path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def _manifest(folder: Path, extra: list[tuple[str, str]]) -> Path:
    """Five good images per class inside ``folder`` (relative rows), then the ``extra`` rows."""
    rows = [(f"imgs/{label}/{i}.png", label) for label in ("a", "b") for i in range(5)]
    for n, (uri, _) in enumerate(rows):
        _png(folder / uri, n)
    path = folder / "m.csv"
    path.write_text("uri,label\n" + "".join(f"{uri},{label}\n" for uri, label in rows + extra))
    return path


def _refused(snap: Snapshot) -> dict[str, str]:
    return {q.uri: q.reason for q in snap.quarantined}


# --- local rows ---------------------------------------------------------------------------------


def test_local_rows_must_stay_inside_the_manifest_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "sub"
    _png(tmp_path / "x.png", 100)  # a real image, two levels up
    outside = tmp_path / "elsewhere"
    _png(outside / "kept.png", 101)
    fifo = outside / "pipe.png"
    os.mkfifo(fifo)
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "link.png").symlink_to(fifo)  # inside by name, outside once resolved
    manifest = _manifest(
        folder,
        [
            ("/etc/shadow", "a"),
            ("/proc/self/environ", "a"),
            ("../../x.png", "a"),
            ("imgs/link.png", "b"),
            ("file:///etc/passwd", "b"),
            (str(outside / "kept.png"), "b"),
            (str(folder / "imgs" / "a" / "0.png"), "a"),  # absolute, but inside: fine (a duplicate here)
        ],
    )

    snap = ingest_without_opening(manifest, IngestConfig(), fifo, "the manifest's folder")
    refused = _refused(snap)
    root = f"allowed: {folder}"
    assert refused["/etc/shadow"].startswith(f"m.csv row 11: /etc/shadow is outside the data root; {root}")
    assert refused["/proc/self/environ"].startswith(
        f"m.csv row 12: /proc/self/environ (resolves to /proc/{os.getpid()}/environ) is outside"
    )
    assert refused[f"{folder}/../../x.png"].startswith(
        f"m.csv row 13: {folder}/../../x.png (resolves to {tmp_path}/x.png) is outside"
    )
    assert refused[f"{folder}/imgs/link.png"].startswith(
        f"m.csv row 14: {folder}/imgs/link.png (resolves to {fifo}) is outside"
    )
    assert refused["/etc/passwd"].startswith("m.csv row 15: /etc/passwd is outside")
    assert refused[f"{outside}/kept.png"].endswith("(add its folder to ingest.allowed_roots to read it)")
    assert refused[f"{folder}/imgs/a/0.png"].startswith("duplicate content of")  # read: it is inside
    assert len(snap.entries) == 10
    assert all(e.uri.startswith(str(folder)) for e in snap.entries)

    # ingest.allowed_roots opens one more folder, and only that one
    snap = ingest_without_opening(
        manifest, IngestConfig(allowed_roots=(str(outside),)), fifo, "the manifest's folder"
    )
    assert str(outside / "kept.png") in {e.uri for e in snap.entries}
    refused = _refused(snap)
    assert refused[f"{folder}/imgs/link.png"] == f"m.csv row 14: {folder}/imgs/link.png: not a regular file"
    assert "/etc/shadow" in refused and f"{folder}/../../x.png" in refused


def test_jsonl_rows_are_confined_too(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _manifest(folder, [])
    jsonl = folder / "m.jsonl"
    lines = [f'{{"path": "imgs/{label}/{i}.png", "label": "{label}"}}' for label in "ab" for i in range(5)]
    jsonl.write_text("\n".join([*lines, '{"path": "/etc/shadow", "label": "a"}']) + "\n")
    refused = _refused(ingest(str(jsonl), IngestConfig()))
    assert list(refused) == ["/etc/shadow"]
    assert refused["/etc/shadow"].startswith("m.jsonl row 11: /etc/shadow is outside the data root")


# --- remote rows: a real HTTP server that counts what it is asked for ---------------------------


class _Server:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.requests: Counter[str] = Counter()
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    outer.requests[self.path] += 1
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{outer.port}/img/secret.png")
                    self.end_headers()
                    return
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # requests must reach this server, not a proxy
    files = {
        f"/img/{name}.png": _png(tmp_path / "served" / f"{name}.png", 200 + n) for n, name in enumerate("cde")
    }
    files["/img/secret.png"] = _png(tmp_path / "served" / "secret.png", 250)
    srv = _Server(files)
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    thread.join(5)


def test_remote_rows_need_an_allowed_scheme_and_are_never_fetched_otherwise(
    tmp_path: Path, server: _Server
) -> None:
    rows = [
        (server.url("/img/c.png"), "a"),
        (f"ftp://127.0.0.1:{server.port}/img/d.png", "b"),
        (f"gopher://127.0.0.1:{server.port}/img/e.png", "b"),
    ]
    snap = ingest(str(_manifest(tmp_path / "m", rows)), IngestConfig())  # default: s3 only
    refused = _refused(snap)
    assert refused[server.url("/img/c.png")] == (
        f"m.csv row 11: {server.url('/img/c.png')}: scheme 'http' is not in ingest.allowed_schemes (s3)"
    )
    assert "scheme 'ftp' is not in ingest.allowed_schemes" in refused[rows[1][0]]
    assert "scheme 'gopher' is not in ingest.allowed_schemes" in refused[rows[2][0]]
    assert server.requests == Counter()  # not one request reached the server
    assert len(snap.entries) == 10


def test_http_rows_are_fetched_only_from_allowed_hosts_and_redirects_stay_there(
    tmp_path: Path, server: _Server
) -> None:
    rows = [
        (server.url("/img/c.png"), "a"),  # allowed: fetched
        (server.url("/img/d.png", host="localhost"), "b"),  # the same server under another name: refused
        (server.url("/redirect"), "b"),  # allowed host, bouncing to localhost: refused at the bounce
        (f"https://127.0.0.1:{server.port}/img/e.png", "b"),  # https is not listed: refused
    ]
    cfg = IngestConfig(allowed_schemes=("s3", "http"), allowed_hosts=("127.0.0.1",))
    snap = ingest(str(_manifest(tmp_path / "m", rows)), cfg)

    assert server.requests == Counter({"/img/c.png": 1, "/redirect": 1})
    assert server.url("/img/c.png") in {e.uri for e in snap.entries}
    refused = _refused(snap)
    assert set(refused) == {rows[1][0], rows[2][0], rows[3][0]}
    assert "host 'localhost' is not in ingest.allowed_hosts (127.0.0.1)" in refused[rows[1][0]]
    assert refused[rows[2][0]].startswith("redirect: unreadable: ")
    assert f"redirects to http://localhost:{server.port}/img/secret.png" in refused[rows[2][0]]
    assert "scheme 'https' is not in ingest.allowed_schemes (s3, http)" in refused[rows[3][0]]


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("ingest.allowed_schemes=[ftp]", "unknown scheme(s) ['ftp']"),
        ("ingest.allowed_schemes=[S3]", "use lowercase names from s3, http, https"),
        ("ingest.allowed_schemes=[s3, http]", "allowed_hosts must name the hosts to trust"),
        ("ingest.allowed_roots=[data/images]", "must be absolute paths"),
    ],
)
def test_confinement_settings_are_validated(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"ingest") as info:
        load_settings(overrides=[override])
    assert fragment in str(info.value)


def test_defaults_allow_s3_only() -> None:
    cfg = load_settings(overrides=["ingest.allowed_hosts=[Example.COM]"]).ingest
    assert (cfg.allowed_schemes, cfg.allowed_hosts, cfg.allowed_roots) == (("s3",), ("example.com",), ())


def test_a_manifest_with_one_label_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _manifest(folder, [])
    one = folder / "one.csv"
    one.write_text("uri,label\n" + "".join(f"imgs/a/{i}.png,a\n" for i in range(5)))
    with pytest.raises(DataError, match=r"has only one class \('a'\)") as info:
        ingest(str(one), IngestConfig())
    assert info.value.hint and "a folder (or manifest label) per class" in info.value.hint
