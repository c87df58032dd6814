"""Plain-text tables: the one printer of the run summary, ``tuner show`` and the benchmarks."""

from __future__ import annotations

from typing import Iterable, Sequence


def format_columns(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The header, a rule and one line per row, each column left-aligned to its widest cell."""
    cells = [[str(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[index]) for row in cells) for index in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in cells]
    return lines[:1] + ["  ".join("-" * width for width in widths)] + lines[1:]
