"""A worker's compile processes: configs compiled into Triton's disk cache ahead of their
measurement, so that compilation leaves the GPU's critical path.

Runs inside a tuning worker (tuner.tuning_worker), whose measurement then loads the compiled
kernel from the cache. Imports neither Ray nor Optuna.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from kernels import LaunchConfig
    from kernels.targets import GPUTarget

    from .problems import Problem

# What the compile processes' fork server imports before it forks them.
PRELOAD = ["torch", "tuner.problems"]
# Seconds the feeder sleeps when nothing woke it (a finished compile always does).
FEED_POLL_S = 0.05
# How much lower than its worker a compile process runs (os.nice increment).
COMPILE_NICENESS = 10


def die_with_parent(parent_pid: int | None = None) -> None:
    """On Linux, has the kernel kill this process when its parent dies, even by SIGKILL, so
    that no worker or compile process outlives the driver that started it. With
    ``parent_pid``, a parent that died before this was set up ends this process now."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pools' shutdown still ends them
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _start_compile_process() -> None:
    """Runs first in each compile process: it dies with its worker, and yields the CPU to the
    worker and the driver, whose every delay holds up the GPU (a compile only has to be
    ready before its trial)."""
    die_with_parent()
    try:
        os.nice(COMPILE_NICENESS)
    except (OSError, AttributeError):  # not POSIX: compiles run at the worker's priority
        pass


def _started() -> None:
    """Nothing: submitted once per process, it has the executor start them all now."""


def _precompile(problem: Problem, config: LaunchConfig, target: GPUTarget) -> float:
    """Runs in a compile process: compiles one config for ``target`` into Triton's disk cache,
    where the worker's launch on its GPU finds it; returns seconds."""
    from kernels.targets import compile_only_for

    from .problems import get_kernel

    start = time.perf_counter()
    compile_only_for(target)
    get_kernel(problem.kernel).compile(problem, config, device="cpu")
    return time.perf_counter() - start


class CompileAhead:
    """``processes`` compile processes for the worker's GPU target (shared Triton cache), fed
    from two queues: the configs the driver says come next, at once, then, whenever a process
    is free, speculative ones (a study's other valid configs: a space holds a few hundred, a
    host compiles dozens a second), keeping one process free for the next upcoming config.

    The processes start at once (a worker creates this before it imports torch itself) and
    compile once :meth:`start` names the target. They never touch the GPU, and fork from a
    server that imported torch and the kernels once, instead of each importing them at the same
    moment on a host where the worker itself is starting. One feeder thread submits every
    compile, so neither :meth:`prefetch` nor :meth:`wait` ever blocks on a process starting.
    A compile that crashes its process fails the compiles then running, and new processes take
    over. ``compile_function(problem, config, target)`` is what a process runs for a config.
    """

    def __init__(self, processes: int, compile_function: Callable[..., float] = _precompile
                 ) -> None:
        self.processes = processes
        self._compile = compile_function  # (problem, config, target) -> seconds, in a process
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        self._executor = self._new_executor()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._upcoming: collections.deque[tuple[Problem, LaunchConfig]] = collections.deque()
        self._speculative: collections.deque[tuple[Problem, LaunchConfig]] = collections.deque()
        self._compiling: dict[tuple[Problem, str], concurrent.futures.Future] = {}
        # Why each config was compiled: "upcoming", "runner-up" or "speculative" (for --verbose).
        self._reasons: dict[tuple[Problem, str], str] = {}
        self._runner_ups: set[tuple[Problem, str]] = set()
        self._target: GPUTarget | None = None
        self._target_known = threading.Event()
        threading.Thread(target=self._feed, daemon=True, name="tuner-compile-feeder").start()

    def start(self, target: GPUTarget) -> None:
        """Starts compiling, for ``target`` (the worker's GPU:
        :func:`kernels.targets.current_target`)."""
        self._target = target
        self._target_known.set()

    def prefetch(self, upcoming: list[tuple[Problem, LaunchConfig]],
                 speculative: list[tuple[Problem, LaunchConfig]] = (),
                 likely: list[tuple[Problem, LaunchConfig]] = ()) -> None:
        """Queues ``upcoming`` to compile now, and for when a process is free ``likely`` ones
        first, then ``speculative`` ones, both ahead of every speculative one queued so far (a
        worker's newest study is the one it measures now)."""
        with self._lock:
            self._upcoming.extend(upcoming)
            self._speculative.extendleft(reversed(speculative))
            self._speculative.extendleft(reversed(likely))
            self._runner_ups.update((problem, config.key()) for problem, config in likely)
        self._wake.set()

    def wait(self, problem: Problem, key: str) -> float | None:
        """Waits for the compile of this config if one is running; its seconds, or None if
        there is none (not queued, not started yet, or failed: the caller compiles inline)."""
        with self._lock:
            self._upcoming = collections.deque(
                item for item in self._upcoming if (item[0], item[1].key()) != (problem, key))
            future = self._compiling.pop((problem, key), None)
        if future is None or future.cancel():  # not started: compiling inline is sooner
            return None
        try:
            return future.result(timeout=600)
        except Exception:  # the measurement compiles again and reports the error
            return None

    def reason(self, problem: Problem, key: str) -> str | None:
        """Why this config was compiled ahead: ``"upcoming"``, ``"runner-up"`` or
        ``"speculative"``; None if it never was."""
        return self._reasons.get((problem, key))

    def close(self) -> None:
        """Kills the compile processes now (killed with their parent, they would linger)."""
        with self._lock:
            self._closed = True
            self._upcoming.clear()
            self._speculative.clear()
        self._wake.set()
        for process in multiprocessing.active_children():  # this worker's only children
            process.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _feed(self) -> None:
        for _ in range(self.processes):  # each start waits for the fork server's imports
            if not self._submit(_started):
                return
        while not self._target_known.wait(FEED_POLL_S):
            if self._closed:
                return
        while not self._closed:
            self._wake.wait(FEED_POLL_S)
            self._wake.clear()
            for problem, config, reason in self._take():
                future = self._submit(self._compile, problem, config, self._target)
                if future is None:
                    return
                future.add_done_callback(lambda _: self._wake.set())
                with self._lock:
                    self._compiling[(problem, config.key())] = future
                    self._reasons[(problem, config.key())] = reason

    def _take(self) -> list[tuple[Problem, LaunchConfig, str]]:
        """What to submit now: every upcoming config, and speculative ones up to one per idle
        process but one (no deeper: an upcoming config must not queue behind speculative
        ones)."""
        with self._lock:
            chosen = [item for item in self._upcoming
                      if (item[0], item[1].key()) not in self._compiling]
            self._upcoming.clear()
            taken = [(problem, config, "upcoming") for problem, config in chosen]
            pending = len(taken) + sum(not future.done() for future in self._compiling.values())
            while self._speculative and pending < max(1, self.processes - 1):
                problem, config = self._speculative.popleft()
                key = (problem, config.key())
                if key not in self._compiling and (problem, config) not in chosen:
                    reason = "runner-up" if key in self._runner_ups else "speculative"
                    taken.append((problem, config, reason))
                    chosen.append((problem, config))
                    pending += 1
        return taken

    def _new_executor(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            self.processes, mp_context=self._context, initializer=_start_compile_process)

    def _submit(self, function, *args) -> concurrent.futures.Future | None:
        for _ in range(2):
            if self._closed:
                return None
            try:
                return self._executor.submit(function, *args)
            except BrokenProcessPool:
                # A compile crashed its process (a compiler bug on some config): the compiles
                # then running fail (their trials compile inline), and new processes go on.
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
            except RuntimeError:  # shut down meanwhile
                return None
        return None
