"""A stage's output sorted by the runner: the terminal gets adaptflow's lines, the log file the rest."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from adaptflow import run_output
from adaptflow.logs import setup_logging
from adaptflow.progress import EVENT_PREFIX, PROGRESS_EVENTS_ENV, image_progress
from adaptflow.run_output import StageOutput

LINES = [
    "[KFP Executor 2026-11-26 16:42:27,842 INFO]: Looking for component `ingest`",
    "16:42:29 INFO adaptflow.data.ingest: ingest: 896 candidate files in 5 classes",
    "16:42:29 INFO adaptflow.console: ingest: 896 images (train=576, val=142, test=178)",
    "16:42:30 WARNING adaptflow.data.ingest: 2 files quarantined",
    "\x1b[96m'ingest'\x1b[0m finished",
]


def _feed(lines: list[str], verbose: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    terminal, log = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    output = StageOutput("ingest", log, verbose)
    for line in lines:
        output.feed(line + "\n")
    output.close()
    return terminal.getvalue(), log.getvalue()


def test_quiet_shows_console_lines_and_warnings_and_logs_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal, log = _feed(LINES, verbose=False, monkeypatch=monkeypatch)
    assert terminal.splitlines() == [
        "16:42:29 ingest: 896 images (train=576, val=142, test=178)",
        "16:42:30 WARNING adaptflow.data.ingest: 2 files quarantined",
    ]
    assert log.splitlines() == [*LINES[:4], "'ingest' finished"]  # every line, without colour codes


def test_verbose_shows_every_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal, _log = _feed(LINES, verbose=True, monkeypatch=monkeypatch)
    assert terminal.splitlines() == LINES


def test_progress_events_become_a_bar_not_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_output, "OFF_TERMINAL_INTERVAL", 0.0)  # off a terminal: a line per update
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)

    def event(kind: str, done: int) -> str:
        record = {"id": "7-0", "event": kind, "description": "features", "total": 100, "done": done}
        return EVENT_PREFIX + json.dumps(record)

    terminal, log = _feed([event("open", 0), event("update", 40), event("close", 100)], False, monkeypatch)
    assert log == ""
    assert "ingest: features: 40/100 images" in terminal
    # a line that only looks like an event is an ordinary line
    _terminal, log = _feed([EVENT_PREFIX + "not json"], False, monkeypatch)
    assert log.strip() == EVENT_PREFIX + "not json"


def test_a_stage_process_writes_progress_events(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PROGRESS_EVENTS_ENV, "1")
    with image_progress("decode", 10) as bar:
        bar.advance(4)
        bar.advance(6)
    events = [json.loads(line[len(EVENT_PREFIX) :]) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["event"] == "open" and events[-1] == {
        "id": events[0]["id"],
        "event": "close",
        "description": "decode",
        "total": 10,
        "done": 10,
    }


def test_quiet_logging_passes_console_lines_and_warnings_only(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers = []
        setup_logging("INFO", verbose=False)
        logging.getLogger("adaptflow.training").info("detail")
        logging.getLogger("adaptflow.console").info("a stage result")
        logging.getLogger("adaptflow.progress").info("pretrain epoch 1/8: 384/594 images, 37 img/s")
        logging.getLogger("adaptflow.training").warning("careful")
        lines = capsys.readouterr().err.splitlines()
        assert [line[9:] for line in lines] == [
            "a stage result",
            "pretrain epoch 1/8: 384/594 images, 37 img/s",  # the same form as the lines around it
            "WARNING adaptflow.training: careful",
        ]
    finally:
        root.handlers, root.level = saved[0], saved[1]
