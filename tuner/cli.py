"""``python -m tuner``: search one shape, sweep many, export and show tables."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from .sweep import SpecError, build_problems, load_spec

DEFAULT_STORAGE = "sqlite:///tuner.db"
# Watchdogs of the local Ray instances this process started: referenced until exit, as closing
# their stdin tells them the driver is gone.
_WATCHDOGS: list = []


class UsageError(ValueError):
    """Bad command-line input; printed without a traceback."""


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
                        help="number of GPU workers (default: one per GPU in the cluster)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: auto or HOST:PORT (default: $RAY_ADDRESS, else "
                             "start a local one)")
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
                             "device 'interpreter', never used on a GPU)")
    parser.add_argument("--trial-timeout", type=_positive(float), default=300.0,
                        help="seconds before a hung trial's worker is replaced (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and input seed (default 0)")
    parser.add_argument("--compile-processes", type=int, default=2,
                        help="processes per worker compiling upcoming configs while the GPU "
                             "times the current one (default 2; 0 compiles inline)")


def build_parser() -> argparse.ArgumentParser:
    from kernels import user_table_path

    from .problems import KERNELS

    kernels = ", ".join(sorted(KERNELS))
    parser = argparse.ArgumentParser(prog="python -m tuner", description=(
        "Autotune Triton kernel launch configs on Ray GPU workers: search one shape, sweep "
        "many, export and show the lookup tables the runtime reads."))
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="tune one shape", description=(
        "Tune the launch config of a kernel for one shape and dtype on every GPU model of the "
        "cluster, then merge the winner into the lookup table."))
    search.add_argument("--shape", required=True,
                        help="ROWSxWIDTH (128x64) or a full tensor shape (32x64x32x64x64), "
                             "normalised over the last dim")
    search.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    search.add_argument("--kernel", default="add_layernorm",
                        help=f"one of {kernels} (default add_layernorm)")
    search.add_argument("--space", default=None, help="search-space YAML (default: the kernel's own)")
    search.add_argument("--table", default=str(user_table_path()),
                        help=f"table to merge the winner into (default {user_table_path()})")
    _add_run_options(search)

    sweep = commands.add_parser("sweep", help="tune many shapes across a cluster", description=(
        "Tune every (kernel, shape, dtype) of a spec on every GPU model of the cluster, trials of "
        "all studies sharing one worker pool; writes one table per GPU model into --out."))
    sweep.add_argument("--spec", default=None, help="sweep spec YAML (see search_spaces/sweeps/)")
    sweep.add_argument("--shapes", default=None, help="comma-separated shapes, instead of --spec")
    sweep.add_argument("--dtypes", default="float32", help="comma-separated dtypes with --shapes")
    sweep.add_argument("--kernel", default="add_layernorm",
                       help=f"kernel for --shapes: one of {kernels} (default add_layernorm)")
    sweep.add_argument("--out", default="tables", help="folder for one table per GPU model (default tables/)")
    _add_run_options(sweep)

    export = commands.add_parser("export", help="rebuild a table from a storage", description=(
        "Merge the confirmed winner of every finished study in a storage into a table."))
    export.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    export.add_argument("--out", required=True, help="table file to write (merged atomically)")
    export.add_argument("--device", default=None, help="only studies of this GPU model")

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


def _run(args: argparse.Namespace, problems, table_for_device, defaults) -> int:
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    from .driver import Driver, Progress
    from .preflight import check_address, check_fits, connect_deadline, host_memory_bytes
    from .report import print_summary
    from .space import load_space
    from .storage import one_line, open_storage, redact
    from .study import Settings
    from .workers import NoGPUError, PoolOptions, WorkerPool
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line says it all
    if args.interpret:  # workers share this machine's memory; GPUs are checked once known
        check_fits(list(problems), {"this machine (--interpret)": host_memory_bytes()})
    storage = open_storage(args.storage)
    space = load_space(args.space) if getattr(args, "space", None) else None
    settings = Settings(trials=args.trials or defaults.get("trials") or 48,
                        timeout=args.timeout or defaults.get("timeout"),
                        patience=args.patience or defaults.get("patience"),
                        trial_timeout=args.trial_timeout, seed=args.seed)
    # Without an address Ray would join any cluster already running on this machine; "local"
    # starts our own, as --help promises (RAY_ADDRESS, as set by Ray Jobs, still wins).
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    check_address(address, args.connect_timeout)
    if not ray.is_initialized():
        with connect_deadline(address, args.connect_timeout):
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=True,
                         logging_level="WARNING")
            except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError...
                raise UsageError(f"cannot join the Ray cluster at {address}: "
                                 f"{type(error).__name__}: {one_line(error)}") from None
        if address == "local":  # ours to clean up, even after kill -9 of this process
            from .watchdog import watch_ray_processes

            _WATCHDOGS.append(watch_ray_processes())
    pool = WorkerPool(PoolOptions(workers=args.workers, interpret=args.interpret,
                                  accelerator_type=args.accelerator_type,
                                  resource=args.resource, seed=args.seed,
                                  compile_processes=args.compile_processes))
    try:
        workers = pool.start()
    except NoGPUError as error:
        print(f"tuner: {error}", file=sys.stderr)
        return 2
    devices = sorted({worker.device for worker in workers})
    memory: dict[str, int] = {}
    for worker in workers:
        size = worker.info.get("memory_bytes") or 0
        memory[worker.device] = min(memory.get(worker.device, size), size)
    try:
        check_fits(list(problems), memory)
    except ValueError:
        pool.shutdown()
        raise
    print(f"{len(workers)} workers on {', '.join(devices)}; {len(problems)} problems; "
          f"storage {redact(args.storage)}", file=sys.stderr)
    driver = Driver(pool, storage, settings, table_for_device, space=space, progress=Progress())
    try:
        results = driver.run(list(problems))
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are stored; run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        pool.shutdown()
    print_summary(results, sys.stdout)
    unfinished = [run for run in driver.runs if run.result is None]
    for run in unfinished:
        errors = [trial.user_attrs["error"] for trial in run.study.get_trials(deepcopy=False)
                  if "error" in trial.user_attrs]
        reason = run.study.user_attrs.get("confirm_error") or \
            (f"first error: {errors[0]}" if errors else "no trial ran")
        print(f"no result for {run.problem} on {run.device}: {len(errors)} failed trials; {reason}",
              file=sys.stderr)
    for device in sorted({result.device for result in results}):  # only tables written
        print(f"table for {device}: {table_for_device(device)}", file=sys.stderr)
    return 1 if unfinished else 0


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
    from .preflight import check_table
    from .storage import check_writable_folder, open_storage, redact

    try:
        if args.command == "search":
            from .problems import get_kernel

            problem = get_kernel(args.kernel).problem(args.shape, args.dtype)
            table = Path(args.table)
            check_table(table)
            return _run(args, [problem], lambda device: table, {})
        if args.command == "sweep":
            if bool(args.spec) == bool(args.shapes):
                raise UsageError("give either --spec FILE or --shapes A,B (with --dtypes)")
            if args.spec:
                spec = load_spec(args.spec)
                problems = spec.problems
                defaults = {"trials": spec.trials, "patience": spec.patience, "timeout": spec.timeout}
            else:
                problems = build_problems([args.kernel], args.shapes.split(","),
                                          args.dtypes.split(","))
                defaults = {}
            out = Path(args.out)
            check_writable_folder(out, f"--out {out}")
            return _run(args, problems, lambda device: out / device_file_name(device), defaults)
        if args.command == "export":
            from .export import export_storage

            storage = open_storage(args.storage, readonly=True)
            check_table(args.out)
            count = export_storage(storage, args.out, args.device)
            print(f"exported {count} entries to {args.out}")
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
    except (UsageError, SpecError, ValueError) as error:
        parser.exit(2, f"tuner: error: {redact(str(error))}\n")
    except OSError as error:  # a path given on the command line: a folder, unreadable...
        parser.exit(2, f"tuner: error: {error.filename or ''}: "
                       f"{error.strerror or type(error).__name__}\n")
    return 2
