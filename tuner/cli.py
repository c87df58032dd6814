"""``python -m tuner``: search one shape, sweep many, serve a warm worker pool, export and show
tables.

Imports are deferred: ``search`` and ``sweep`` start their GPU workers first, so the workers'
own start (torch, CUDA) overlaps this process's imports of Optuna, torch and the kernels.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse  # noqa: E402  (after the clock: everything below counts as start-up)
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from .errors import InputError, UsageError  # noqa: E402

DEFAULT_STORAGE = "sqlite:///tuner.db"


def make_storage(url: str, readonly: bool = False):
    """An Optuna storage from a URL (tuner.storage.open_storage: clear one-line errors)."""
    from .storage import open_storage

    return open_storage(url, readonly=readonly)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=_positive(int), default=None,
                        help="measured configs per study (default 48; resumed runs count earlier ones)")
    parser.add_argument("--timeout", type=_positive(float), default=None,
                        help="stop proposing new trials after this many seconds")
    parser.add_argument("--patience", type=_positive(int), default=None,
                        help="stop a study after this many trials in a row without improvement")
    parser.add_argument("--workers", type=_positive(int), default=None,
                        help="number of GPU workers (default: one per GPU of this host, or of the "
                             "cluster with --address)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on: auto or HOST:PORT; its warm pool (tuner serve) "
                             "if it has one (default: $RAY_ADDRESS, else a process per local GPU, "
                             "no Ray)")
    parser.add_argument("--connect-timeout", type=_positive(float), default=30.0,
                        help="seconds to wait for the Ray cluster at --address (default 30)")
    parser.add_argument("--accelerator-type", default=None,
                        help="only use GPUs of this Ray accelerator type (e.g. H100)")
    parser.add_argument("--resource", default=None,
                        help="only use GPUs on nodes with this Ray custom resource (e.g. rtx4090)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help=f"Optuna storage URL (default {DEFAULT_STORAGE} in the working directory)")
    parser.add_argument("--interpret", action="store_true",
                        help="run on CPU through the Triton interpreter (entries stored under "
                             "device 'interpreter', never used on a GPU); implied by "
                             "TRITON_INTERPRET=1")
    parser.add_argument("--trial-timeout", type=_positive(float), default=300.0,
                        help="seconds before a hung trial's worker is replaced (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and input seed (default 0)")
    parser.add_argument("--compile-processes", type=int, default=None,
                        help="processes per worker compiling upcoming configs while the GPU "
                             "times the current one (default: the host's cores shared by its "
                             "GPUs, less a core for each worker; 0 compiles inline)")
    parser.add_argument("--verbose", action="store_true",
                        help="print where the time went: start-up phases, first trial, shutdown")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or status lines; only errors and the results")
    parser.add_argument("--json", action="store_true",
                        help="print the results on stdout as JSON (for scripts) instead of a table")


def build_parser() -> argparse.ArgumentParser:
    from .export import add_triton_config_options

    # Listing the registered kernels would import them (torch, triton) before any worker starts.
    kernels = "a registered kernel, an installed plugin's, or a KernelSpec as module:attribute"
    parser = argparse.ArgumentParser(prog="python -m tuner", description=(
        "Autotune Triton kernel launch configs on Ray GPU workers: search one shape, sweep "
        "many, export and show the lookup tables the runtime reads, report on studies."))
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="tune one shape", description=(
        "Tune the launch config of a kernel for one shape and dtype on every GPU model of the "
        "cluster, then merge the winner into the lookup table."))
    search.add_argument("--shape", required=True,
                        help="ROWSxWIDTH (128x64) or a full tensor shape (32x64x32x64x64), "
                             "normalised over the last dim")
    search.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    search.add_argument("--kernel", default="add_layernorm",
                        help=f"{kernels} (default add_layernorm)")
    search.add_argument("--space", default=None, help="search-space YAML (default: the kernel's own)")
    search.add_argument("--table", default=None,
                        help="table to merge the winner into (default: the user's table, "
                             "$XDG_DATA_HOME/tuner/table.json)")
    search.add_argument("--out", default=None,
                        help="instead of --table: a folder for one table per GPU model, as "
                             "sweep writes")
    _add_run_options(search)

    sweep = commands.add_parser("sweep", help="tune many shapes across a cluster", description=(
        "Tune every (kernel, shape, dtype) of a spec on every GPU model of the cluster, trials of "
        "all studies sharing one worker pool; writes one table per GPU model into --out."))
    sweep.add_argument("--spec", default=None, help="sweep spec YAML (see search_spaces/sweeps/)")
    sweep.add_argument("--shapes", default=None, help="comma-separated shapes, instead of --spec")
    sweep.add_argument("--misses", default=None,
                       help="table-miss log written by the runtime (TUNER_MISS_LOG), instead of "
                            "--spec: tunes each logged problem on the GPU models it missed on")
    sweep.add_argument("--dtypes", default="float32", help="comma-separated dtypes with --shapes")
    sweep.add_argument("--kernel", default="add_layernorm",
                       help=f"kernel for --shapes: {kernels} (default add_layernorm)")
    sweep.add_argument("--out", default="tables", help="folder for one table per GPU model (default tables/)")
    _add_run_options(sweep)

    serve = commands.add_parser("serve", help="keep a warm worker pool on a Ray cluster", description=(
        "Start one worker per GPU of a Ray cluster as named detached actors, compiled and warm, "
        "for later `search`/`sweep --address` runs to share; --stop ends them (and the local "
        "cluster that serve started)."))
    serve.add_argument("--address", default=None,
                       help="Ray cluster (auto or HOST:PORT; default: start a local one and keep it)")
    serve.add_argument("--workers", type=_positive(int), default=None,
                       help="number of GPU workers (default: one per GPU in the cluster)")
    serve.add_argument("--interpret", action="store_true", help="CPU workers (Triton interpreter)")
    serve.add_argument("--compile-processes", type=int, default=None,
                       help="compile processes per worker (default: cores shared by the GPUs)")
    serve.add_argument("--stop", action="store_true", help="end the warm pool")

    export = commands.add_parser("export", help="rebuild a table from a storage", description=(
        "Merge the confirmed winner of every finished study in a storage into a table; or, with "
        "--format triton-configs, write a kernel's tuned configs as triton.Config objects."))
    export.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    export.add_argument("--out", required=True,
                        help="table file to write (merged atomically); with --format "
                             "triton-configs, a .py file or - for stdout")
    export.add_argument("--device", default=None, help="only studies of this GPU model")
    add_triton_config_options(export)

    report = commands.add_parser("report", help="plot and summarise studies", description=(
        "Per study in a storage: PNG plots (best time so far, distribution of measured configs, "
        "parameter importances) and a Markdown summary, with an index.md linking them."))
    report.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    report.add_argument("--study", default=None, help="only this study (default: every study)")
    report.add_argument("--out", default="report", help="folder to write into (default report/)")

    show = commands.add_parser("show", help="print tables", description=(
        "Print a table's entries; without --table, every table the runtime reads, in lookup "
        "order (TUNER_TABLE, the user's table, the shipped tables)."))
    show.add_argument("--table", default=None, help="table file")
    return parser


def device_file_name(device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3.json``: letters, digits and dashes
    only, so a hostile device name cannot leave the --out folder."""
    stem = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:100].strip("-")
    return (stem or "unnamed-device") + ".json"


def _serve(args: argparse.Namespace) -> int:
    if args.address is None:  # serve's own local cluster keeps Ray's token authentication on
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from . import serve
    from .runner import pool_options

    if args.stop:
        print(serve.stop(args.address), file=sys.stderr)
        return 0
    print(serve.start(args.address, pool_options(args)), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _command(args, parser)
    except KeyboardInterrupt:  # before or after the search loop, which handles its own
        print("\ninterrupted", file=sys.stderr)
        return 130


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # Imports stay inside each branch: `search` and `sweep` start their workers before any.
    try:
        if args.command == "search":
            def problems() -> list:
                from .problems import get_kernel

                return [get_kernel(args.kernel).problem(args.shape, args.dtype)]

            if args.table and args.out:
                raise UsageError("give --table FILE or --out FOLDER, not both")

            def table(device: str) -> Path:
                from kernels import user_table_path

                if args.out:
                    return Path(args.out) / device_file_name(device)
                return Path(args.table) if args.table else user_table_path()

            def problems_and_table() -> list:
                from .preflight import check_table
                from .storage import check_writable_folder

                if args.out:
                    check_writable_folder(Path(args.out), f"--out {args.out}")
                else:  # a bad or unwritable table is an error now, not after the search
                    check_table(table(""))
                return problems()

            from .runner import run

            return run(args, _STARTED, problems_and_table, table, dict)
        if args.command == "sweep":
            if sum(map(bool, (args.spec, args.shapes, args.misses))) != 1:
                raise UsageError("give one of --spec FILE, --shapes A,B (with --dtypes) or "
                                 "--misses FILE")
            spec: dict[str, Any] = {}
            misses: dict[str, Any] = {}

            def sweep_problems() -> list:
                from .storage import check_writable_folder
                from .sweep import build_problems, load_misses, load_spec

                check_writable_folder(out, f"--out {out}")
                if args.misses:
                    misses["only_on"] = load_misses(args.misses)
                    return list(misses["only_on"])
                if args.spec:
                    loaded = load_spec(args.spec)
                    spec.update(trials=loaded.trials, patience=loaded.patience,
                                timeout=loaded.timeout)
                    return loaded.problems
                return build_problems([args.kernel], args.shapes.split(","), args.dtypes.split(","))

            out = Path(args.out)
            from .runner import run

            return run(args, _STARTED, sweep_problems, lambda device: out / device_file_name(device),
                       lambda: spec, lambda: misses.get("only_on"))
        if args.command == "serve":
            return _serve(args)
        if args.command == "export":
            from .export import export_storage, write_triton_configs

            if args.format == "table" and (args.table or args.kernel or args.dtype or args.meta):
                raise UsageError("--table, --kernel, --dtype and --meta apply only to "
                                 "--format triton-configs")
            if args.format == "triton-configs":
                storage = None if args.table else make_storage(args.storage, readonly=True)
                count = write_triton_configs(args, storage)
                print(f"exported {count} configs to {args.out}", file=sys.stderr)
                return 0
            from .preflight import check_table

            check_table(args.out)
            storage = make_storage(args.storage, readonly=True)
            count = export_storage(storage, args.out, args.device)
            print(f"exported {count} entries to {args.out}")
            return 0
        if args.command == "report":
            from .progress import quiet_library_noise
            from .report import write_report

            quiet_library_noise()
            try:
                pages = write_report(make_storage(args.storage), args.out, args.study)
            except ImportError as error:  # matplotlib, an optional extra
                raise UsageError(str(error)) from None
            print(f"wrote {len(pages)} study reports; start at {Path(args.out) / 'index.md'}")
            return 0
        if args.command == "show":
            from kernels import table_paths

            from .export import show_table

            paths = [args.table] if args.table else [path for path in table_paths() if path.exists()]
            if not paths:
                print("no tables yet: the runtime uses its heuristic everywhere")
            for path in paths:
                show_table(path, sys.stdout)
            return 0
    except InputError as error:  # UsageError, SpecError, StorageError, bad shapes or dtypes...
        from .storage import redact

        parser.exit(2, f"tuner: error: {redact(str(error))}\n")
    except ValueError as error:
        from kernels import TableError

        if not isinstance(error, TableError):  # any other ValueError is a bug: its traceback
            raise
        parser.exit(2, f"tuner: error: {error}\n")
    except OSError as error:  # a path given on the command line: a folder, unreadable...
        parser.exit(2, f"tuner: error: {error.filename or ''}: "
                       f"{error.strerror or type(error).__name__}\n")
    return 2
