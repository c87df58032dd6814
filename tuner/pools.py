"""What every worker pool shares: its options, and the error when no GPU is there to use.

Two pools implement the same interface for the driver (``workers``, ``start``, ``replace``,
``devices``, ``shutdown``, ``lost_errors``, ``compile_processes``; each worker has ``info``,
``slot``, ``device``, ``call(method, *args) -> Future`` and ``kill()``):
``tuner.local.LocalPool`` (a process per GPU of this host, no cluster to start) and
``tuner.workers.WorkerPool`` (Ray actors on a cluster, or the warm pool of ``tuner serve``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Where `tuner serve` notes the local cluster it started (address, head pid), so that
# `--address auto` and `serve --stop` find that cluster and not another one on the machine.
SERVE_FILE = Path(tempfile.gettempdir()) / f"tuner-serve-{os.getuid()}.json"


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1 in this process's environment, read as kernels.interpreter_enabled
    reads it (importing kernels would import torch, which the driver and a starting worker
    put off)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass
class PoolOptions:
    """Where workers go: how many, and which GPUs they may take."""

    workers: int | None = None  # None: one per GPU the cluster (or host) has
    interpret: bool = False
    accelerator_type: str | None = None
    resource: str | None = None
    seed: int = 0
    # Per worker, compiling upcoming configs; None: the host's cores shared by its GPUs; 0: inline.
    compile_processes: int | None = None
    env_vars: dict[str, str] = dataclasses.field(default_factory=dict)  # for the worker processes
    # (kernel, shape, dtype) of the first problem: a worker builds its inputs and compiles its
    # default config while it starts (the first trial measures the default).
    first_problem: tuple[str, str, str] | None = None


class Pool:
    """What both pools do alike with their ``workers``."""

    workers: list[Any]

    def devices(self) -> dict[str, list[Any]]:
        """Workers grouped by the GPU model their CUDA driver reported."""
        groups: dict[str, list[Any]] = {}
        for worker in self.workers:
            groups.setdefault(worker.device, []).append(worker)
        return groups

    #: workers still starting, to join later (:meth:`joined`)
    starting: int = 0

    def joined(self) -> list[Any]:
        """Workers that came up since the pool started (or since the last call), now in
        :attr:`workers`: a pool may start before all its workers are ready. None here."""
        return []

    def shutdown(self) -> None:
        """Ends every worker and its compile processes now (nothing in them to save)."""
        closing = [worker.call("close") for worker in self.workers]
        concurrent.futures.wait(closing, timeout=5)
        for worker in self.workers:
            worker.kill()
        self.workers = []


class NoGPUError(RuntimeError):
    """The cluster has no GPU the workers could use."""


def resolve_address(address: str | None) -> str | None:
    """``auto`` (or None) means the cluster `tuner serve` started here, if it still runs.

    That cluster keeps Ray's token authentication on (as ``ray start`` sets it up, with the
    token in ``~/.ray/auth_token``), so its clients must say so: this sets ``RAY_AUTH_MODE``,
    which Ray reads when it is imported, so call it before importing Ray.
    """
    if address not in (None, "auto"):
        return address
    try:
        noted = json.loads(SERVE_FILE.read_text())
        os.kill(noted["head_pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):
        return address
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    return noted["address"]
