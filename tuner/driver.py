"""The driver: many Optuna studies over one pool of GPU workers.

Asynchronous dispatch: whenever a worker is free it gets the next trial of a study for its GPU
model (the study with the fewest trials in flight first), and a result is told as soon as it
arrives, so no GPU waits for the slowest of a batch. ``search`` is this loop with one problem.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import optuna

from kernels import merge_entries
from kernels.defaults import DeviceProperties, register_device_properties

from .errors import is_fatal
from .jobs import ConfirmJob, Job, TrialJob
from .lookahead import (
    SPREAD_INFLIGHT_PER_STUDY,
    TRIALS_ASKED_AHEAD,
    TRIALS_ASKED_AHEAD_WITH_MANY_STUDIES,
    Lookahead,
    studies_to_ask,
)
from .measure import Confirmation, Measurement
from .problems import Problem, get_kernel
from .progress import Progress, format_phases
from .recorder import Recorder, RecorderError
from .space import SearchSpace, SpaceError, load_space
from .result import StudyResult, entry_from_result
from .study import Settings, Stage, StudyRun
from .tuning_worker import HELD_PROBLEMS

# A trial whose worker died is re-run elsewhere this many times before it fails.
MAX_ATTEMPTS = 2
# From this many workers on, an SQL storage is written by a recorder process: one driver's
# storage work (tens of ms a trial) would otherwise keep that many GPUs waiting (BENCHMARKS.md).
BACKGROUND_WRITES_FROM_WORKERS = 2


class Driver:
    """Runs the studies of many problems on every GPU model of a worker pool."""

    def __init__(self, pool: Any, storage: optuna.storages.BaseStorage | str,
                 settings: Settings, table_for_device: Callable[[str], Path],
                 space: SearchSpace | None = None, progress: Progress | None = None) -> None:
        self.pool, self.storage, self.settings = pool, storage, settings
        self.table_for_device = table_for_device
        self.space = space
        self.progress = progress or Progress()
        self.inflight: dict[concurrent.futures.Future, Job] = {}
        # Each worker slot's jobs in flight, in the order it runs them (the first is running).
        self.queued: dict[int, collections.deque[concurrent.futures.Future]] = {}
        self.retries: list[Job] = []
        # Trials asked ahead per worker and sent to it at once: they compile while the current
        # one is timed, and the worker starts the next the moment the current one ends,
        # without waiting for the driver (busy telling and asking for other workers); the
        # workers' other compile processes compile the studies' configs speculatively.
        self.prefetch = min(TRIALS_ASKED_AHEAD, pool.compile_processes)
        self.spread_prefetch = min(TRIALS_ASKED_AHEAD_WITH_MANY_STUDIES, pool.compile_processes)
        self.lookahead = Lookahead(pool)
        # The problems each worker slot measured last, the latest last: their inputs are ready
        # there (tuner.tuning_worker.HELD_PROBLEMS).
        self.held_problems: dict[int, list[Problem]] = {}
        self.runs: list[StudyRun] = []
        # Writes the run's trials to an SQL storage in a process of its own (tuner.recorder).
        self.recorder: Recorder | None = None
        self._problems: list[Problem] = []  # run()'s, for the studies of workers joining later
        self._only_on: Mapping[Problem, Collection[str]] | None = None
        self._spaces: dict[str, SearchSpace] = {}
        # Seconds each worker slot spent on jobs, and the loop's own wall time: GPU busy fractions.
        self.busy_seconds: dict[int, float] = {}
        self.wall_seconds = 0.0
        # When the first trial was sent and its result came back (time.monotonic), for --verbose.
        self.first_dispatch: float | None = None
        self.first_result: float | None = None
        # Seconds summed over the run's trials: the driver's asking and telling, and each phase
        # the workers reported (Measurement.phases), for --verbose.
        self.phase_seconds: collections.Counter[str] = collections.Counter()
        self.phase_trials: collections.Counter[str] = collections.Counter()  # trials with each

    def _space_for(self, kernel: str) -> SearchSpace:
        if self.space is not None:
            # A plugin's space may name it by its table name or by the reference it was loaded by.
            if self.space.kernel not in (kernel, get_kernel(kernel).table_name):
                raise SpaceError(f"{self.space.path}: search space is for kernel "
                                 f"{self.space.kernel!r}, not {kernel!r}")
            return self.space
        return load_space(get_kernel(kernel).space_file)

    def run(self, problems: list[Problem],
            only_on: Mapping[Problem, Collection[str]] | None = None) -> list[StudyResult]:
        """Tunes every problem on every GPU model in the pool (with ``only_on``, only on the
        GPU models it names for the problem); returns the confirmed winners.

        Each winner is merged into its GPU model's table as soon as it is confirmed. On Ctrl-C
        the trials in flight are dropped (they are proposed again on resume) and every finished
        trial stays stored.
        """
        self._problems, self._only_on = problems, only_on
        self._spaces = {problem.kernel: self._space_for(problem.kernel) for problem in problems}
        self.runs = []
        if self._writes_in_background():
            self.recorder = Recorder.for_storage(self.storage)
        self._admit(self.pool.workers)
        started = time.monotonic()
        deadline = None if self.settings.timeout is None else started + self.settings.timeout
        try:
            self._loop(deadline)
        except BaseException:
            self._abandon_inflight()
            self._close_recorder(raise_errors=False)
            raise
        finally:
            self.wall_seconds = time.monotonic() - started
        self._close_recorder(raise_errors=True)
        self.progress.update(self.runs, 0, len(self.pool.workers), force=True)
        return [run.result for run in self.runs if run.result is not None]

    def _writes_in_background(self) -> bool:
        """Whether the storage is written by a recorder: from BACKGROUND_WRITES_FROM_WORKERS
        GPU workers on (those still starting count). Interpreter workers take hundreds of ms a
        trial, which the driver's own writes never hold up."""
        options = getattr(self.pool, "options", None)
        workers = len(self.pool.workers) + self.pool.starting
        return workers >= BACKGROUND_WRITES_FROM_WORKERS and not getattr(options, "interpret", False)

    def _close_recorder(self, raise_errors: bool) -> None:
        """Waits for the recorder to write the run's trials, then ends it."""
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return
        try:
            recorder.close()
        except RecorderError:
            if raise_errors:
                raise

    def _admit(self, workers: list[Any]) -> None:
        """Takes on workers (those the pool started with, then those that joined it later):
        their GPU models' properties, and a study of every problem on each new GPU model."""
        devices = {run.device for run in self.runs}
        self._learn_devices(workers)
        for device in sorted({worker.device for worker in workers} - devices):
            new = [StudyRun(get_kernel(problem.kernel), problem, device,
                            self._spaces[problem.kernel], self.storage, self.settings,
                            self.recorder)
                   for problem in self._problems
                   if self._only_on is None or device in self._only_on.get(problem, ())]
            self.runs.extend(new)
            for run in new:
                if run.result is not None:
                    self._export(run.result)

    def _learn_devices(self, workers: list[Any]) -> None:
        """Describes each worker's GPU model to the kernels' defaults, so that the heuristic
        configs this process seeds studies with are those of the workers' GPUs (wherever they
        are), found without starting CUDA here."""
        for worker in workers:
            properties = worker.info.get("properties")
            if properties:
                register_device_properties(worker.device, DeviceProperties(
                    **{**properties, "capability": tuple(properties["capability"])}))

    # -- the dispatch loop ---------------------------------------------------------------------
    def _loop(self, deadline: float | None) -> None:
        idle_rounds = 0
        while True:
            self._admit(self.pool.joined())
            busy = {job.worker.slot for job in self.inflight.values()}
            for worker in list(self.pool.workers):
                if worker.slot not in busy:
                    self._dispatch(worker, deadline)
            if not self.inflight:
                if all(run.done for run in self.runs):
                    if not self.pool.starting:
                        return
                    time.sleep(0.05)  # a worker yet to come up may be of another GPU model
                    continue
                waiting = [run for run in self.runs if run.waiting]
                if waiting:  # other drivers on the storage are measuring the last configs
                    time.sleep(0.5)
                    for run in waiting:
                        run.refresh()
                    continue
                idle_rounds += 1
                if idle_rounds > 3:  # work remains that no worker can take
                    stranded = [run for run in self.runs if not run.done]
                    raise RuntimeError("no worker left for " + ", ".join(
                        f"{run.problem} on {run.device}" for run in stranded))
                continue
            idle_rounds = 0
            ready, _ = concurrent.futures.wait(list(self.inflight), timeout=0.5,
                                               return_when=concurrent.futures.FIRST_COMPLETED)
            # Each worker went on with its next trial already. A worker's jobs are handled in
            # the order it ran them (one that lost the worker is blamed, those behind it not).
            position = {future: index for queue in self.queued.values()
                        for index, future in enumerate(queue)}
            for future in sorted(ready, key=lambda future: position.get(future, 0)):
                if future in self.inflight:  # else sent again: its worker was replaced
                    self._handle(future, *self._finished(future))
            self._ask_ahead(deadline)
            self._check_timeouts()
            self.progress.update(self.runs, len(self.inflight), len(self.pool.workers))

    def _dispatch(self, worker: Any, deadline: float | None) -> None:
        for index, job in enumerate(self.retries):
            if job.run.device == worker.device:
                del self.retries[index]
                self._submit(dataclasses.replace(job, worker=worker))
                return
        now = time.monotonic()
        job = self._ask(worker, now, deadline)
        if job is not None:
            self._submit(job)
            self._ask_ahead(deadline)
            return
        for run in self.runs:
            if run.device == worker.device and run.stage is Stage.SEARCH \
                    and run.search_finished(now, deadline) and not run.inflight:
                if run.best is None:
                    run.finish_without_confirm()
                    continue
                run.start_confirm()
                self._submit(ConfirmJob(run, worker, now))
                return

    def _ask_ahead(self, deadline: float | None) -> None:
        """Tops up each busy worker's trials asked ahead: has it compile them now, and sends
        them, to run after those it has."""
        busy = {job.worker.slot: job.worker for job in self.inflight.values()}
        now = time.monotonic()
        for slot, worker in busy.items():
            for depth, max_inflight in ((self.prefetch, None),
                                        (self.spread_prefetch, SPREAD_INFLIGHT_PER_STUDY)):
                while len(self.queued.get(slot, ())) < 1 + depth:
                    job = self._ask(worker, now, deadline, max_inflight)
                    if job is None:
                        break
                    worker.prefetch([(job.run.problem, job.config)],
                                    self.lookahead.speculative(job, self.runs),
                                    [(job.run.problem, config) for config in job.run.likely_next()])
                    self._submit(job)

    def _ask(self, worker: Any, now: float, deadline: float | None,
             max_inflight: int | None = None) -> TrialJob | None:
        """A new trial for the worker's GPU model, from the first study of
        :func:`tuner.lookahead.studies_to_ask` that proposes one."""
        started = time.perf_counter()
        try:
            return self._ask_any(worker, now, deadline, max_inflight)
        finally:
            self.phase_seconds["driver: asking"] += time.perf_counter() - started

    def _ask_any(self, worker: Any, now: float, deadline: float | None,
                 max_inflight: int | None = None) -> TrialJob | None:
        for run in studies_to_ask(self.runs, worker.device, self.held_problems.get(worker.slot, []),
                                  now, deadline, max_inflight):
            config = run.ask()
            if config is not None:
                return TrialJob(run, worker, now, config)
        return None

    def _submit(self, job: Job) -> None:
        problem = job.run.problem
        held = [other for other in self.held_problems.get(job.worker.slot, []) if other != problem]
        self.held_problems[job.worker.slot] = [*held, problem][-HELD_PROBLEMS:]
        job.started = time.monotonic()  # once queued behind another job: when that one ends
        if isinstance(job, ConfirmJob):
            future = job.worker.call("confirm", problem, job.run.confirm_candidates(),
                                     self.settings.confirm_rounds)
        else:
            future = job.worker.call("measure", problem, job.config)
            if self.first_dispatch is None:
                self.first_dispatch = job.started
        self.inflight[future] = job
        self.queued.setdefault(job.worker.slot, collections.deque()).append(future)

    def _finished(self, future: concurrent.futures.Future) -> tuple[Job, bool]:
        """Takes a finished job out of flight: the job, and whether its worker was running it
        (not only holding it queued); the next one its worker queued is running now."""
        job = self.inflight.pop(future)
        queue = self.queued.get(job.worker.slot, collections.deque())
        running = bool(queue) and queue[0] is future
        if future in queue:
            queue.remove(future)
        if queue and queue[0] in self.inflight:
            self.inflight[queue[0]].started = time.monotonic()
        return job, running

    def _replace_worker(self, worker: Any) -> None:
        """A fresh worker takes the GPU; the jobs queued on the old one behind the one at fault
        are sent again, to whichever worker is free, as if never sent."""
        for future in self.queued.pop(worker.slot, ()):
            job = self.inflight.pop(future, None)
            if job is not None:
                self.retries.append(job)
        if worker in self.pool.workers:
            self.pool.replace(worker)

    def phase_report(self) -> str:
        """Milliseconds per measured trial of each driver and worker phase (and how many
        trials had a phase that not all had)."""
        return format_phases(self.phase_seconds, self.phase_trials, self.progress.measured)

    def busy_fractions(self) -> dict[int, float]:
        """Per worker slot, the share of the run's wall time it spent on jobs."""
        return {slot: busy / max(self.wall_seconds, 1e-9) for slot, busy in self.busy_seconds.items()}

    def _handle(self, future: concurrent.futures.Future, job: Job, running: bool = True) -> None:
        if running:
            self.busy_seconds[job.worker.slot] = (self.busy_seconds.get(job.worker.slot, 0.0)
                                                  + time.monotonic() - job.started)
        try:
            result = future.result()
        except self.pool.lost_errors as error:
            if running:
                self._worker_lost(job, f"worker died: {type(error).__name__}")
            else:  # queued behind the job that lost the worker: not its fault
                self.retries.append(job)
            return
        except Exception as error:  # the confirm stage raised: re-run it elsewhere
            if isinstance(job, ConfirmJob):
                if is_fatal(error):  # the worker's CUDA context is gone with it
                    self._replace_worker(job.worker)
                self._retry_or_fail(job, f"{type(error).__name__}: {error}")
            else:
                self._worker_lost(job, f"{type(error).__name__}: {error}")
            return
        if isinstance(job, ConfirmJob):
            confirmation: Confirmation = result
            self.phase_seconds.update({f"worker: {name}": seconds
                                       for name, seconds in confirmation.phases.items()})
            self._export(job.run.finish(confirmation, job.worker.info))
            return
        measurement: Measurement = result
        if self.first_result is None:
            self.first_result = time.monotonic()
        self.phase_seconds.update({f"worker: {name}": seconds
                                   for name, seconds in measurement.phases.items()})
        self.phase_trials.update(f"worker: {name}" for name in measurement.phases)
        started = time.perf_counter()
        job.run.tell(job.config, measurement, job.worker.info.get("node", ""))
        self.phase_seconds["driver: telling"] += time.perf_counter() - started
        self.progress.measured += 1
        if measurement.fatal:  # the CUDA context is gone: a fresh process takes the GPU
            self._replace_worker(job.worker)

    def _worker_lost(self, job: Job, reason: str) -> None:
        self._replace_worker(job.worker)
        self._retry_or_fail(job, reason)

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        if isinstance(job, ConfirmJob) and job.run.drop_untried_candidates():
            self.retries.append(job)  # without the configs no trial had run: not its attempt
        elif job.attempts < MAX_ATTEMPTS:
            self.retries.append(dataclasses.replace(job, attempts=job.attempts + 1))
        elif isinstance(job, ConfirmJob):
            job.run.finish_without_confirm(f"confirm stage failed: {reason}")
        else:
            job.run.tell(job.config,
                         Measurement(job.config.key(), error=f"{reason} (after {job.attempts} attempts)"), "")

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        running = {queue[0] for queue in self.queued.values() if queue}
        for future, job in list(self.inflight.items()):
            if future not in running or now - job.started <= self.settings.trial_timeout:
                continue
            self._finished(future)
            self._replace_worker(job.worker)
            reason = f"timed out after {self.settings.trial_timeout:g} s"
            if isinstance(job, ConfirmJob):
                self._retry_or_fail(job, reason)
            else:  # a config that hangs its worker is to blame: no retry
                job.run.tell(job.config, Measurement(job.config.key(), error=reason), "")

    def _abandon_inflight(self) -> None:
        for job in list(self.inflight.values()) + self.retries:
            if isinstance(job, TrialJob):
                try:
                    job.run.abandon(job.config, "interrupted")
                except Exception:
                    pass
        self.inflight.clear()
        self.queued.clear()
        self.retries.clear()

    def _export(self, result: StudyResult) -> None:
        merge_entries(self.table_for_device(result.device), [entry_from_result(result)])
