"""Progress bars for long work: rich bars on a terminal, periodic log lines elsewhere (KFP pods, CI).

``image_progress`` is the one helper for image work (feature extraction, fine-tuning, pretraining)::

    with image_progress(f"fine-tune epoch {epoch}/{epochs}", images_in(loader)) as bar:
        for x, y in loader:
            ...
            bar.advance(len(y))

On a terminal (stderr is a TTY) it draws a transient rich bar on stderr: description, bar,
done/total images, img/s, elapsed, ETA. Bars opened inside another share its display, one row
each, so a per-epoch bar inside a per-run bar works. While a bar is up, the project's stderr log
handler (logs.py) writes through rich, above the bar, so log lines and the bar never garble.

Off a terminal it writes a log line at most every ``interval`` seconds, and nothing else::

    fine-tune epoch 2/5: 1,280/5,000 images, 412 img/s, ETA 9s

Rates there are the average since the bar opened. At the end it logs one summary line (images,
seconds, img/s): at INFO off a terminal when it logged progress lines, so a long run's last line
is not a stale ETA; otherwise at DEBUG, as short work is already summed up by its caller's log.

In a stage process of a local run (``ADAPTFLOW_PROGRESS_EVENTS=1``, set by the runner) it writes
events instead, one JSON line on stdout at most every ``EVENT_INTERVAL`` seconds, prefixed with
``EVENT_PREFIX``; the runner, which reads the stage's output, draws the bars on its own terminal
(adaptflow.run_output).

``advance`` takes plain ints, so it never syncs a device; it costs an add and a clock read (off a
terminal) or rich's own counter update (a lock, a clock read, a deque append) on one.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

T = TypeVar("T")
log = logging.getLogger("adaptflow.progress")
Clock = Callable[[], float]
#: "1" in a stage process whose runner draws its bars: progress is written to stdout as events
PROGRESS_EVENTS_ENV = "ADAPTFLOW_PROGRESS_EVENTS"
EVENT_PREFIX = "adaptflow-progress "
EVENT_INTERVAL = 0.5
_event_ids = itertools.count()


class ProgressEvents:
    """One bar's events, for the runner to draw (see the module docstring)."""

    def __init__(self, description: str, total: int | None, clock: Clock) -> None:
        self.id = f"{os.getpid()}-{next(_event_ids)}"
        self.description, self.total, self._clock = description, total, clock
        self._next = 0.0

    def send(self, kind: str, done: int) -> None:
        record = {"id": self.id, "event": kind, "description": self.description, "total": self.total}
        sys.stdout.write(f"{EVENT_PREFIX}{json.dumps(record | {'done': done})}\n")
        sys.stdout.flush()

    def update(self, done: int) -> None:
        now = self._clock()
        if now >= self._next:
            self._next = now + EVENT_INTERVAL
            self.send("update", done)


def images_in(loader: object) -> int | None:
    """Images one pass over a DataLoader yields; None when its sampler has no length."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    try:
        n = len(sampler) if sampler is not None else len(loader)  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset or a sampler without __len__
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    batch_size = getattr(batch_sampler, "batch_size", None)
    if getattr(batch_sampler, "drop_last", False) and batch_size:
        n -= n % batch_size
    return n


def duration(seconds: float) -> str:
    """Compact: 9s, 2m05s, 1h02m."""
    s = math.ceil(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(done: int, seconds: float) -> float | None:
    return done / seconds if seconds > 0 else None


@dataclass
class _Live:
    """The one rich display all open bars share; two Live displays on one terminal would garble."""

    progress: Progress
    users: int = 0
    restore: list[tuple[logging.StreamHandler, IO[str]]] = field(default_factory=list)


_live: _Live | None = None
_live_lock = threading.Lock()


def _columns() -> list:
    from rich.progress import (
        BarColumn,
        ProgressColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class CountColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            total = f"{int(task.total):,}" if task.total is not None else "?"
            return Text(f"{int(task.completed):,}/{total} {task.fields['unit']}", style="progress.download")

    class RateColumn(ProgressColumn):
        # rich's speed is over its last 30 s of samples, the same one TimeRemainingColumn's ETA uses
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None and task.elapsed:
                speed = task.completed / task.elapsed
            shown = f"{speed:,.0f}" if speed is not None else "-"
            return Text(f"{shown} {task.fields['rate_unit']}/s", style="progress.data.speed")

    return [
        TextColumn("{task.description}"),
        BarColumn(),
        CountColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]


def _route_log_handlers(console: Console) -> list[tuple[logging.StreamHandler, IO[str]]]:
    """Points stderr log handlers (logs.py's) at the console for the bar's lifetime.

    rich's redirect_stderr only swaps ``sys.stderr``; a StreamHandler holds the stream it was made
    with, so its lines would land in the middle of the bar's redraws.
    """
    from rich.file_proxy import FileProxy

    routed = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            stream = handler.stream
            if stream is not None and any(stream is s for s in (sys.stderr, sys.__stderr__)):
                handler.setStream(FileProxy(console, stream))
                routed.append((handler, stream))
    return routed


def on_terminal(console: Console | None) -> bool:
    """A bar opened inside a live one joins it, so nesting never switches a row to log lines."""
    if _live is not None:
        return True
    return console.is_terminal if console is not None else sys.stderr.isatty()


def _restore(live: _Live) -> None:
    for handler, stream in live.restore:
        handler.setStream(stream)


@contextmanager
def rich_bar(
    description: str, total: int | None, unit: str, rate_unit: str, console: Console | None, clock: Clock
) -> Iterator[tuple[Progress, TaskID]]:
    global _live
    from rich.console import Console
    from rich.progress import Progress

    with _live_lock:
        if _live is None:
            progress = Progress(
                *_columns(),
                console=console or Console(stderr=True),
                transient=True,
                get_time=clock,
                redirect_stdout=False,  # stdout carries --json; it must never move to stderr
                redirect_stderr=True,  # stray writes (warnings) print above the bar
            )
            live = _Live(progress, restore=_route_log_handlers(progress.console))
            try:
                progress.start()
            except BaseException:
                _restore(live)
                raise
            _live = live
        live = _live
        live.users += 1
    task = live.progress.add_task(description, total=total, unit=unit, rate_unit=rate_unit)
    try:
        yield live.progress, task
    finally:
        with _live_lock:
            live.users -= 1
            if live.users:
                live.progress.remove_task(task)
            else:  # the last bar: stop() draws its final state, then transient erases it
                live.progress.stop()
                _restore(live)
                _live = None


class ImageProgress:
    """Counts the images of one bar; see the module docstring."""

    def __init__(
        self,
        description: str,
        total_images: int | None,
        *,
        clock: Clock,
        interval: float,
        bar: tuple[Progress, TaskID] | None = None,
        events: ProgressEvents | None = None,
    ) -> None:
        self.description = description
        self.events = events
        self.total = total_images
        self.done = 0
        self.lines = 0  # progress lines logged (off a terminal)
        self._clock = clock
        self._interval = interval
        self._bar = bar
        self.started = clock()
        self._next_line = self.started + interval

    def advance(self, images: int) -> None:
        """Counts a batch of ``images`` (a plain int: ``len(y)``, never a tensor)."""
        self.done += images
        if self.events is not None:
            self.events.update(self.done)
            return
        if self._bar is not None:
            self._bar[0].advance(self._bar[1], images)
            return
        now = self._clock()
        if self.line_due(now):
            self.lines += 1
            log.info("%s", self.line(now))

    def line_due(self, now: float) -> bool:
        """Whether the off-terminal line is due at ``now`` (then the next one is an interval away)."""
        if now < self._next_line:
            return False
        self._next_line = now + self._interval
        return True

    def line(self, now: float) -> str:
        """The off-terminal progress line at clock time ``now``."""
        rate = _rate(self.done, now - self.started)
        rate_text = f"{rate:,.0f} img/s" if rate is not None else "- img/s"
        if self.total is None:
            return f"{self.description}: {self.done:,} images, {rate_text}"
        eta = f", ETA {duration(max(self.total - self.done, 0) / rate)}" if rate else ""
        return f"{self.description}: {self.done:,}/{self.total:,} images, {rate_text}{eta}"

    def summary(self, now: float) -> str:
        seconds = now - self.started
        rate = _rate(self.done, seconds)
        rate_text = f", {rate:,.0f} img/s" if rate is not None else ""
        return f"{self.description}: {self.done:,} images in {seconds:.1f}s{rate_text}"


@contextmanager
def image_progress(
    description: str,
    total_images: int | None,
    *,
    interval: float = 10.0,
    console: Console | None = None,
    clock: Clock | None = None,
) -> Iterator[ImageProgress]:
    """A bar for image work; ``advance(len(batch))`` per batch. ``total_images`` None: no ETA.

    ``console`` (a rich Console) overrides the stderr TTY check; ``clock`` defaults to
    ``time.monotonic``, looked up per call so tests can patch it.
    """
    clock = clock or time.monotonic
    if os.environ.get(PROGRESS_EVENTS_ENV) == "1" and console is None:
        events = ProgressEvents(description, total_images, clock)
        progress = ImageProgress(description, total_images, clock=clock, interval=interval, events=events)
        events.send("open", 0)
        try:
            yield progress
        finally:
            events.send("close", progress.done)
        log.info("%s", progress.summary(clock()))  # for the run's log file
        return
    terminal = on_terminal(console)
    if not terminal:
        progress = ImageProgress(description, total_images, clock=clock, interval=interval)
        yield progress
        level = logging.INFO if progress.lines else logging.DEBUG
        log.log(level, "%s", progress.summary(clock()))
        return
    with rich_bar(description, total_images, "images", "img", console, clock) as bar:
        progress = ImageProgress(description, total_images, clock=clock, interval=interval, bar=bar)
        yield progress
    log.debug("%s", progress.summary(clock()))


def track(
    items: Iterable[T],
    total: int | None = None,
    description: str = "working",
    *,
    interval: float = 10.0,
    console: Console | None = None,
) -> Iterator[T]:
    """Yields ``items``, with a bar on a terminal (on stderr) or a log line every ``interval`` s."""
    terminal = on_terminal(console)
    if terminal:
        with rich_bar(description, total, "items", "items", console, time.monotonic) as (progress, task):
            for item in items:
                yield item
                progress.advance(task, 1)
        return
    last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= interval:
            last = now
            log.info("%s: %d/%s", description, done, total if total is not None else "?")
