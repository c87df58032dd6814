"""Running ``search`` and ``sweep``: the worker pool (local processes, or Ray actors when a
cluster is named), the driver over it, the start-up timeline of ``--verbose`` and the summary.

Imports are deferred: local workers are launched before anything heavy is imported here, so
their own start (torch, CUDA) overlaps this process's imports of Optuna, torch and the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .pools import NoGPUError, PoolOptions, interpreter_requested


def use_ray(args: argparse.Namespace) -> bool:
    """Ray when a cluster is named (or this process already runs one); else local processes."""
    ray = sys.modules.get("ray")
    return bool(getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
                or (ray is not None and ray.is_initialized()))


def pool_options(args: argparse.Namespace) -> PoolOptions:
    return PoolOptions(workers=args.workers, interpret=args.interpret,
                       accelerator_type=getattr(args, "accelerator_type", None),
                       resource=getattr(args, "resource", None), seed=getattr(args, "seed", 0),
                       compile_processes=args.compile_processes,
                       first_problem=(args.kernel, args.shape, args.dtype)
                       if getattr(args, "shape", None) else None)  # search's one problem


class Timeline:
    """Seconds from the command's start to each phase, for ``--verbose``."""

    def __init__(self, started: float) -> None:
        self.started = started  # time.perf_counter() when the command started
        self.marks: list[tuple[str, float]] = []

    def mark(self, name: str, monotonic: float | None = None) -> None:
        """Now, or a ``time.monotonic()`` stamp taken elsewhere."""
        if monotonic is not None:
            self.marks.append((name, time.perf_counter() - (time.monotonic() - monotonic)))
        else:
            self.marks.append((name, time.perf_counter()))

    def report(self) -> str:
        marks = sorted(self.marks, key=lambda mark: mark[1])
        return "seconds since the command started: " + ", ".join(
            f"{name} {stamp - self.started:.2f}" for name, stamp in marks)


def run(args: argparse.Namespace, started: float, problems: Callable[[], list],
        table_for_device: Callable[[str], Path], defaults: Callable[[], dict],
        only_on: Callable[[], dict | None] = lambda: None) -> int:
    """Tunes ``problems()`` on a pool of workers and merges the winners into the tables
    (each problem on the GPU models ``only_on()`` names for it, if it names any).

    Local workers are launched before anything heavy is imported here, so their start overlaps
    this process's imports, the problems' validation and the storage's opening.
    """
    clock = Timeline(started)
    info = (lambda *_: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    # With TRITON_INTERPRET=1 every kernel runs in the interpreter, GPU or not.
    args.interpret = args.interpret or interpreter_requested()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    pool = storage = None
    try:
        no_gpu = None
        if not use_ray(args):
            from .local import LocalPool

            pool = LocalPool(pool_options(args))
            try:
                pool.launch()
            except NoGPUError as error:  # reported after the input is checked: bad input first
                pool, no_gpu = None, error
            clock.mark("workers launched")
        from .driver import Driver
        from .progress import Progress, quiet_library_noise
        from .report import print_summary, results_document
        from .space import load_space
        from .study import Settings

        problem_list, run_defaults = problems(), defaults()
        if no_gpu is not None:
            raise no_gpu
        from .preflight import check_fits, host_memory_bytes
        from .storage import open_storage, redact

        if args.interpret:  # workers share this machine's memory; GPUs are checked once known
            check_fits(problem_list, {"this machine (--interpret)": host_memory_bytes()})
        clock.mark("imports")
        quiet_library_noise()  # the progress bar says it all
        storage = open_storage(args.storage)
        space = load_space(args.space) if getattr(args, "space", None) else None
        settings = Settings(trials=args.trials or run_defaults.get("trials") or 48,
                            timeout=args.timeout or run_defaults.get("timeout"),
                            patience=args.patience or run_defaults.get("patience"),
                            trial_timeout=args.trial_timeout, seed=args.seed)
        clock.mark("storage open")
        if pool is None:
            pool = ray_pool(args)
            workers = pool.start()
        else:  # local workers: the first one up starts measuring, the others join
            workers = pool.start(first_only=True)
        clock.mark("workers ready")
        devices = sorted({worker.device for worker in workers})
        memory: dict[str, int] = {}
        for worker in workers:
            size = worker.info.get("memory_bytes") or 0
            memory[worker.device] = min(memory.get(worker.device, size), size)
        check_fits(problem_list, memory)
        warm = " (the warm pool of tuner serve)" if getattr(pool, "served", False) else ""
        info(f"{len(workers)} workers on {', '.join(devices)}{warm}; {len(problem_list)} "
             f"problems; storage {redact(args.storage)}")
        wanted = only_on()
        absent = sorted({device for models in (wanted or {}).values() for device in models}
                        - set(devices))
        if absent:
            info(f"no workers on {', '.join(absent)}: the misses logged there are not tuned")
        progress = Progress(quiet=args.quiet)
        driver = Driver(pool, storage, settings, table_for_device, space=space, progress=progress)
        try:
            results = driver.run(list(problem_list), wanted)
        except KeyboardInterrupt:
            progress.close()  # the bar ends before the message, not after it
            print("\ninterrupted: finished trials are stored; run the same command to resume",
                  file=sys.stderr)
            return 130
        progress.close()
        if args.verbose:
            busy = driver.busy_fractions()
            print(f"{driver.progress.measured} trials in {driver.wall_seconds:.2f} s of dispatch loop "
                 f"({driver.progress.measured / max(driver.wall_seconds, 1e-9):.1f}/s); each "
                 "worker busy " + ", ".join(f"{fraction:.0%}" for _, fraction in sorted(busy.items())),
                 file=sys.stderr)  # beside the start-up breakdown, apart from the results
            print(driver.phase_report(), file=sys.stderr)
        if not use_ray(args):  # same host: the workers' monotonic clocks are this one's
            answered = [worker.info["answered_monotonic"] for worker in pool.workers]
            clock.mark("first worker up", min(answered))
            clock.mark("last worker up", max(answered))
        clock.mark("first trial sent", driver.first_dispatch)
        clock.mark("first result", driver.first_result)
        clock.mark("done")
    except NoGPUError as error:
        print(f"tuner: {error}", file=sys.stderr)
        return 2
    finally:
        if pool is not None:
            pool.shutdown()
            clock.mark("shutdown")
        if storage is not None:
            from .storage import close_storage

            close_storage(storage)
        if args.verbose:
            print(clock.report(), file=sys.stderr)
    unfinished = [run for run in driver.runs if run.result is None]
    failures = []
    for run in unfinished:
        errors = [trial.user_attrs["error"] for trial in run.study.get_trials(deepcopy=False)
                  if "error" in trial.user_attrs]
        reason = run.study.user_attrs.get("confirm_error") or \
            (f"first error: {errors[0]}" if errors else "no trial ran")
        failures.append((run, f"{len(errors)} failed trials; {reason}"))
        print(f"no result for {run.problem} on {run.device}: {failures[-1][1]}", file=sys.stderr)
    tables = {device: str(table_for_device(device))  # only the tables written
              for device in sorted({result.device for result in results})}
    if args.json:
        json.dump(results_document(results, failures, tables), sys.stdout, indent=1)
        print()
    else:
        print_summary(results, sys.stdout)
    for device, table in tables.items():
        info(f"table for {device}: {table}")
    return 1 if unfinished else 0


def connect_ray(address: str | None, timeout: float) -> None:
    """Joins the Ray cluster at ``address`` (or $RAY_ADDRESS); a one-line error if it does
    not answer within ``timeout`` seconds."""
    from .pools import resolve_address

    address = resolve_address(address or os.environ.get("RAY_ADDRESS"))
    import ray

    from .preflight import check_address, connect_deadline
    from .storage import one_line

    if address:
        check_address(address, timeout)
    if ray.is_initialized():
        return
    with connect_deadline(address, timeout):
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True,
                     logging_level="WARNING")
        except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError...
            raise UsageError(f"cannot join the Ray cluster at {address}: "
                             f"{type(error).__name__}: {one_line(error)}") from None


def ray_pool(args: argparse.Namespace):
    """The warm pool of ``tuner serve`` on the cluster if it has one, else new actors."""
    connect_ray(args.address, args.connect_timeout)
    from .serve import attach
    from .workers import WorkerPool

    options = pool_options(args)
    return attach(options) or WorkerPool(options)
