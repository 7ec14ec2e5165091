"""A linear model on CSV files, trained and applied: one script, two example models.

`train` (the image built with MODE=train) fits y = intercept + sum(w_i * x_i) by (ridge) least
squares on every *.csv under /input: a header row, the target column (`target`, default "y") and
numeric feature columns. It writes /output/weights.json (the coefficients, and the sufficient
statistics X'X, X'y, y'y and the row count, as exact fractions) and /output/report.json.

When /model holds a weights.json (the task was submitted with model_from=<an earlier training
task>), training continues from it: its statistics are added to the new data's. The statistics
are exact fractions, so fine-tuning on B from a model trained on A gives exactly the weights of
training on A and B at once.

`predict` (MODE=predict) applies /model/weights.json to every *.csv under /input that has the
model's feature columns and writes the same relative path under /output with a `prediction`
column appended, plus /output/predictions.json.

Params (/params.json, absent when the task has none): train takes {"l2": number >= 0,
"target": column name}, declared in train_params_schema.json; l2 penalises the coefficients,
not the intercept.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

INPUT = Path(os.environ.get("MODEL_INPUT_DIR", "/input"))
OUTPUT = Path(os.environ.get("MODEL_OUTPUT_DIR", "/output"))
MODEL = Path(os.environ.get("MODEL_DIR", "/model"))
PARAMS = Path(os.environ.get("MODEL_PARAMS_FILE", "/params.json"))
WEIGHTS_FILE = "weights.json"
PREDICTION_COLUMN = "prediction"
DEFAULT_TARGET = "y"


class ModelError(Exception):
    """What the user did wrong, said in one line; the task fails with it (exit 1)."""


Matrix = list[list[Fraction]]


@dataclass
class Statistics:
    """Everything least squares needs from the rows seen so far; adding two is training on both.
    Index 0 of the design row is the intercept's constant 1."""

    features: list[str]
    target: str
    rows: int
    xtx: Matrix
    xty: list[Fraction]
    yty: Fraction

    @classmethod
    def empty(cls, features: list[str], target: str) -> Statistics:
        size = len(features) + 1
        return cls(
            features=features,
            target=target,
            rows=0,
            xtx=[[Fraction(0)] * size for _ in range(size)],
            xty=[Fraction(0)] * size,
            yty=Fraction(0),
        )

    def add_row(self, x: list[Fraction], y: Fraction) -> None:
        design = [Fraction(1), *x]
        for i, left in enumerate(design):
            row = self.xtx[i]
            for j, right in enumerate(design):
                row[j] += left * right
            self.xty[i] += left * y
        self.yty += y * y
        self.rows += 1

    def add(self, other: Statistics) -> None:
        for i, row in enumerate(other.xtx):
            for j, value in enumerate(row):
                self.xtx[i][j] += value
            self.xty[i] += other.xty[i]
        self.yty += other.yty
        self.rows += other.rows

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "xtx": [[str(value) for value in row] for row in self.xtx],
            "xty": [str(value) for value in self.xty],
            "yty": str(self.yty),
        }

    @classmethod
    def from_weights(cls, weights: dict[str, Any]) -> Statistics:
        statistics = weights["statistics"]
        return cls(
            features=[str(name) for name in weights["features"]],
            target=str(weights["target"]),
            rows=int(statistics["rows"]),
            xtx=[[Fraction(value) for value in row] for row in statistics["xtx"]],
            xty=[Fraction(value) for value in statistics["xty"]],
            yty=Fraction(statistics["yty"]),
        )


def read_params() -> dict[str, Any]:
    if not PARAMS.is_file():
        return {}
    params = json.loads(PARAMS.read_text())
    if not isinstance(params, dict):
        raise ModelError(f"{PARAMS} is not a JSON object")
    return params


def csv_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*.csv") if path.is_file())


def number(text: str, where: str) -> Fraction:
    """Exact value of a decimal as written; JSON-style floats like 1e-3 too."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ModelError(f"{where}: {text!r} is not a number") from None
    return value


def read_rows(path: Path, columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of one CSV; every name in `columns` must be in its header."""
    relative = path.relative_to(INPUT).as_posix()
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in columns if name not in header]
        if missing:
            raise ModelError(f"{relative}: no column(s) {', '.join(missing)} in header {header}")
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ModelError(f"{relative}:{line}: {len(row)} values for {len(header)} columns")
    return header, rows


def solve(matrix: Matrix, vector: list[Fraction]) -> list[Fraction]:
    """Gauss-Jordan elimination in exact arithmetic; ModelError when the system is singular."""
    size = len(vector)
    augmented = [[*matrix[i], vector[i]] for i in range(size)]
    for column in range(size):
        pivot = next((row for row in range(column, size) if augmented[row][column] != 0), None)
        if pivot is None:
            raise ModelError(
                "the features are collinear or there are fewer rows than features: "
                "add rows or set the l2 param above 0"
            )
        augmented[column], augmented[pivot] = augmented[pivot], augmented[column]
        lead = augmented[column][column]
        augmented[column] = [value / lead for value in augmented[column]]
        for row in range(size):
            factor = augmented[row][column]
            if row != column and factor != 0:
                pivot_row = augmented[column]
                augmented[row] = [a - factor * b for a, b in zip(augmented[row], pivot_row, strict=True)]
    return [augmented[row][size] for row in range(size)]


def fit(statistics: Statistics, l2: Fraction) -> list[Fraction]:
    """Intercept first, then one coefficient per feature; the intercept is not penalised."""
    matrix = [list(row) for row in statistics.xtx]
    for i in range(1, len(matrix)):
        matrix[i][i] += l2
    return solve(matrix, statistics.xty)


def residual_sum_of_squares(statistics: Statistics, solution: list[Fraction]) -> Fraction:
    """||y - Xw||^2 = y'y - 2 w'X'y + w'X'Xw, from the statistics alone."""
    xtx_w = [sum((a * w for a, w in zip(row, solution, strict=True)), Fraction(0)) for row in statistics.xtx]
    w_xty = sum((w * b for w, b in zip(solution, statistics.xty, strict=True)), Fraction(0))
    w_xtx_w = sum((w * a for w, a in zip(solution, xtx_w, strict=True)), Fraction(0))
    return statistics.yty - 2 * w_xty + w_xtx_w


def load_earlier_weights() -> dict[str, Any] | None:
    weights_file = MODEL / WEIGHTS_FILE
    if not weights_file.is_file():
        return None
    try:
        weights: dict[str, Any] = json.loads(weights_file.read_text())
        Statistics.from_weights(weights)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{weights_file} is not a weights file of this model: {exc!r}") from exc
    return weights


def train() -> int:
    params = read_params()
    l2 = Fraction(params.get("l2", 0))
    earlier = load_earlier_weights()
    target = str(params.get("target", earlier["target"] if earlier else DEFAULT_TARGET))
    files = csv_files(INPUT)
    if not files:
        raise ModelError(f"no *.csv files under {INPUT}")

    features: list[str] | None = None
    if earlier is not None:
        features = [str(name) for name in earlier["features"]]
        if earlier["target"] != target:
            raise ModelError(f"the earlier model predicts {earlier['target']!r}, not {target!r}")
    new_data: Statistics | None = None
    for path in files:
        relative = path.relative_to(INPUT).as_posix()
        header, rows = read_rows(path, [target, *(features or [])])
        if features is None:
            features = [name for name in header if name != target]
            if not features:
                raise ModelError(f"{relative}: no feature column besides {target!r}")
        if new_data is None:
            new_data = Statistics.empty(features, target)
        positions = [header.index(name) for name in features]
        target_position = header.index(target)
        for line, row in enumerate(rows, start=2):
            where = f"{relative}:{line}"
            new_data.add_row([number(row[i], where) for i in positions], number(row[target_position], where))
        print(f"{relative}: {len(rows)} row(s)")
    assert new_data is not None and features is not None  # at least one file was read

    statistics = Statistics.empty(features, target)
    earlier_rows = 0
    if earlier is not None:
        earlier_statistics = Statistics.from_weights(earlier)
        earlier_rows = earlier_statistics.rows
        statistics.add(earlier_statistics)
    statistics.add(new_data)
    solution = fit(statistics, l2)
    rss = residual_sum_of_squares(statistics, solution)
    rmse = math.sqrt(float(rss) / statistics.rows) if statistics.rows else 0.0

    coefficients = {name: float(value) for name, value in zip(features, solution[1:], strict=True)}
    weights = {
        "model": "linear_model",
        "target": target,
        "features": features,
        "intercept": float(solution[0]),
        "coefficients": coefficients,
        "l2": float(l2),
        "statistics": statistics.to_json(),
    }
    report = {
        "rows_new": new_data.rows,
        "rows_earlier": earlier_rows,
        "rows_total": statistics.rows,
        "continued_from_model": earlier is not None,
        "rmse_all_rows": rmse,
        "files": [path.relative_to(INPUT).as_posix() for path in files],
    }
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / WEIGHTS_FILE).write_text(json.dumps(weights, indent=2) + "\n")
    (OUTPUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    fitted = ", ".join(f"{name} {value:.6g}" for name, value in coefficients.items())
    source = f"{earlier_rows} earlier + {new_data.rows} new" if earlier else f"{new_data.rows}"
    print(f"trained on {source} row(s): intercept {float(solution[0]):.6g}, {fitted}")
    print(f"rmse over all rows {rmse:.6g}")
    return 0


def predict() -> int:
    weights_file = MODEL / WEIGHTS_FILE
    weights = load_earlier_weights()
    if weights is None:
        raise ModelError(
            f"{weights_file} not found: submit with model_from=<a training task's uid>, or register "
            "this model with a model zip holding a training task's weights.json"
        )
    features = [str(name) for name in weights["features"]]
    intercept = float(weights["intercept"])
    coefficients = [float(weights["coefficients"][name]) for name in features]
    files = csv_files(INPUT)
    if not files:
        raise ModelError(f"no *.csv files under {INPUT}")
    written = []
    for path in files:
        relative = path.relative_to(INPUT)
        header, rows = read_rows(path, features)
        positions = [header.index(name) for name in features]
        target = OUTPUT / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow([*header, PREDICTION_COLUMN])
            for line, row in enumerate(rows, start=2):
                x = [float(number(row[i], f"{relative.as_posix()}:{line}")) for i in positions]
                value = intercept + sum(w * v for w, v in zip(coefficients, x, strict=True))
                writer.writerow([*row, repr(value)])
        written.append({"file": relative.as_posix(), "rows": len(rows)})
        print(f"{relative.as_posix()}: {len(rows)} prediction(s)")
    summary = {"target": weights["target"], "features": features, "files": written}
    (OUTPUT / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


MODES = {"train": train, "predict": predict}


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else os.environ.get("LINEAR_MODEL_MODE", "")
    if mode not in MODES:
        print(f"linear_model: mode must be one of {', '.join(MODES)}, not {mode!r}", file=sys.stderr)
        return 2
    try:
        return MODES[mode]()
    except ModelError as exc:
        print(f"linear_model {mode}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
