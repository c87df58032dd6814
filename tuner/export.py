"""Tables from studies: rebuild a table from a storage, print a table readably, and write a
kernel's tuned configs as ``triton.Config`` lists."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .columns import format_columns
from .errors import InputError

# Imported where used: the CLI builds its parser (with this module's export options) before
# its workers start, and must not pay for Optuna, torch and Triton first.
if TYPE_CHECKING:
    import optuna
    import triton

    from kernels import TableEntry

    from .result import StudyResult


def results_in_storage(storage: optuna.storages.BaseStorage | str) -> list[StudyResult]:
    """The confirmed winner of every finished study in a storage."""
    import optuna

    from .result import StudyResult

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
    from kernels import merge_entries

    from .result import entry_from_result

    entries = [entry_from_result(result) for result in results_in_storage(storage)
               if device is None or result.device == device]
    merge_entries(out, entries)
    return len(entries)


def format_entries(entries: list[TableEntry]) -> list[str]:
    """One aligned line per entry: device, kernel, dtype, shape, config, speed, provenance."""
    header = ("device", "kernel", "dtype", "width", "rows", "variant", "config", "ms", "GB/s",
              "% copy", "trials", "date")
    return format_columns(header, [(
        entry.device, entry.kernel, entry.dtype, entry.width, entry.rows,
        entry.variant or "-", entry.config.key(),
        f"{entry.ms:.4g}" if entry.ms is not None else "-",
        f"{entry.gbps:.0f}" if entry.gbps is not None else "-",
        f"{entry.pct_of_copy:.0f}" if entry.pct_of_copy is not None else "-",
        entry.trials if entry.trials is not None else "-", entry.date or "-")
        for entry in entries])


def show_table(path: str | os.PathLike, stream: TextIO) -> None:
    """Prints a table file's entries."""
    from kernels import load_table

    entries = load_table(path)
    print(f"{Path(path)}: {len(entries)} entries", file=stream)
    for line in format_entries(entries):
        print(line, file=stream)


# -- triton.Config lists, for kernels that keep @triton.autotune ---------------------------------
#: How each LaunchConfig knob reaches a kernel: as this constexpr (block_rows -> BLOCK_ROWS), as
#: Triton's num_warps / num_stages launch options, or not at all (an empty name).
DEFAULT_META_NAMES: dict[str, str] = {"block_rows": "BLOCK_ROWS", "block_w": "BLOCK_W",
                                      "eviction_policy": "EVICTION_POLICY"}
EXPORT_FORMATS = ("table", "triton-configs")


def parse_meta_names(text: str | None) -> dict[str, str]:
    """``"block_rows=BLOCK_M,eviction_policy="`` -> DEFAULT_META_NAMES with those replaced
    (an empty name leaves the knob out)."""
    names = dict(DEFAULT_META_NAMES)
    for part in filter(None, (text or "").split(",")):
        knob, sep, meta = part.partition("=")
        knob, meta = knob.strip(), meta.strip()
        if not sep or knob not in DEFAULT_META_NAMES or (meta and not meta.isidentifier()):
            raise InputError(f"bad --meta {part!r}: expected KNOB=NAME with KNOB one of "
                             f"{', '.join(DEFAULT_META_NAMES)} and NAME a Python identifier "
                             "or empty")
        names[knob] = meta
    return names


def triton_configs(entries: list[TableEntry], kernel: str, *, device: str | None = None,
                   dtype: str | None = None,
                   meta_names: dict[str, str] | None = None) -> list[triton.Config]:
    """The distinct configs of ``kernel``'s entries (of one GPU model and dtype, if given) as
    ``triton.Config`` objects for ``@triton.autotune(configs=...)``, in table order.

    An InputError names the kernels present when none match.
    """
    import triton

    names = DEFAULT_META_NAMES if meta_names is None else meta_names
    chosen = [entry for entry in entries if entry.kernel == kernel
              and device in (None, entry.device) and dtype in (None, entry.dtype)]
    if not chosen:
        present = sorted({f"{entry.kernel} ({entry.device}, {entry.dtype})" for entry in entries})
        raise InputError(f"no entries for kernel {kernel!r}"
                         + (f" on {device!r}" if device else "") + (f" in {dtype}" if dtype else "")
                         + f"; the entries are for: {', '.join(present) or 'nothing (empty)'}")
    configs = list(dict.fromkeys(entry.config for entry in chosen))
    return [triton.Config({names[knob]: getattr(config, knob) for knob in DEFAULT_META_NAMES
                           if names.get(knob)},
                          num_warps=config.num_warps, num_stages=config.num_stages)
            for config in configs]


def triton_configs_module(configs: list[triton.Config], source: str) -> str:
    """Python source defining ``CONFIGS``, the list of ``triton.Config`` to pass to
    ``@triton.autotune``; ``source`` says where the entries came from."""
    lines = [f'"""Launch configs exported by `python -m tuner export --format triton-configs` '
             f'from {source}."""', "", "import triton", "", "CONFIGS = ["]
    for config in configs:
        meta = ", ".join(f"{name!r}: {value!r}" for name, value in config.kwargs.items())
        lines.append(f"    triton.Config({{{meta}}}, num_warps={config.num_warps}, "
                     f"num_stages={config.num_stages}),")
    return "\n".join(lines + ["]", ""])


def add_triton_config_options(parser: argparse.ArgumentParser) -> None:
    """The ``export`` options that select and name the configs of ``--format triton-configs``."""
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="table",
                        help="table: a lookup table (default); triton-configs: a Python module "
                             "defining CONFIGS, a list of triton.Config for @triton.autotune")
    parser.add_argument("--table", default=None,
                        help="with --format triton-configs: read this table file, not --storage")
    parser.add_argument("--kernel", default=None,
                        help="with --format triton-configs: the kernel's name in the table")
    parser.add_argument("--dtype", default=None, help="with --format triton-configs: only this dtype")
    parser.add_argument("--meta", default=None,
                        help="with --format triton-configs: the kernel's constexpr names, e.g. "
                             "block_rows=BLOCK_M,block_w=BLOCK_N,eviction_policy= (default "
                             + ",".join(f"{k}={v}" for k, v in DEFAULT_META_NAMES.items()) + ")")


def write_triton_configs(args: argparse.Namespace,
                         storage: optuna.storages.BaseStorage | None) -> int:
    """``export --format triton-configs``: writes the module to ``args.out`` ("-": stdout);
    returns the number of configs."""
    from kernels import load_table

    from .result import entry_from_result

    if not args.kernel:
        raise InputError("--format triton-configs needs --kernel NAME (the kernel's name in the table)")
    if args.table:
        entries, source = load_table(args.table), args.table
    else:
        entries = [entry_from_result(result) for result in results_in_storage(storage)]
        source = args.storage
    configs = triton_configs(entries, args.kernel, device=args.device, dtype=args.dtype,
                             meta_names=parse_meta_names(args.meta))
    text = triton_configs_module(configs, f"{source} (kernel {args.kernel})")
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return len(configs)
