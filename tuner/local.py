"""A pool of local worker processes, one per GPU of this host.

Without a cluster address there is nothing for Ray to schedule across, and starting it costs
more than a whole search: each GPU gets a plain spawned process instead (the same
``TuningWorker``), started before the driver has finished its own imports.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from .compiling import die_with_parent
from .errors import InputError
from .pools import NoGPUError, Pool, PoolOptions
from .tuning_worker import TuningWorker, default_compile_processes

_worker: TuningWorker | None = None  # the TuningWorker of this process, once started
# Workers end by SIGKILL (nothing in them to save), so their queues' semaphores are reclaimed
# by multiprocessing's resource tracker, which would warn about each one when the command
# exits. The tracker process, started with the first executor, takes its warning filters from
# this process's -W options.
_RECLAIMED_SEMAPHORES_WARNING = "ignore:resource_tracker:UserWarning"


def _start_worker(gpu: str | None, seed: int, compile_processes: int,
                  first_problem: tuple[str, str, str] | None, env_vars: dict[str, str],
                  prefetches: multiprocessing.Queue) -> None:
    """Initialiser of a worker process: pins the GPU before CUDA starts, builds the worker and
    a thread that passes the driver's prefetches to it while it measures."""
    global _worker
    die_with_parent()
    os.environ.update(env_vars)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _worker = TuningWorker(seed, compile_processes, first_problem)
    threading.Thread(target=_serve_prefetches, args=(_worker, prefetches), daemon=True,
                     name="tuner-prefetch").start()


def _serve_prefetches(worker: TuningWorker, prefetches: multiprocessing.Queue) -> None:
    while True:
        try:
            args = prefetches.get()
        except (EOFError, OSError, ValueError):  # the driver's end is gone: nothing more comes
            return
        worker.prefetch(*args)


def _invoke(method: str, args: tuple) -> Any:
    return getattr(_worker, method)(*args)


def visible_gpus() -> list[str]:
    """This host's GPUs as CUDA_VISIBLE_DEVICES entries, found without starting CUDA here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip() and entry.strip() != "-1"]
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [str(index) for index in range(len(list(proc.iterdir())))]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree now (Linux; empty elsewhere)."""
    def children(parent: int) -> list[int]:
        try:
            return [int(child) for child in
                    Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            return []

    found, stack = [], children(pid)
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children(child))
    return found


@dataclasses.dataclass
class LocalWorker:
    """A worker process and what it said about its device."""

    executor: concurrent.futures.ProcessPoolExecutor
    info: dict[str, Any]
    slot: int
    gpu: str | None
    prefetches: Any  # a multiprocessing.Queue read by the worker's prefetch thread

    @property
    def device(self) -> str:
        return self.info["device"]

    def call(self, method: str, *args: Any) -> concurrent.futures.Future:
        """Runs ``TuningWorker.<method>(*args)`` in the worker process."""
        return self.executor.submit(_invoke, method, args)

    def prefetch(self, *args: Any) -> None:
        """``TuningWorker.prefetch(*args)`` in the worker process, now, even while it measures."""
        self.prefetches.put(args)

    def kill(self) -> None:
        pid = self.info.get("pid")
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.prefetches.close()
        self.prefetches.cancel_join_thread()  # nobody reads what is still queued


class LocalPool(Pool):
    """One TuningWorker process per GPU of this host; replaces workers that die or hang."""

    #: what ``Future.result()`` raises when the worker behind it died
    lost_errors: tuple[type[BaseException], ...] = (BrokenProcessPool,)

    def __init__(self, options: PoolOptions) -> None:
        if options.resource or options.accelerator_type:
            raise InputError("--resource and --accelerator-type choose nodes of a Ray cluster: "
                             "give --address too")
        self.options = options
        self.workers: list[LocalWorker] = []
        self._slots = itertools.count()
        self._pending: list[tuple[concurrent.futures.ProcessPoolExecutor, str | None,
                                  Any, concurrent.futures.Future]] = []
        self._gpus: list[str | None] = ([None] * (options.workers or 1) if options.interpret
                                        else visible_gpus()[:options.workers or None])
        self.compile_processes = 0 if options.interpret else (
            options.compile_processes if options.compile_processes is not None
            else default_compile_processes(len(self._gpus)))

    def launch(self) -> None:
        """Starts every worker process and returns at once; ``start`` waits for them."""
        if not self._gpus:
            raise NoGPUError("no GPU on this host (CUDA_VISIBLE_DEVICES / the NVIDIA driver show "
                             "none). Run on a machine with a GPU, pass --address of a Ray "
                             "cluster that has them, or use --interpret to run the whole "
                             "pipeline on the CPU through the Triton interpreter.")
        if _RECLAIMED_SEMAPHORES_WARNING not in sys.warnoptions:
            sys.warnoptions.append(_RECLAIMED_SEMAPHORES_WARNING)
        self._pending = [self._spawn(gpu) for gpu in self._gpus]

    def _spawn(self, gpu: str | None):
        env_vars = dict(self.options.env_vars)
        if self.options.interpret:
            env_vars["TRITON_INTERPRET"] = "1"
        context = multiprocessing.get_context("spawn")
        prefetches = context.Queue()
        executor = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=context, initializer=_start_worker,
            initargs=(gpu, self.options.seed, self.compile_processes, self.options.first_problem,
                      env_vars, prefetches))
        return executor, gpu, prefetches, executor.submit(_invoke, "info", ())

    def start(self, timeout: float = 600.0, first_only: bool = False) -> list[LocalWorker]:
        """Starts the workers (if ``launch`` has not) and waits until each reported its device;
        with ``first_only``, until one did, the others joining as they come up (:meth:`joined`:
        workers starting together on one host come up a second or more apart, and the first
        need not wait for the last)."""
        if not self._pending and not self.workers:
            self.launch()
        while self._pending and (not self.workers or not first_only):
            done, _ = concurrent.futures.wait([info for *_, info in self._pending], timeout,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                self.shutdown()
                raise NoGPUError(f"a worker did not start within {timeout:g} s")
            _, errors = self._collect()
            if errors and not first_only:
                self.shutdown()
                raise NoGPUError(f"a worker process died while starting: {errors[0]}")
            if errors and not self._pending and not self.workers:
                raise NoGPUError(f"every worker process died while starting: {errors[0]}")
        return self.workers

    @property
    def starting(self) -> int:
        return len(self._pending)

    def joined(self) -> list[LocalWorker]:
        return self._collect()[0]

    def _collect(self) -> tuple[list[LocalWorker], list[BaseException]]:
        """Moves the workers that came up from pending to :attr:`workers`: those, and the
        errors of those that died starting (their GPUs stay idle, with a warning)."""
        joined, errors, pending = [], [], []
        for executor, gpu, prefetches, info in self._pending:
            if not info.done():
                pending.append((executor, gpu, prefetches, info))
                continue
            try:
                worker = LocalWorker(executor, info.result(), next(self._slots), gpu, prefetches)
            except Exception as error:  # BrokenProcessPool
                executor.shutdown(wait=False, cancel_futures=True)
                errors.append(error)
                warnings.warn(f"the worker for GPU {gpu} died while starting: {error}",
                              RuntimeWarning, stacklevel=3)
                continue
            self.workers.append(worker)
            joined.append(worker)
        self._pending = pending
        return joined, errors

    def shutdown(self) -> None:
        """Ends every worker; those still starting end once started (or with this process)."""
        for executor, *_ in self._pending:
            executor.shutdown(wait=False, cancel_futures=True)
        self._pending = []
        super().shutdown()

    def replace(self, worker: LocalWorker) -> LocalWorker | None:
        """Kills ``worker`` and starts another on its GPU; None if none can start."""
        worker.kill()
        self.workers.remove(worker)
        executor, gpu, prefetches, info = self._spawn(worker.gpu)
        try:
            replacement = LocalWorker(executor, info.result(300), next(self._slots), gpu, prefetches)
        except Exception:
            executor.shutdown(wait=False, cancel_futures=True)
            return None
        self.workers.append(replacement)
        return replacement
