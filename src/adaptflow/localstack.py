"""A production-like MLflow stack on loopback: PostgreSQL + moto S3 + ``mlflow server``.

``stack_up`` starts the three services as detached processes under one root folder
(default ``.adaptflow/stack``), waits until each one is healthy and returns the environment a
client needs. ``stack_down`` stops them and keeps every byte of data: PostgreSQL keeps its data
folder, and because moto keeps S3 in memory only, the buckets are snapshotted to
``<root>/s3-snapshot/`` on the way down and restored on the way up.

Layout under the root::

    stack.json        ports (reused on restart), pids
    pg-password       the database password, generated once (mode 0600)
    pg/               the PostgreSQL data folder (initdb once)
    s3-snapshot/      <bucket>/manifest.json + <bucket>/blobs/<sha256(key)>
    logs/             postgres.log, moto.log, mlflow.log

PostgreSQL refuses to run as root. When this process is root, the server runs as the
``postgres`` system user (or ``adaptflow-pg``, created on demand); the root folder's parents
must then be searchable by that user.

Command line: ``python -m adaptflow.localstack up|down|status|snapshot [--root DIR]``; ``up``
prints ``export VAR=value`` lines on stdout, so ``eval "$(python -m adaptflow.localstack up)"``
works. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptflow.errors import StoreError

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(".adaptflow/stack")
STATE_FILE = "stack.json"
SNAPSHOT_DIR = "s3-snapshot"
PG_DB = "mlflow"
PG_SUPERUSER = "adaptflow"
FALLBACK_PG_OS_USER = "adaptflow-pg"
# Dummy credentials: moto accepts anything. They only ever reach the child processes' environment
# and the printed exports; they are not secrets.
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
SERVICES = ("postgres", "s3", "mlflow")


@dataclass(frozen=True)
class StackConfig:
    """Where the stack lives and how it listens. Ports left ``None`` are picked free on first start
    and then persisted in ``<root>/stack.json``, so a restart reuses them."""

    root: Path = DEFAULT_ROOT
    postgres_port: int | None = None
    s3_port: int | None = None
    mlflow_port: int | None = None
    artifacts_bucket: str = "adaptflow-artifacts"
    data_bucket: str = "adaptflow-data"
    region: str = "us-east-1"
    pg_bin_dir: Path | None = None  # None: found by find_pg_bin_dir()
    pg_os_user: str | None = None  # None: current user, or postgres/adaptflow-pg when root
    mlflow_workers: int = 1
    python: str = field(default_factory=lambda: sys.executable)
    startup_timeout_s: float = 90.0
    stop_timeout_s: float = 30.0

    @property
    def root_dir(self) -> Path:
        return Path(self.root).expanduser().resolve()

    @property
    def state_path(self) -> Path:
        return self.root_dir / STATE_FILE

    @property
    def pg_dir(self) -> Path:
        return self.root_dir / "pg"

    @property
    def logs_dir(self) -> Path:
        return self.root_dir / "logs"

    @property
    def snapshot_dir(self) -> Path:
        return self.root_dir / SNAPSHOT_DIR

    def log_path(self, service: str) -> Path:
        return self.logs_dir / f"{service}.log"


@dataclass(frozen=True)
class StackInfo:
    """What a client needs: URLs, bucket names and the env vars to export."""

    config: StackConfig
    ports: dict[str, int]
    tracking_uri: str
    s3_endpoint_url: str
    artifacts_bucket: str
    data_bucket: str
    env: dict[str, str]

    def s3_client(self) -> Any:
        """A boto3 S3 client for this stack's endpoint (path-style, the stack's dummy credentials)."""
        return _s3(self.s3_endpoint_url, self.env["AWS_DEFAULT_REGION"])

    def exports(self) -> str:
        """``export VAR=value`` lines, quoted for a POSIX shell."""
        return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in self.env.items())


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    port: int | None
    log: Path


# ---------------------------------------------------------------------------------------------
# Reachability helpers (usable without the stack)


def check_s3_reachable(endpoint_url: str, timeout: float = 5.0, region: str = "us-east-1") -> None:
    """Raises StoreError naming ``endpoint_url`` when the S3 endpoint cannot list buckets."""
    try:
        _s3(endpoint_url, region, timeout=timeout, attempts=1).list_buckets()
    except Exception as error:  # botocore raises many types; all mean "cannot use this endpoint"
        raise StoreError(
            f"S3 endpoint {endpoint_url} is unreachable: {error}",
            hint="start the local stack (make stack-up), or fix ADAPTFLOW_S3_ENDPOINT_URL / "
            "MLFLOW_S3_ENDPOINT_URL and the AWS credentials",
        ) from None


def find_pg_bin_dir(preferred: Path | None = None) -> Path | None:
    """The folder holding ``initdb``/``postgres``/``pg_isready``, or None when PostgreSQL is absent.

    Looks at ``preferred``, ``$ADAPTFLOW_PG_BIN``, ``/usr/lib/postgresql/<newest>/bin``, then PATH."""
    candidates: list[Path] = []
    if preferred is not None:
        candidates.append(Path(preferred))
    if env_bin := os.environ.get("ADAPTFLOW_PG_BIN"):
        candidates.append(Path(env_bin))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.split(".")[0].isdigit()]
        versions.sort(key=lambda p: int(p.name.split(".")[0]), reverse=True)
        candidates.extend(v / "bin" for v in versions)
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "postgres", "pg_isready", "psql")):
            return folder
    return None


# ---------------------------------------------------------------------------------------------
# State file


def _load_state(cfg: StackConfig) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(cfg.state_path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(
            f"cannot read the stack state {cfg.state_path}: {error}",
            hint="fix or delete the file (ports will be picked again; data is kept)",
        ) from None
    return data


def _pg_password(cfg: StackConfig) -> str:
    """The database password, generated once and kept in ``<root>/pg-password`` (mode 0600)."""
    path = cfg.root_dir / "pg-password"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    password = secrets.token_urlsafe(24)
    cfg.root_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def _save_state(cfg: StackConfig, state: Mapping[str, Any]) -> None:
    cfg.root_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.state_path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, cfg.state_path)


@contextlib.contextmanager
def _stack_lock(cfg: StackConfig) -> Iterator[None]:
    from filelock import FileLock, Timeout

    cfg.root_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cfg.root_dir / "stack.lock"))
    try:
        lock.acquire(timeout=cfg.startup_timeout_s + cfg.stop_timeout_s)
    except Timeout:
        raise StoreError(
            f"another stack-up/stack-down holds {cfg.root_dir / 'stack.lock'}",
            hint="wait for it to finish, or remove the lock file if no such process runs",
        ) from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# Processes


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int | None, marker: str) -> bool:
    """True when ``pid`` runs and its command line holds ``marker`` (guards against pid reuse)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not Path("/proc").is_dir():
        return True
    return marker in _cmdline(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if _is_zombie(pid):
            return True
        time.sleep(0.1)
    return False


def _markers(cfg: StackConfig, ports: Mapping[str, int]) -> dict[str, str]:
    return {
        "postgres": str(cfg.pg_dir),
        "s3": f"moto.server -H 127.0.0.1 -p {ports['s3']}",
        "mlflow": f"--port {ports['mlflow']}",
    }


def _open_log(cfg: StackConfig, service: str) -> int:
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.log_path(service), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"\n==== adaptflow localstack: starting {service} at {time.ctime()} ====\n".encode())
    return fd


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _spawn(
    cfg: StackConfig,
    service: str,
    argv: list[str],
    env: Mapping[str, str],
    user: str | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    fd = _open_log(cfg, service)
    log.info("starting %s: %s (log %s)", service, shlex.join(argv), cfg.log_path(service))
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            user=user,
            group=_primary_group(user) if user else None,
            extra_groups=[] if user else None,
        )
    except OSError as error:
        raise StoreError(
            f"cannot start {service} ({argv[0]}): {error}", hint=f"see {cfg.log_path(service)}"
        ) from None
    finally:
        os.close(fd)


def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _terminate(service: str, pid: int, sig: int, group: bool, timeout: float) -> None:
    log.info("stopping %s (pid %d)", service, pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    if not _wait_gone(pid, timeout):
        log.warning("%s (pid %d) did not stop in %.0f s; killing it", service, pid, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    if group:  # stragglers in the group (uvicorn workers, postgres backends)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    return {key: os.environ[key] for key in keep if key in os.environ}


def _resolve_pg_user(cfg: StackConfig) -> str | None:
    """The OS user PostgreSQL runs as; None means "this process's user"."""
    if cfg.pg_os_user:
        return cfg.pg_os_user
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", FALLBACK_PG_OS_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    useradd = shutil.which("useradd")
    if not useradd:
        raise StoreError(
            "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as",
            hint="create an unprivileged user and pass StackConfig(pg_os_user=...), or run as non-root",
        )
    log.info("creating system user %s to run PostgreSQL (it refuses to run as root)", FALLBACK_PG_OS_USER)
    done = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_PG_OS_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise StoreError(
            f"cannot create the system user {FALLBACK_PG_OS_USER}: {done.stderr.strip()}",
            hint="create an unprivileged user and pass StackConfig(pg_os_user=...)",
        )
    return FALLBACK_PG_OS_USER


def _check_reachable_by(user: str, folder: Path) -> None:
    """PostgreSQL, running as ``user``, must be able to reach and write its data folder."""
    ok = subprocess.run(["test", "-w", str(folder), "-a", "-x", str(folder)], user=user, check=False)
    if ok.returncode == 0:
        return
    for parent in [*reversed(folder.parents), folder]:
        if subprocess.run(["test", "-x", str(parent)], user=user, check=False).returncode != 0:
            raise StoreError(
                f"PostgreSQL runs as user {user!r} (it refuses root) but cannot enter {parent}",
                hint=f"chmod o+x {parent}, or put the stack root somewhere {user!r} can reach",
            )
    raise StoreError(f"PostgreSQL runs as user {user!r} but cannot write {folder}")


def _pg_tool(bin_dir: Path, tool: str) -> str:
    return str(bin_dir / tool)


def _init_postgres(cfg: StackConfig, bin_dir: Path, user: str | None, password: str) -> None:
    pg = cfg.pg_dir
    if (pg / "PG_VERSION").is_file():
        return
    pg.mkdir(parents=True, exist_ok=True)
    if any(pg.iterdir()):
        raise StoreError(
            f"{pg} is not empty but holds no PostgreSQL cluster (no PG_VERSION)",
            hint="move it away; stack-up runs initdb there",
        )
    init_dir = cfg.root_dir / "pg-init"
    init_dir.mkdir(exist_ok=True)
    pwfile = init_dir / "pwfile"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        for path in (pg, init_dir, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(pg, 0o700)
        _check_reachable_by(user, pg)
    argv = [
        _pg_tool(bin_dir, "initdb"),
        "-D",
        str(pg),
        "-U",
        PG_SUPERUSER,
        f"--pwfile={pwfile}",
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "--encoding=UTF8",
        "--no-locale",
    ]
    log.info("initdb %s (once)", pg)
    fd = _open_log(cfg, "postgres")
    try:
        done = subprocess.run(
            argv, stdout=fd, stderr=fd, env=_base_env(), user=user, cwd=init_dir, check=False
        )
    finally:
        os.close(fd)
        shutil.rmtree(init_dir, ignore_errors=True)
    if done.returncode != 0:
        raise StoreError(
            f"initdb failed for {pg} (exit {done.returncode})",
            hint=f"see {cfg.log_path('postgres')}:\n{_log_tail(cfg.log_path('postgres'))}",
        )


def _remove_stale_postmaster_pid(cfg: StackConfig) -> None:
    """A crash leaves postmaster.pid behind; after a container restart its pid may belong to some
    other process, and PostgreSQL would then refuse to start. Remove it only when that pid is not a
    postmaster of this data folder (two postmasters on one folder would corrupt it)."""
    lock = cfg.pg_dir / "postmaster.pid"
    try:
        first = lock.read_text().split("\n", 1)[0].strip()
    except OSError:
        return
    if first.isdigit() and _alive(int(first), str(cfg.pg_dir)):
        raise StoreError(
            f"a PostgreSQL server (pid {first}) already runs on {cfg.pg_dir} but is not recorded in "
            f"{cfg.state_path}",
            hint=f"stop it (kill -INT {first}), then run stack-up again",
        )
    log.info("removing stale %s", lock)
    lock.unlink(missing_ok=True)


def _start_postgres(cfg: StackConfig, bin_dir: Path, user: str | None, port: int) -> subprocess.Popen[bytes]:
    _remove_stale_postmaster_pid(cfg)
    argv = [
        _pg_tool(bin_dir, "postgres"),
        "-D",
        str(cfg.pg_dir),
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "unix_socket_directories=",
        "-c",
        "max_connections=60",
        "-c",
        "shared_buffers=32MB",
    ]
    return _spawn(cfg, "postgres", argv, _base_env(), user=user, cwd=cfg.pg_dir)


def _pg_ready(bin_dir: Path, port: int) -> bool:
    done = subprocess.run(
        [_pg_tool(bin_dir, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "2"],
        env=_base_env(),
        check=False,
    )
    return done.returncode == 0


def _ensure_database(cfg: StackConfig, bin_dir: Path, port: int, password: str) -> None:
    env = {**_base_env(), "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"}
    base = [
        _pg_tool(bin_dir, "psql"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        PG_SUPERUSER,
        "-d",
        "postgres",
    ]
    query = f"SELECT 1 FROM pg_database WHERE datname = '{PG_DB}'"
    found = subprocess.run([*base, "-tAc", query], env=env, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise StoreError(
            f"cannot query PostgreSQL on 127.0.0.1:{port}: {found.stderr.strip()}",
            hint=f"see {cfg.log_path('postgres')}",
        )
    if found.stdout.strip() == "1":
        return
    made = subprocess.run(
        [*base, "-c", f"CREATE DATABASE {PG_DB}"], env=env, capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        raise StoreError(
            f"cannot create database {PG_DB!r} on 127.0.0.1:{port}: {made.stderr.strip()}",
            hint=f"see {cfg.log_path('postgres')}",
        )


def _stop_postgres(cfg: StackConfig, pid: int) -> None:
    # SIGINT to the postmaster is exactly `pg_ctl stop -m fast` (pg_ctl itself refuses to run as root).
    _terminate("postgres", pid, signal.SIGINT, group=False, timeout=cfg.stop_timeout_s)


# ---------------------------------------------------------------------------------------------
# S3 (moto) and its snapshot


def _s3(endpoint_url: str, region: str, timeout: float = 10.0, attempts: int = 3) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=TEST_ACCESS_KEY,
        aws_secret_access_key=TEST_SECRET_KEY,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=timeout,
            read_timeout=max(timeout, 30.0),
            retries={"max_attempts": attempts, "mode": "standard"},
        ),
    )


def _s3_endpoint(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _s3_ready(endpoint: str, region: str) -> bool:
    try:
        _s3(endpoint, region, timeout=2.0, attempts=1).list_buckets()
    except Exception:
        return False
    return True


def _ensure_buckets(cfg: StackConfig, client: Any) -> None:
    have = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for bucket in (cfg.artifacts_bucket, cfg.data_bucket):
        if bucket not in have:
            client.create_bucket(Bucket=bucket)


def _blob_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _current_snapshot(cfg: StackConfig) -> Path | None:
    """The last complete snapshot (``.old`` is used when a swap was interrupted)."""
    for folder in (cfg.snapshot_dir, cfg.snapshot_dir.with_name(SNAPSHOT_DIR + ".old")):
        if (folder / "COMPLETE").is_file():
            return folder
    return None


def _snapshot_s3(cfg: StackConfig, endpoint: str) -> int:
    """Copies every object of both buckets to ``<root>/s3-snapshot`` (atomic swap, unchanged blobs
    reused by ETag). Returns the number of objects."""
    client = _s3(endpoint, cfg.region, timeout=10.0, attempts=5)
    previous = _current_snapshot(cfg)
    new = cfg.snapshot_dir.with_name(SNAPSHOT_DIR + ".new")
    shutil.rmtree(new, ignore_errors=True)
    count = 0
    for bucket in (cfg.artifacts_bucket, cfg.data_bucket):
        blobs = new / bucket / "blobs"
        blobs.mkdir(parents=True)
        old_manifest: dict[str, dict[str, Any]] = {}
        if previous is not None and (previous / bucket / "manifest.json").is_file():
            entries = json.loads((previous / bucket / "manifest.json").read_text())
            old_manifest = {entry["key"]: entry for entry in entries}
        manifest: list[dict[str, Any]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", ()):
                key, etag, size = item["Key"], item.get("ETag", ""), int(item["Size"])
                blob = _blob_name(key)
                old = old_manifest.get(key)
                reused = False
                if previous is not None and old and old["etag"] == etag and old["size"] == size:
                    with contextlib.suppress(OSError):
                        os.link(previous / bucket / "blobs" / blob, blobs / blob)
                        reused = True
                head: dict[str, Any]
                if reused and old is not None:
                    head = {"content_type": old.get("content_type"), "metadata": old.get("metadata", {})}
                else:
                    client.download_file(bucket, key, str(blobs / blob))
                    meta = client.head_object(Bucket=bucket, Key=key)
                    head = {"content_type": meta.get("ContentType"), "metadata": meta.get("Metadata", {})}
                manifest.append({"key": key, "blob": blob, "etag": etag, "size": size, **head})
        (new / bucket / "manifest.json").write_text(json.dumps(manifest, indent=1))
        count += len(manifest)
    (new / "COMPLETE").write_text(time.ctime() + "\n")
    old_dir = cfg.snapshot_dir.with_name(SNAPSHOT_DIR + ".old")
    shutil.rmtree(old_dir, ignore_errors=True)
    if cfg.snapshot_dir.exists():
        os.replace(cfg.snapshot_dir, old_dir)
    os.replace(new, cfg.snapshot_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    log.info("snapshotted %d S3 objects to %s", count, cfg.snapshot_dir)
    return count


def _restore_s3(cfg: StackConfig, endpoint: str) -> int:
    snapshot = _current_snapshot(cfg)
    if snapshot is None:
        return 0
    client = _s3(endpoint, cfg.region, timeout=10.0, attempts=5)
    count = 0
    for bucket in (cfg.artifacts_bucket, cfg.data_bucket):
        manifest_path = snapshot / bucket / "manifest.json"
        if not manifest_path.is_file():
            continue
        for entry in json.loads(manifest_path.read_text()):
            extra: dict[str, Any] = {"Metadata": entry.get("metadata") or {}}
            if entry.get("content_type"):
                extra["ContentType"] = entry["content_type"]
            client.upload_file(str(snapshot / bucket / "blobs" / entry["blob"]), bucket, entry["key"], extra)
            count += 1
    log.info("restored %d S3 objects from %s", count, snapshot)
    return count


# ---------------------------------------------------------------------------------------------
# MLflow


def _mlflow_ready(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _client_env(cfg: StackConfig, ports: Mapping[str, int]) -> dict[str, str]:
    endpoint = _s3_endpoint(ports["s3"])
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "ADAPTFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": cfg.region,
        "ADAPTFLOW_DATA_BUCKET": cfg.data_bucket,
    }


def _start_mlflow(cfg: StackConfig, ports: Mapping[str, int], password: str) -> subprocess.Popen[bytes]:
    port = ports["mlflow"]
    env = {
        **_base_env(),
        **_client_env(cfg, ports),
        "PGPASSWORD": password,  # libpq reads it, so the password stays out of argv and `ps`
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MLFLOW_TRACKING_URI")
    hosts = f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost"
    argv = [
        cfg.python,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"postgresql://{PG_SUPERUSER}@127.0.0.1:{ports['postgres']}/{PG_DB}",
        "--artifacts-destination",
        f"s3://{cfg.artifacts_bucket}/mlflow",
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(cfg.mlflow_workers),
        "--allowed-hosts",
        hosts,
        "--cors-allowed-origins",
        f"http://127.0.0.1:{port},http://localhost:{port}",
    ]
    return _spawn(cfg, "mlflow", argv, env, cwd=cfg.root_dir)


# ---------------------------------------------------------------------------------------------
# Public API


def _ports(cfg: StackConfig, state: Mapping[str, Any]) -> dict[str, int]:
    saved: dict[str, int] = {k: int(v) for k, v in (state.get("ports") or {}).items()}
    wanted = {"postgres": cfg.postgres_port, "s3": cfg.s3_port, "mlflow": cfg.mlflow_port}
    ports: dict[str, int] = {}
    for name in SERVICES:
        chosen = wanted[name] or saved.get(name)
        if chosen is None:
            chosen = _free_port(set(ports.values()))
        ports[name] = int(chosen)
    if len(set(ports.values())) != len(ports):
        raise StoreError(f"stack ports must differ: {ports}")
    return ports


def _wait_for(
    cfg: StackConfig,
    service: str,
    check: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    deadline: float,
) -> None:
    while True:
        if check():
            log.info("%s is healthy", service)
            return
        if proc is not None and proc.poll() is not None:
            raise StoreError(
                f"{service} exited with code {proc.returncode} while starting",
                hint=f"see {cfg.log_path(service)}:\n{_log_tail(cfg.log_path(service))}",
            )
        if time.monotonic() > deadline:
            raise StoreError(
                f"{service} did not become healthy within {cfg.startup_timeout_s:.0f} s",
                hint=f"see {cfg.log_path(service)}:\n{_log_tail(cfg.log_path(service))}",
            )
        time.sleep(0.25)


def stack_up(cfg: StackConfig | None = None) -> StackInfo:
    """Starts (or finds running) PostgreSQL, moto S3 and the MLflow server; waits until all three
    are healthy. On failure, everything this call started is stopped again and StoreError names
    the service and its log file."""
    cfg = cfg or StackConfig()
    bin_dir = find_pg_bin_dir(cfg.pg_bin_dir)
    if bin_dir is None:
        raise StoreError(
            "PostgreSQL server binaries (initdb, postgres, pg_isready, psql) were not found",
            hint="apt-get install postgresql (or set ADAPTFLOW_PG_BIN to their folder)",
        )
    with _stack_lock(cfg):
        state = _load_state(cfg)
        ports = _ports(cfg, state)
        pids: dict[str, int] = {k: int(v) for k, v in (state.get("pids") or {}).items()}
        password = _pg_password(cfg)
        markers = _markers(cfg, ports)
        saved_ports = {k: int(v) for k, v in (state.get("ports") or {}).items()}
        if set(saved_ports) == set(SERVICES) and saved_ports != ports:
            old_markers = _markers(cfg, saved_ports)
            if any(_alive(pids.get(name), old_markers[name]) for name in SERVICES):
                raise StoreError(
                    f"the stack at {cfg.root_dir} runs on ports {saved_ports}, not {ports}",
                    hint="run stack-down first to move it to other ports",
                )
        running = {name: _alive(pids.get(name), markers[name]) for name in SERVICES}
        s3_restored = bool(state.get("s3_restored")) and running["s3"]
        for name in SERVICES:
            if not running[name] and _port_in_use(ports[name]):
                raise StoreError(
                    f"port {ports[name]} for {name} is taken by another process",
                    hint=f"stop that process, or pass another port (--{name}-port N); "
                    "the new port is saved for later starts",
                )

        def save() -> None:
            _save_state(
                cfg,
                {
                    "version": 1,
                    "ports": ports,
                    "pids": pids,
                    "s3_restored": s3_restored,
                    "buckets": {"artifacts": cfg.artifacts_bucket, "data": cfg.data_bucket},
                },
            )

        save()
        started: list[str] = []
        try:
            deadline = time.monotonic() + cfg.startup_timeout_s
            pg_user = _resolve_pg_user(cfg)
            procs: dict[str, subprocess.Popen[bytes] | None] = dict.fromkeys(SERVICES)
            if not running["postgres"]:
                _init_postgres(cfg, bin_dir, pg_user, password)
                pg_proc = _start_postgres(cfg, bin_dir, pg_user, ports["postgres"])
                procs["postgres"], pids["postgres"] = pg_proc, pg_proc.pid
                started.append("postgres")
            if not running["s3"]:
                s3_env = {**_base_env(), "MOTO_PORT": str(ports["s3"]), "PYTHONUNBUFFERED": "1"}
                argv = [cfg.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])]
                s3_proc = _spawn(cfg, "s3", argv, s3_env, cwd=cfg.root_dir)
                procs["s3"], pids["s3"] = s3_proc, s3_proc.pid
                started.append("s3")
            save()
            _wait_for(
                cfg, "postgres", lambda: _pg_ready(bin_dir, ports["postgres"]), procs["postgres"], deadline
            )
            _ensure_database(cfg, bin_dir, ports["postgres"], password)
            if not running["mlflow"]:
                mlflow_proc = _start_mlflow(cfg, ports, password)
                procs["mlflow"], pids["mlflow"] = mlflow_proc, mlflow_proc.pid
                started.append("mlflow")
                save()
            endpoint = _s3_endpoint(ports["s3"])
            _wait_for(cfg, "s3", lambda: _s3_ready(endpoint, cfg.region), procs["s3"], deadline)
            if not s3_restored:
                try:
                    _ensure_buckets(cfg, _s3(endpoint, cfg.region))
                    _restore_s3(cfg, endpoint)
                except Exception as error:
                    raise StoreError(
                        f"cannot create the buckets or restore {cfg.snapshot_dir} into S3 at {endpoint}: {error}",
                        hint=f"see {cfg.log_path('s3')}; the snapshot on disk is untouched",
                    ) from error
                s3_restored = True
                save()
            tracking = f"http://127.0.0.1:{ports['mlflow']}"
            _wait_for(cfg, "mlflow", lambda: _mlflow_ready(tracking), procs["mlflow"], deadline)
        except BaseException:
            log.error("stack-up failed; stopping what it started: %s", ", ".join(started) or "nothing")
            _stop_services(cfg, pids, ports, started, snapshot=False)
            for name in started:
                pids.pop(name, None)
            if "s3" in started:
                s3_restored = False
            save()
            raise
    env = _client_env(cfg, ports)
    return StackInfo(
        config=cfg,
        ports=dict(ports),
        tracking_uri=env["MLFLOW_TRACKING_URI"],
        s3_endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"],
        artifacts_bucket=cfg.artifacts_bucket,
        data_bucket=cfg.data_bucket,
        env=env,
    )


def _stop_services(
    cfg: StackConfig, pids: Mapping[str, int], ports: Mapping[str, int], names: list[str], snapshot: bool
) -> None:
    markers = _markers(cfg, ports)
    errors: list[str] = []
    if "mlflow" in names and _alive(pids.get("mlflow"), markers["mlflow"]):
        _terminate("mlflow", pids["mlflow"], signal.SIGTERM, group=True, timeout=cfg.stop_timeout_s)
    if "s3" in names and _alive(pids.get("s3"), markers["s3"]):
        if snapshot:
            try:
                _snapshot_s3(cfg, _s3_endpoint(ports["s3"]))
            except Exception as error:
                # Keep moto running: stopping it now would lose the objects that were not saved.
                errors.append(f"S3 snapshot failed, moto left running (pid {pids['s3']}): {error}")
        if not errors:
            _terminate("s3", pids["s3"], signal.SIGTERM, group=True, timeout=cfg.stop_timeout_s)
    if "postgres" in names and _alive(pids.get("postgres"), markers["postgres"]):
        _stop_postgres(cfg, pids["postgres"])
    if errors:
        raise StoreError("; ".join(errors), hint=f"see {cfg.log_path('s3')}, then run stack-down again")


def stack_snapshot(cfg: StackConfig | None = None) -> int:
    """Saves the S3 buckets to ``<root>/s3-snapshot`` now, without stopping anything."""
    cfg = cfg or StackConfig()
    with _stack_lock(cfg):
        state = _load_state(cfg)
        ports = _ports(cfg, state)
        pids = {k: int(v) for k, v in (state.get("pids") or {}).items()}
        if not (_alive(pids.get("s3"), _markers(cfg, ports)["s3"]) and state.get("s3_restored")):
            raise StoreError("the stack's S3 server is not running", hint="run stack-up first")
        try:
            return _snapshot_s3(cfg, _s3_endpoint(ports["s3"]))
        except Exception as error:
            raise StoreError(
                f"S3 snapshot to {cfg.snapshot_dir} failed: {error}",
                hint=f"see {cfg.log_path('s3')}; the previous snapshot is kept",
            ) from error


def stack_down(cfg: StackConfig | None = None) -> None:
    """Stops mlflow, then moto (after snapshotting S3), then PostgreSQL (fast shutdown).
    Idempotent; all data is kept."""
    cfg = cfg or StackConfig()
    if not cfg.state_path.is_file():
        log.info("no stack at %s", cfg.root_dir)
        return
    with _stack_lock(cfg):
        state = _load_state(cfg)
        ports = {k: int(v) for k, v in (state.get("ports") or {}).items()}
        pids = {k: int(v) for k, v in (state.get("pids") or {}).items()}
        if set(ports) != set(SERVICES):
            state["pids"] = {}
            _save_state(cfg, state)
            return
        # Only snapshot an S3 whose restore completed: a half-restored moto would overwrite the
        # good snapshot with a partial one.
        _stop_services(cfg, pids, ports, list(SERVICES), snapshot=bool(state.get("s3_restored")))
        state["pids"] = {}
        state["s3_restored"] = False
        _save_state(cfg, state)


def stack_status(cfg: StackConfig | None = None) -> dict[str, ServiceStatus]:
    """Per service: recorded pid, whether it runs, whether it answers its health check."""
    cfg = cfg or StackConfig()
    state = _load_state(cfg)
    ports = {k: int(v) for k, v in (state.get("ports") or {}).items()}
    pids = {k: int(v) for k, v in (state.get("pids") or {}).items()}
    result: dict[str, ServiceStatus] = {}
    markers = _markers(cfg, ports) if set(ports) == set(SERVICES) else {}
    bin_dir = find_pg_bin_dir(cfg.pg_bin_dir)
    for name in SERVICES:
        pid = pids.get(name)
        running = bool(markers) and _alive(pid, markers[name])
        healthy = False
        if running:
            if name == "postgres":
                healthy = bin_dir is not None and _pg_ready(bin_dir, ports[name])
            elif name == "s3":
                healthy = _s3_ready(_s3_endpoint(ports[name]), cfg.region)
            else:
                healthy = _mlflow_ready(f"http://127.0.0.1:{ports[name]}")
        result[name] = ServiceStatus(name, pid, running, healthy, ports.get(name), cfg.log_path(name))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaptflow.localstack", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("command", choices=["up", "down", "status", "snapshot", "env"])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("ADAPTFLOW_STACK_ROOT") or DEFAULT_ROOT),
        help="stack folder (default $ADAPTFLOW_STACK_ROOT or .adaptflow/stack)",
    )
    parser.add_argument("--postgres-port", type=int)
    parser.add_argument("--s3-port", type=int)
    parser.add_argument("--mlflow-port", type=int)
    parser.add_argument("--timeout", type=float, default=90.0, help="startup timeout in seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="localstack: %(message)s")
    cfg = StackConfig(
        root=args.root,
        postgres_port=args.postgres_port,
        s3_port=args.s3_port,
        mlflow_port=args.mlflow_port,
        startup_timeout_s=args.timeout,
    )
    try:
        if args.command == "up":
            info = stack_up(cfg)
            sys.stdout.write(info.exports())
            log.info(
                "stack up: MLflow %s, S3 %s (root %s)", info.tracking_uri, info.s3_endpoint_url, cfg.root_dir
            )
        elif args.command == "env":
            state = _load_state(cfg)
            if not state.get("ports"):
                raise StoreError(f"no stack at {cfg.root_dir}", hint="run stack-up first")
            ports = {k: int(v) for k, v in state["ports"].items()}
            sys.stdout.write(
                "".join(f"export {k}={shlex.quote(v)}\n" for k, v in _client_env(cfg, ports).items())
            )
        elif args.command == "down":
            stack_down(cfg)
            log.info("stack down (data kept under %s)", cfg.root_dir)
        elif args.command == "snapshot":
            log.info("%d objects saved", stack_snapshot(cfg))
        else:
            for status in stack_status(cfg).values():
                state_word = "healthy" if status.healthy else ("running" if status.running else "stopped")
                print(f"{status.name:9} {state_word:8} port={status.port} pid={status.pid} log={status.log}")
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
