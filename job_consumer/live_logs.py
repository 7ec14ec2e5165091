"""A running container's log, shipped to the private API while the model runs.

The runner feeds the container's output as it comes (`feed`, from its log-stream thread); a
shipping thread sends the whole text so far, with the latest progress line, at most every
SHIP_INTERVAL_S when something changed. Whole text rather than appended pieces: a retried or
repeated upload then changes nothing, and a lost one is made good by the next. The text stops
growing at IS_MAX_LOG_BYTES with a marker line (progress lines are still read past it); the
final upload after the run replaces the live log with the one the verdict goes with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from job_consumer.progress import Progress, parse_progress_line

log = logging.getLogger(__name__)

# The issue asks for the output at least once a second while a model runs.
SHIP_INTERVAL_S = 0.5
# A line longer than this cannot be a progress line worth reading; its rest is not kept.
_MAX_PARTIAL_LINE = 4096

ShipLog = Callable[[str, Progress | None], None]


class LiveLog:
    """One run's output so far (capped) and the thread shipping it."""

    def __init__(
        self, *, max_bytes: int, ship: ShipLog, cap_marker: str, interval_s: float = SHIP_INTERVAL_S
    ) -> None:
        self._max_bytes = max_bytes
        self._ship = ship
        self._cap_marker = cap_marker
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._data = bytearray()
        self._capped = False
        self._partial_line = b""
        self._progress: Progress | None = None
        self._changed = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def feed(self, chunk: bytes) -> None:
        """Take more of the container's output (any thread)."""
        with self._lock:
            if not self._capped:
                room = self._max_bytes - len(self._data)
                self._data += chunk[:room]
                self._capped = len(chunk) > room
                self._changed = True
            self._read_progress(chunk)

    def _read_progress(self, chunk: bytes) -> None:
        lines = (self._partial_line + chunk).split(b"\n")
        self._partial_line = lines.pop()[-_MAX_PARTIAL_LINE:]
        for raw in reversed(lines):
            progress = parse_progress_line(raw.decode("utf-8", errors="replace"))
            if progress is not None:
                if progress != self._progress:
                    self._progress = progress
                    self._changed = True
                break

    def text(self) -> str:
        with self._lock:
            return self._text_locked()

    def _text_locked(self) -> str:
        text = self._data.decode("utf-8", errors="replace")
        if self._capped:
            text += ("" if text.endswith("\n") else "\n") + self._cap_marker + "\n"
        return text

    @property
    def progress(self) -> Progress | None:
        with self._lock:
            return self._progress

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._ship_loop, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop shipping (the caller uploads the final log next, so nothing live follows it)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def ship_now(self) -> bool:
        """Ship what changed since the last shipment; False once the private API refuses it for
        good (the task is no longer this consumer's): shipping then ends."""
        with self._lock:
            if not self._changed:
                return True
            self._changed = False
            text, progress = self._text_locked(), self._progress
        try:
            self._ship(text, progress)
        except LogRefused as exc:
            log.info("live log no longer accepted: %s", exc)
            return False
        except Exception as exc:
            # The next turn sends the whole text again, so nothing is lost meanwhile.
            log.warning("live log not shipped this time: %r", exc)
            with self._lock:
                self._changed = True
        return True

    def _ship_loop(self) -> None:
        while not self._done.wait(self._interval_s):
            if not self.ship_now():
                return


class LogRefused(Exception):
    """The private API will not take this task's log from this consumer any more."""
