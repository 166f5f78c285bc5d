"""Threads whose failures fail the test: a worker's exception is re-raised, not left as a warning."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any


def peak_concurrency(
    guard: Callable[[], AbstractContextManager[Any]], workers: int, hold_seconds: float = 0.02
) -> int:
    """Runs ``workers`` threads that each hold ``guard()`` for ``hold_seconds``.

    Returns the largest number that were inside at once. Raises the first worker's error, and
    fails when any worker did not finish: a lease that lets 7 of 8 holders crash does not pass.
    """
    inside, peak, done, lock = [0], [0], [0], threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with guard():
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(hold_seconds)
                with lock:
                    inside[0] -= 1
            with lock:
                done[0] += 1
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    assert done[0] == workers, f"only {done[0]} of {workers} workers went through"
    return peak[0]
