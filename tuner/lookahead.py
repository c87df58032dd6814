"""What a worker does ahead: the studies its queued trials come from, and what it compiles
speculatively (its studies' likely configs, shared among the workers of a GPU model), so that
a trial finds its config compiled and its inputs ready when it starts (tuner.compiling)."""

from __future__ import annotations

from typing import Any, Sequence

from kernels import LaunchConfig

from .jobs import TrialJob
from .problems import Problem
from .study import StudyRun

# A worker stays on its problems while their studies are fewer than this many trials ahead of
# the least advanced study of the GPU model: studies advance together, and a worker builds a
# problem's inputs once per this many trials, not every trial.
STICKY_TRIALS = 8
# Trials a worker holds queued behind the one it runs. Two, because telling a result and asking
# the next trial takes the driver about as long as a fast trial (a worker holding one ran dry,
# BENCHMARKS.md); the sampler's picks are no worse with them in flight (simulate_search.py).
TRIALS_ASKED_AHEAD = 2
# With many studies a worker holds up to this many trials queued, of studies with fewer than
# SPREAD_INFLIGHT_PER_STUDY trials in flight: a compile on a host compiling for several GPUs
# takes 0.3-0.5 s, several trials' time, so a config asked two trials ahead was still
# compiling when its turn came (BENCHMARKS.md). Bounding a study's trials in flight keeps its
# sampler's picks as good as with two (simulate_all.py).
TRIALS_ASKED_AHEAD_WITH_MANY_STUDIES = 6
SPREAD_INFLIGHT_PER_STUDY = 2
# A study's likely configs a worker compiles speculatively, per compile process it has: with
# fewer processes a worker (more GPUs on a host) they would hold up the compiles it waits for
# (BENCHMARKS.md: on 2 GPUs of 32 cores, 32 a study beat 96; on one GPU, 96 beat 32).
SPECULATIVE_PER_PROCESS = 3


def studies_to_ask(runs: Sequence[StudyRun], device: str, holds: Sequence[Problem], now: float,
                   deadline: float | None, max_inflight: int | None = None) -> list[StudyRun]:
    """The studies of the GPU model ``device`` still searching (with fewer than
    ``max_inflight`` trials in flight), in the order a worker holding ``holds`` asks them for
    its next trial: its problems first (another one costs it new inputs and a reference) while
    their studies are less than STICKY_TRIALS ahead of the least advanced one, then the study
    with the fewest trials in flight."""
    searching = [run for run in runs if run.device == device
                 and not run.search_finished(now, deadline)
                 and (max_inflight is None or len(run.inflight) < max_inflight)]
    if not searching:
        return []
    least = min(run.n_measured for run in searching)
    return sorted(searching, key=lambda run: (
        not (run.problem in holds and run.n_measured < least + STICKY_TRIALS),
        len(run.inflight), run.n_measured))


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
