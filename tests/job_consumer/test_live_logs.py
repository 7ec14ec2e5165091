"""The live log a consumer keeps of a running container, and the progress lines read from it."""

from __future__ import annotations

import threading

import pytest

from job_consumer.live_logs import LiveLog, LogRefused
from job_consumer.progress import Progress, latest_progress, parse_progress_line
from tests.helpers import wait_until

MARKER = "[inference-server] capped"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("INFERENCE_PROGRESS 0.42 resampling the volume", Progress(0.42, "resampling the volume")),
        ("INFERENCE_PROGRESS 42%", Progress(0.42)),
        ("  INFERENCE_PROGRESS 1\r", Progress(1.0)),
        ("INFERENCE_PROGRESS 0", Progress(0.0)),
        ("INFERENCE_PROGRESS 1.5", None),
        ("INFERENCE_PROGRESS -0.1", None),
        ("INFERENCE_PROGRESS nan", None),
        ("INFERENCE_PROGRESS half", None),
        ("INFERENCE_PROGRESS", None),
        ("progress 0.5", None),
        ("epoch 3 INFERENCE_PROGRESS 0.5", None),
    ],
)
def test_progress_lines(line, expected):
    assert parse_progress_line(line) == expected


def test_the_latest_progress_line_counts():
    text = "INFERENCE_PROGRESS 0.1 a\nnoise\nINFERENCE_PROGRESS 0.7 b\nINFERENCE_PROGRESS bad\n"
    assert latest_progress(text) == Progress(0.7, "b")


class Recorder:
    def __init__(self, failures: int = 0, refuse: bool = False) -> None:
        self.shipped: list[tuple[str, Progress | None]] = []
        self.failures = failures
        self.refuse = refuse
        self.calls = 0

    def __call__(self, text: str, progress: Progress | None) -> None:
        self.calls += 1
        if self.refuse:
            raise LogRefused("task is no longer yours")
        if self.failures:
            self.failures -= 1
            raise ConnectionError("private API down")
        self.shipped.append((text, progress))


def test_output_is_shipped_whole_so_far_with_its_progress():
    ship = Recorder()
    live = LiveLog(max_bytes=1024, ship=ship, cap_marker=MARKER)
    live.feed(b"one\nINFERENCE_PROGRESS 0.5 hal")
    live.feed(b"fway\ntwo\n")

    assert live.ship_now()

    assert ship.shipped == [("one\nINFERENCE_PROGRESS 0.5 halfway\ntwo\n", Progress(0.5, "halfway"))]


def test_nothing_new_ships_nothing():
    ship = Recorder()
    live = LiveLog(max_bytes=1024, ship=ship, cap_marker=MARKER)
    live.feed(b"one\n")
    live.ship_now()
    live.ship_now()
    assert ship.calls == 1


def test_a_failed_shipment_is_made_good_by_the_next():
    ship = Recorder(failures=1)
    live = LiveLog(max_bytes=1024, ship=ship, cap_marker=MARKER)
    live.feed(b"one\n")

    assert live.ship_now()  # failed, kept for the next turn
    assert live.ship_now()

    assert ship.shipped == [("one\n", None)]


def test_a_refused_shipment_ends_shipping():
    live = LiveLog(max_bytes=1024, ship=Recorder(refuse=True), cap_marker=MARKER)
    live.feed(b"one\n")
    assert not live.ship_now()


def test_the_log_stops_at_the_cap_with_a_marker_but_progress_is_still_read():
    live = LiveLog(max_bytes=10, ship=Recorder(), cap_marker=MARKER)
    live.feed(b"0123456789abcdef\n")
    live.feed(b"INFERENCE_PROGRESS 0.9 late\n")

    assert live.text() == f"0123456789\n{MARKER}\n"
    assert live.progress == Progress(0.9, "late")


def test_the_thread_ships_while_output_comes_and_stops_when_told():
    shipped = threading.Event()
    ship = Recorder()

    def recording(text: str, progress: Progress | None) -> None:
        ship(text, progress)
        shipped.set()

    live = LiveLog(max_bytes=1024, ship=recording, cap_marker=MARKER, interval_s=0.05)
    live.start(name="test-live-log")
    live.feed(b"first line\n")
    wait_until(lambda: shipped.is_set(), timeout=5)
    live.stop()
    calls = ship.calls
    live.feed(b"after the end\n")

    assert ship.shipped[0] == ("first line\n", None)
    assert ship.calls == calls  # nothing ships once stopped
