"""What a person sees: the main job (`make run` is `adaptflow demo`) prints a short, plain transcript;
everything else goes to the run's log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# slow (make test-all): two real `adaptflow demo` runs, about 5 minutes of CI's 30
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADAPTFLOW = [sys.executable, "-m", "adaptflow.cli"]
FIRST_RUN_LINES = 60  # issue 13: the first `make run`, besides progress bars
UNCHANGED_RUN_LINES = 15
TIMESTAMPED = re.compile(r"^\d\d:\d\d:\d\d ")


def _demo(home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ADAPTFLOW_"))}
    result = subprocess.run(
        [*ADAPTFLOW, *extra, "demo", "--workdir", str(home)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


@pytest.fixture(scope="module")
def demo_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[subprocess.CompletedProcess[str]]]:
    home = tmp_path_factory.mktemp("demo-home")
    return home, [_demo(home), _demo(home)]


def test_the_first_run_and_an_unchanged_rerun_print_a_few_plain_lines(demo_runs) -> None:  # type: ignore[no-untyped-def]
    _home, (first, unchanged) = demo_runs
    lines = _lines(first)
    assert len(lines) <= FIRST_RUN_LINES, "\n".join(lines)
    assert len(_lines(unchanged)) <= UNCHANGED_RUN_LINES, "\n".join(_lines(unchanged))
    for result in (first, unchanged):
        assert "\x1b[" not in result.stdout + result.stderr  # not a terminal: no colour codes
        assert "Traceback" not in result.stderr
    # every stderr line carries the one timestamp format; each stage starts and ends once, with its time
    assert all(TIMESTAMPED.match(line) for line in first.stderr.splitlines()), first.stderr
    for stage in ("ingest", "baseline", "finetune", "evaluate", "export", "register"):
        assert sum(line.endswith(f" {stage} started") for line in lines) == 1, stage
        assert sum(bool(re.search(rf" {stage} done in \d+\.\d s$", line)) for line in lines) == 1, stage
    assert "PROMOTED" in first.stdout
    assert "unchanged: " in unchanged.stdout and "unchanged: unchanged" not in unchanged.stdout
    # no line twice (kfp.local's and the executor's own logging used to repeat each)
    stamped = [TIMESTAMPED.sub("", line) for line in first.stderr.splitlines()]
    assert len(stamped) == len(set(stamped)), first.stderr


def test_the_run_log_holds_what_the_terminal_does_not(demo_runs) -> None:  # type: ignore[no-untyped-def]
    home, (first, _unchanged) = demo_runs
    named = re.search(r"run log: (\S+)", first.stderr)
    assert named, first.stderr
    log = Path(named.group(1))
    assert log.is_file() and log.parent.parent == home / "runs"
    text = log.read_text()
    assert "Executing task" in text  # kfp.local's own lines
    assert "finetune-full epoch 1/" in text  # the stages' INFO lines
    assert "\x1b[" not in text
    # the executor's own handler is dropped in stage processes: each stage line is in the log once
    epoch_lines = [
        line for line in text.splitlines() if "adaptflow.training.loop: finetune-full epoch 1/" in line
    ]
    assert len(epoch_lines) == 1, epoch_lines


def test_verbose_shows_the_stages_lines_live(demo_runs) -> None:  # type: ignore[no-untyped-def]
    home, _runs = demo_runs
    result = _demo(home, "-v")  # an unchanged rerun: ingest, then the report
    assert "Executing task" in result.stderr and "INFO adaptflow.data.ingest" in result.stderr
