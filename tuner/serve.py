"""A warm worker pool: one named, detached TuningWorker actor per GPU of a Ray cluster.

``python -m tuner serve`` starts them (and, without ``--address``, a local Ray cluster that
outlives the command); ``search``/``sweep --address`` find them by name and share them, so a
search pays neither Ray's start nor the workers' (torch, CUDA, compile processes). Actors run
one task at a time in arrival order and each client keeps at most one trial in flight per
worker, so concurrent clients take turns. ``serve --stop`` ends the pool.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import ray

from .pools import SERVE_FILE, PoolOptions, resolve_address
from .workers import Worker, WorkerPool

NAMESPACE = "tuner"
ACTOR_PREFIX = "tuner-worker-"


class ServedPool(WorkerPool):
    """The workers of ``tuner serve``, shared with other clients: never shut down by one."""

    served = True

    def __init__(self, options: PoolOptions, workers: list[Worker], compile_processes: int) -> None:
        super().__init__(options)
        self.workers = workers
        self.compile_processes = compile_processes

    def start(self, timeout: float = 600.0) -> list[Worker]:
        return self.workers

    def _new_actor(self, name: str | None = None):
        return super()._new_actor(name or f"{ACTOR_PREFIX}{next(self._slots)}")

    def shutdown(self) -> None:
        """Leaves the warm workers running for the next client."""
        self.workers = []


def _served_names() -> list[str]:
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor.get("namespace") == NAMESPACE and actor["name"].startswith(ACTOR_PREFIX))


def attach(options: PoolOptions, timeout: float = 60.0) -> ServedPool | None:
    """The warm pool on the connected cluster, or None if nothing is served there."""
    names = _served_names()[:options.workers or None]
    if not names:
        return None
    actors = [ray.get_actor(name, namespace=NAMESPACE) for name in names]
    infos = ray.get([actor.info.remote() for actor in actors], timeout=timeout)
    stored = ray.experimental.internal_kv._internal_kv_get(b"tuner:serve:options")
    compile_processes = json.loads(stored)["compile_processes"] if stored else 0
    workers = [Worker(actor, info, slot) for slot, (actor, info) in enumerate(zip(actors, infos))]
    pool = ServedPool(options, workers, compile_processes)
    pool._slots = iter(range(len(workers), 1 << 30))
    return pool


def _connect(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=resolve_address(address) or "auto", namespace=NAMESPACE, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)


def _start_local_cluster(interpret: bool, timeout: float = 60.0) -> None:
    """A Ray head of our own that outlives this command (``ray start --head --block`` in its
    own session); ``stop`` ends exactly it, never another cluster on the machine."""
    from ray._private.services import get_node_ip_address

    with socket.socket() as probe:  # a free port, so the address is known before the head is up
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
               "--include-dashboard=false", "--disable-usage-stats"]
    if interpret:
        command.append("--num-gpus=0")
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    address = f"{get_node_ip_address()}:{port}"
    deadline = time.monotonic() + timeout
    while True:  # until the GCS accepts connections (ray.init itself would retry for minutes)
        try:
            socket.create_connection((get_node_ip_address(), port), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                raise RuntimeError("could not start a local Ray cluster: " + (
                    head.stderr.read().decode()[-500:] if head.poll() is not None else "timed out"))
            time.sleep(0.2)
    SERVE_FILE.write_text(json.dumps({"address": address, "head_pid": head.pid}))
    _connect(None)  # through resolve_address: the served cluster, with token authentication


def start(address: str | None, options: PoolOptions) -> str:
    """Starts the warm pool (and a local cluster if no address is given); says what it did."""
    if address is None and not ray.is_initialized():
        _start_local_cluster(options.interpret)
    _connect(address)
    existing = _served_names()
    if existing:
        return f"already serving {len(existing)} workers; `python -m tuner serve --stop` ends them"
    pool = ServedPool(options, [], 0)
    pool.compile_processes = WorkerPool(options).compile_processes
    pool.workers = WorkerPool.start(pool)
    ray.experimental.internal_kv._internal_kv_put(
        b"tuner:serve:options", json.dumps({"compile_processes": pool.compile_processes}).encode())
    devices = sorted({worker.device for worker in pool.workers})
    return (f"serving {len(pool.workers)} warm workers on {', '.join(devices)} (Ray namespace "
            f"{NAMESPACE!r}); search or sweep with --address {address or 'auto'} uses them; "
            "`python -m tuner serve --stop` ends them")


def stop(address: str | None) -> str:
    """Kills the served workers, and the local cluster if ``serve`` started it."""
    try:
        _connect(address)
    except ConnectionError:
        return "no Ray cluster to stop"
    names = _served_names()
    for name in names:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    ray.experimental.internal_kv._internal_kv_del(b"tuner:serve:options")
    message = f"stopped {len(names)} workers"
    if address in (None, "auto") and SERVE_FILE.exists():
        ray.shutdown()
        try:
            os.kill(json.loads(SERVE_FILE.read_text())["head_pid"], signal.SIGTERM)
            message += " and the local Ray cluster serve had started"
        except (OSError, ValueError, KeyError):  # `ray start --block` stops its cluster on SIGTERM
            pass
        SERVE_FILE.unlink(missing_ok=True)
    return message


def actor_options(name: str) -> dict[str, Any]:
    """Ray options that make a worker actor a named, detached member of the warm pool."""
    return {"name": name, "namespace": NAMESPACE, "lifetime": "detached"}
