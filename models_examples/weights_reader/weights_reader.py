"""Applies static weights shipped in the model zip (/model/weights.json) to numbers in /input.

Every *.txt file under /input holds numbers separated by white space; each number x becomes
scale * x + offset in a file of the same name and sub-folder under /output, and
/output/summary.json records the weights used and the files written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

INPUT = Path(os.environ.get("MODEL_INPUT_DIR", "/input"))
OUTPUT = Path(os.environ.get("MODEL_OUTPUT_DIR", "/output"))
MODEL = Path(os.environ.get("MODEL_DIR", "/model"))


def load_weights() -> tuple[float, float, dict[str, Any]]:
    weights_file = MODEL / "weights.json"
    if not weights_file.is_file():
        raise SystemExit(
            f"weights_reader: {weights_file} not found; register this model with its model zip "
            "(model_available=true) so the consumer mounts it at /model"
        )
    try:
        weights = json.loads(weights_file.read_text())
        return float(weights["scale"]), float(weights.get("offset", 0.0)), weights
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"weights_reader: {weights_file} is not valid: {exc!r}") from exc


def format_number(value: float) -> str:
    return repr(int(value)) if value.is_integer() else repr(value)


def main() -> int:
    scale, offset, weights = load_weights()
    files = sorted(p for p in INPUT.rglob("*.txt") if p.is_file())
    if not files:
        print(f"weights_reader: no *.txt files under {INPUT}", file=sys.stderr)
        return 2
    written = []
    for path in files:
        relative = path.relative_to(INPUT)
        out_lines = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                values = [float(token) for token in line.split()]
            except ValueError:
                print(f"weights_reader: {relative}:{number}: not a number: {line!r}", file=sys.stderr)
                return 1
            out_lines.append(" ".join(format_number(scale * v + offset) for v in values))
        target = OUTPUT / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(out_lines) + "\n")
        written.append(relative.as_posix())
        print(f"{relative}: {len(out_lines)} line(s), scale {scale} offset {offset}")
    summary = {"weights": weights, "files": written}
    (OUTPUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
