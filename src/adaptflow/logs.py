"""Logging to stderr (stdout stays clean for ``--json``), quiet unless asked.

The terminal gets adaptflow's own lines: records of the ``adaptflow.console`` logger (a stage
started, finished, what it found), progress, and warnings and errors. Everything else at the chosen
level goes to a local run's log file (:func:`log_to_file`), and to the terminal too with ``-v``
(:func:`setup_logging`'s ``verbose``). One timestamp format everywhere: ``HH:MM:SS``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

NOISY = (
    "onnxscript",
    "onnx_ir",
    "alembic",
    "mlflow.store.db",
    "urllib3",
    "botocore",
    "matplotlib",
    "PIL",
    "torch.onnx",
)
#: the logger whose INFO lines a person running adaptflow sees by default
CONSOLE = "adaptflow.console"
#: the logger of progress lines off a terminal (``adaptflow.progress``)
PROGRESS = "adaptflow.progress"
TIME_FORMAT = "%H:%M:%S"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def console() -> logging.Logger:
    """The logger for a line a person should see: a stage's result, a decision."""
    return logging.getLogger(CONSOLE)


class _ConsoleFilter(logging.Filter):
    """Quiet mode: warnings and errors, the console logger, and progress lines."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            self.verbose
            or record.levelno >= logging.WARNING
            or record.name == CONSOLE
            or record.name == PROGRESS
        )


class _Formatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message``; with ``plain_console``, console and progress lines as
    ``HH:MM:SS message``, like the rest of what a person sees. (A stage process keeps the full form:
    the runner recognises its console lines by it.)"""

    def __init__(self, plain_console: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", TIME_FORMAT)
        self._plain = logging.Formatter("%(asctime)s %(message)s", TIME_FORMAT) if plain_console else None

    def format(self, record: logging.LogRecord) -> str:
        if self._plain is not None and record.name in (CONSOLE, PROGRESS):
            return self._plain.format(record)
        return super().format(record)


def _ours(handler: logging.Handler) -> bool:
    return bool(getattr(handler, "_adaptflow", False))


def setup_logging(level: str | int = "INFO", *, verbose: bool = True, exclusive: bool = False) -> None:
    """One stderr handler on the root logger at ``level``; unless ``verbose``, it shows only what
    :class:`_ConsoleFilter` lets through. ``exclusive`` drops other root handlers (a component
    process, where kfp's executor installed its own: every line would be written twice)."""
    root = logging.getLogger()
    if exclusive:
        for other in [h for h in root.handlers if not _ours(h)]:
            root.removeHandler(other)
    handler = next((h for h in root.handlers if _ours(h) and not isinstance(h, logging.FileHandler)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._adaptflow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.setFormatter(_Formatter(plain_console=not verbose))
    handler.filters = [_ConsoleFilter(verbose)]
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def is_verbose() -> bool:
    """Whether the terminal gets every log line (``-v``)."""
    for handler in logging.getLogger().handlers:
        if _ours(handler) and not isinstance(handler, logging.FileHandler):
            return any(isinstance(f, _ConsoleFilter) and f.verbose for f in handler.filters)
    return True


def log_to_file(path: Path) -> logging.FileHandler:
    """Adds a handler writing every record (at the root's level) to ``path``; remove it when done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_Formatter())
    handler._adaptflow = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return handler
