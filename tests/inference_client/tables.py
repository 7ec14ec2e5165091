"""Reading the tables `infer` prints, column by column, as a person reads them."""

from __future__ import annotations


def parse_table(text: str, columns: list[str]) -> list[dict[str, str]]:
    """The rows of a table whose header line holds `columns` in order, each cell cut at the
    offset where its header starts: a cell out of line with its header reads wrong and fails
    the test that looks at it, so this also checks that the table is tidy."""
    header, *lines = text.splitlines()
    starts = [header.index(column) for column in columns]
    assert starts == sorted(starts), header
    assert header.split() == " ".join(columns).split(), header
    ends = [*starts[1:], None]
    return [
        {column: line[start:end].strip() for column, start, end in zip(columns, starts, ends, strict=True)}
        for line in lines
    ]
