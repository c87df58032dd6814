"""The process that measures configs on one GPU, whichever pool (local processes or Ray actors)
runs it. Imports neither Ray nor Optuna, so a local worker starts as fast as torch does."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .compiling import CompileAhead
from .pools import interpreter_requested

# A small problem whose compile warms up Triton's compiler in a new worker.
WARM_UP_SHAPE = "64x64"

if TYPE_CHECKING:  # a local worker imports torch and the kernels once it has started
    from kernels import LaunchConfig

    from .measure import Confirmation, Measurement
    from .problems import Problem


# Problems whose inputs, references and timing copies a worker keeps (the least recently used
# is dropped first) while its GPU has at least MIN_FREE_MEMORY_SHARE of its memory unallocated:
# with many studies a worker's queued trials take turns between problems, and rebuilding a
# problem's inputs and float64 reference at each turn cost a trial 12 ms (BENCHMARKS.md).
HELD_PROBLEMS = 4
MIN_FREE_MEMORY_SHARE = 0.5

# Compile processes never touch a GPU, so a host compiles on all its cores: each worker gets
# an equal share, less a core for itself (and one for the driver), at most this many.
MAX_COMPILE_PROCESSES = 32


def default_compile_processes(workers_on_host: int) -> int:
    """Compile processes per worker: the host's cores shared by its workers, less one core for
    each worker itself and one for the driver; at least one, at most
    :data:`MAX_COMPILE_PROCESSES`."""
    workers = max(1, workers_on_host)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_COMPILE_PROCESSES, (cores - 1) // workers - 1))


class TuningWorker:
    """Measures configs on the one GPU it was given (or on the CPU under the interpreter).

    Inputs and references are built once per problem and kept for the next trial of it. With
    ``compile_processes`` > 0, configs are compiled ahead in that many processes (for this GPU
    without touching it, into the shared Triton cache) while the GPU checks and times others:
    first the configs the driver says come next (:meth:`prefetch`, which the pools let the
    driver call while a measurement runs), then, whenever a process is free, the sampler's
    runner-ups and the study's other valid configs (speculatively: a space holds a few hundred,
    a host compiles dozens a second), so that compilation leaves the GPU's critical path
    without the driver asking far ahead of what it has learnt. Trials are timed quickly; the
    confirm stage re-times the best few properly.
    """

    def __init__(self, seed: int = 0, compile_processes: int = 0,
                 first_problem: tuple[str, str, str] | None = None) -> None:
        # The compile processes start first: their fork server imports torch beside this
        # process.
        interpret = interpreter_requested()
        processes = 0 if interpret else compile_processes
        self._compiles = CompileAhead(processes) if processes else None
        import torch

        # The pool makes the GPU given to this worker device 0 (CUDA_VISIBLE_DEVICES).
        self.device = torch.device("cpu") if interpret else torch.device("cuda", 0)
        self.seed = seed
        self.first_problem = first_problem
        self._benches: dict[Problem, Any] = {}
        self._copy_gbps: float | None = None
        # When this worker's last trial or confirm stage ended: the gap to the next one is time
        # its GPU waited for the driver (reported with the next trial).
        self._last_end: float | None = None
        self._warming = threading.Thread(target=self._warm_up, daemon=True, name="tuner-warm-up")
        if self.device.type == "cuda":
            self._warming.start()

    def _warm_up(self) -> None:
        """What the first trial would otherwise wait for, done while the driver starts: the
        CUDA context, the compile processes (told the GPU's target), the copy bandwidth, the
        first problem's inputs and reference, and its default config compiled (the study's
        first trial; without a first problem, a small one warms up Triton's compiler)."""
        from kernels.targets import current_target

        from .problems import get_kernel

        try:
            if self._compiles is not None:
                self._compiles.start(current_target())
            self.copy_gbps()
            if self.first_problem is not None:
                kernel, shape, dtype = self.first_problem
                spec = get_kernel(kernel)
                problem = spec.problem(shape, dtype)
                self._bench(problem)
            else:
                spec = get_kernel("add_layernorm")
                problem = spec.problem(WARM_UP_SHAPE, "float32")
            spec.compile(problem, spec.heuristic(problem))
        except Exception:  # the first trial meets the same error and reports it
            pass

    def _ready(self) -> None:
        """Waits for the warm-up: nothing may share the GPU with a measurement."""
        if self._warming.is_alive():
            self._warming.join()

    def prefetch(self, upcoming: list[tuple[Problem, LaunchConfig]],
                 speculative: list[tuple[Problem, LaunchConfig]] = (),
                 likely: list[tuple[Problem, LaunchConfig]] = ()) -> None:
        """Compiles ``upcoming`` (the configs this worker measures next) now, and whenever a
        compile process is free ``likely`` ones (the sampler's runner-ups), then
        ``speculative`` ones. Safe to call while :meth:`measure` runs."""
        if self._compiles is not None:
            self._compiles.prefetch(upcoming, speculative, likely)

    def info(self) -> dict[str, Any]:
        """Device name (from the CUDA driver), compute capability, the properties the default
        configs are derived from, versions, node, pid, the device's memory in bytes and when
        this answered (``time.monotonic()`` here: comparable with the driver's on the same
        host)."""
        import dataclasses

        import torch
        import triton

        from kernels.defaults import device_properties
        from kernels.device import compute_capability, device_name

        cuda = self.device if self.device.type == "cuda" else None
        if cuda is not None:
            memory = torch.cuda.get_device_properties(cuda).total_memory
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"device": device_name(cuda), "compute_capability": compute_capability(cuda),
                "properties": dataclasses.asdict(device_properties()),
                "torch": torch.__version__.split("+")[0], "triton": triton.__version__,
                "node": _node_id(), "pid": os.getpid(), "memory_bytes": memory,
                "answered_monotonic": time.monotonic()}

    def copy_gbps(self) -> float:
        """Device-to-device copy bandwidth, measured once per worker (on first use)."""
        from .measure import copy_bandwidth_gbps

        if self._copy_gbps is None:
            self._copy_gbps = copy_bandwidth_gbps(self.device)
        return self._copy_gbps

    def _bench(self, problem: Problem):
        """The problem's inputs, reference and timing buffers: kept from an earlier trial, or
        built now, dropping the least recently used problems' first (see HELD_PROBLEMS) and, if
        the GPU runs out of memory building them, every other problem's."""
        import torch

        from .measure import ProblemBench
        from .problems import get_kernel

        bench = self._benches.pop(problem, None)
        if bench is None:
            while self._benches and (len(self._benches) >= HELD_PROBLEMS
                                     or not self._memory_to_spare()):
                self._benches.pop(next(iter(self._benches)))
            try:
                bench = ProblemBench(get_kernel(problem.kernel), problem, self.device, self.seed)
            except torch.cuda.OutOfMemoryError:
                if not self._benches:
                    raise
                self._benches.clear()
                torch.cuda.empty_cache()
                bench = ProblemBench(get_kernel(problem.kernel), problem, self.device, self.seed)
        self._benches[problem] = bench  # the most recently used last
        return bench

    def _memory_to_spare(self) -> bool:
        """Whether the GPU has MIN_FREE_MEMORY_SHARE of its memory unallocated (always on the
        CPU)."""
        import torch

        if self.device.type != "cuda":
            return True
        total = torch.cuda.get_device_properties(self.device).total_memory
        return torch.cuda.memory_allocated(self.device) <= (1 - MIN_FREE_MEMORY_SHARE) * total

    def measure(self, problem: Problem, config: LaunchConfig) -> Measurement:
        """Compile, check and time one config; failures come back in the result."""
        self._ready()
        waited = time.perf_counter()
        idle = None if self._last_end is None else waited - self._last_end
        try:
            return self._measure(problem, config, waited, idle)
        finally:
            self._last_end = time.perf_counter()

    def _measure(self, problem: Problem, config: LaunchConfig, waited: float,
                 idle: float | None) -> Measurement:
        from .errors import is_fatal
        from .measure import Measurement

        compiled_s = None if self._compiles is None else self._compiles.wait(problem, config.key())
        ready = time.perf_counter()
        try:
            bench = self._bench(problem)
            copy_gbps = self.copy_gbps()
        except Exception as error:
            return Measurement(config.key(), error=f"setup failed: {error}", fatal=is_fatal(error))
        set_up = time.perf_counter()
        result = bench.measure(config, copy_gbps, quick=True)
        # Whose compile the trial waited for (the driver's upcoming config, a runner-up of the
        # sampler, a speculative one), so that --verbose shows which kind came in time.
        reason = None if compiled_s is None else self._compiles.reason(problem, config.key())
        waiting = f"waiting for its compile ({reason})" if reason else "waiting for its compile"
        result.phases.update({waiting: ready - waited, "inputs and reference": set_up - ready})
        if idle is not None:
            result.phases["idle before it, waiting for the driver"] = idle
        inline = compiled_s is None and self._compiles is not None
        if inline and "first launch and check" in result.phases:
            # Not compiled ahead (asked too late, or its compile had not started): inline.
            result.phases["first launch, compile inline, check"] = result.phases.pop(
                "first launch and check")
        if compiled_s is not None and result.compile_s is not None:
            result.compile_s += compiled_s  # compiled elsewhere, then loaded from the cache
        return result

    def confirm(self, problem: Problem, configs: list[LaunchConfig],
                rounds: int = 5) -> Confirmation:
        """Re-times configs carefully, interleaved over several rounds (and torch eager once).

        Gives each config's median over rounds, so drift in clocks or temperature affects
        every config alike; each config is captured for timing once, then replayed each round.
        """
        from .measure import Confirmation

        self._ready()
        try:
            started = time.perf_counter()
            bench = self._bench(problem)
            for config in configs:
                bench.check(config)
            checked = time.perf_counter()
            medians = bench.time_interleaved(configs, rounds)
            timed = time.perf_counter()
            try:
                eager_ms = bench.time_eager()
            except Exception:  # PyTorch itself may lack the op (e.g. bfloat16 avg_pool3d on CPU)
                eager_ms = None
            phases = {"confirm: inputs and checks": checked - started,
                      "confirm: interleaved timing": timed - checked,
                      "confirm: torch eager": time.perf_counter() - timed}
            return Confirmation(medians, eager_ms, bench.n_bytes, self.copy_gbps(), phases)
        finally:
            self._last_end = time.perf_counter()

    def close(self) -> None:
        """Ends the compile processes now: killed with their parent, they would linger."""
        if self._compiles is not None:
            self._compiles.close()
            self._compiles = None

    def ping(self) -> int:
        """The worker's pid: answers as soon as the worker is idle."""
        return os.getpid()

    def crash(self) -> None:
        """Ends the worker process abruptly (tests use it to simulate a lost GPU or node)."""
        os._exit(1)


def _node_id() -> str:
    """The Ray node id where this runs under Ray, else the host name."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; a local one never pays for it
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()
