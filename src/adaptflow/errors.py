"""Errors that tell the user what went wrong *and what to do about it*."""

from __future__ import annotations

import errno
from typing import Any


class AdaptflowError(Exception):
    """Base class. ``hint`` says what to do next; the CLI prints both and exits non-zero.

    The CLI's exit status: 2 for a mistake in the command or its config (:class:`ConfigError`, as click
    does for usage errors), 1 for everything else (data, store, weights, security, a failed stage).
    A stage *process* exits with :func:`exit_status` instead, which says whether a retry can help.
    """

    exit_code = 1
    #: True when the same call may succeed later (network, throttling, preemption): worth a retry
    transient = False

    def __init__(self, message: str, hint: str | None = None, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # whole across processes (decoding workers): class, message, hint and the rest of the state
        return (_restore, (type(self), self.message, self.__dict__))


def _restore(cls: type[AdaptflowError], message: str, state: dict[str, Any]) -> AdaptflowError:
    error = cls.__new__(cls)
    BaseException.__init__(error, message)
    error.__dict__.update(state)
    return error


class ConfigError(AdaptflowError):
    """The command or its configuration is invalid; raised before any work starts."""

    exit_code = 2


class DataError(AdaptflowError):
    """The input data cannot be used (empty class, too few images, unreadable source)."""


class WeightsError(AdaptflowError):
    """Backbone weights could not be resolved or failed verification."""


class StoreError(AdaptflowError):
    """A tracking store, registry or object store could not be reached or written."""


class ExportError(AdaptflowError):
    """The ONNX export failed its checks."""


class LeaseError(AdaptflowError):
    """The promotion lease could not be taken in time."""


class PredictionsFailed(AdaptflowError):
    """``adaptflow predict``: some files were not classified (the others' predictions were printed)."""

    def __init__(self, failed: list[dict[str, Any]], total: int) -> None:
        first = "; ".join(f"{r['path']}: {r['error']}" for r in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        super().__init__(
            f"{len(failed)} of {total} files could not be classified: {first}{more}",
            hint="the other files' predictions are above; fix or remove the files named",
        )


class Interrupted(AdaptflowError):
    """SIGTERM or Ctrl-C: the work stopped (training checkpointed first); running it again resumes."""

    exit_code = 143  # 128 + SIGTERM, what a shell and Kubernetes report
    transient = True  # a preempted task is worth retrying


def describe_error(error: BaseException) -> tuple[str, str | None]:
    """(message, hint) for the user: our own errors carry both; a full disk gets its own advice."""
    if isinstance(error, AdaptflowError):
        return error.message, error.hint
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = error.filename or "the output folder"
        return (
            f"disk full while writing {where}",
            "free space there, or point workdir / the pipeline root at a larger volume; outputs are "
            "written to a temporary file and renamed, so nothing already saved was damaged",
        )
    store = store_error_from(error)  # SQLAlchemy/MLflow/botocore errors span lines and name no remedy
    if store is not None:
        return store.message, store.hint
    return f"{type(error).__name__}: {error}", None


# --------------------------------------------------------------------------- what a retry can fix

#: a stage's exit status, read by the local runner: only the transient ones are retried
EXIT_FAILED = 1  # an unexpected error (a bug): retrying runs the same code on the same input
EXIT_PERMANENT = 2  # data, config, security: fails the same way every time
EXIT_TRANSIENT = 75  # EX_TEMPFAIL (sysexits.h): network, 5xx, throttling
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a signal after checkpointing
RETRYABLE_EXITS = frozenset({EXIT_TRANSIENT, EXIT_PREEMPTED, 137, -9, -15})  # 137/-9: killed (OOM killer)

_TRANSIENT_NAMES = (
    "Connection",
    "Timeout",
    "Throttl",
    "SlowDown",
    "ServiceUnavailable",
    "EndpointConnection",
)
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}


def is_transient(error: BaseException) -> bool:
    """Whether the same call may succeed later: network failures, 5xx and throttling are; the rest not."""
    if isinstance(error, AdaptflowError):
        return error.transient
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    response = getattr(error, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
    text = f"{type(error).__name__}: {error}"
    return any(name in type(error).__name__ for name in _TRANSIENT_NAMES) or "Max retries exceeded" in text


def exit_status(error: BaseException) -> int:
    """The exit status a stage process ends with for ``error`` (see RETRYABLE_EXITS)."""
    error = store_error_from(error) or error  # a broken store raised by MLflow or SQLAlchemy
    if isinstance(error, AdaptflowError) and error.exit_code == EXIT_PREEMPTED:
        return EXIT_PREEMPTED
    if is_transient(error):
        return EXIT_TRANSIENT
    if isinstance(error, AdaptflowError) or (isinstance(error, OSError) and error.errno == errno.ENOSPC):
        return EXIT_PERMANENT
    return EXIT_FAILED


# --------------------------------------------------------------------------- broken stores, in one line

_STORE_HINT_ELSEWHERE = "or point tracking.tracking_uri (MLFLOW_TRACKING_URI) or workdir at another store"
#: (what SQLite says, what it means, what to do): matched anywhere in the exception chain
_SQLITE_PROBLEMS = (
    (
        "file is not a database",
        "is corrupt",
        f"move the file aside (mv mlflow.db mlflow.db.corrupt) to start an empty store, restore it from a "
        f"backup, {_STORE_HINT_ELSEWHERE}",
    ),
    (
        "database disk image is malformed",
        "is corrupt (truncated or damaged)",
        f"move the file aside (mv mlflow.db mlflow.db.corrupt) to start an empty store, restore it from a "
        f"backup, {_STORE_HINT_ELSEWHERE}",
    ),
    (
        "attempt to write a readonly database",
        "is read-only",
        f"make the file and its folder writable by this user (a read-only volume cannot hold it), "
        f"{_STORE_HINT_ELSEWHERE}",
    ),
    (
        "unable to open database file",
        "cannot be opened",
        f"check that it is a file (not a folder) this user can read and write, {_STORE_HINT_ELSEWHERE}",
    ),
    (
        "database is locked",
        "is locked by another process",
        "wait for the other adaptflow command to finish, or use a tracking server (MLFLOW_TRACKING_URI) "
        "for concurrent runs",
    ),
)
_S3_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling"}


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in seen and len(seen) < 10:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen


def store_error_from(error: BaseException, store: str | None = None) -> StoreError | None:
    """A StoreError (one line + hint) for what a broken store raises, or None when ``error`` is not one.

    Recognised: SQLite's own complaints (through SQLAlchemy and MLflow, which wrap them in multi-line
    messages with the SQL statement), MLflow's REST client giving up on a tracking server, and S3's
    5xx/throttling replies that outlived botocore's retries. ``store`` names the store in the message.
    """
    for link in _chain(error):
        module = type(link).__module__.split(".")[0]
        text = str(link)
        if module in ("sqlite3", "sqlalchemy", "mlflow"):
            for phrase, meaning, hint in _SQLITE_PROBLEMS:
                if phrase in text:
                    where = store or "the MLflow SQLite store"
                    locked = phrase == "database is locked"
                    return StoreError(f"{where} {meaning}: {phrase}", hint=hint, transient=locked)
        if module == "mlflow" and text.startswith("API request to"):
            # MLflow's client already retried (MLFLOW_HTTP_REQUEST_MAX_RETRIES, with backoff)
            where = store or "the MLflow tracking server"
            return StoreError(
                f"{where} did not answer: {text.splitlines()[0][:300]}",
                hint="it may be restarting or down: run the command again once it answers (GET /health); "
                "check MLFLOW_TRACKING_URI; MLFLOW_HTTP_REQUEST_MAX_RETRIES sets how long the client waits",
                transient=True,
            )
        response = getattr(link, "response", None)  # botocore's ClientError
        if module == "botocore" and isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _S3_TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return StoreError(
                    f"{store or 'S3'} kept failing (HTTP {status} {code}) after botocore's retries: "
                    f"{text.splitlines()[0][:300]}",
                    hint="the endpoint is overloaded or down; this is transient: run the command again later",
                    transient=True,
                )
    return None
