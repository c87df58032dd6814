"""What a worker compiles speculatively: its studies' likely configs, shared among the workers
of a GPU model, so that a trial finds its config compiled when it starts (tuner.compiling)."""

from __future__ import annotations

from typing import Any, Sequence

from kernels import LaunchConfig

from .jobs import TrialJob
from .problems import Problem
from .study import StudyRun

# A study's likely configs a worker compiles speculatively, per compile process it has: with
# fewer processes a worker (more GPUs on a host) they would hold up the compiles it waits for
# (BENCHMARKS.md: on 2 GPUs of 32 cores, 32 a study beat 96; on one GPU, 96 beat 32).
SPECULATIVE_PER_PROCESS = 3


class Lookahead:
    """Hands each worker, once per study, the configs it compiles whenever its compile
    processes are free."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._given: set[tuple[int, str]] = set()  # (worker slot, study name)

    def speculative(self, job: TrialJob, runs: Sequence[StudyRun]
                    ) -> list[tuple[Problem, LaunchConfig]]:
        """Once per worker and study: the study's likely configs. The device's workers split
        them in shares, each its own share first (peers measuring the study meanwhile compile
        theirs), then the others' (compiled already, they are found in the cache at once; and
        a peer that never takes the study never compiles its share). A worker's first list
        also holds every other study's seeds (of ``runs``), so that each study's first trial
        finds its config compiled."""
        marker = (job.worker.slot, job.run.study.study_name)
        processes = self.pool.compile_processes
        if not processes or marker in self._given:
            return []
        first = not any(slot == job.worker.slot for slot, _ in self._given)
        self._given.add(marker)
        peers = sorted(worker.slot for worker in self.pool.workers
                       if worker.device == job.run.device)
        index = peers.index(job.worker.slot) if job.worker.slot in peers else 0
        likely = job.run.likely_configs()[:SPECULATIVE_PER_PROCESS * processes]
        shares = max(1, len(peers))
        ordered = [(job.run.problem, config) for offset in range(shares)
                   for config in likely[(index + offset) % shares::shares]]
        if first:
            # The first config of each other study (which would otherwise compile as the
            # worker reaches it), after one round of this study's.
            seeds = [(run.problem, config) for run in runs
                     if run is not job.run and run.device == job.run.device and not run.done
                     for config in run.seeds()]
            ordered[processes:processes] = seeds
        return ordered
