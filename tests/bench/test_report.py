"""BENCHMARKS.md is its own template: rendering replaces the figures between markers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import TEMPLATE_PATH, TemplateError, fill, markdown

RESULTS_PATH = Path(__file__).resolve().parents[2] / "bench" / "results.json"


def test_inline_and_block_figures_are_replaced_and_the_prose_is_kept() -> None:
    template = (
        "Intro by hand, <!-- bench:rate -->1.0<!-- /bench:rate --> MB/s.\n\n"
        "<!-- bench:table -->\nold table\n<!-- /bench:table -->\n\nOutro by hand.\n"
    )
    filled = fill(template, {"rate": "2.5", "table": "| a |\n| b |"})
    assert filled == (
        "Intro by hand, <!-- bench:rate -->2.5<!-- /bench:rate --> MB/s.\n\n"
        "<!-- bench:table -->\n| a |\n| b |\n<!-- /bench:table -->\n\nOutro by hand.\n"
    )
    # Rendering again with the same figures changes nothing.
    assert fill(filled, {"rate": "2.5", "table": "| a |\n| b |"}) == filled


def test_an_empty_block_figure_leaves_its_markers_on_their_own_lines() -> None:
    template = "before\n\n<!-- bench:errors -->\nold\n<!-- /bench:errors -->\n"
    assert fill(template, {"errors": ""}) == "before\n\n<!-- bench:errors -->\n<!-- /bench:errors -->\n"


def test_a_marker_for_a_figure_the_report_does_not_make_is_an_error() -> None:
    with pytest.raises(TemplateError, match="no_such_figure"):
        fill("<!-- bench:no_such_figure -->x<!-- /bench:no_such_figure -->", {})


def test_a_template_without_markers_is_an_error() -> None:
    with pytest.raises(TemplateError, match="no <!-- bench:NAME --> markers"):
        fill("# Benchmarks\n\nOnly prose.\n", {"table": "| a |"})


def test_the_committed_report_is_what_its_results_render_to() -> None:
    """`python -m bench.run --render bench/results.json` must not change BENCHMARKS.md."""
    results = json.loads(RESULTS_PATH.read_text())
    template = TEMPLATE_PATH.read_text()
    assert markdown(results, template) == template
