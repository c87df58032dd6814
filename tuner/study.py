"""One Optuna study: a problem on one GPU model. Proposes configs, dedupes, records results."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import random
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from kernels import LaunchConfig, nearest_configs

from .claims import ClaimBook, is_measurement
from .measure import Confirmation, Measurement
from .neighbours import local_search, neighbours
from .problems import KernelSpec, Problem
from .recorder import RecordedClaims, Recorder
from .result import StudyResult
from .sampler import CandidateTPE
from .space import PARAMETERS, SearchSpace
from .storage import open_storage

# Once this share of a study's trials is measured, the unmeasured neighbours of its best
# configs are proposed before TPE's picks: TPE finds the right region, the neighbours the
# best point in it (few configs in a landscape are within 2% of the best). Until then TPE's
# picks each try a new tiling (tuner.sampler), which finds isolated optima a local search
# from the best few cannot reach.
LOCAL_SEARCH_AFTER = 0.6
# Best configs whose neighbours the local search visits, best first.
LOCAL_SEARCH_TOP = 3
# Configs of a study its workers compile speculatively, per trial of its budget.
SPECULATIVE_PER_TRIAL = 3
# The local search's next configs handed to the workers' compile processes with each trial.
LOCAL_SEARCH_LOOKAHEAD = 4
# Seconds between looks at what other drivers on the same storage measured and claimed.
REFRESH_S = 1.0


@dataclasses.dataclass
class Settings:
    """When a study stops and how its winner is confirmed."""

    trials: int = 48               # measured configs per study (resumed runs count earlier ones)
    timeout: float | None = None   # seconds for the whole run; None: no limit
    patience: int | None = None    # stop after this many trials in a row without improvement
    min_improvement: float = 0.005  # relative gain that counts as an improvement
    trial_timeout: float = 300.0   # seconds before a hung worker is replaced
    confirm_top: int = 4           # configs re-timed, interleaved, by the confirm stage
    confirm_rounds: int = 5
    seed: int = 0


class Stage(enum.Enum):
    """Where a study is: proposing and measuring configs, re-timing its best few, or done."""

    SEARCH = "search"
    CONFIRM = "confirm"
    DONE = "done"


def study_name(problem: Problem, device: str) -> str:
    """One study per (kernel, device, dtype, shape)."""
    return f"{problem.kernel}:{device}:{problem.dtype}:{problem.shape_text}"


class StudyRun:
    """Drives one study: ask (a valid config not measured yet), tell, confirm."""

    def __init__(self, spec: KernelSpec, problem: Problem, device: str, space: SearchSpace,
                 storage: optuna.storages.BaseStorage | str, settings: Settings,
                 recorder: Recorder | None = None) -> None:
        self.spec, self.problem, self.device, self.settings = spec, problem, device, settings
        self.table_key = spec.table_key(problem)
        self.choices = space.choices(self.table_key)
        self.valid = {config.key(): config for config in space.candidates(self.table_key)}
        # The storage holds one trial per measured config (and claims given up unmeasured,
        # failed, on storages other processes share). Proposals come from TPE over the valid
        # configs (tuner.sampler), never a rejected or measured one. Each measured config is
        # first claimed in the storage, so that concurrent drivers on one storage split the
        # configs (tuner.claims).
        self.storage = optuna.storages.get_storage(
            open_storage(storage) if isinstance(storage, str) else storage)
        self.study = optuna.create_study(study_name=study_name(problem, device),
                                         storage=self.storage, direction="minimize",
                                         load_if_exists=True)
        self.claims: ClaimBook | RecordedClaims = ClaimBook(
            self.storage, self.storage.get_study_id_from_name(self.study.study_name))
        if recorder is not None and self.claims.enabled:  # its process writes the trials
            self.claims = recorder.book(self.claims)
        self.refine_last = space.refine_last
        self.proposer = CandidateTPE(list(self.valid.values()), self.choices, settings.seed,
                                     self.refine_last)
        self.queued: collections.deque[LaunchConfig] = collections.deque()  # proposed first
        self.distributions = {name: optuna.distributions.CategoricalDistribution(self.choices[name])
                              for name in PARAMETERS}
        for name, value in (("kernel", problem.kernel), ("device", device),
                            ("dtype", problem.dtype), ("shape", list(problem.shape)),
                            ("heuristic_config", spec.heuristic(problem, device).key()),
                            ("space", space.path)):
            self.study.set_user_attr(name, value)
        self.measured: dict[str, float | None] = {}
        self.best: tuple[float, str] | None = None
        self.since_improvement = 0
        self.inflight: dict[str, LaunchConfig] = {}
        # Configs left out of the confirm stage after it failed with them untried (tuner.driver).
        self.unconfirmable: set[str] = set()
        # config key -> this run's claim: its trial id (its recorder's token with a recorder)
        self.claimed: dict[str, int] = {}
        self.others: set[str] = set()  # configs other live drivers claimed and are measuring
        self._loaded: set[int] = set()  # numbers of finished trials already learned from
        self._refreshed = 0.0
        self.exhausted = False
        self.result: StudyResult | None = None
        self.stage = Stage.SEARCH
        self._load_existing()
        if self.result is None:
            self._enqueue_seeds()

    # -- state ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Learns the measurements stored since the last look (by earlier runs or other
        drivers) and which configs other live drivers hold; fails dead drivers' claims."""
        self._refreshed = time.monotonic()
        trials = self.study.get_trials(deepcopy=False)
        if self.claims.enabled:
            self.claims.expire(trials, self.study)
            trials = self.study.get_trials(deepcopy=False)
            self.exhausted = False  # configs whose claims expired can be proposed again
        others = set()
        for trial in trials:
            key = trial.user_attrs.get("config")
            if not key:
                continue
            if self.claims.is_live_claim(trial):
                if trial.user_attrs.get("claim") != self.claims.owner:
                    others.add(key)
                continue
            if trial.number in self._loaded or not is_measurement(trial):
                continue
            value = trial.value if trial.state == TrialState.COMPLETE else None
            self._loaded.add(trial.number)
            if key not in self.measured:  # else told by this run already
                self._note(key, value)
        self.others = others - set(self.measured)

    @property
    def done(self) -> bool:
        """True once the study has its result, or has ended without one."""
        return self.stage is Stage.DONE

    @property
    def waiting(self) -> bool:
        """True while the search waits for configs other drivers are measuring."""
        return self.stage is Stage.SEARCH and bool(self.others)

    def _load_existing(self) -> None:
        """Rebuilds the measured cache, and the sampler's history, from storage."""
        self.refresh()
        stored = self.study.user_attrs.get("result")
        # The stored winner counts only if it was confirmed over every measured trial: a run
        # interrupted between its last trial and its confirm stage must confirm on resume.
        if stored and self.n_measured >= self._trial_budget() \
                and stored.get("trials", 0) >= self.n_measured:
            self.result = StudyResult.from_json(stored)
            self.stage = Stage.DONE

    def _frozen(self, config: LaunchConfig, value: float | None, user_attrs: dict[str, Any],
                state: TrialState | None = None) -> optuna.trial.FrozenTrial:
        if state is None:
            state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        return optuna.trial.create_trial(
            params=config.as_dict(), distributions=self.distributions, value=value,
            state=state, user_attrs=user_attrs)

    def enqueue(self, config: LaunchConfig) -> None:
        """Proposes ``config`` before the sampler's picks, unless it is measured by then."""
        if config not in self.queued:
            self.queued.append(config)

    def _trial_budget(self) -> int:
        return min(self.settings.trials, len(self.valid))

    def _note(self, key: str, value: float | None) -> bool:
        """Caches a measured value; True when it improves the best by min_improvement."""
        self.measured[key] = value
        if value is None:
            return False
        improved = self.best is None or value < self.best[0] * (1 - self.settings.min_improvement)
        if self.best is None or value < self.best[0]:
            self.best = (value, key)
        return improved

    @property
    def n_measured(self) -> int:
        return len(self.measured)

    def _enqueue_seeds(self) -> None:
        """The heuristic config and the table's nearest entries go first, so the search can
        only improve on what the runtime does today.

        A seed outside the search space (a knob value not in the space's choices, or one the
        restrictions reject) is not enqueued: Optuna cannot suggest a value that is not among
        a categorical's choices. The heuristic is still re-timed by the confirm stage.
        """
        seeds = [self.spec.heuristic(self.problem, self.device)]
        seeds += nearest_configs(self.spec.table_name, self.device, self.problem.dtype,
                                 self.table_key.width, self.table_key.rows,
                                 variant=self.table_key.variant)
        for config in seeds:
            if config.key() in self.valid and config.key() not in self.measured:
                self.enqueue(config)

    def stopped(self, now: float, deadline: float | None) -> bool:
        """True once the run's time is up or patience ran out: trials not yet started are dropped."""
        patience = self.settings.patience
        return ((deadline is not None and now >= deadline)
                or (patience is not None and self.since_improvement >= patience))

    def search_finished(self, now: float, deadline: float | None) -> bool:
        """True when no further trial should be proposed."""
        if self.stage is not Stage.SEARCH:
            return True
        if self.stopped(now, deadline):
            return True
        # A budget filled by other drivers' claims is finished once their results are in.
        return self._full() and not self.others

    def _full(self) -> bool:
        return self.exhausted or \
            self.n_measured + len(self.inflight) + len(self.others) >= self._trial_budget()

    # -- ask / tell ----------------------------------------------------------------------------
    def ask(self) -> LaunchConfig | None:
        """The next config to measure, or None when every valid config is measured or running."""
        if self.claims.enabled and time.monotonic() - self._refreshed >= REFRESH_S:
            self.refresh()
        self.others |= self.claims.lost_keys() - set(self.measured)
        if self.n_measured >= LOCAL_SEARCH_AFTER * self._trial_budget():
            local = self._unmeasured_neighbour()
            if local is not None:
                self.enqueue(local)
        while True:
            busy = set(self.inflight) | self.others
            if sum(key in self.valid for key in self.measured) + len(busy) >= len(self.valid):
                self.exhausted = True
                return None
            if self._full():
                return None
            config = self._next_queued(busy) or self.proposer.propose(self.measured, busy)
            if config is None:  # measured configs of an older space fill the count
                self.exhausted = True
                return None
            key = config.key()
            if self.claims.enabled:
                claim = self.claims.claim(self._frozen(config, None, {}, TrialState.RUNNING), key)
                if claim is None:  # another driver claimed it first
                    self.others.add(key)
                    continue
                self.claimed[key] = claim
            self.inflight[key] = config
            return config

    def likely_next(self) -> list[LaunchConfig]:
        """Configs the next asks will likely propose (the local search's next ones once it is
        near, the sampler's runner-ups of the last ask), neither measured nor running: worth
        compiling now."""
        busy = set(self.inflight) | self.others
        likely = list(self.proposer.runner_ups)
        if self.n_measured + len(self.inflight) >= LOCAL_SEARCH_AFTER * self._trial_budget():
            # The local search is on (or about to be): it proposes these next, in this order.
            likely = self._unmeasured_neighbours()[:LOCAL_SEARCH_LOOKAHEAD] + likely
        return [config for config in dict.fromkeys(likely)
                if config.key() not in self.measured and config.key() not in busy]

    def _next_queued(self, busy: set[str]) -> LaunchConfig | None:
        while self.queued:
            config = self.queued.popleft()
            if config.key() not in self.measured and config.key() not in busy:
                return config
        return None

    def neighbours(self, config: LaunchConfig) -> list[LaunchConfig]:
        """Valid configs one step from ``config`` (:func:`tuner.neighbours.neighbours`)."""
        return neighbours(config, self.choices, self.valid, self.refine_last)

    def seeds(self) -> list[LaunchConfig]:
        """The configs this study measures first (the heuristic, the table's nearest entries)."""
        return [config for config in self.queued if config.key() not in self.measured]

    def likely_configs(self) -> list[LaunchConfig]:
        """Unmeasured configs this study may well propose, likeliest first: its seeds, the
        sampler's random startup picks, the heuristic's neighbours, then a random sample,
        SPECULATIVE_PER_TRIAL times the trial budget in all."""
        heuristic = self.spec.heuristic(self.problem, self.device)
        ordered = self.seeds()
        taken = [*self.measured, *self.inflight, *(config.key() for config in ordered)]
        ordered += self.proposer.startup_picks(taken)
        if heuristic.key() in self.valid:
            ordered += [config for config in self.neighbours(heuristic) if config not in ordered]
        rest = [config for config in self.valid.values() if config not in ordered]
        random.Random(self.settings.seed).shuffle(rest)
        return [config for config in ordered + rest
                if config.key() not in self.measured][:SPECULATIVE_PER_TRIAL * self._trial_budget()]

    def _unmeasured_neighbours(self) -> list[LaunchConfig]:
        """The local search's next configs, in order (:func:`tuner.neighbours.local_search`)."""
        ranked = sorted((value, key) for key, value in self.measured.items() if value is not None)
        best = [self.valid[key] for _, key in ranked[:LOCAL_SEARCH_TOP]]
        return local_search(best, self.choices, self.valid, {*self.measured, *self.inflight},
                            self.refine_last)

    def _unmeasured_neighbour(self) -> LaunchConfig | None:
        return next(iter(self._unmeasured_neighbours()), None)

    def tell(self, config: LaunchConfig, measurement: Measurement, worker: str) -> None:
        """Records a measurement in the storage (a failed config fails its trial and is never
        retried)."""
        self.inflight.pop(config.key(), None)
        attrs: dict[str, Any] = {"config": config.key(), "measured": True, "worker": worker}
        for name in ("gbps", "pct_of_copy", "compile_s", "error"):
            value = getattr(measurement, name)
            if value is not None:
                attrs[name] = value
        frozen = self._frozen(config, measurement.ms, attrs)
        claim = self.claimed.pop(config.key(), None)
        if claim is None:
            self.study.add_trial(frozen)
        else:
            self.claims.finish(claim, frozen)
        if self._note(config.key(), measurement.ms):
            self.since_improvement = 0
        else:
            self.since_improvement += 1

    def abandon(self, config: LaunchConfig, reason: str) -> None:
        """Ends a proposal that was not measured (interrupted): its claim is released, and the
        config can be proposed again."""
        self.inflight.pop(config.key(), None)
        claim = self.claimed.pop(config.key(), None)
        if claim is not None:
            self.claims.release(claim, reason)

    # -- confirm -------------------------------------------------------------------------------
    def start_confirm(self) -> None:
        """Ends the search: the best few configs are re-timed next (:meth:`finish`)."""
        self.stage = Stage.CONFIRM

    def confirm_candidates(self) -> list[LaunchConfig]:
        """The best few measured configs plus the heuristic (unless its own trial failed: it
        crashed or gave wrong results; or it was left out after failing untried), for
        interleaved re-timing."""
        ranked = sorted((value, key) for key, value in self.measured.items() if value is not None)
        configs = [self.valid[key] for _, key in ranked[:self.settings.confirm_top]]
        heuristic = self.spec.heuristic(self.problem, self.device)
        failed = heuristic.key() in self.measured and self.measured[heuristic.key()] is None
        if heuristic not in configs and not failed and heuristic.key() not in self.unconfirmable:
            configs.append(heuristic)
        return configs

    def drop_untried_candidates(self) -> bool:
        """After the confirm stage failed: leaves out of it the candidates no trial has run (a
        heuristic outside the search space), the likely culprits; False when there are none."""
        untried = {config.key() for config in self.confirm_candidates()} - set(self.measured)
        self.unconfirmable |= untried
        return bool(untried)

    def finish(self, confirmed: Confirmation, info: dict[str, Any]) -> StudyResult:
        """Takes the confirm stage's medians: the fastest config wins."""
        medians = confirmed.ms
        winner_key = min(medians, key=medians.get)
        heuristic = self.spec.heuristic(self.problem, self.device)
        ms = medians[winner_key]
        gbps = confirmed.gbps(ms)
        winner = self.valid.get(winner_key) or heuristic
        self.result = StudyResult(
            problem=self.problem, device=self.device, config=winner, ms=ms, gbps=gbps,
            pct_of_copy=100 * gbps / confirmed.copy_gbps, trials=self.n_measured,
            heuristic_ms=medians.get(heuristic.key()), eager_ms=confirmed.eager_ms,
            compute_capability=info.get("compute_capability", ""), torch=info.get("torch", ""),
            triton=info.get("triton", ""), date=datetime.date.today().isoformat())
        self.study.set_user_attr("result", self.result.to_json())
        self.stage = Stage.DONE
        return self.result

    def finish_without_confirm(self, reason: str | None = None) -> None:
        """Ends a study with nothing to export (every config failed, or the confirm stage did)."""
        if reason:
            self.study.set_user_attr("confirm_error", reason)
        self.stage = Stage.DONE

    def progress_line(self) -> str:
        best = f"best {self.best[0]:.4g} ms {self.best[1]}" if self.best else "no result yet"
        return (f"{self.problem.shape_text} {self.problem.dtype} on {self.device}: "
                f"{self.n_measured}/{self._trial_budget()} measured, {best}")
