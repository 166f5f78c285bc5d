"""What a local run shows while its stages run: adaptflow's own lines on the terminal, every line in
the run's log file.

kfp.local runs each stage as a process; :mod:`adaptflow.pipelines.local_process` reads its output
line by line and hands each line to the stage's :class:`StageOutput`, which sends

- progress events (:mod:`adaptflow.progress`) to a bar on this terminal, or off a terminal to a
  line every ``OFF_TERMINAL_INTERVAL`` seconds;
- the stage's console lines (``HH:MM:SS INFO adaptflow.console: ...``) and its warnings and errors
  to the terminal;
- every line but the events to the run's log file, without colour codes.

With ``-v`` every line also reaches the terminal, as it did before the log file existed.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from typing import TextIO

from adaptflow.logs import TIME_FORMAT
from adaptflow.progress import EVENT_PREFIX, ImageProgress, on_terminal, rich_bar

#: off a terminal, a running bar's line is printed at most this often
OFF_TERMINAL_INTERVAL = 30.0
_CONSOLE_LINE = re.compile(r"^(\d\d:\d\d:\d\d) INFO adaptflow\.console: (.*)$")
_PROBLEM_LINE = re.compile(r"^\d\d:\d\d:\d\d (WARNING|ERROR|CRITICAL) ")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def say(text: str) -> None:
    """One line on the terminal (stderr), timestamped like the log lines."""
    sys.stderr.write(f"{time.strftime(TIME_FORMAT)} {text}\n")
    sys.stderr.flush()


class _Bar:
    """One stage bar: rich's on a terminal, a periodic line off one. Not ``image_progress``: while a
    task runs, kfp.local swaps the root log handlers for its own (into the run log), so its
    off-terminal log lines would never reach the terminal; these lines are written directly."""

    def __init__(self, description: str, total: int | None) -> None:
        self.progress = ImageProgress(
            description, total, clock=time.monotonic, interval=OFF_TERMINAL_INTERVAL
        )
        self._stack = contextlib.ExitStack()
        self._task = None
        if on_terminal(None):
            self._task = self._stack.enter_context(
                rich_bar(description, total, "images", "img", None, time.monotonic)
            )

    def to(self, done: int) -> None:
        step = done - self.progress.done
        self.progress.done = done
        if self._task is not None:
            self._task[0].advance(self._task[1], step)
            return
        now = time.monotonic()
        if self.progress.line_due(now):
            say(self.progress.line(now))

    def close(self) -> None:
        self._stack.close()


class StageOutput:
    """Sorts one stage process's output lines (module docstring)."""

    def __init__(self, stage: str, log_file: TextIO, verbose: bool) -> None:
        self.stage, self.log_file, self.verbose = stage, log_file, verbose
        self._bars: dict[str, _Bar] = {}

    def feed(self, line: str) -> None:
        text = line.rstrip("\n")
        if text.startswith(EVENT_PREFIX) and self._event(text[len(EVENT_PREFIX) :]):
            return
        self.log_file.write(strip_ansi(text) + "\n")
        if self.verbose:
            sys.stderr.write(text + "\n")
            return
        console = _CONSOLE_LINE.match(text)
        if console:
            sys.stderr.write(f"{console[1]} {console[2]}\n")
        elif _PROBLEM_LINE.match(text):
            sys.stderr.write(text + "\n")

    def _event(self, payload: str) -> bool:
        try:
            event = json.loads(payload)
            key, kind, done = str(event["id"]), event["event"], int(event["done"])
        except (ValueError, KeyError, TypeError):
            return False  # not ours after all: an ordinary line
        if kind == "open":
            self._bars[key] = _Bar(f"{self.stage}: {event.get('description', '')}", event.get("total"))
        bar = self._bars.get(key)
        if bar is not None:
            bar.to(done)
            if kind == "close":
                self._bars.pop(key).close()
        return True

    def close(self) -> None:
        """The stage ended: any bar it left open goes too."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
