"""The search service end to end on a local Ray cluster with logical GPUs, kernels run through
the Triton interpreter: CLI search and export into a table, resume without re-measuring, dedupe,
failing configs, lost workers, hung trials and the no-GPU message."""

from __future__ import annotations

import io

import optuna
import pytest
import ray
import torch
from optuna.trial import TrialState

from kernels import LaunchConfig, load_table, reload_tables, select_config
from tuner import cli
from tuner.driver import Driver, Progress
from tuner.measure import Confirmation, Measurement, ProblemBench
from tuner.problems import get_kernel
from tuner.problems.add_layernorm import AddLayerNorm
from tuner.space import load_space, parse_space
from tuner.sampler import tiling
from tuner.study import LOCAL_SEARCH_AFTER, Settings, Stage, StudyRun, study_name
from tuner.workers import NoGPUError, PoolOptions, WorkerPool

from tests.faults import InterruptingProgress, inject

SPEC = get_kernel("add_layernorm")
PROBLEM = SPEC.problem("128x64", "float32")
STUDY = "add_layernorm:interpreter:float32:128x64"


@pytest.fixture(autouse=True)
def quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


def small_space(**overrides) -> dict:
    """A search space of the add_layernorm knobs with few values (2*2*2 = 8 configs)."""
    parameters = {"block_rows": [2, 4], "block_w": [64], "num_warps": [1, 2], "num_stages": [1],
                  "eviction_policy": ["", "evict_first"]}
    parameters.update(overrides)
    return {"kernel": "add_layernorm", "parameters": parameters, "restrictions": {}}


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [trial for trial in study.get_trials(deepcopy=False) if trial.user_attrs.get("measured")]


def search_argv(tmp_path, trials: int) -> list[str]:
    return ["search", "--shape", "128x64", "--trials", str(trials), "--interpret",
            "--workers", "2", "--storage", f"sqlite:///{tmp_path}/t.db",
            "--table", str(tmp_path / "table.json")]


# -- 1. the CLI end to end ----------------------------------------------------------------------
def test_cli_search_writes_a_table_the_runtime_uses(ray_cluster, tmp_path, monkeypatch, capsys):
    assert cli.main(search_argv(tmp_path, 5)) == 0
    out = capsys.readouterr().out

    entries = load_table(tmp_path / "table.json")
    assert len(entries) == 1
    entry = entries[0]
    assert (entry.kernel, entry.device, entry.dtype, entry.width, entry.rows) == \
        ("add_layernorm", "interpreter", "float32", 64, 128)
    assert entry.trials == 5 and entry.ms > 0 and entry.gbps > 0
    assert entry.config.key() in out and "128x64" in out and "interpreter" in out

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path}/t.db")
    measured = measured_trials(study)
    assert len(measured) == 5
    assert all(trial.state == TrialState.COMPLETE for trial in measured)
    # The heuristic is proposed first (and so always measured): the search can only improve on it.
    assert SPEC.heuristic(PROBLEM).key() in {t.user_attrs["config"] for t in measured}
    assert study.user_attrs["result"]["config"] == entry.config.as_dict()

    monkeypatch.setenv("TUNER_TABLE", str(tmp_path / "table.json"))
    reload_tables()
    try:
        config, source = select_config(128, 64, torch.float32, "interpreter")
        assert config == entry.config
        assert "table" in source
        # A table of the interpreter never applies to a GPU model.
        assert select_config(128, 64, torch.float32, "NVIDIA GeForce RTX 4090")[1] == "heuristic"
    finally:
        monkeypatch.delenv("TUNER_TABLE")
        reload_tables()


# -- 2. resume without repeats ------------------------------------------------------------------
def test_cli_resume_measures_no_config_twice(ray_cluster, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/t.db"
    assert cli.main(search_argv(tmp_path, 5)) == 0
    first = [t.user_attrs["config"] for t in
             measured_trials(optuna.load_study(study_name=STUDY, storage=storage))]
    assert len(first) == 5

    assert cli.main(search_argv(tmp_path, 8)) == 0
    study = optuna.load_study(study_name=STUDY, storage=storage)
    configs = [t.user_attrs["config"] for t in measured_trials(study)]
    assert len(configs) == 8
    assert len(set(configs)) == 8, f"a config was measured twice: {configs}"
    assert configs[:5] == first
    assert load_table(tmp_path / "table.json")[0].trials == 8
    capsys.readouterr()

    assert cli.main(search_argv(tmp_path, 8)) == 0
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert len(measured_trials(study)) == 8
    assert "8 (resumed)" in capsys.readouterr().out
    assert len(load_table(tmp_path / "table.json")) == 1


# -- 3. dedupe in StudyRun (no Ray) ---------------------------------------------------------------
def fake_ms(key: str) -> float:
    return 1.0 + (sum(map(ord, key)) % 97) / 10


def test_cli_search_tunes_the_fused_tail_kernel(ray_cluster, tmp_path, monkeypatch):
    """A second kernel goes through search, the table and its runtime lookup unchanged."""
    from kernels import ADD_LAYERNORM_POOL_GELU, PoolGeluCall

    argv = ["search", "--kernel", "add_layernorm_pool_gelu", "--shape", "2x3x4x4x8",
            "--dtype", "bfloat16", "--trials", "3", "--interpret", "--workers", "2",
            "--storage", f"sqlite:///{tmp_path}/tail.db", "--table", str(tmp_path / "table.json")]
    assert cli.main(argv) == 0
    [entry] = load_table(tmp_path / "table.json")
    assert (entry.kernel, entry.device, entry.dtype, entry.width, entry.rows) == \
        ("add_layernorm_pool_gelu", "interpreter", "bfloat16", 8, 2 * 3 * 2 * 2)
    assert entry.variant.startswith("h4_k2x2x2_none") and entry.trials == 3
    monkeypatch.setenv("TUNER_TABLE", str(tmp_path / "table.json"))
    reload_tables()
    try:
        config, source = ADD_LAYERNORM_POOL_GELU.select(PoolGeluCall((2, 3, 4, 4, 8),
                                                                     torch.bfloat16))
        assert config == entry.config and "table" in source
    finally:
        monkeypatch.delenv("TUNER_TABLE")
        reload_tables()


def test_cli_search_tunes_the_backward_kernel(ray_cluster, tmp_path, monkeypatch):
    """The add+LayerNorm backward is tuned like any kernel, and its runtime reads the result.
    TRITON_INTERPRET=1 (tests/conftest.py) stands for --interpret; --out takes a table per GPU
    model."""
    from kernels import ADD_LAYERNORM_BACKWARD, AddLayerNormBackwardCall

    argv = ["search", "--kernel", "add_layernorm_backward", "--shape", "64x32", "--trials", "3",
            "--workers", "2", "--storage", f"sqlite:///{tmp_path}/bwd.db",
            "--out", str(tmp_path / "tables")]
    assert cli.main(argv) == 0
    [entry] = load_table(tmp_path / "tables" / "interpreter.json")
    assert (entry.kernel, entry.device, entry.dtype, entry.width, entry.rows, entry.trials) == \
        ("add_layernorm_backward", "interpreter", "float32", 32, 64, 3)
    monkeypatch.setenv("TUNER_TABLE", str(tmp_path / "tables" / "interpreter.json"))
    reload_tables()
    try:
        config, source = ADD_LAYERNORM_BACKWARD.select(
            AddLayerNormBackwardCall(64, 32, torch.float32), "interpreter")
        assert config == entry.config and source == "table"
    finally:
        monkeypatch.delenv("TUNER_TABLE")
        reload_tables()


def test_studyrun_never_proposes_a_measured_config_twice():
    storage = optuna.storages.InMemoryStorage()
    space = parse_space(small_space())
    run = StudyRun(SPEC, PROBLEM, "interpreter", space, storage, Settings(trials=100))
    assert len(run.valid) == 8
    proposed: list[str] = []

    def measure_next(ms=None, error=None):
        config = run.ask()
        assert config.key() not in proposed
        proposed.append(config.key())
        run.tell(config, Measurement(config.key(), ms=ms if error else fake_ms(config.key()),
                                     error=error), "test")
        return config

    good = measure_next()
    bad = measure_next(error="RuntimeError: boom")
    assert run.measured == {good.key(): fake_ms(good.key()), bad.key(): None}

    # Enqueued again (as the local search or a table seed might), a measured config or a
    # failure is skipped, not re-measured.
    run.enqueue(good)
    run.enqueue(bad)
    third = measure_next()
    assert third.key() not in (good.key(), bad.key())

    # A config in flight is not handed out again either.
    inflight = run.ask()
    run.enqueue(inflight)
    other = run.ask()
    assert other != inflight
    for config in (inflight, other):
        proposed.append(config.key())
        run.tell(config, Measurement(config.key(), ms=fake_ms(config.key())), "test")

    while (config := run.ask()) is not None:
        assert config.key() not in proposed
        proposed.append(config.key())
        run.tell(config, Measurement(config.key(), ms=fake_ms(config.key())), "test")
    assert sorted(proposed) == sorted(run.valid)
    assert run.exhausted and run.search_finished(0.0, None)
    measured = measured_trials(run.study)
    assert sorted(t.user_attrs["config"] for t in measured) == sorted(run.valid)
    # The storage holds the measurements only: no rejected, duplicate or running proposals.
    assert len(run.study.trials) == len(measured)

    # Resuming from the storage rebuilds the cache: nothing left to measure, the failure included.
    resumed = StudyRun(SPEC, PROBLEM, "interpreter", space, storage, Settings(trials=100))
    assert resumed.measured == run.measured
    assert resumed.measured[bad.key()] is None
    assert resumed.ask() is None


def test_studyrun_resume_proposes_trials_that_were_in_flight_again():
    storage = optuna.storages.InMemoryStorage()
    space = parse_space(small_space())
    run = StudyRun(SPEC, PROBLEM, "interpreter", space, storage, Settings(trials=100))
    config = run.ask()
    run.tell(config, Measurement(config.key(), ms=1.0), "test")
    lost = run.ask()  # the driver dies with this trial in flight

    resumed = StudyRun(SPEC, PROBLEM, "interpreter", space, storage, Settings(trials=100))
    # Only the measurement reached the storage; the lost proposal left nothing behind.
    assert [t.user_attrs["config"] for t in run.study.trials] == [config.key()]
    assert resumed.measured == {config.key(): 1.0}
    keys = []
    while (proposed := resumed.ask()) is not None:
        keys.append(proposed.key())
        resumed.tell(proposed, Measurement(proposed.key(), ms=2.0), "test")
    assert lost.key() in keys and config.key() not in keys
    assert len(keys) == len(set(keys)) == 7


def confirm_all(run: StudyRun, ms: float = 5.0) -> None:
    """What the confirm stage reports: every candidate at ``ms``."""
    keys = [config.key() for config in run.confirm_candidates()]
    run.finish(Confirmation({key: ms for key in keys}, eager_ms=1.0, n_bytes=1000,
                            copy_gbps=1.0), {})


def test_studyrun_resume_after_interrupted_confirm_confirms_again():
    """A winner stored by an earlier, shorter run must not stand for trials measured since."""
    storage = optuna.storages.InMemoryStorage()
    space = parse_space(small_space())

    def start(trials):
        return StudyRun(SPEC, PROBLEM, "interpreter", space, storage, Settings(trials=trials))

    def measure(run, count):
        for _ in range(count):
            config = run.ask()
            run.tell(config, Measurement(config.key(), ms=fake_ms(config.key())), "test")

    first = start(3)
    measure(first, 3)
    confirm_all(first)
    assert start(3).done and start(3).result.trials == 3  # finished: resumes as done

    second = start(5)
    assert second.stage is Stage.SEARCH and second.result is None
    measure(second, 2)  # ... then interrupted before its confirm stage finished

    third = start(5)
    assert third.n_measured == 5
    assert third.stage is Stage.SEARCH and third.result is None
    assert third.search_finished(0.0, None)  # budget spent: the driver goes straight to confirm
    confirm_all(third)
    assert start(5).result.trials == 5


def test_studyrun_seeds_heuristic_first_and_stops_at_budget():
    # 128x64 float32: the heuristic r32_w64_warps16 is in the shipped space, so it goes first.
    run = StudyRun(SPEC, PROBLEM, "interpreter", load_space(SPEC.space_file),
                   optuna.storages.InMemoryStorage(), Settings(trials=3))
    config = run.ask()
    assert config == SPEC.heuristic(PROBLEM)
    run.tell(config, Measurement(config.key(), ms=5.0), "test")
    for _ in range(2):
        assert not run.search_finished(0.0, None)
        config = run.ask()
        run.tell(config, Measurement(config.key(), ms=6.0), "test")
    assert run.search_finished(0.0, None)
    assert run.best == (5.0, SPEC.heuristic(PROBLEM).key())
    assert run.confirm_candidates()[0] == SPEC.heuristic(PROBLEM)


def test_local_search_changes_the_stages_only_after_every_other_move_around_the_best():
    """Around the best three configs, moves of the tiling or the policy come first; a move of
    the stages alone (they rarely change the time) only once none of those is open."""
    run = StudyRun(SPEC, SPEC.problem("4096x8192", "float32"), "interpreter",
                   load_space(SPEC.space_file), optuna.storages.InMemoryStorage(),
                   Settings(trials=1000))
    run.queued.clear()  # no seeds: the measurements below decide what is proposed
    chunked = sorted((config for config in run.valid.values()
                      if config.block_w < 8192 and config.num_stages == 1), key=LaunchConfig.key)
    best = chunked[:3]
    around = {neighbour.key(): config for config in best for neighbour in run.neighbours(config)}
    stages_only = {key for key, config in around.items()
                   if tiling(run.valid[key]) == tiling(config)
                   and run.valid[key].eviction_policy == config.eviction_policy}
    for rank, config in enumerate(best):
        run.tell(config, Measurement(config.key(), ms=1.0 + rank), "test")
    slow = [config for key, config in run.valid.items()
            if key not in around and config not in best]
    for config in slow[:round(LOCAL_SEARCH_AFTER * len(run.valid))]:
        run.tell(config, Measurement(config.key(), ms=1e3), "test")
    proposed = []
    while open_moves := [key for key in around if key not in run.measured]:
        config = run.ask()
        assert config.key() in open_moves
        if config.key() in stages_only:
            assert set(open_moves) <= stages_only
        proposed.append(config.key())
        run.tell(config, Measurement(config.key(), ms=1e3), "test")
    assert set(proposed) & stages_only and set(proposed) - stages_only


def test_a_default_config_that_failed_is_not_re_timed_and_the_study_still_has_a_winner():
    """A default config that crashes (or is wrong) fails its own trial only: the confirm stage
    leaves it out, and the result says the heuristic failed instead of losing the study."""
    from tuner.report import print_summary

    run = StudyRun(SPEC, PROBLEM, "interpreter", load_space(SPEC.space_file),
                   optuna.storages.InMemoryStorage(), Settings(trials=3))
    heuristic = run.ask()
    assert heuristic == SPEC.heuristic(PROBLEM)
    run.tell(heuristic, Measurement(heuristic.key(), error="illegal memory access"), "test")
    for ms in (6.0, 5.0):
        config = run.ask()
        run.tell(config, Measurement(config.key(), ms=ms), "test")
    candidates = run.confirm_candidates()
    assert heuristic not in candidates and len(candidates) == 2
    result = run.finish(Confirmation({config.key(): 5.0 for config in candidates}, eager_ms=1.0,
                                     n_bytes=1000, copy_gbps=100.0), {})
    assert result.heuristic_ms is None and result.speedup_vs_heuristic is None
    summary = io.StringIO()
    print_summary([result], summary)
    assert "failed" in summary.getvalue()


def test_studyrun_foresees_its_local_search_for_the_compile_processes():
    """Late in its budget a study proposes the unmeasured neighbours of its best configs: those
    are the configs it says come next (compiled ahead), in the order it proposes them."""
    run = StudyRun(SPEC, PROBLEM, "interpreter", load_space(SPEC.space_file),
                   optuna.storages.InMemoryStorage(), Settings(trials=12))
    for ms in (5.0, 4.0, 6.0, 3.0, 7.0, 8.0, 9.0, 5.5):  # past LOCAL_SEARCH_AFTER of 12
        config = run.ask()
        run.tell(config, Measurement(config.key(), ms=ms), "test")
    foreseen = run.likely_next()
    best = run.valid[run.best[1]]
    assert foreseen[0] in run.neighbours(best)
    assert [run.ask(), run.ask()] == foreseen[:2]


@pytest.mark.parametrize("shape,dtype", [("4194304x16", "bfloat16"), ("4194304x16", "float16")])
def test_studyrun_heuristic_outside_the_space_is_not_seeded(shape, dtype):
    """The heuristic's knob values may lie outside the space's choices (a user's space, or an
    older one); asking must still work and stay in the space."""
    problem = SPEC.problem(shape, dtype)
    heuristic = SPEC.heuristic(problem)
    space = parse_space(small_space(block_rows=[value for value in (1, 2, 4, 8)
                                                if value != heuristic.block_rows],
                                    block_w=[heuristic.block_w]))
    assert heuristic.key() not in {c.key() for c in space.candidates(SPEC.table_key(problem))}
    run = StudyRun(SPEC, problem, "interpreter", space, optuna.storages.InMemoryStorage(),
                   Settings(trials=4))
    for _ in range(4):
        config = run.ask()
        assert config.key() in run.valid
        run.tell(config, Measurement(config.key(), ms=1.0), "test")
    # The confirm stage still re-times the heuristic beside the best configs.
    assert heuristic in run.confirm_candidates()


# -- 4. configs that fail ----------------------------------------------------------------------
BAD_CONFIG = LaunchConfig(block_rows=2, block_w=64, num_warps=1)
GOOD_CONFIG = LaunchConfig(block_rows=4, block_w=64, num_warps=2)


class Broken(AddLayerNorm):
    """add_layernorm whose BAD_CONFIG misbehaves in one of several ways."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def run(self, inputs, config, out=None):
        if config != BAD_CONFIG:
            return super().run(inputs, config, out=out)
        if self.mode == "raise":
            raise RuntimeError("boom: the kernel failed to compile")
        if self.mode == "fatal":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.mode == "wrong":
            return super().run(inputs, config, out=out).add_(0.25)
        if self.mode == "partial":  # writes only half the rows
            full = super().run(inputs, config)
            out[: len(out) // 2] = full[: len(out) // 2]
            return out
        raise AssertionError(self.mode)


@pytest.mark.parametrize("mode,match,fatal", [
    ("raise", "RuntimeError: boom: the kernel failed to compile", False),
    ("fatal", "illegal memory access", True),
    ("wrong", "WrongResult: relative error", False),
    ("partial", "WrongResult: output has non-finite or unwritten (poisoned) elements", False),
])
def test_failing_config_fails_only_its_measurement(mode, match, fatal):
    bench = ProblemBench(Broken(mode), PROBLEM, torch.device("cpu"), seed=0)
    failed = bench.measure(BAD_CONFIG, copy_gbps=10.0)
    assert failed.config == BAD_CONFIG.key()
    assert failed.ms is None and failed.gbps is None and failed.pct_of_copy is None
    assert match in failed.error
    assert failed.fatal is fatal
    if mode == "wrong":
        assert "exceeds 0.0001 for float32" in failed.error

    good = bench.measure(GOOD_CONFIG, copy_gbps=10.0)  # the bench stays usable
    assert good.error is None and good.ms > 0 and good.compile_s is not None
    assert good.gbps == pytest.approx(bench.n_bytes / good.ms / 1e6)
    assert good.pct_of_copy == pytest.approx(10 * good.gbps)


def test_correct_kernel_passes_the_poisoned_check():
    bench = ProblemBench(SPEC, PROBLEM, torch.device("cpu"), seed=0)
    bench.check(BAD_CONFIG)
    assert torch.isfinite(bench.out).all()
    assert bench.reference.dtype == torch.float64


def test_failed_measurement_fails_only_its_trial_and_is_never_remeasured():
    storage = optuna.storages.InMemoryStorage()
    space = parse_space(small_space())
    bench = ProblemBench(Broken("raise"), PROBLEM, torch.device("cpu"), seed=0)
    run = StudyRun(SPEC, PROBLEM, "interpreter", space, storage, Settings(trials=100))
    run.enqueue(BAD_CONFIG)
    run.enqueue(GOOD_CONFIG)
    for expected in (BAD_CONFIG, GOOD_CONFIG):
        config = run.ask()
        assert config == expected
        run.tell(config, bench.measure(config, 10.0), "worker-1")
    states = {t.user_attrs["config"]: t for t in measured_trials(run.study)}
    assert states[BAD_CONFIG.key()].state == TrialState.FAIL
    assert "boom" in states[BAD_CONFIG.key()].user_attrs["error"]
    assert states[GOOD_CONFIG.key()].state == TrialState.COMPLETE
    assert run.best[1] == GOOD_CONFIG.key()
    assert run.measured[BAD_CONFIG.key()] is None

    run.enqueue(BAD_CONFIG)
    remaining = []
    while (config := run.ask()) is not None:
        remaining.append(config)
        run.tell(config, Measurement(config.key(), ms=3.0), "worker-1")
    assert BAD_CONFIG not in remaining and len(remaining) == 6
    assert BAD_CONFIG not in run.confirm_candidates()


# -- 5. a worker killed mid-trial ---------------------------------------------------------------
def test_worker_killed_mid_trial_is_replaced_and_the_trial_rerun(ray_cluster, tmp_path):
    pool = WorkerPool(PoolOptions(workers=2, interpret=True))
    storage = optuna.storages.InMemoryStorage()
    table = tmp_path / "table.json"
    settings = Settings(trials=4, confirm_top=2, confirm_rounds=1)
    try:
        pool.start()
        assert len(pool.workers) == 2 and pool.devices().keys() == {"interpreter"}
        # The worker of the third trial dies right after the trial is sent to it.
        faults = inject(pool, 3, lambda worker: ray.kill(worker.actor, no_restart=True))
        driver = Driver(pool, storage, settings, lambda device: table,
                        progress=Progress(stream=io.StringIO()))
        results = driver.run([PROBLEM])
        [(killed_worker, _, killed_config)] = faults.faulted
        assert faults.replaced == [killed_worker]
        assert len(pool.workers) == 2
        assert killed_worker not in pool.workers
        assert killed_worker.actor._actor_id not in {w.actor._actor_id for w in pool.workers}
        assert len({w.slot for w in pool.workers}) == 2
    finally:
        pool.shutdown()

    assert faults.measures >= 5  # the killed trial was sent again
    assert len(results) == 1 and results[0].trials == 4
    study = optuna.load_study(study_name=study_name(PROBLEM, "interpreter"), storage=storage)
    measured = measured_trials(study)
    assert len(measured) == 4
    assert all(t.state == TrialState.COMPLETE and "error" not in t.user_attrs for t in measured)
    assert killed_config.key() in {t.user_attrs["config"] for t in measured}
    assert len({t.user_attrs["config"] for t in measured}) == 4
    [entry] = load_table(table)
    assert entry.config == results[0].config and entry.device == "interpreter"


# -- 6. a trial that hangs past the per-trial timeout -------------------------------------------
def test_trial_timeout_fails_trials_and_replaces_workers(ray_cluster, tmp_path):
    # block_rows 1: 128 programs a launch, over a second per trial in the interpreter, far past
    # the timeout (the driver looks at timeouts every 0.5 s).
    space = parse_space(small_space(block_rows=[1]), "slow.yaml")
    pool = WorkerPool(PoolOptions(workers=2, interpret=True))
    storage = optuna.storages.InMemoryStorage()
    table = tmp_path / "table.json"
    try:
        pool.start()
        before = {w.actor._actor_id for w in pool.workers}
        driver = Driver(pool, storage, Settings(trials=2, trial_timeout=0.01), lambda d: table,
                        space=space, progress=Progress(stream=io.StringIO()))
        results = driver.run([PROBLEM])
        assert len(pool.workers) == 2
        assert not before & {w.actor._actor_id for w in pool.workers}
    finally:
        pool.shutdown()

    assert results == []
    assert all(run.done and run.result is None for run in driver.runs)
    study = optuna.load_study(study_name=study_name(PROBLEM, "interpreter"), storage=storage)
    measured = measured_trials(study)
    assert len(measured) == 2
    for trial in measured:
        assert trial.state == TrialState.FAIL
        assert "timed out after 0.01 s" in trial.user_attrs["error"]
    assert "result" not in study.user_attrs
    assert not table.exists()


# -- 7. no GPU and no --interpret -----------------------------------------------------------------
@pytest.mark.parametrize("options,wanted", [
    (PoolOptions(resource="does_not_exist"), "no GPUs with resource 'does_not_exist'"),
    (PoolOptions(accelerator_type="B200"), "no GPUs of accelerator type 'B200'"),
    (PoolOptions(resource="does_not_exist", interpret=True), "with resource 'does_not_exist'"),
])
def test_pool_without_usable_gpus_says_so(ray_cluster, options, wanted):
    pool = WorkerPool(options)
    with pytest.raises(NoGPUError) as raised:
        pool.start()
    message = str(raised.value)
    assert wanted in message
    assert "--interpret" in message and "--address" in message
    assert pool.workers == []


def test_cli_without_gpus_exits_2_with_the_message(ray_cluster, tmp_path, capsys):
    code = cli.main(["search", "--shape", "128x64", "--resource", "does_not_exist",
                     "--storage", f"sqlite:///{tmp_path}/t.db", "--table", str(tmp_path / "t.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "tuner: no GPUs with resource 'does_not_exist' in the Ray cluster" in err
    assert "--interpret" in err
    assert not (tmp_path / "t.json").exists()


def test_pool_capacity_counts_gpus_of_matching_alive_nodes(monkeypatch):
    """Heterogeneous clusters: only GPUs on nodes with the requested type/resource count."""
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16, "GPU": 2, "accelerator_type:RTX4090": 1, "rtx4090": 2}},
        {"Alive": True, "Resources": {"CPU": 64, "GPU": 4, "accelerator_type:H100": 1}},
        {"Alive": False, "Resources": {"CPU": 16, "GPU": 8, "accelerator_type:RTX4090": 1, "rtx4090": 8}},
        {"Alive": True, "Resources": {"CPU": 8}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 88, "GPU": 6})
    assert WorkerPool(PoolOptions())._capacity() == 6
    assert WorkerPool(PoolOptions(accelerator_type="RTX4090"))._capacity() == 2
    assert WorkerPool(PoolOptions(resource="rtx4090"))._capacity() == 2
    assert WorkerPool(PoolOptions(accelerator_type="H100"))._capacity() == 4
    assert WorkerPool(PoolOptions(accelerator_type="A100"))._capacity() == 0
    # Interpreter workers use GPUs when the cluster has them, CPUs otherwise.
    assert WorkerPool(PoolOptions(interpret=True))._capacity() == 6
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 88})
    assert WorkerPool(PoolOptions(interpret=True))._capacity() == 88


def test_ctrl_c_keeps_finished_trials_and_resume_completes(ray_cluster, tmp_path):
    pool = WorkerPool(PoolOptions(workers=2, interpret=True))
    storage_url = f"sqlite:///{tmp_path}/ctrl_c.db"
    table = tmp_path / "table.json"
    settings = Settings(trials=6, confirm_top=2, confirm_rounds=1)
    try:
        pool.start()
        with pytest.raises(KeyboardInterrupt):
            Driver(pool, storage_url, settings, lambda device: table,
                   progress=InterruptingProgress(after=2)).run([PROBLEM])
        study = optuna.load_study(study_name=STUDY, storage=storage_url)
        finished = {t.user_attrs["config"] for t in measured_trials(study)}
        assert len(finished) >= 2  # nothing measured before Ctrl-C is lost
        # The trials in flight were dropped: their claims are released (FAIL, unmeasured).
        assert all(t.state == TrialState.COMPLETE for t in measured_trials(study))
        released = [t for t in study.trials if not t.user_attrs.get("measured")]
        assert len(study.trials) == len(finished) + len(released)
        assert all(t.state == TrialState.FAIL and t.user_attrs["released"] == "interrupted"
                   for t in released)
        assert not table.exists()

        # The same run again completes the budget without measuring a finished config twice.
        [result] = Driver(pool, storage_url, settings, lambda device: table,
                          progress=Progress(stream=io.StringIO())).run([PROBLEM])
    finally:
        pool.shutdown()
    measured = measured_trials(optuna.load_study(study_name=STUDY, storage=storage_url))
    configs = [t.user_attrs["config"] for t in measured]
    assert len(configs) == 6 and len(set(configs)) == 6 and finished <= set(configs)
    assert result.trials == 6 and load_table(table)[0].config == result.config


def test_cli_export_rebuilds_a_table_and_show_prints_it(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path}/export.db"
    space = parse_space(small_space())
    for problem in (PROBLEM, SPEC.problem("40x64", "bfloat16")):
        run = StudyRun(SPEC, problem, "NVIDIA GeForce RTX 4090", space, url, Settings(trials=2))
        for _ in range(2):
            config = run.ask()
            run.tell(config, Measurement(config.key(), ms=fake_ms(config.key())), "test")
        confirm_all(run)
    unfinished = StudyRun(SPEC, SPEC.problem("8x64", "float32"), "NVIDIA GeForce RTX 4090", space,
                          url, Settings(trials=2))
    config = unfinished.ask()
    unfinished.tell(config, Measurement(config.key(), ms=1.0), "test")

    out = tmp_path / "exported.json"
    assert cli.main(["export", "--storage", url, "--out", str(out)]) == 0
    entries = load_table(out)
    assert sorted((e.dtype, e.rows) for e in entries) == [("bfloat16", 40), ("float32", 128)]
    assert all(e.device == "NVIDIA GeForce RTX 4090" and e.trials == 2 for e in entries)
    assert cli.main(["export", "--storage", url, "--out", str(tmp_path / "none.json"),
                     "--device", "NVIDIA H100 80GB HBM3"]) == 0
    assert load_table(tmp_path / "none.json") == []

    capsys.readouterr()
    assert cli.main(["show", "--table", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "2 entries" in shown and "NVIDIA GeForce RTX 4090" in shown
    assert all(e.config.key() in shown for e in entries)

    # Without --table: every table the runtime reads, TUNER_TABLE first.
    monkeypatch.setenv("TUNER_TABLE", str(out))
    assert cli.main(["show"]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 2 entries")

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["show", "--table", str(corrupt)])
    assert exit_info.value.code == 2 and str(corrupt) in capsys.readouterr().err


@pytest.mark.parametrize("kernel,shape", [("add_layernorm", "37x64"),
                                          ("add_layernorm_backward", "37x64"),
                                          ("add_layernorm_pool_gelu", "3x5x4x6x8"),
                                          ("add_layernorm_pool_gelu_channels_last", "3x5x4x6x8"),
                                          ("add_layernorm_pool_gelu_backward", "3x5x4x6x8"),
                                          ("add_layernorm_pool_gelu_backward_channels_last",
                                           "3x5x5x6x8")])
def test_reference_computed_in_slices_matches_one_piece(monkeypatch, kernel, shape):
    import tuner.problems.base as base

    spec = get_kernel(kernel)
    problem = spec.problem(shape, "float32")
    inputs = spec.make_inputs(problem, torch.device("cpu"), torch.Generator().manual_seed(3))
    whole = spec.reference_slice(inputs, torch.float64)
    monkeypatch.setattr(base, "REFERENCE_SLICE_ELEMENTS", 2 * inputs["x"][0].numel())
    sliced = spec.reference(inputs, torch.float64)
    assert sliced.shape == whole.shape
    torch.testing.assert_close(sliced, whole, rtol=1e-12, atol=1e-12)
    # And a bench built on it still rejects a wrong output, slice by slice.
    monkeypatch.setattr("tuner.measure.CHECK_SLICE_ELEMENTS", 2 * inputs["x"][0].numel())
    bench = ProblemBench(spec, problem, torch.device("cpu"), seed=3)
    bench.check(spec.heuristic(problem))
    real_run = spec.run
    monkeypatch.setattr(spec, "run", lambda inputs, config, out=None:
                        real_run(inputs, config, out=out).mul_(1.01))
    with pytest.raises(Exception, match="relative error"):
        bench.check(spec.heuristic(problem))
