"""SIGTERM means "checkpoint and exit": the stop request training checks, and dying with the parent.

Kept free of torch so the CLI's process runner can use it too.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM while :func:`stop_on_sigterm` is active; the loop checks it after each step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[StopRequest]:
    """SIGTERM means "checkpoint and exit": it sets the request instead of killing the process.

    Only the main thread can install handlers; elsewhere the request is never set.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: Any) -> None:
        log.warning("SIGTERM: checkpointing after the current step, then stopping")
        request.set()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def handlers_restored(*names: str) -> Iterator[None]:
    """Puts back the handlers of the named signals (those this platform has) on leaving: for code
    that installs its own and never removes them (torch's elastic launcher does)."""
    saved = {sig: signal.getsignal(sig) for name in names if (sig := getattr(signal, name, None))}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                if handler is not None:
                    signal.signal(sig, handler)


def stop_with_parent() -> None:
    """SIGTERM this process when its parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``).

    Called in a stage process started by the local runner, before exec, and again in the stage's
    Python (its parent is the ``sh -c`` KFP wraps every component in), so the chain reaches training.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
