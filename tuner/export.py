"""Tables from studies: rebuild a table from a storage, and print a table readably."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

import optuna

from kernels import TableEntry, load_table, merge_entries

from .driver import entry_from_result
from .study import StudyResult


def results_in_storage(storage: optuna.storages.BaseStorage | str) -> list[StudyResult]:
    """The confirmed winner of every finished study in a storage."""
    results = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        stored = summary.user_attrs.get("result")
        if stored:
            results.append(StudyResult.from_json(stored))
    return results


def export_storage(storage: optuna.storages.BaseStorage | str, out: str | os.PathLike,
                   device: str | None = None) -> int:
    """Merges the winners of every finished study (of one GPU model, if given) into ``out``;
    returns the number of entries exported."""
    entries = [entry_from_result(result) for result in results_in_storage(storage)
               if device is None or result.device == device]
    merge_entries(out, entries)
    return len(entries)


def format_entries(entries: list[TableEntry]) -> list[str]:
    """One aligned line per entry: device, kernel, dtype, shape, config, speed, provenance."""
    header = ("device", "kernel", "dtype", "width", "rows", "variant", "config", "ms", "GB/s",
              "% copy", "trials", "date")
    rows = [header] + [(
        entry.device, entry.kernel, entry.dtype, str(entry.width), str(entry.rows),
        entry.variant or "-", entry.config.key(),
        f"{entry.ms:.4g}" if entry.ms is not None else "-",
        f"{entry.gbps:.0f}" if entry.gbps is not None else "-",
        f"{entry.pct_of_copy:.0f}" if entry.pct_of_copy is not None else "-",
        str(entry.trials) if entry.trials is not None else "-", entry.date or "-")
        for entry in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def show_table(path: str | os.PathLike, stream: TextIO) -> None:
    """Prints a table file's entries."""
    entries = load_table(path)
    print(f"{Path(path)}: {len(entries)} entries", file=stream)
    for line in format_entries(entries):
        print(line, file=stream)
