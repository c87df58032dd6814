"""The recorder (tuner.recorder): a driver's claims and measurements written by a process of its
own, in order, with lost races dropped and reported, flushed on Ctrl-C; through a driver. SQLite
(tests/test_claims.py runs concurrent drivers with recorders on PostgreSQL too); no Ray:
measurements are fake."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import subprocess
import sys
import time
import zlib

import optuna
import pytest
from optuna.trial import TrialState

from tests.faults import InterruptingProgress
from tests.test_claims import CONFIGS, PROBLEM, SPACE, SPEC  # the same 12-config study
from tuner.claims import is_measurement
from tuner.driver import Driver
from tuner.progress import Progress
from tuner.measure import Confirmation, Measurement
from tuner.pools import Pool
from tuner.recorder import Recorder, RecorderError
from tuner.storage import open_storage
from tuner.study import Settings, StudyRun

STUDY = "add_layernorm:interpreter:float32:128x64"


@pytest.fixture
def url(tmp_path):
    """SQLite (the claims' tests run concurrent recorders on PostgreSQL too)."""
    return f"sqlite:///{tmp_path}/recorder.db"


@pytest.fixture
def recorder(url):
    recorder = Recorder.for_storage(open_storage(url))
    yield recorder
    with contextlib.suppress(RecorderError):  # raised in the test already
        recorder.close()


def stored(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=url).trials


def test_measurements_are_written_in_the_background_with_their_attributes(url, recorder):
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=4), recorder)
    told = {}
    for index in range(4):
        config = run.ask()
        if index % 2:  # written separately, or together with its claim
            recorder.flush()
        told[config.key()] = 1.0 + index
        run.tell(config, Measurement(config.key(), ms=1.0 + index, gbps=2.0), "gpu-7")
    recorder.flush()
    trials = stored(url)
    assert len(trials) == 4 and all(is_measurement(trial) for trial in trials)
    assert {trial.user_attrs["config"]: trial.value for trial in trials} == told
    assert all(trial.state == TrialState.COMPLETE and trial.user_attrs["worker"] == "gpu-7"
               and trial.user_attrs["gbps"] == 2.0 for trial in trials)
    # A later run resumes from what the recorder wrote.
    resumed = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=4))
    assert resumed.measured == told and resumed.search_finished(0.0, None)


def test_a_lost_race_is_reported_and_its_measurement_dropped(url, recorder):
    rival = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=12))
    taken = rival.ask()  # another driver's live claim, made first
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=12), recorder)
    run.proposer.propose = lambda measured, busy: taken  # proposes the rival's config
    assert run.ask() == taken  # claimed optimistically: measured while the claim is written
    run.tell(taken, Measurement(taken.key(), ms=9.0), "here")
    recorder.flush()
    assert taken.key() in run.claims.lost_keys()
    rival.tell(taken, Measurement(taken.key(), ms=1.0), "rival")
    measurements = [trial for trial in stored(url) if is_measurement(trial)]
    assert [(trial.user_attrs["worker"], trial.value) for trial in measurements] == [("rival", 1.0)]
    lost = [trial for trial in stored(url) if not is_measurement(trial)]
    assert lost and all(trial.state == TrialState.FAIL and
                        trial.user_attrs["released"].startswith("lost") for trial in lost)


def test_abandoned_claims_are_released_or_never_written(url, recorder):
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=12), recorder)
    first = run.ask()
    recorder.flush()  # written as a claim: released
    second = run.ask()
    run.abandon(first, "interrupted")
    run.abandon(second, "interrupted")  # if given up before it was written: nothing to write
    recorder.flush()
    trials = {trial.user_attrs["config"]: trial for trial in stored(url)}
    assert first.key() in trials and set(trials) <= {first.key(), second.key()}
    assert all(trial.state == TrialState.FAIL and trial.user_attrs["released"] == "interrupted"
               for trial in trials.values())


def test_a_failed_write_raises_in_the_driver(url, recorder):
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=12), recorder)
    run.claims.study_id = 10_000  # no such study: the recorder's write fails
    run.ask()
    with pytest.raises(RecorderError, match="writing to the storage failed"):
        recorder.flush()
    with pytest.raises(RecorderError):
        run.ask()


def test_the_recorder_dies_with_its_driver(tmp_path):
    url = f"sqlite:///{tmp_path}/orphan.db"
    script = (f"import os; from tuner.recorder import Recorder; from tuner.storage import open_storage\n"
              f"recorder = Recorder.for_storage(open_storage({url!r}))\n"
              f"print(recorder._process.pid, flush=True); os._exit(0)\n")
    pid = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True, timeout=120).stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ")[1].startswith("Z"):
                    break  # ended, not yet reaped
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the recorder outlived its driver")


def fake_ms(key: str) -> float:
    return 1.0 + zlib.crc32(key.encode()) % 100 / 100


class FakeWorker:
    """Answers at once, like a GPU that measures each config at its fixed fake time."""

    def __init__(self, slot: int) -> None:
        self.slot, self.device = slot, "interpreter"
        self.info = {"device": "interpreter", "node": f"fake-{slot}"}

    def call(self, method: str, problem, configs, *rest) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if method == "measure":
            future.set_result(Measurement(configs.key(), ms=fake_ms(configs.key())))
        else:
            future.set_result(Confirmation({config.key(): fake_ms(config.key())
                                            for config in configs}, None, 1, 1.0))
        return future

    def prefetch(self, *args) -> None:
        pass


class HalfStartedPool(Pool):
    """Two workers, the second still starting when the driver begins."""

    compile_processes = 0
    lost_errors = ()

    def __init__(self) -> None:
        self.workers, self.starting = [FakeWorker(0)], 1

    def joined(self) -> list:
        if not self.starting:
            return []
        self.starting = 0
        self.workers.append(FakeWorker(1))
        return self.workers[-1:]


def test_a_driver_of_two_workers_writes_through_its_recorder(url, tmp_path, monkeypatch):
    made = []
    real = Recorder.for_storage.__func__
    monkeypatch.setattr(Recorder, "for_storage",
                        classmethod(lambda cls, storage: made.append(real(cls, storage)) or made[-1]))
    driver = Driver(HalfStartedPool(), open_storage(url), Settings(trials=6, confirm_top=2),
                    lambda device: tmp_path / "table.json", space=SPACE)
    [result] = driver.run([PROBLEM])
    assert len(made) == 1 and made[0] is not None and driver.recorder is None  # closed
    measured = [trial for trial in stored(url) if is_measurement(trial)]
    assert len(measured) == 6 and len({trial.user_attrs["config"] for trial in measured}) == 6
    assert result.ms == min(fake_ms(trial.user_attrs["config"]) for trial in measured) \
        or result.config.key() not in CONFIGS  # the heuristic, outside this small space


def test_ctrl_c_through_a_recorder_keeps_finished_trials_and_resume_completes(url, tmp_path):
    settings = Settings(trials=8, confirm_top=2)
    with pytest.raises(KeyboardInterrupt):
        Driver(HalfStartedPool(), open_storage(url), settings, lambda device: tmp_path / "t.json",
               space=SPACE, progress=InterruptingProgress(after=3, busy_only=False)).run([PROBLEM])
    finished = {trial.user_attrs["config"] for trial in stored(url) if is_measurement(trial)}
    assert len(finished) >= 3  # flushed before the interrupt propagated
    assert all(trial.state != TrialState.RUNNING for trial in stored(url))  # claims released
    [result] = Driver(HalfStartedPool(), open_storage(url), settings,
                      lambda device: tmp_path / "t.json", space=SPACE,
                      progress=Progress(stream=io.StringIO())).run([PROBLEM])
    configs = [trial.user_attrs["config"] for trial in stored(url) if is_measurement(trial)]
    assert len(configs) == 8 and len(set(configs)) == 8 and finished <= set(configs)
    assert result.trials == 8
