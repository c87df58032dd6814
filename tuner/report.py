"""The end-of-run summary: one line per study."""

from __future__ import annotations

from typing import TextIO

from .study import StudyResult


def print_summary(results: list[StudyResult], stream: TextIO) -> None:
    """Best config, time, GB/s, % of copy bandwidth and speedups, per shape and GPU model."""
    header = ("device", "kernel", "shape", "dtype", "best config", "ms", "GB/s", "% copy",
              "vs heuristic", "vs eager", "trials")
    rows = [header] + [(
        result.device, result.problem.kernel, result.problem.shape_text, result.problem.dtype,
        result.config.key(), f"{result.ms:.4g}", f"{result.gbps:.0f}", f"{result.pct_of_copy:.0f}%",
        f"{result.speedup_vs_heuristic:.2f}x", "-" if result.speedup_vs_eager is None else f"{result.speedup_vs_eager:.2f}x",
        str(result.trials) + (" (resumed)" if result.resumed else ""))
        for result in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=stream)
        if index == 0:
            print("  ".join("-" * width for width in widths), file=stream)
