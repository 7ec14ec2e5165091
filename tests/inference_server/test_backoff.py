"""Backoff: doubling delays up to a cap, with or without jitter, counted failures, reset."""

from __future__ import annotations

from inference_server.backoff import Backoff


def test_delays_double_up_to_the_cap_and_start_over_after_reset():
    backoff = Backoff(4.0, 0.5, jitter=False)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.failures == 6
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next() == 0.5


def test_jitter_stays_within_the_upper_quarter_below_each_delay():
    backoff = Backoff(30.0)
    for nominal in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0):
        assert 0.75 * nominal <= backoff.next() <= nominal
