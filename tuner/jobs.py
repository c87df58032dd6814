"""Work in flight on the driver's workers: a trial's measurement or a study's confirm stage."""

from __future__ import annotations

import dataclasses
from typing import Any

from kernels import LaunchConfig

from .study import StudyRun


@dataclasses.dataclass
class Job:
    """Work in flight on one worker for one study."""

    run: StudyRun
    worker: Any  # a worker of the pool: tuner.workers.Worker or tuner.local.LocalWorker
    started: float  # time.monotonic() when sent, or when the job before it on its worker ended
    attempts: int = dataclasses.field(default=1, kw_only=True)


@dataclasses.dataclass
class TrialJob(Job):
    """The measurement of one proposed config."""

    config: LaunchConfig


@dataclasses.dataclass
class ConfirmJob(Job):
    """A study's confirm stage: its best few configs re-timed, interleaved."""
