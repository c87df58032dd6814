"""Pools of tuning workers, one per GPU: Ray actors (a cluster, or a warm `tuner serve` pool),
or plain local processes (tuner.local). The driver talks to either through ``Worker.call``,
which returns a ``concurrent.futures.Future``."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

from .pools import NoGPUError, Pool, PoolOptions
from .tuning_worker import TuningWorker, default_compile_processes

__all__ = ["NoGPUError", "PoolOptions", "TuningWorker", "Worker", "WorkerPool"]

# The actors' concurrency group for prefetches, which run beside a measurement; every other
# call (the measurements of all clients of a warm pool) runs one at a time.
PREFETCH_GROUP = "prefetch"


@dataclasses.dataclass
class Worker:
    """A live Ray actor and what it said about its device."""

    actor: Any
    info: dict[str, Any]
    slot: int

    @property
    def device(self) -> str:
        return self.info["device"]

    def call(self, method: str, *args: Any) -> concurrent.futures.Future:
        """Runs ``TuningWorker.<method>(*args)`` on the worker."""
        return getattr(self.actor, method).remote(*args).future()

    def prefetch(self, *args: Any) -> None:
        """``TuningWorker.prefetch(*args)`` on the worker, even while it measures."""
        self.actor.prefetch.options(concurrency_group=PREFETCH_GROUP).remote(*args)

    def kill(self) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            pass


class WorkerPool(Pool):
    """One TuningWorker actor per GPU of a Ray cluster; replaces workers that die or hang."""

    #: what ``Future.result()`` raises when the worker behind it died
    lost_errors: tuple[type[BaseException], ...] = (RayActorError, WorkerCrashedError)

    def __init__(self, options: PoolOptions) -> None:
        self.options = options
        self.workers: list[Worker] = []
        self._slots = itertools.count()
        self.compile_processes = 0 if options.interpret else (
            options.compile_processes if options.compile_processes is not None
            else default_compile_processes(self._gpus_per_node()))

    def _gpus_per_node(self) -> int:
        return max([int(node.get("Resources", {}).get("GPU", 0)) for node in ray.nodes()
                    if node.get("Alive")] + [1])

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

    def _new_actor(self, name: str | None = None):
        """A new worker actor; ``name`` makes it a named, detached member of the warm pool."""
        options = self._actor_options()
        if name is not None:
            from .serve import actor_options

            options.update(actor_options(name))
        actor_class = ray.remote(concurrency_groups={PREFETCH_GROUP: 1})(TuningWorker)
        return actor_class.options(**options).remote(self.options.seed, self.compile_processes,
                                                     self.options.first_problem)

    def replace(self, worker: Worker) -> Worker | None:
        """Kills ``worker`` and starts another in its place; None if none can start."""
        worker.kill()
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

    def _no_gpu_message(self) -> str:
        wanted = "GPUs"
        if self.options.resource:
            wanted += f" with resource {self.options.resource!r}"
        if self.options.accelerator_type:
            wanted += f" of accelerator type {self.options.accelerator_type!r}"
        return (f"no {wanted} in the Ray cluster (resources: {ray.cluster_resources()}). "
                "Run on a machine with a GPU, pass --address of a cluster that has them, or use "
                "--interpret to run the whole pipeline on the CPU through the Triton interpreter.")
