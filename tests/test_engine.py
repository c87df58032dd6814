"""The parts of the tuning engine below the driver: the sampler over valid configs, the
compile-ahead processes of a worker and how many of them a host gets."""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest

from kernels.targets import GPUTarget
from tuner import get_kernel, load_space, sampler
from tuner.compiling import CompileAhead
from tuner import lookahead
from tuner.lookahead import (
    SPREAD_INFLIGHT_PER_STUDY,
    TRIALS_ASKED_AHEAD,
    TRIALS_ASKED_AHEAD_WITH_MANY_STUDIES,
)
from tuner.sampler import RUNNER_UPS, STARTUP_TRIALS, CandidateTPE, tiling
from tuner.tuning_worker import default_compile_processes

SPEC = get_kernel("add_layernorm")
PROBLEM = SPEC.problem("4096x768", "bfloat16")


def candidates():
    space = load_space(SPEC.space_file)
    key = SPEC.table_key(PROBLEM)
    return space.candidates(key), space.choices(key)


def landscape(config) -> float:
    """A smooth synthetic time with one best config, in rank distance from it."""
    return (1.0 + abs(config.block_rows.bit_length() - 3) + abs(config.num_warps.bit_length() - 3)
            + 0.5 * abs(config.block_w.bit_length() - 10) + 0.3 * (config.num_stages - 1)
            + 0.2 * (config.eviction_policy != "evict_first"))


def search(proposer: CandidateTPE, trials: int, excluded=()) -> dict[str, float]:
    measured: dict[str, float | None] = {}
    for _ in range(trials):
        config = proposer.propose(measured, set(excluded))
        assert config is not None
        measured[config.key()] = landscape(config)
    return measured


def test_proposals_are_valid_unmeasured_and_not_excluded():
    configs, choices = candidates()
    valid = {config.key() for config in configs}
    excluded = {configs[0].key(), configs[1].key()}
    measured = search(CandidateTPE(configs, choices, seed=3), 40, excluded)
    assert len(measured) == 40, "never the same config twice"
    assert set(measured) <= valid and not set(measured) & excluded


def test_runner_ups_are_what_the_next_proposals_pick():
    """Compiled ahead as the likeliest next proposals: open configs other than the proposal,
    and often the next proposal itself."""
    configs, choices = candidates()
    proposer = CandidateTPE(configs, choices, seed=5)
    measured = search(proposer, STARTUP_TRIALS - 1)
    config = proposer.propose(measured, set())
    measured[config.key()] = landscape(config)
    foreseen = 0
    for _ in range(20):
        config = proposer.propose(measured, set())
        runner_ups = proposer.runner_ups
        assert 0 < len(runner_ups) <= RUNNER_UPS and config not in runner_ups
        assert not {runner_up.key() for runner_up in runner_ups} & set(measured)
        measured[config.key()] = landscape(config)
        foreseen += proposer.propose(measured, set()) in runner_ups
    assert foreseen >= 5  # of 20 (a random guess of three: under one)


def test_random_startup_picks_are_known_ahead():
    """The estimator's first proposals are random but fixed by the seed: the study can hand
    them to the compile processes before they are proposed, and does (its likely configs)."""
    configs, choices = candidates()
    proposer = CandidateTPE(configs, choices, seed=3)
    foreseen = proposer.startup_picks(set())
    assert len(foreseen) == STARTUP_TRIALS and len(set(foreseen)) == STARTUP_TRIALS
    measured: dict = {}
    for expected in foreseen:
        config = proposer.propose(measured, set())
        assert config == expected
        assert proposer.runner_ups == foreseen[len(measured) + 1:len(measured) + 1 + RUNNER_UPS]
        measured[config.key()] = landscape(config)
    other = CandidateTPE(configs, choices, seed=4).startup_picks(set())
    assert other != foreseen


def test_proposals_end_when_every_candidate_is_measured_or_excluded():
    configs, choices = candidates()
    proposer = CandidateTPE(configs[:12], choices, seed=0)
    measured = {config.key(): landscape(config) for config in configs[:10]}
    assert proposer.propose(measured, {configs[10].key()}) == configs[11]
    measured[configs[11].key()] = None  # a failed config counts as measured
    assert proposer.propose(measured, {configs[10].key()}) is None


def test_same_seed_same_proposals_and_failures_are_avoided():
    configs, choices = candidates()
    first = list(search(CandidateTPE(configs, choices, seed=7), 20))
    assert first == list(search(CandidateTPE(configs, choices, seed=7), 20))
    assert first != list(search(CandidateTPE(configs, choices, seed=8), 20))


def trials_to_best_tiling(proposer: CandidateTPE, configs) -> int:
    """How many proposals it takes to try the tiling of the landscape's best config."""
    best = tiling(min(configs, key=landscape))
    measured: dict[str, float | None] = {}
    while True:
        config = proposer.propose(measured, set())
        measured[config.key()] = landscape(config)
        if tiling(config) == best:
            return len(measured)


def test_the_estimator_finds_the_best_tiling_sooner_than_random_proposals(monkeypatch):
    """Random proposals over 24 tilings take 12.5 on average; the estimator takes over after
    STARTUP_TRIALS (the same random proposals) and finds it sooner."""
    configs, choices = candidates()
    seeds = range(40)
    estimated = [trials_to_best_tiling(CandidateTPE(configs, choices, seed), configs)
                 for seed in seeds]
    monkeypatch.setattr(sampler, "STARTUP_TRIALS", len(configs))  # random proposals throughout
    random_order = [trials_to_best_tiling(CandidateTPE(configs, choices, seed), configs)
                    for seed in seeds]
    assert sum(estimated) < 0.85 * sum(random_order)


def test_proposals_try_every_tiling_at_one_stage_before_refining_one():
    """A tiling's other policies, and then its other stage counts, wait until every tiling is
    measured once."""
    problem = SPEC.problem("4096x8192", "float32")
    space = load_space(SPEC.space_file)
    configs = space.candidates(SPEC.table_key(problem))
    choices = space.choices(SPEC.table_key(problem))
    tilings = {tiling(config) for config in configs}
    at_one_stage = [config for config in configs if config.num_stages == 1]
    assert len(tilings) < len(at_one_stage) < len(configs)
    assert space.refine_last == ("num_stages",)
    measured = search(CandidateTPE(configs, choices, seed=1, refine_last=space.refine_last),
                      len(configs))
    order = [next(c for c in configs if c.key() == key) for key in measured]
    assert {tiling(config) for config in order[:len(tilings)]} == tilings
    assert all(config.num_stages == 1 for config in order[:len(at_one_stage)])
    assert all(config.num_stages > 1 for config in order[len(at_one_stage):])
    # A space that does not say so (a kernel whose time may depend on its stages) gets no such
    # preference: its first proposals already try other stage counts.
    unpreferred = search(CandidateTPE(configs, choices, seed=1), len(at_one_stage))
    assert any(key not in {config.key() for config in at_one_stage} for key in unpreferred)


def test_default_compile_processes_share_a_host(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)), raising=False)
    assert [default_compile_processes(n) for n in (1, 2, 4, 8, 16)] == [32, 30, 14, 6, 2]
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert [default_compile_processes(n) for n in (1, 4, 8, 16)] == [14, 2, 1, 1]


def compiled_soon(compiles: CompileAhead, config, how: str = "upcoming") -> float | None:
    """Asks for ``config`` (``how``: as upcoming, speculative or a runner-up) until its compile
    has run (a compile not started yet when waited for is cancelled: the worker would compile
    inline); the compile's seconds, or None."""
    deadline = time.monotonic() + 120  # the fork server imports torch before any process starts
    while time.monotonic() < deadline:
        item = [(PROBLEM, config)]
        compiles.prefetch(*{"upcoming": (item,), "speculative": ([], item),
                            "runner-up": ([], [], item)}[how])
        time.sleep(0.5)
        seconds = compiles.wait(PROBLEM, config.key())
        if seconds is not None:
            return seconds
    return None


def test_compile_ahead_compiles_what_is_prefetched_and_nothing_after_close():
    """Under the interpreter a compile is a no-op: this checks the feeding, not Triton."""
    configs, _ = candidates()
    compiles = CompileAhead(2)
    compiles.prefetch([(PROBLEM, configs[0])])  # queued before the target is known
    compiles.start(GPUTarget("cuda", 89, 32))
    try:
        assert compiled_soon(compiles, configs[0]) is not None  # an upcoming config
        assert compiles.wait(PROBLEM, configs[0].key()) is None  # waited for once
        assert compiled_soon(compiles, configs[1], "speculative") is not None
        assert compiled_soon(compiles, configs[2], "runner-up") is not None
        assert [compiles.reason(PROBLEM, config.key()) for config in configs[:4]] == [
            "upcoming", "speculative", "runner-up", None]
        assert compiles.wait(PROBLEM, configs[5].key()) is None  # never asked for
    finally:
        compiles.close()
    compiles.prefetch([(PROBLEM, configs[6])])
    time.sleep(0.3)
    assert compiles.wait(PROBLEM, configs[6].key()) is None


def test_compiles_go_on_after_a_compile_crashes_its_process():
    """A compiler crash on one config fails the compiles then running (their trials compile
    inline) but not compiling ahead for the rest of the run."""
    from faults import compile_or_crash

    configs, _ = candidates()
    crashing = next(config for config in configs if config.num_warps == 32)
    fine = [config for config in configs if config.num_warps != 32]
    compiles = CompileAhead(2, compile_or_crash)
    compiles.start(GPUTarget("cuda", 89, 32))
    try:
        assert compiled_soon(compiles, fine[0]) is not None
        compiles.prefetch([(PROBLEM, crashing)])
        time.sleep(2.0)
        assert compiles.wait(PROBLEM, crashing.key()) is None  # its process died
        assert compiled_soon(compiles, fine[1]) is not None
    finally:
        compiles.close()


def test_a_driver_takes_its_workers_gpu_properties_for_the_defaults(monkeypatch):
    """The heuristic seeds of a study are those of the workers' GPU model, which the driver's
    own host may not have (a Ray head node without GPUs)."""
    import dataclasses

    from kernels import defaults
    from tuner import Driver, Settings
    from tuner.tuning_worker import TuningWorker

    info = TuningWorker().info()
    few_sms = {**info["properties"], "name": "Tiny GPU", "sm_count": 2}

    class Pool:
        compile_processes = 0
        workers = [type("Worker", (), {"device": "Tiny GPU", "info": {"properties": few_sms}})()]

    monkeypatch.setattr(defaults, "_REGISTERED", {})
    defaults.device_properties.cache_clear()
    assert defaults.device_properties("Tiny GPU").sm_count != 2  # unknown here
    Driver(Pool(), "sqlite://", Settings(), lambda device: None)._learn_devices(Pool.workers)
    assert dataclasses.asdict(defaults.device_properties("Tiny GPU")) == {
        **few_sms, "capability": tuple(few_sms["capability"])}
    defaults.device_properties.cache_clear()


def test_a_local_worker_takes_prefetches_beside_its_measurement():
    """The driver's prefetches reach a local worker through a queue its own thread reads, so a
    busy worker starts compiling its next config at once."""
    import multiprocessing
    import queue
    import threading

    from tuner import local

    received: queue.Queue = queue.Queue()

    class Worker:
        def prefetch(self, *args):
            received.put(args)

    prefetches = multiprocessing.get_context("spawn").Queue()
    threading.Thread(target=local._serve_prefetches, args=(Worker(), prefetches),
                     daemon=True).start()
    configs, _ = candidates()
    prefetches.put(([(PROBLEM, configs[0])], [(PROBLEM, configs[1])]))
    assert received.get(timeout=30) == ([(PROBLEM, configs[0])], [(PROBLEM, configs[1])])


def test_a_worker_keeps_its_problem_while_its_study_is_not_far_ahead():
    """Another problem costs a worker new inputs and a reference; studies still advance
    together (a sweep with --timeout gets a result for every shape)."""
    from tuner import driver as driver_module

    class Run:
        def __init__(self, problem: str, measured: int) -> None:
            self.problem, self.n_measured, self.device, self.inflight = problem, measured, "GPU", {}

        def search_finished(self, now, deadline) -> bool:
            return False

        def ask(self):
            return self.problem  # stands in for the config

    worker = type("Worker", (), {"slot": 0, "device": "GPU"})()
    held, other = Run("held", 0), Run("other", 0)
    driver = driver_module.Driver.__new__(driver_module.Driver)
    driver.runs, driver.held_problems = [other, held], {0: ["held"]}
    assert driver._ask_any(worker, 0.0, None).config == "held"
    held.n_measured = lookahead.STICKY_TRIALS - 1
    assert driver._ask_any(worker, 0.0, None).config == "held"
    held.n_measured = lookahead.STICKY_TRIALS
    assert driver._ask_any(worker, 0.0, None).config == "other"
    driver.held_problems = {}
    other.inflight = {"a config": None}
    assert driver._ask_any(worker, 0.0, None).config == "held"  # fewest in flight


def test_a_worker_prepares_the_first_problem_while_it_starts():
    """The study's first trial (its default config) then finds inputs, reference and the
    compiled kernel ready; a first problem that is not valid only costs the warm-up."""
    from tuner.tuning_worker import TuningWorker

    worker = TuningWorker(first_problem=("add_layernorm", "48x80", "bfloat16"))
    worker._warm_up()  # a GPU worker runs it in a thread from its start
    assert list(worker._benches) == [SPEC.problem("48x80", "bfloat16")]
    invalid = TuningWorker(first_problem=("add_layernorm", "48x80", "float8"))
    invalid._warm_up()  # the driver reports the bad dtype; the warm-up only skips the problem
    assert invalid._benches == {}


def test_a_worker_keeps_the_inputs_of_its_last_few_problems():
    """Trials of a few studies taking turns on a worker find their inputs and references ready;
    beyond HELD_PROBLEMS the least recently used problem's are dropped."""
    from tuner.tuning_worker import HELD_PROBLEMS, TuningWorker

    worker = TuningWorker()
    problems = [SPEC.problem(f"{8 * (index + 1)}x32", "float16") for index in range(HELD_PROBLEMS + 1)]
    first = worker._bench(problems[0])
    for problem in problems[1:HELD_PROBLEMS]:
        worker._bench(problem)
    assert worker._bench(problems[0]) is first  # used again: now the most recent
    worker._bench(problems[HELD_PROBLEMS])  # one too many: the least recently used goes
    assert list(worker._benches) == [*problems[2:HELD_PROBLEMS], problems[0], problems[HELD_PROBLEMS]]
    measurement = worker.measure(problems[1], SPEC.heuristic(problems[1]))
    assert measurement.error is None and problems[1] in worker._benches


class _Lost(RuntimeError):
    """What a dead in-process worker's calls raise (a pool's ``lost_errors``)."""


# The Triton interpreter is not thread-safe: in-process workers take turns.
_INTERPRETER = threading.Lock()


class _ThreadWorker:
    """A TuningWorker run by one thread, so that calls queue behind each other as in a worker
    process; it dies measuring ``poison`` (every call queued on it then fails as lost)."""

    def __init__(self, slot: int, poison: str, log: list) -> None:
        import concurrent.futures

        from tuner.tuning_worker import TuningWorker

        self.slot, self.poison, self.log, self.dead = slot, poison, log, False
        self.executor = concurrent.futures.ThreadPoolExecutor(1)
        self.worker = TuningWorker()
        self.info = self.worker.info()
        self.device = self.info["device"]
        self.in_flight = 0

    def call(self, method, *args):
        self.in_flight += 1
        self.log.append(("queued", self.slot, self.in_flight))

        def run():
            try:
                if self.dead:
                    raise _Lost("worker died")
                if method == "measure" and args[1].key() == self.poison:
                    self.dead = True
                    raise _Lost("worker died")
                with _INTERPRETER:
                    return getattr(self.worker, method)(*args)
            finally:
                self.in_flight -= 1

        return self.executor.submit(run)

    def prefetch(self, *args) -> None:
        pass

    def kill(self) -> None:
        self.dead = True


def test_trials_queued_on_a_worker_start_without_the_driver_and_survive_its_death(tmp_path):
    """With compiling ahead, a worker holds its next trial while it measures one (it starts
    it without waiting for the driver). When a config kills the worker, that config alone is
    blamed (failed after its attempts); the trial queued behind it is sent again, unblamed."""
    import io
    import itertools

    import optuna

    from tuner import Driver, Progress, Settings
    from tuner.pools import Pool

    problem = SPEC.problem("16x32", "float32")
    poison = SPEC.heuristic(problem).key()  # the first trial of the study
    log: list = []

    class ThreadPool(Pool):
        compile_processes = 1
        lost_errors = (_Lost,)

        def __init__(self) -> None:
            self.slots = itertools.count()
            self.workers = [_ThreadWorker(next(self.slots), poison, log) for _ in range(2)]
            self.replaced = 0

        def replace(self, worker):
            worker.kill()
            self.workers.remove(worker)
            self.replaced += 1
            self.workers.append(_ThreadWorker(next(self.slots), poison, log))
            return self.workers[-1]

    pool = ThreadPool()
    storage = optuna.storages.InMemoryStorage()
    [result] = Driver(pool, storage, Settings(trials=6, confirm_top=1, confirm_rounds=1),
                      lambda device: tmp_path / "table.json",
                      progress=Progress(stream=io.StringIO())).run([problem])
    assert max(depth for _, _, depth in log) == 2  # a trial waited on its worker, not the driver
    trials = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0],
                               storage=storage).trials
    errors = {t.user_attrs["config"]: t.user_attrs["error"] for t in trials if "error" in t.user_attrs}
    assert list(errors) == [poison] and "after 2 attempts" in errors[poison]
    assert pool.replaced == 2 and result.trials == 6


class _InstantWorker:
    """A worker that answers at once: a config's time from its warps; the confirm stage raises
    a fatal CUDA error with ``crash_confirm_on`` among its configs; prefetches are recorded."""

    info = {"device": "interpreter", "node": "test"}
    device = "interpreter"

    def __init__(self, slot: int, crash_confirm_on: str = "") -> None:
        self.slot, self.crash_confirm_on = slot, crash_confirm_on
        self.confirmed: list[list[str]] = []
        self.prefetched: list[tuple] = []

    def call(self, method, *args):
        import concurrent.futures

        future = concurrent.futures.Future()
        try:
            future.set_result(getattr(self, method)(*args))
        except Exception as error:
            future.set_exception(error)
        return future

    def measure(self, problem, config):
        from tuner import Measurement

        return Measurement(config.key(), ms=1.0 + config.num_warps / 100)

    def confirm(self, problem, configs, rounds):
        from tuner import Confirmation

        self.confirmed.append([config.key() for config in configs])
        if self.crash_confirm_on in self.confirmed[-1]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return Confirmation({key: 1.0 for key in self.confirmed[-1]}, None, 1000, 100.0)

    def prefetch(self, *args):
        self.prefetched.append(args)

    def kill(self):
        pass


def _instant_pool(compile_processes: int, crash_confirm_on: str = ""):
    import itertools

    from tuner.pools import Pool

    class InstantPool(Pool):
        lost_errors = ()

        def __init__(self) -> None:
            self.compile_processes = compile_processes
            self.slots = itertools.count()
            self.workers = [_InstantWorker(next(self.slots), crash_confirm_on)]
            self.retired: list[_InstantWorker] = []

        def replace(self, worker):
            self.workers.remove(worker)
            self.retired.append(worker)
            self.workers.append(_InstantWorker(next(self.slots), crash_confirm_on))
            return self.workers[-1]

    return InstantPool()


def _run_driver(pool, problems, tmp_path, space=None, **settings):
    import io

    import optuna

    from tuner import Driver, Progress, Settings

    return Driver(pool, optuna.storages.InMemoryStorage(), Settings(**settings),
                  lambda device: tmp_path / "table.json", space=space,
                  progress=Progress(stream=io.StringIO())).run(problems)


def outside_space(heuristic: str):
    """A search space of the add_layernorm knobs whose block_rows choices leave ``heuristic``
    out (the shipped space holds every default of today's rule)."""
    from kernels import LaunchConfig
    from tuner import parse_space

    config = LaunchConfig.from_key(heuristic)
    rows = [value for value in (1, 2, 4, 8) if value != config.block_rows]
    return parse_space({"kernel": "add_layernorm", "restrictions": {}, "parameters": {
        "block_rows": rows, "block_w": [config.block_w], "num_warps": [1, 2], "num_stages": [1],
        "eviction_policy": ["", "evict_first"]}})


def test_a_confirm_stage_that_crashes_on_an_untried_heuristic_is_rerun_without_it(tmp_path):
    """The heuristic may lie outside the search space, so no trial runs it before the confirm
    stage does. If it kills the CUDA context there, the worker is replaced and the confirm stage
    re-run without it: the study keeps its winner, and says the heuristic failed."""
    problem = SPEC.problem("4194304x16", "bfloat16")
    heuristic = SPEC.heuristic(problem, "interpreter").key()
    space = outside_space(heuristic)
    pool = _instant_pool(0, crash_confirm_on=heuristic)
    [result] = _run_driver(pool, [problem], tmp_path, space, trials=3, confirm_top=2,
                           confirm_rounds=1)
    [crashed], [rerun] = pool.retired[0].confirmed, pool.workers[0].confirmed
    assert heuristic in crashed and heuristic not in rerun and len(pool.retired) == 1
    assert result.config.key() != heuristic and result.heuristic_ms is None
    assert (tmp_path / "table.json").exists()


def test_a_workers_first_compiles_include_every_studys_first_config(tmp_path):
    """Each study's first trial is its heuristic: the worker's compile processes get every
    study's seeds with its first speculative list, right after one round of its own."""
    problems = [SPEC.problem(shape, "float32") for shape in ("4096x64", "512x1000", "64x3000")]
    pool = _instant_pool(compile_processes=2)
    _run_driver(pool, problems, tmp_path, trials=3, confirm_top=1, confirm_rounds=1)
    speculative = [item for _, items, _ in pool.workers[0].prefetched for item in items]
    first_study = speculative[0][0]
    heuristics = {(problem, SPEC.heuristic(problem, "interpreter").key())
                  for problem in problems if problem != first_study}
    assert heuristics <= {(problem, config.key()) for problem, config in speculative[:2 + 2]}
    assert all(problem == first_study for problem, _ in speculative[:2])


class _DelayedWorker(_InstantWorker):
    """An instant worker whose answers come a few milliseconds later, in order, so that the
    driver queues trials behind the running one."""

    def __init__(self, slot: int) -> None:
        super().__init__(slot)
        self.backlog: queue.Queue = queue.Queue()
        threading.Thread(target=self._answer, daemon=True).start()

    def call(self, method, *args):
        import concurrent.futures

        future = concurrent.futures.Future()
        self.backlog.put((future, method, args))
        return future

    def _answer(self):
        while True:
            future, method, args = self.backlog.get()
            time.sleep(0.002)
            future.set_result(getattr(self, method)(*args))


@pytest.mark.parametrize("shapes, depth", [(["4096x64"], 1 + TRIALS_ASKED_AHEAD),
                                           (["4096x64", "512x1000", "64x3000", "8192x32",
                                             "256x256", "100x700"],
                                            1 + TRIALS_ASKED_AHEAD_WITH_MANY_STUDIES)])
def test_a_worker_queues_deeper_when_studies_are_many(tmp_path, monkeypatch, shapes, depth):
    """One study keeps two trials queued behind the running one; many studies keep more, each
    beyond the first two of a study with fewer than SPREAD_INFLIGHT_PER_STUDY in flight, and
    every study still measures each config once."""
    from tuner import Driver

    pool = _instant_pool(compile_processes=8)
    pool.workers = [_DelayedWorker(0)]
    depths, crowded = [], []
    submit = Driver._submit

    def spy(driver, job):
        submit(driver, job)
        queue = driver.queued[job.worker.slot]
        depths.append(len(queue))
        if len(queue) > 1 + TRIALS_ASKED_AHEAD:
            crowded.append(len(job.run.inflight))
    monkeypatch.setattr(Driver, "_submit", spy)
    problems = [SPEC.problem(shape, "float32") for shape in shapes]
    results = _run_driver(pool, problems, tmp_path, trials=12, confirm_top=1, confirm_rounds=1)
    assert max(depths) == depth
    assert all(count <= SPREAD_INFLIGHT_PER_STUDY for count in crowded)
    assert len(results) == len(problems) and all(result.trials == 12 for result in results)
