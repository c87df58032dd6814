"""Faults injected where the driver meets its workers: the pool's public interface.

The driver sends every trial through ``worker.call("measure", problem, config, ...)`` and
replaces a lost worker with ``pool.replace(worker)``; :func:`inject` wraps both on a started
pool, so a test can kill or signal the worker of the N-th trial and see what the driver did
about it, without touching the driver's internals.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable

from tuner.progress import Progress


@dataclasses.dataclass
class FaultLog:
    """What happened around an injected fault."""

    #: measurements sent to any worker, the re-run of a lost trial included
    measures: int = 0
    #: (worker, problem, config) of the trial whose worker the fault hit
    faulted: list[tuple[Any, Any, Any]] = dataclasses.field(default_factory=list)
    #: workers the driver replaced, in order
    replaced: list[Any] = dataclasses.field(default_factory=list)


def inject(pool: Any, at: int, fault: Callable[[Any], None]) -> FaultLog:
    """Calls ``fault(worker)`` right after the ``at``-th measurement is sent to ``worker``;
    the pool must be started. Replacement workers are watched too."""
    log = FaultLog()

    def watch(worker: Any) -> None:
        send = worker.call

        def call(method: str, *args: Any):
            future = send(method, *args)
            if method == "measure":
                log.measures += 1
                if log.measures == at:
                    log.faulted.append((worker, args[0], args[1]))
                    fault(worker)
            return future

        worker.call = call

    replace = pool.replace

    def replaced(worker: Any):
        log.replaced.append(worker)
        fresh = replace(worker)
        if fresh is not None:
            watch(fresh)
        return fresh

    for worker in pool.workers:
        watch(worker)
    pool.replace = replaced
    return log


def compile_or_crash(problem: Any, config: Any, target: Any) -> float:
    """A compile process's job (``tuner.compiling.CompileAhead``) that kills its process on
    configs of 32 warps, as a compiler crash would, and compiles nothing otherwise."""
    import os

    if config.num_warps == 32:
        os._exit(1)
    return 0.0


class InterruptingProgress(Progress):
    """Raises KeyboardInterrupt (as Ctrl-C would) once ``after`` trials are measured, with
    trials in flight unless ``busy_only`` is False (workers that answer at once)."""

    def __init__(self, after: int, busy_only: bool = True) -> None:
        super().__init__(stream=io.StringIO(), interval=0.0)
        self.after, self.busy_only = after, busy_only

    def update(self, runs, busy, workers, force=False):
        super().update(runs, busy, workers, force)
        if self.measured >= self.after and (busy or not self.busy_only):
            raise KeyboardInterrupt
