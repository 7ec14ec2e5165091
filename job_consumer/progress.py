"""A model's progress, as it reports it in its log: `INFERENCE_PROGRESS <fraction> [message]`.

The fraction is 0..1, or a percentage with a `%` sign (`INFERENCE_PROGRESS 42% resampling`).
A line that does not parse is an ordinary log line: a model's output never fails its task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inference_server.contract import PROGRESS_LINE_PREFIX, PROGRESS_MESSAGE_MAX_CHARS


@dataclass(frozen=True)
class Progress:
    fraction: float
    message: str | None = None


def parse_progress_line(line: str) -> Progress | None:
    """The progress one log line reports, or None when it is not a (well-formed) progress line."""
    parts = line.strip().split(maxsplit=2)
    if len(parts) < 2 or parts[0] != PROGRESS_LINE_PREFIX:
        return None
    value = parts[1]
    try:
        fraction = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        return None
    if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        return None
    message = parts[2].strip()[:PROGRESS_MESSAGE_MAX_CHARS] if len(parts) == 3 else ""
    return Progress(fraction, message or None)


def latest_progress(text: str) -> Progress | None:
    """The last progress line of `text`, if any."""
    for line in reversed(text.splitlines()):
        if PROGRESS_LINE_PREFIX in line and (progress := parse_progress_line(line)) is not None:
            return progress
    return None
