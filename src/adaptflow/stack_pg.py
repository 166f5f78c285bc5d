"""PostgreSQL of the local stack, through Debian's ``pg_ctl``, ``pg_isready`` and ``psql``.

PostgreSQL refuses to run as root: when this process is root, ``pg_ctl`` runs as the ``postgres``
user that Debian's package creates (or ``StackConfig.pg_os_user``), who must be able to enter the
stack folder.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from adaptflow.errors import StoreError

PG_SUPERUSER, PG_DB = "adaptflow", "mlflow"


def find_pg_bin_dir(preferred: Path | None = None) -> Path | None:
    """The folder of PostgreSQL's server tools: ``preferred``, ``$ADAPTFLOW_PG_BIN``, the newest
    ``/usr/lib/postgresql/<version>/bin``, or PATH; None when PostgreSQL is absent."""
    debian = Path("/usr/lib/postgresql").glob("[0-9]*/bin")
    newest_first = sorted(debian, key=lambda p: int(p.parent.name.split(".")[0]), reverse=True)
    on_path = Path(found).parent if (found := shutil.which("pg_ctl")) else None
    for folder in (
        Path(f) for f in (preferred, os.environ.get("ADAPTFLOW_PG_BIN"), *newest_first, on_path) if f
    ):
        if all((folder / tool).is_file() for tool in ("pg_ctl", "initdb", "postgres", "pg_isready", "psql")):
            return folder
    return None


def child_env() -> dict[str, str]:
    """The environment of the stack's processes: never the caller's AWS_* or MLFLOW_* settings."""
    keep = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE")
    return {key: os.environ[key] for key in keep if key in os.environ}


def service_error(what: str, log_file: Path, detail: str = "", hint: str = "") -> StoreError:
    """StoreError for a service that failed: what went wrong, then the end of its log in the hint."""
    try:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    except OSError:
        tail = "(no log)"
    message = f"{what}: {detail.strip()[-600:]}" if detail.strip() else what
    return StoreError(message, hint=f"{hint}see {log_file}:\n{tail}")


@dataclass(frozen=True)
class Postgres:
    """One cluster (data folder, log, password file), listening on 127.0.0.1 only."""

    bin_dir: Path
    data_dir: Path
    log_file: Path
    password_file: Path
    os_user: str | None = None  # None: this user, or ``postgres`` when root

    def _user(self) -> pwd.struct_passwd | None:
        name = self.os_user or ("postgres" if os.geteuid() == 0 else None)
        try:
            return pwd.getpwnam(name) if name else None
        except KeyError:
            raise StoreError(
                f"PostgreSQL refuses to run as root, and there is no user {name!r} to run it as",
                hint="install PostgreSQL from Debian's packages (they create 'postgres'), or pass "
                "StackConfig(pg_os_user=...) naming an unprivileged user",
            ) from None

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        who = self._user()
        return subprocess.run(
            [str(self.bin_dir / "pg_ctl"), *args, "-D", str(self.data_dir)],
            user=who.pw_uid if who else None,
            group=who.pw_gid if who else None,
            extra_groups=[] if who else None,
            env=child_env(),
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            check=False,
        )

    def pid(self) -> int | None:
        """The postmaster's pid (``pg_ctl status``), or None when it does not run."""
        found = re.search(r"PID: (\d+)", self.ctl("status").stdout) if self.data_dir.is_dir() else None
        return int(found.group(1)) if found else None

    def ready(self, port: int) -> bool:
        argv = [str(self.bin_dir / "pg_isready"), *f"-q -h 127.0.0.1 -p {port} -t 2".split()]
        return subprocess.run(argv, env=child_env(), check=False).returncode == 0

    def start(self, port: int, timeout_s: float) -> None:
        """``pg_ctl initdb`` the first time, then ``pg_ctl start``, which waits until it is up."""
        self.log_file.touch()
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.password()  # initdb reads it
        if who := self._user():
            for path in (self.data_dir, self.log_file, self.password_file):
                os.chown(path, who.pw_uid, who.pw_gid)
        opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c shared_buffers=32MB"
        steps: list[tuple[str, ...]] = [
            ("start", "-w", "-t", str(int(timeout_s)), "-l", str(self.log_file), "-o", opts)
        ]
        if not (self.data_dir / "PG_VERSION").is_file():
            auth = f"--auth-local=trust --auth-host=scram-sha-256 --pwfile={shlex.quote(str(self.password_file))}"
            steps.insert(0, ("initdb", "-s", "-o", f"-U {PG_SUPERUSER} {auth} -E UTF8 --no-locale"))
        for step in steps:
            if (done := self.ctl(*step)).returncode != 0:
                who_runs = f"user {who.pw_name!r}" if who else "this user"
                hint = f"is port {port} taken? Can {who_runs} enter {self.data_dir}? "
                raise service_error(
                    f"pg_ctl {step[0]} failed", self.log_file, done.stderr or done.stdout, hint
                )

    def stop(self, timeout_s: float) -> None:
        if (done := self.ctl("stop", "-m", "fast", "-w", "-t", str(int(timeout_s)))).returncode != 0:
            raise service_error("pg_ctl stop failed", self.log_file, done.stderr)

    def ensure_database(self, port: int) -> None:
        """Creates the ``mlflow`` database unless it exists."""
        sql = f"SELECT 'CREATE DATABASE {PG_DB}' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{PG_DB}')"
        argv = [str(self.bin_dir / "psql"), *f"-qh 127.0.0.1 -p {port} -U {PG_SUPERUSER} -d postgres".split()]
        env = child_env() | {"PGPASSWORD": self.password(), "PGCONNECT_TIMEOUT": "5"}
        done = subprocess.run(
            [*argv, "-v", "ON_ERROR_STOP=1"],
            input=sql + "\\gexec\n",
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise service_error(f"cannot create the database {PG_DB!r}", self.log_file, done.stderr)

    def password(self) -> str:
        """The superuser's password, generated once into the password file (mode 0600)."""
        if not self.password_file.exists():
            self.password_file.touch(mode=0o600)
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
        return self.password_file.read_text().strip()
