"""A production-like MLflow stack on loopback: PostgreSQL + moto S3 + ``mlflow server``.

One supervisord per stack root runs all three, from ``infra/local/supervisord.conf.in`` rendered into
the root; ``supervisorctl -c <root>/supervisord.conf status|tail mlflow`` works on a running stack.
``stack_up`` starts each service once the one before answers its own health check (``pg_isready``, an
S3 ``list_buckets``, MLflow's ``/health``). ``stack_down`` stops them; all data is kept: PostgreSQL's
in ``pg/``, S3's in ``s3-snapshot/`` (adaptflow.stack_s3). ``stack.json`` keeps the ports, picked once.

CLI: ``python -m adaptflow.localstack up|down|status [--root DIR]``; ``up`` prints ``export`` lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import socket
import string
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from adaptflow.errors import StoreError
from adaptflow.stack_s3 import TEST_KEY, restore_s3, s3_client, snapshot_s3
from adaptflow.tracking import check_tracking_reachable

log = logging.getLogger(__name__)
TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "local" / "supervisord.conf.in"
SERVICES = ("postgres", "s3", "mlflow")  # the start order; supervisord's priorities stop them in reverse
ALIVE = ("RUNNING", "STARTING", "BACKOFF")  # supervisord's states of a process that holds or wants its port
PG_USER, PG_DB = "adaptflow", "mlflow"  # PostgreSQL's superuser, and MLflow's database


@dataclass(frozen=True)
class StackConfig:
    """Where the stack lives and how it listens; ports left None are picked once, then kept."""

    root: Path = Path(".adaptflow/stack")
    postgres_port: int | None = None
    s3_port: int | None = None
    mlflow_port: int | None = None
    artifacts_bucket: str = "adaptflow-artifacts"
    data_bucket: str = "adaptflow-data"
    region: str = "us-east-1"
    pg_bin_dir: Path | None = None  # None: find_pg_bin_dir()
    pg_os_user: str | None = None  # None: this user, or postgres when root (PostgreSQL refuses root)
    python: str = field(default_factory=lambda: sys.executable)
    startup_timeout_s: float = 90.0

    @property
    def root_dir(self) -> Path:
        return Path(self.root).expanduser().resolve()

    @property
    def snapshot_dir(self) -> Path:
        return self.root_dir / "s3-snapshot"

    def log_path(self, service: str) -> Path:
        return self.root_dir / "logs" / f"{service}.log"


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
        return s3_client(self.s3_endpoint_url, self.env["AWS_DEFAULT_REGION"])

    def exports(self) -> str:
        return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in self.env.items())


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    port: int | None
    log: Path


def check_s3_reachable(endpoint_url: str, timeout: float = 5.0, region: str = "us-east-1") -> None:
    """Raises StoreError naming ``endpoint_url`` when the S3 endpoint cannot list buckets."""
    try:
        s3_client(endpoint_url, region, timeout=timeout, attempts=1).list_buckets()
    except Exception as error:  # botocore raises many types; all mean "cannot use this endpoint"
        raise StoreError(
            f"S3 endpoint {endpoint_url} is unreachable: {error}",
            hint="start the local stack (make stack-up), or fix ADAPTFLOW_S3_ENDPOINT_URL / "
            "MLFLOW_S3_ENDPOINT_URL and the AWS credentials",
        ) from None


def find_pg_bin_dir(preferred: Path | None = None) -> Path | None:
    """The folder of PostgreSQL's server tools: ``preferred``, ``$ADAPTFLOW_PG_BIN``, the newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian's), or PATH; None when PostgreSQL is absent."""
    debian = Path("/usr/lib/postgresql").glob("[0-9]*/bin")
    newest_first = sorted(debian, key=lambda p: int(p.parent.name.split(".")[0]), reverse=True)
    on_path = Path(found).parent if (found := shutil.which("postgres")) else None
    for folder in (preferred, os.environ.get("ADAPTFLOW_PG_BIN"), *newest_first, on_path):
        if folder and all((Path(folder) / tool).is_file() for tool in ("postgres", "initdb", "pg_isready")):
            return Path(folder)
    return None


def _child_env() -> dict[str, str]:
    """The environment of the stack's processes: never the caller's AWS_* or MLFLOW_* settings."""
    keep = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE")
    return {key: os.environ[key] for key in keep if key in os.environ}


def _failed(what: str, log_file: Path, detail: str = "") -> StoreError:
    """StoreError for a service that failed: what went wrong, then the end of its log in the hint."""
    try:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    except OSError:
        tail = "(no log)"
    return StoreError(
        f"{what}: {detail.strip()[-600:]}" if detail.strip() else what, f"see {log_file}:\n{tail}"
    )


def _pg_owner(cfg: StackConfig) -> pwd.struct_passwd:
    name = cfg.pg_os_user or ("postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise StoreError(
            f"PostgreSQL refuses to run as root, and there is no user {name!r} to run it as",
            hint="install PostgreSQL from Debian's packages (they create 'postgres'), or pass "
            "StackConfig(pg_os_user=...) naming an unprivileged user",
        ) from None


def _initdb(cfg: StackConfig, bin_dir: Path, owner: pwd.struct_passwd) -> None:
    """The first time: the cluster (owned by ``owner``, who must be able to enter the root), its
    password, and MLflow's database, made in single-user mode before any server runs."""
    data, password = cfg.root_dir / "pg", cfg.root_dir / "pg-password"
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(mode=0o700, exist_ok=True)
    password.touch(mode=0o600)
    password.write_text(secrets.token_urlsafe(24) + "\n")
    for path in (data, password):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    as_owner: dict[str, Any] = {}
    if owner.pw_uid != os.geteuid():
        as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password}"]
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, *auth, "-E", "UTF8", "--no-locale"]
    single = [str(bin_dir / "postgres"), "--single", "-c", "exit_on_error=on", "-D", str(data), "postgres"]
    for argv, stdin in ((initdb, None), (single, f"CREATE DATABASE {PG_DB}\n")):
        run = subprocess.run(
            argv, input=stdin, **as_owner, env=_child_env(), cwd=data, capture_output=True, text=True
        )
        if run.returncode != 0:
            shutil.rmtree(data)  # so that the next stack-up starts afresh
            what = f"{Path(argv[0]).name} failed (can {owner.pw_name!r} enter {data}?)"
            raise _failed(what, cfg.log_path("postgres"), run.stderr)


def _healthy(cfg: StackConfig, name: str, port: int) -> bool:
    """Whether ``name`` answers its own health check."""
    url = f"http://127.0.0.1:{port}"
    try:
        if name == "postgres":
            argv = [f"{find_pg_bin_dir(cfg.pg_bin_dir)}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]
            return subprocess.run(argv, env=_child_env()).returncode == 0
        if name == "s3":
            check_s3_reachable(url, timeout=2.0, region=cfg.region)
        else:
            check_tracking_reachable(url, timeout=2.0)
    except (StoreError, OSError):
        return False
    return True


def _supervisor(cfg: StackConfig) -> tuple[Any | None, dict[str, dict[str, Any]]]:
    """This root's supervisord (its XML-RPC interface) and its programs' states; (None, {}) when it
    does not run."""
    from supervisor.childutils import getRPCInterface

    sup = getRPCInterface({"SUPERVISOR_SERVER_URL": f"unix://{cfg.root_dir / 'supervisor.sock'}"}).supervisor
    try:
        return sup, {info["name"]: info for info in sup.getAllProcessInfo()}
    except (OSError, xmlrpc.client.Error):
        return None, {}


def _start_supervisord(cfg: StackConfig, ports: dict[str, int], bin_dir: Path, pg_owner: str) -> Any:
    values = {f"{name}_port": port for name, port in ports.items()} | {
        "root": cfg.root_dir,
        "python": shlex.quote(cfg.python),
        "postgres": shlex.quote(str(bin_dir / "postgres")),
        "pg_data": shlex.quote(str(cfg.root_dir / "pg")),
        "pg_owner": pg_owner,
        "pg_password": (cfg.root_dir / "pg-password").read_text().strip(),
        "db_user": PG_USER,
        "db_name": PG_DB,
        "artifacts_bucket": cfg.artifacts_bucket,
        "region": cfg.region,
        "access_key": TEST_KEY,
    }
    text = string.Template(TEMPLATE.read_text()).substitute(
        {key: str(value).replace("%", "%%") for key, value in values.items()}  # supervisord expands "%"
    )
    conf = cfg.root_dir / "supervisord.conf"
    with open(conf, "w", opener=lambda path, flags: os.open(path, flags, 0o600)) as handle:
        handle.write(text)  # mode 0600: it holds the database password
    argv = [cfg.python, "-m", "supervisor.supervisord", "-c", str(conf)]
    run = subprocess.run(argv, env=_child_env(), capture_output=True, text=True)
    if run.returncode != 0 or (sup := _supervisor(cfg)[0]) is None:
        raise _failed("supervisord did not start", cfg.log_path("supervisord"), run.stderr)
    return sup


def _stop(cfg: StackConfig, sup: Any) -> None:
    """Stops mlflow, snapshots S3, then stops moto, PostgreSQL and supervisord, each waited for."""
    sup.stopProcessGroup("mlflow")  # first, so that nothing writes to S3 during the snapshot
    s3, restored = sup.getProcessInfo("s3"), cfg.root_dir / "s3-restored"
    # Only the moto that stack_up restored holds all of S3: one restarted by hand must not replace the snapshot.
    if s3["statename"] == "RUNNING" and restored.is_file() and restored.read_text() == str(s3["pid"]):
        try:
            snapshot_s3(
                s3_client(f"http://127.0.0.1:{_saved_ports(cfg)['s3']}", attempts=5), cfg.snapshot_dir
            )
        except Exception as error:
            hint = "S3 still runs, so nothing is lost; fix the cause and stack-down again"
            raise StoreError(f"cannot snapshot S3 into {cfg.snapshot_dir}: {error}", hint=hint) from error
    sup.stopAllProcesses()  # in reverse priority order: moto, then PostgreSQL
    sup.shutdown()
    deadline = time.monotonic() + 60
    while (cfg.root_dir / "supervisord.pid").exists() and time.monotonic() < deadline:  # removed at exit
        time.sleep(0.1)


def _saved_ports(cfg: StackConfig) -> dict[str, int]:
    path = cfg.root_dir / "stack.json"
    try:
        return dict(json.loads(path.read_text())["ports"]) if path.exists() else {}
    except (OSError, ValueError, KeyError) as error:
        raise StoreError(
            f"cannot read {path}: {error}", hint="delete it: the ports are picked again"
        ) from None


def _ports(cfg: StackConfig, running: dict[str, bool]) -> dict[str, int]:
    """The configured ports, else the saved ones, else free ones; a stopped service's must be free."""
    saved = _saved_ports(cfg)
    wanted = {"postgres": cfg.postgres_port, "s3": cfg.s3_port, "mlflow": cfg.mlflow_port}
    ports = {name: wanted[name] or saved.get(name) or 0 for name in SERVICES}
    if any(running.values()) and ports != saved:
        raise StoreError(
            f"the stack at {cfg.root_dir} runs on ports {saved}, not {ports}", hint="stack-down first"
        )
    with contextlib.ExitStack() as held:  # free ports stay bound until all are picked, so they differ
        for name in SERVICES:
            sock = held.enter_context(socket.socket())
            if not ports[name]:
                sock.bind(("127.0.0.1", 0))
                ports[name] = sock.getsockname()[1]
            elif not running.get(name) and sock.connect_ex(("127.0.0.1", ports[name])) == 0:
                raise StoreError(
                    f"port {ports[name]} for {name} is taken", hint=f"stop it or pass --{name}-port N"
                )
    return ports


def _start_program(sup: Any, name: str, cfg: StackConfig, deadline: float) -> None:
    """startProcess; a child that dies at once is reported like one that never got healthy."""
    try:
        sup.startProcess(name, False)
    except xmlrpc.client.Fault as fault:  # SPAWN_ERROR: it died before supervisord saw it up
        # let supervisord give up, and log the child's stderr, before the log is read
        while (
            sup.getProcessInfo(name)["statename"] not in ("FATAL", "EXITED") and time.monotonic() < deadline
        ):
            time.sleep(0.25)
        raise _failed(
            f"{name} did not become healthy (supervisord: {fault.faultString})", cfg.log_path(name)
        ) from None


def stack_up(cfg: StackConfig | None = None) -> StackInfo:
    """Starts what is not running of PostgreSQL, moto S3 and MLflow, and waits until each is healthy.
    On failure it stops what it started; StoreError names the service and its log."""
    cfg = cfg or StackConfig()
    if (bin_dir := find_pg_bin_dir(cfg.pg_bin_dir)) is None:
        raise StoreError(
            "PostgreSQL server binaries (postgres, initdb, pg_isready) were not found",
            hint="apt-get install postgresql (or set ADAPTFLOW_PG_BIN to their folder)",
        )
    owner = _pg_owner(cfg)
    cfg.log_path("-").parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cfg.root_dir / "stack.lock")):
        sup, states = _supervisor(cfg)
        running = {name: info["statename"] in ALIVE for name, info in states.items()}
        ports = _ports(cfg, running)
        (cfg.root_dir / "stack.json").write_text(json.dumps({"ports": ports}) + "\n")
        endpoint, tracking = f"http://127.0.0.1:{ports['s3']}", f"http://127.0.0.1:{ports['mlflow']}"
        started = None
        try:
            _initdb(cfg, bin_dir, owner)
            if sup is None:
                sup = started = _start_supervisord(cfg, ports, bin_dir, owner.pw_name)
            deadline = time.monotonic() + cfg.startup_timeout_s
            for name in SERVICES:  # the programs have autostart=false: the order is ours
                if not running.get(name):
                    _start_program(sup, name, cfg, deadline)
                while not _healthy(cfg, name, ports[name]):
                    state = sup.getProcessInfo(name)["statename"]
                    if state in ("FATAL", "EXITED") or time.monotonic() > deadline:
                        raise _failed(
                            f"{name} did not become healthy (supervisord: {state})", cfg.log_path(name)
                        )
                    time.sleep(0.25)
                if name == "s3" and not running.get(name):  # a new moto: its S3 is empty until restored
                    restore_s3(s3_client(endpoint), cfg.snapshot_dir, [cfg.artifacts_bucket, cfg.data_bucket])
                    (cfg.root_dir / "s3-restored").write_text(str(sup.getProcessInfo("s3")["pid"]))
                log.info("%s is healthy", name)
        except BaseException:
            log.error("stack-up failed; stopping what it started")
            with contextlib.suppress(Exception):
                if started:
                    (cfg.root_dir / "s3-restored").unlink(missing_ok=True)  # S3 is still what is on disk
                    _stop(cfg, started)
            raise
    env = {
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "ADAPTFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_KEY,
        "AWS_DEFAULT_REGION": cfg.region,
        "ADAPTFLOW_DATA_BUCKET": cfg.data_bucket,
    }
    return StackInfo(cfg, ports, tracking, endpoint, cfg.artifacts_bucket, cfg.data_bucket, env)


def stack_down(cfg: StackConfig | None = None) -> None:
    """Stops the stack; idempotent, and all data is kept."""
    cfg = cfg or StackConfig()
    if (cfg.root_dir / "stack.json").is_file():
        with FileLock(str(cfg.root_dir / "stack.lock")):
            if (sup := _supervisor(cfg)[0]) is not None:
                _stop(cfg, sup)


def stack_status(cfg: StackConfig | None = None) -> dict[str, ServiceStatus]:
    """Per service: pid, whether it runs, and whether it answers its health check."""
    cfg = cfg or StackConfig()
    states, ports = _supervisor(cfg)[1], _saved_ports(cfg)
    pids = {name: info["pid"] for name, info in states.items() if info["statename"] == "RUNNING"}
    statuses = {}
    for name in SERVICES:
        pid, port = pids.get(name), ports.get(name)
        healthy = pid is not None and port is not None and _healthy(cfg, name, port)
        statuses[name] = ServiceStatus(name, pid, pid is not None, healthy, port, cfg.log_path(name))
    return statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaptflow.localstack", description=__doc__.splitlines()[0]
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--root", type=Path, default=os.environ.get("ADAPTFLOW_STACK_ROOT") or ".adaptflow/stack"
    )
    for name in SERVICES:
        parser.add_argument(f"--{name}-port", type=int)
    parser.add_argument("--timeout", type=float, default=90.0, help="startup timeout in seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="localstack: %(message)s")
    cfg = StackConfig(
        args.root, args.postgres_port, args.s3_port, args.mlflow_port, startup_timeout_s=args.timeout
    )
    try:
        if args.command == "up":
            sys.stdout.write(stack_up(cfg).exports())
        elif args.command == "down":
            stack_down(cfg)
        for s in stack_status(cfg).values() if args.command == "status" else ():
            state = "healthy" if s.healthy else "running" if s.running else "stopped"
            print(f"{s.name:9} {state:8} port={s.port} pid={s.pid} log={s.log}")
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
