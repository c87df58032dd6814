"""Ray actors that measure configs, one pinned to each GPU, and the pool that manages them."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from .problems import Problem


def _warm_up_compiler() -> None:
    """Runs once in each compile process: the imports and the CUDA context a compile needs."""
    import torch

    import tuner.problems  # noqa: F401  (imports kernels, triton)

    torch.cuda.init()


def _precompile(problem: Problem, config: dict[str, Any]) -> float:
    """Runs in a compile process: compiles one config into Triton's disk cache; returns seconds."""
    import time

    from kernels import LaunchConfig

    from .problems import get_kernel

    start = time.perf_counter()
    get_kernel(problem.kernel).compile(problem, LaunchConfig(**config))
    return time.perf_counter() - start


class TuningWorker:
    """Measures configs on the one GPU Ray gave it (or on the CPU under the interpreter).

    Inputs and references are built once per problem and kept for the next trial of it.
    With ``compile_processes`` > 0, configs the driver says come next are compiled in that many
    processes (same GPU, shared Triton cache) while the current one is checked and timed, so
    compilation leaves the GPU's critical path.
    """

    def __init__(self, seed: int = 0, compile_processes: int = 0) -> None:
        import torch

        from kernels import interpreter_enabled

        # Ray sets CUDA_VISIBLE_DEVICES, so the GPU given to this actor is device 0.
        self.device = torch.device("cpu") if interpreter_enabled() else torch.device("cuda", 0)
        self.seed = seed
        self._benches: dict[Problem, Any] = {}
        self._copy_gbps: float | None = None
        self._compile_processes = 0 if interpreter_enabled() else compile_processes
        self._compiling: dict[tuple[Problem, str], Any] = {}
        self._compiler = None
        if self._compile_processes:
            import concurrent.futures
            import multiprocessing

            # Started now, and warmed up (imports, CUDA context), so the first trials of a
            # search do not wait for them.
            self._compiler = concurrent.futures.ProcessPoolExecutor(
                self._compile_processes, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self._compile_processes):
                self._compiler.submit(_warm_up_compiler)

    def _prefetch(self, upcoming: list[tuple[Problem, dict[str, Any]]]) -> None:
        if self._compiler is None:
            return
        from kernels import LaunchConfig

        for problem, config in upcoming:
            key = (problem, LaunchConfig(**config).key())
            if key not in self._compiling:
                self._compiling[key] = self._compiler.submit(_precompile, problem, config)

    def _wait_compiled(self, problem: Problem, key: str) -> float | None:
        """Waits for a prefetched compile of this config; its seconds, or None if there was none."""
        future = self._compiling.pop((problem, key), None)
        if future is None:
            return None
        try:
            return future.result(timeout=600)
        except Exception:  # the measurement compiles again and reports the error
            return None

    def info(self) -> dict[str, Any]:
        """Device name (from the CUDA driver), compute capability, versions, copy bandwidth,
        device memory in bytes."""
        import torch
        import triton

        from kernels.device import compute_capability, device_name

        from .measure import copy_bandwidth_gbps

        if self._copy_gbps is None:
            self._copy_gbps = copy_bandwidth_gbps(self.device)
        if self.device.type == "cuda":
            memory = torch.cuda.get_device_properties(self.device).total_memory
        else:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"device": device_name(self.device if self.device.type == "cuda" else None),
                "compute_capability": compute_capability(self.device if self.device.type == "cuda" else None),
                "torch": torch.__version__.split("+")[0], "triton": triton.__version__,
                "copy_gbps": self._copy_gbps, "node": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "memory_bytes": memory}

    def _bench(self, problem: Problem):
        from .measure import ProblemBench
        from .problems import get_kernel

        if problem not in self._benches:
            self._benches.clear()  # one problem's buffers at a time bounds GPU memory
            self._benches[problem] = ProblemBench(get_kernel(problem.kernel), problem,
                                                  self.device, self.seed)
        return self._benches[problem]

    def measure(self, problem: Problem, config: dict[str, Any],
                upcoming: list[tuple[Problem, dict[str, Any]]] = ()) -> dict[str, Any]:
        """Compile, check and time one config; failures come back in the result.

        ``upcoming`` are the configs this worker will measure next: they start compiling now.
        """
        from kernels import LaunchConfig

        from .measure import Measurement, is_fatal

        launch_config = LaunchConfig(**config)
        self._prefetch(list(upcoming))
        compiled_s = self._wait_compiled(problem, launch_config.key())
        try:
            bench = self._bench(problem)
        except Exception as error:
            return Measurement(launch_config.key(), error=f"setup failed: {error}",
                               fatal=is_fatal(error)).as_dict()
        result = bench.measure(launch_config, self.info()["copy_gbps"])
        if compiled_s is not None and result.compile_s is not None:
            result.compile_s += compiled_s  # compiled elsewhere, then loaded from the cache
        return result.as_dict()

    def confirm(self, problem: Problem, configs: list[dict[str, Any]], rounds: int = 5) -> dict[str, Any]:
        """Re-times configs interleaved over several rounds (and torch eager once).

        Returns each config's median over rounds, so drift in clocks or temperature affects
        every config alike.
        """
        import statistics

        from kernels import LaunchConfig

        bench = self._bench(problem)
        parsed = [LaunchConfig(**config) for config in configs]
        samples: dict[str, list[float]] = {config.key(): [] for config in parsed}
        for config in parsed:
            bench.check(config)
        for _ in range(rounds):
            for config in parsed:
                samples[config.key()].append(bench.time(config, quick=True))
        try:
            eager_ms = bench.time_eager()
        except Exception:  # PyTorch itself may lack the op (e.g. bfloat16 avg_pool3d on CPU)
            eager_ms = None
        return {"ms": {key: statistics.median(values) for key, values in samples.items()},
                "eager_ms": eager_ms, "n_bytes": bench.n_bytes,
                "copy_gbps": self.info()["copy_gbps"]}

    def crash(self) -> None:
        """Ends the worker process abruptly (tests use it to simulate a lost GPU or node)."""
        os._exit(1)


@dataclasses.dataclass
class Worker:
    """A live actor and what it said about its device."""

    actor: Any
    info: dict[str, Any]
    slot: int

    @property
    def device(self) -> str:
        return self.info["device"]


@dataclasses.dataclass
class PoolOptions:
    """Where workers go: how many, and which GPUs they may take."""

    workers: int | None = None  # None: one per GPU the cluster has
    interpret: bool = False
    accelerator_type: str | None = None
    resource: str | None = None
    seed: int = 0
    compile_processes: int = 2  # per worker, compiling upcoming configs (0: compile inline)
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)  # for the worker processes


class NoGPUError(RuntimeError):
    """The cluster has no GPU the workers could use."""


class WorkerPool:
    """One TuningWorker per GPU; replaces workers that die or hang."""

    def __init__(self, options: PoolOptions) -> None:
        self.options = options
        self.workers: list[Worker] = []
        self._slots = itertools.count()

    def _actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}
        if self._uses_cpus():
            options["num_cpus"] = 1
        else:
            options["num_gpus"] = 1
        if self.options.accelerator_type:
            options["accelerator_type"] = self.options.accelerator_type
        if self.options.resource:
            options["resources"] = {self.options.resource: 1}
        env_vars = dict(self.options.env_vars)
        if self.options.interpret:
            env_vars["TRITON_INTERPRET"] = "1"
        if env_vars:
            options["runtime_env"] = {"env_vars": env_vars}
        return options

    def _uses_cpus(self) -> bool:
        """Interpreter workers on a cluster without GPUs take a CPU each instead."""
        return self.options.interpret and not ray.cluster_resources().get("GPU")

    def _capacity(self) -> int:
        """How many workers fit: GPUs (or CPUs) summed over the alive nodes that have the
        requested custom resource and accelerator type."""
        unit = "CPU" if self._uses_cpus() else "GPU"
        capacity = 0
        for node in ray.nodes():
            resources = node.get("Resources", {})
            if not node.get("Alive"):
                continue
            if self.options.accelerator_type and \
                    f"accelerator_type:{self.options.accelerator_type}" not in resources:
                continue
            slots = resources.get(unit, 0)
            if self.options.resource:
                slots = min(slots, resources.get(self.options.resource, 0))
            capacity += int(slots)
        return capacity

    def start(self, timeout: float = 600.0) -> list[Worker]:
        """Starts the workers and waits until each has reported its device."""
        capacity = self._capacity()
        if capacity < 1:
            raise NoGPUError(self._no_gpu_message())
        count = min(self.options.workers or capacity, capacity)
        actors = [self._new_actor() for _ in range(count)]
        try:
            infos = ray.get([actor.info.remote() for actor in actors], timeout=timeout)
        except GetTimeoutError:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise NoGPUError(f"{count} workers did not start within {timeout:g} s; "
                             + self._no_gpu_message()) from None
        self.workers = [Worker(actor, info, next(self._slots)) for actor, info in zip(actors, infos)]
        return self.workers

    def _new_actor(self):
        actor_class = ray.remote(TuningWorker)
        return actor_class.options(**self._actor_options()).remote(
            self.options.seed, 0 if self.options.interpret else self.options.compile_processes)

    def replace(self, worker: Worker) -> Worker | None:
        """Kills ``worker`` and starts another in its place; None if none can start."""
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:
            pass
        self.workers.remove(worker)
        actor = self._new_actor()
        ready = actor.info.remote()
        deadline = time.monotonic() + 300
        # A worker lost with its node leaves no GPU to start on: give up once Ray marks the
        # node dead (seconds) instead of waiting out the whole start-up timeout.
        while not ray.wait([ready], timeout=2.0)[0] and time.monotonic() < deadline \
                and self._capacity() > len(self.workers):
            pass
        try:
            info = ray.get(ready, timeout=0)
        except Exception:
            ray.kill(actor, no_restart=True)
            return None
        replacement = Worker(actor, info, next(self._slots))
        self.workers.append(replacement)
        return replacement

    def devices(self) -> dict[str, list[Worker]]:
        """Workers grouped by the GPU model their CUDA driver reported."""
        groups: dict[str, list[Worker]] = {}
        for worker in self.workers:
            groups.setdefault(worker.device, []).append(worker)
        return groups

    def shutdown(self) -> None:
        for worker in self.workers:
            try:
                ray.kill(worker.actor, no_restart=True)
            except Exception:
                pass
        self.workers = []

    def _no_gpu_message(self) -> str:
        wanted = "GPUs"
        if self.options.resource:
            wanted += f" with resource {self.options.resource!r}"
        if self.options.accelerator_type:
            wanted += f" of accelerator type {self.options.accelerator_type!r}"
        return (f"no {wanted} in the Ray cluster (resources: {ray.cluster_resources()}). "
                "Run on a machine with a GPU, pass --address of a cluster that has them, or use "
                "--interpret to run the whole pipeline on the CPU through the Triton interpreter.")
