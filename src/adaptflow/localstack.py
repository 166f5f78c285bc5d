"""A production-like MLflow stack on loopback: PostgreSQL + moto S3 + ``mlflow server``.

PostgreSQL runs under ``pg_ctl`` (adaptflow.stack_pg); moto (adaptflow.stack_s3, which keeps S3 on
disk across restarts) and MLflow run under supervisord, its config rendered from
``infra/local/supervisord.conf.in``. ``stack_up`` starts what is not running and waits for each
service's own health check: ``pg_isready``, an S3 ``list_buckets``, MLflow's ``/health``.
``stack_down`` stops everything; all data is kept.

The root (default ``.adaptflow/stack``) holds ``stack.json`` (the ports, picked once), ``pg-password``,
``pg/``, ``supervisord.conf``, ``s3-snapshot/`` and ``logs/``.

CLI: ``python -m adaptflow.localstack up|down|status [--root DIR]``; ``up`` prints ``export`` lines;
``supervisorctl -c <root>/supervisord.conf status|tail mlflow`` works on a running stack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from adaptflow.errors import StoreError
from adaptflow.stack_pg import PG_DB, PG_SUPERUSER, Postgres, child_env, find_pg_bin_dir, service_error
from adaptflow.stack_s3 import TEST_KEY, s3_client

log = logging.getLogger(__name__)
TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "local" / "supervisord.conf.in"
SERVICES = ("postgres", "s3", "mlflow")
ALIVE = ("RUNNING", "STARTING", "BACKOFF")  # supervisord's states of a process that holds or wants its port


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
    pg_os_user: str | None = None  # None: this user, or postgres when root
    mlflow_workers: int = 1
    python: str = field(default_factory=lambda: sys.executable)
    startup_timeout_s: float = 90.0
    stop_timeout_s: float = 60.0

    @property
    def root_dir(self) -> Path:
        return Path(self.root).expanduser().resolve()

    @property
    def pg_dir(self) -> Path:
        return self.root_dir / "pg"

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


def _client_env(cfg: StackConfig, ports: dict[str, int]) -> dict[str, str]:
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "ADAPTFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_KEY,
        "AWS_DEFAULT_REGION": cfg.region,
        "ADAPTFLOW_DATA_BUCKET": cfg.data_bucket,
    }


def _postgres(cfg: StackConfig, bin_dir: Path) -> Postgres:
    return Postgres(
        bin_dir, cfg.pg_dir, cfg.log_path("postgres"), cfg.root_dir / "pg-password", cfg.pg_os_user
    )


def _supervisor(cfg: StackConfig) -> Any | None:
    """The XML-RPC interface of this root's supervisord, or None when it does not run."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{cfg.root_dir / 'supervisor.sock'}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor
    try:
        proxy.getState()
    except (OSError, xmlrpc.client.Error):
        return None
    return proxy


def _states(sup: Any | None) -> dict[str, dict[str, Any]]:
    return {info["name"]: info for info in sup.getAllProcessInfo()} if sup else {}


def _start_supervisord(cfg: StackConfig, ports: dict[str, int], password: str) -> Any:
    values = {f"{name}_port": port for name, port in ports.items()} | {
        "root": cfg.root_dir,
        "logs": cfg.log_path("-").parent,
        "python": shlex.quote(cfg.python),
        "snapshot": shlex.quote(str(cfg.snapshot_dir)),
        "buckets": f"{cfg.artifacts_bucket} {cfg.data_bucket}",
        "artifacts_bucket": cfg.artifacts_bucket,
        "db_user": PG_SUPERUSER,
        "db_name": PG_DB,
        "pg_password": password,
        "workers": cfg.mlflow_workers,
        "region": cfg.region,
        "access_key": TEST_KEY,
    }
    conf = cfg.root_dir / "supervisord.conf"
    with open(conf, "w", opener=lambda path, flags: os.open(path, flags, 0o600)) as handle:
        handle.write(
            string.Template(TEMPLATE.read_text()).substitute(
                {k: str(v).replace("%", "%%") for k, v in values.items()}
            )
        )
    argv = [cfg.python, "-m", "supervisor.supervisord", "-c", str(conf)]
    done = subprocess.run(argv, env=child_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0 or (sup := _supervisor(cfg)) is None:
        raise service_error(
            "supervisord did not start", cfg.log_path("supervisord"), done.stderr or done.stdout
        )
    return sup


def _s3_ready(endpoint: str, region: str) -> bool:
    try:
        check_s3_reachable(endpoint, timeout=2.0, region=region)
    except StoreError:
        return False
    return True


def _mlflow_ready(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _reap_groups(pgids: list[int], timeout_s: float) -> None:
    """supervisord waits for each program's main process only; its workers (mlflow's uvicorn and job
    consumers, in the program's process group) can outlive it by a moment. Wait for each group to
    empty, then kill what is left: nothing of the stack stays running."""
    deadline = time.monotonic() + timeout_s
    for pgid in pgids:
        while True:
            try:
                os.killpg(pgid, signal.SIGKILL if time.monotonic() > deadline else 0)
            except ProcessLookupError:
                break
            except PermissionError:  # the group id was reused by someone else's processes
                break
            time.sleep(0.1)


def _stop(cfg: StackConfig, pg: Postgres | None, sup: Any | None) -> None:
    """Stops mlflow, then moto (it writes the S3 snapshot on its way out), supervisord, then PostgreSQL."""
    snapshot_failed = False
    if sup is not None:
        states = _states(sup)
        s3_was_running = states["s3"]["statename"] == "RUNNING"
        groups = [info["pid"] for info in states.values() if info["pid"]]
        sup.stopAllProcesses()  # one by one, in reverse priority order, each waited for
        _reap_groups(groups, cfg.stop_timeout_s)
        snapshot_failed = s3_was_running and sup.getProcessInfo("s3")["exitstatus"] != 0
        sup.shutdown()
        deadline = time.monotonic() + cfg.stop_timeout_s
        while (cfg.root_dir / "supervisord.pid").exists() and time.monotonic() < deadline:  # gone at exit
            time.sleep(0.1)
    if pg is not None:
        pg.stop(cfg.stop_timeout_s)
    if snapshot_failed:
        raise service_error(
            "moto could not write the S3 snapshot", cfg.log_path("s3"), hint="the last one is kept; "
        )


def _saved_ports(cfg: StackConfig) -> dict[str, int]:
    path = cfg.root_dir / "stack.json"
    try:
        return {name: int(port) for name, port in json.loads(path.read_text())["ports"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:
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
            elif not running[name] and sock.connect_ex(("127.0.0.1", ports[name])) == 0:
                raise StoreError(
                    f"port {ports[name]} for {name} is taken",
                    hint=f"stop its process or pass --{name}-port N",
                )
    return ports


def _checks(cfg: StackConfig, pg: Postgres | None, ports: dict[str, int]) -> dict[str, Callable[[], bool]]:
    """Each service's own health check."""
    env = _client_env(cfg, ports)
    return {
        "postgres": lambda: pg is not None and pg.ready(ports["postgres"]),
        "s3": lambda: _s3_ready(env["MLFLOW_S3_ENDPOINT_URL"], cfg.region),
        "mlflow": lambda: _mlflow_ready(env["MLFLOW_TRACKING_URI"]),
    }


def stack_up(cfg: StackConfig | None = None) -> StackInfo:
    """Starts what is not running of PostgreSQL, moto S3 and MLflow, and waits until each is healthy.
    On failure it stops what it started; StoreError names the service and its log."""
    cfg = cfg or StackConfig()
    if (bin_dir := find_pg_bin_dir(cfg.pg_bin_dir)) is None:
        raise StoreError(
            "PostgreSQL server binaries (pg_ctl, initdb, postgres, pg_isready, psql) were not found",
            hint="apt-get install postgresql (or set ADAPTFLOW_PG_BIN to their folder)",
        )
    cfg.log_path("-").parent.mkdir(parents=True, exist_ok=True)
    pg = _postgres(cfg, bin_dir)
    with FileLock(str(cfg.root_dir / "stack.lock")):
        sup, pg_pid = _supervisor(cfg), pg.pid()
        states = _states(sup)
        running = {name: states.get(name, {}).get("statename") in ALIVE for name in SERVICES}
        running["postgres"] = pg_pid is not None
        ports = _ports(cfg, running)
        (cfg.root_dir / "stack.json").write_text(json.dumps({"ports": ports}) + "\n")
        started = None
        try:
            if pg_pid is None:
                pg.start(ports["postgres"], cfg.startup_timeout_s)
            if not pg.ready(ports["postgres"]):
                raise service_error("postgres does not answer pg_isready", pg.log_file)
            pg.ensure_database(ports["postgres"])
            log.info("postgres is healthy")
            if sup is None:
                sup = started = _start_supervisord(cfg, ports, pg.password())  # it starts moto and mlflow
            for name in ("s3", "mlflow") if started is None else ():
                if not running[name]:
                    sup.startProcess(name, False)
            deadline, checks = time.monotonic() + cfg.startup_timeout_s, _checks(cfg, pg, ports)
            for name in ("s3", "mlflow"):
                while not checks[name]():
                    state = sup.getProcessInfo(name)["statename"]
                    if state in ("FATAL", "EXITED") or time.monotonic() > deadline:
                        raise service_error(
                            f"{name} did not become healthy (supervisord: {state})", cfg.log_path(name)
                        )
                    time.sleep(0.25)
                log.info("%s is healthy", name)
        except BaseException:
            log.error("stack-up failed; stopping what it started")
            with contextlib.suppress(Exception):
                _stop(cfg, pg if pg_pid is None else None, started)
            raise
    env = _client_env(cfg, ports)
    tracking, s3 = env["MLFLOW_TRACKING_URI"], env["MLFLOW_S3_ENDPOINT_URL"]
    return StackInfo(cfg, ports, tracking, s3, cfg.artifacts_bucket, cfg.data_bucket, env)


def stack_down(cfg: StackConfig | None = None) -> None:
    """Stops the stack; idempotent, and all data is kept."""
    cfg = cfg or StackConfig()
    if (cfg.root_dir / "stack.json").is_file():
        with FileLock(str(cfg.root_dir / "stack.lock")):
            pg = _postgres(cfg, bin_dir) if (bin_dir := find_pg_bin_dir(cfg.pg_bin_dir)) else None
            _stop(cfg, pg if pg and pg.pid() else None, _supervisor(cfg))


def stack_status(cfg: StackConfig | None = None) -> dict[str, ServiceStatus]:
    """Per service: pid, whether it runs, and whether it answers its health check."""
    cfg = cfg or StackConfig()
    pg = _postgres(cfg, bin_dir) if (bin_dir := find_pg_bin_dir(cfg.pg_bin_dir)) else None
    pids = {
        name: info["pid"]
        for name, info in _states(_supervisor(cfg)).items()
        if info["statename"] == "RUNNING"
    }
    pids["postgres"] = pg.pid() if pg else None
    ports = _saved_ports(cfg)
    checks = _checks(cfg, pg, ports) if set(ports) == set(SERVICES) else {}
    statuses = {}
    for name in SERVICES:
        pid = pids.get(name)
        healthy = pid is not None and name in checks and checks[name]()
        statuses[name] = ServiceStatus(
            name, pid, pid is not None, healthy, ports.get(name), cfg.log_path(name)
        )
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
