"""Errors that tell the user what went wrong *and what to do about it*."""

from __future__ import annotations

import errno


class AdaptflowError(Exception):
    """Base class. ``hint`` says what to do next; the CLI prints both and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(AdaptflowError):
    """The configuration is invalid; raised before any work starts."""


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
    return f"{type(error).__name__}: {error}", None
