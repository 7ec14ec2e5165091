"""Capped exponential backoff between tries of something that may come back (a broker, an API)."""

from __future__ import annotations

import random


class Backoff:
    """Delays of first_s, twice that, and so on up to cap_s; `reset` after a success.

    With jitter, each delay is drawn from the upper quarter below the nominal one, so clients
    that lost a server together do not all come back in step.
    """

    def __init__(self, cap_s: float, first_s: float = 0.5, *, jitter: bool = True) -> None:
        self.cap_s = cap_s
        self.first_s = first_s
        self.jitter = jitter
        self._current = 0.0
        self.failures = 0

    def next(self) -> float:
        """The delay before the next try; counts one more failure."""
        self.failures += 1
        self._current = min(self.cap_s, self._current * 2 if self._current else self.first_s)
        return self._current * random.uniform(0.75, 1.0) if self.jitter else self._current

    def reset(self) -> None:
        self._current = 0.0
        self.failures = 0
