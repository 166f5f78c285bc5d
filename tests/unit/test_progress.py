"""Progress: img/s and ETA from a fake clock off a terminal, a rich bar on a forced terminal."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from adaptflow import progress
from adaptflow.progress import duration, image_progress, images_in, track


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=160, color_system=None), out


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "adaptflow.progress"]


@pytest.fixture(autouse=True)
def off_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)


def test_off_terminal_lines_show_rate_and_eta_from_the_clock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "adaptflow.progress")
    clock = FakeClock()
    with image_progress("fine-tune epoch 2/5", 5000, interval=2.0, clock=clock) as bar:
        for _ in range(5):
            clock.now += 1.0
            bar.advance(640)  # 640 img/s
    assert messages(caplog) == [
        # t=2: 1,280 done, 3,720 left at 640/s -> 5.8s, shown rounded up
        (logging.INFO, "fine-tune epoch 2/5: 1,280/5,000 images, 640 img/s, ETA 6s"),
        (logging.INFO, "fine-tune epoch 2/5: 2,560/5,000 images, 640 img/s, ETA 4s"),
        (logging.INFO, "fine-tune epoch 2/5: 3,200 images in 5.0s, 640 img/s"),
    ]


def test_off_terminal_lines_are_at_most_one_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "adaptflow.progress")
    clock = FakeClock()
    with image_progress("extract", 10_000, interval=10.0, clock=clock) as bar:
        for _ in range(100):
            clock.now += 0.25
            bar.advance(32)
    lines = [m for _, m in messages(caplog)]
    assert lines[:2] == [
        "extract: 1,280/10,000 images, 128 img/s, ETA 1m09s",  # t=10
        "extract: 2,560/10,000 images, 128 img/s, ETA 59s",  # t=20
    ]
    assert len(lines) == 3 and lines[-1] == "extract: 3,200 images in 25.0s, 128 img/s"


def test_short_work_logs_only_a_debug_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "adaptflow.progress")
    clock = FakeClock()
    with image_progress("extract", 100, clock=clock) as bar:
        clock.now += 0.5
        bar.advance(100)
    assert messages(caplog) == [(logging.DEBUG, "extract: 100 images in 0.5s, 200 img/s")]


def test_unknown_total_has_no_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "adaptflow.progress")
    clock = FakeClock()
    with image_progress("pretrain epoch 1/8", None, interval=1.0, clock=clock) as bar:
        clock.now += 2.0
        bar.advance(50)
    assert messages(caplog)[0] == (logging.INFO, "pretrain epoch 1/8: 50 images, 25 img/s")


def test_zero_images_and_zero_seconds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "adaptflow.progress")
    clock = FakeClock()
    with image_progress("extract", 0, clock=clock) as bar:
        bar.advance(0)
    assert messages(caplog) == [(logging.DEBUG, "extract: 0 images in 0.0s")]
    assert bar.line(clock.now) == "extract: 0/0 images, - img/s"


def test_no_summary_when_the_work_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "adaptflow.progress")
    with pytest.raises(RuntimeError), image_progress("extract", 10, clock=FakeClock()):
        raise RuntimeError("boom")
    assert messages(caplog) == []


def test_terminal_bar_shows_images_per_second() -> None:
    console, out = terminal()
    clock = FakeClock()
    with image_progress("fine-tune epoch 1/3", 1000, console=console, clock=clock) as bar:
        for _ in range(5):
            clock.now += 1.0
            bar.advance(100)
    shown = out.getvalue()
    assert "fine-tune epoch 1/3" in shown
    assert "500/1,000 images" in shown
    assert "100 img/s" in shown  # rich's speed: the 400 images after the first sample over 4 s
    assert progress._live is None


def test_terminal_bar_with_unknown_total_and_zero_images() -> None:
    console, out = terminal()
    with image_progress("extract", None, console=console, clock=FakeClock()) as bar:
        bar.advance(0)
    shown = out.getvalue()
    assert "0/? images" in shown and "img/s" in shown


def test_nested_bars_share_one_display() -> None:
    console, out = terminal()
    clock = FakeClock()
    with image_progress("fine-tune", 3000, console=console, clock=clock) as outer:
        live = progress._live
        assert live is not None
        for epoch in range(1, 4):
            with image_progress(f"epoch {epoch}/3", 1000, console=Console(), clock=clock) as inner:
                assert progress._live is live and len(live.progress.tasks) == 2  # a row, not log lines
                clock.now += 1.0
                inner.advance(1000)
            outer.advance(1000)
        assert len(live.progress.tasks) == 1
    assert progress._live is None and "3,000/3,000 images" in out.getvalue()


def test_log_lines_print_above_the_bar_and_the_handler_is_restored() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # as logs.setup_logging makes it
    root.addHandler(handler)
    try:
        console, out = terminal()
        with image_progress("extract", 10, console=console, clock=FakeClock()):
            assert handler.stream is not sys.stderr
            logging.getLogger("adaptflow.test").warning("a warning during the bar")
        assert handler.stream is sys.stderr
    finally:
        root.removeHandler(handler)
    assert "a warning during the bar" in out.getvalue()


def test_track_yields_every_item_on_and_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "adaptflow.progress")
    assert list(track(iter(range(5)), total=5, description="ingest", interval=0.0)) == [0, 1, 2, 3, 4]
    assert [m for _, m in messages(caplog)][-1] == "ingest: 5/5"
    console, out = terminal()
    assert list(track(range(3), total=3, description="ingest", console=console)) == [0, 1, 2]
    assert "3/3 items" in out.getvalue() and progress._live is None


def test_images_in_loaders() -> None:
    data = TensorDataset(torch.zeros(10, 1))
    assert images_in(DataLoader(data, batch_size=4)) == 10
    assert images_in(DataLoader(data, batch_size=4, drop_last=True)) == 8

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    assert images_in(DataLoader(Stream(), batch_size=2)) is None


def test_duration() -> None:
    assert [duration(s) for s in (0, 8.2, 59, 125, 3720)] == ["0s", "9s", "59s", "2m05s", "1h02m"]
