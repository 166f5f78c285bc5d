"""Progress bars for long work: rich bars on a terminal, periodic log lines elsewhere (KFP pods, CI)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("adaptflow.progress")


def track(items: Iterable[T], total: int | None = None, description: str = "working") -> Iterator[T]:
    if sys.stderr.isatty():
        from rich.progress import track as rich_track

        yield from rich_track(items, total=total, description=description, transient=True)
        return
    last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= 10.0:
            last = now
            log.info("%s: %d/%s", description, done, total if total is not None else "?")
