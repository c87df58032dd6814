"""Claims on SQLite and PostgreSQL: concurrent study runs split the configs and record each once
(writing in their loop, or through recorders); a claim whose heartbeat stopped expires after the
grace period. No Ray: measurements are fake."""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from tuner.claims import is_measurement
from tuner.measure import Measurement
from tuner.problems import get_kernel
from tuner.recorder import Recorder
from tuner.space import parse_space
from tuner.storage import open_storage
from tuner.study import Settings, StudyRun

SPEC = get_kernel("add_layernorm")
PROBLEM = SPEC.problem("128x64", "float32")
SPACE = parse_space({"kernel": "add_layernorm", "restrictions": {}, "parameters": {
    "block_rows": [2, 4, 8], "block_w": [64], "num_warps": [1, 2], "num_stages": [1],
    "eviction_policy": ["", "evict_first"]}})  # 12 configs
CONFIGS = sorted(config.key() for config in SPACE.candidates(SPEC.table_key(PROBLEM)))


def drive(url: str, errors: list, seed: int, recorded: bool) -> None:
    """One driver's loop: ask, 'measure' for a few ms, tell; wait while others finish. With
    ``recorded``, its writes go through a recorder of its own (tuner.recorder)."""
    recorder = Recorder.for_storage(open_storage(url)) if recorded else None
    try:
        rng = random.Random(seed)
        run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=len(CONFIGS)),
                       recorder)
        while not run.search_finished(0.0, None):
            config = run.ask()
            if config is None:
                time.sleep(0.02)
                run.refresh()
                continue
            time.sleep(rng.uniform(0, 0.02))
            run.tell(config, Measurement(config.key(), ms=rng.uniform(1, 2)), f"d{seed}")
        if recorder is None:
            assert run.n_measured == len(CONFIGS)
        else:  # a driver may also have measured configs whose race it lost: not recorded
            recorder.flush()
    except BaseException as error:  # reported by the main thread
        errors.append(error)
    finally:
        if recorder is not None:
            recorder.close()


@pytest.mark.parametrize("recorded", [False, True], ids=["in-the-loop", "recorders"])
def test_concurrent_runs_measure_each_config_once(url, recorded):
    errors: list = []
    threads = [threading.Thread(target=drive, args=(url, errors, seed, recorded))
               for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    study = optuna.load_study(study_name="add_layernorm:interpreter:float32:128x64", storage=url)
    measured = [t for t in study.trials if is_measurement(t)]
    assert sorted(t.user_attrs["config"] for t in measured) == CONFIGS, \
        "every config recorded exactly once"
    if not recorded:  # recorders claim while measuring: whose recorder started first may win all
        assert len({t.user_attrs["worker"] for t in measured}) > 1
    others = [t for t in study.trials if not is_measurement(t)]
    assert all(t.state == TrialState.FAIL and t.user_attrs["released"].startswith("lost")
               for t in others), "the only other trials are claims that lost a race"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_claim_of_a_driver_elsewhere_expires_after_its_heartbeat_grace(url):
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=3)
    config = SPACE.candidates(SPEC.table_key(PROBLEM))[0]
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, storage, Settings(trials=12))
    frozen = run._frozen(config, None, {"config": config.key(), "claim": "gpu-host-7/42/x"},
                         TrialState.RUNNING)
    trial_id = storage.create_new_trial(run.claims.study_id, template_trial=frozen)
    storage.record_heartbeat(trial_id)  # ... and never again: that host died
    run.refresh()
    assert run.others == {config.key()}
    keys = []
    while (proposed := run.ask()) is not None:
        keys.append(proposed.key())
        run.tell(proposed, Measurement(proposed.key(), ms=1.0), "test")
    assert len(keys) == 11 and config.key() not in keys  # held by the live-looking claim
    assert run.waiting and not run.search_finished(0.0, None)
    time.sleep(5.0)  # past the grace period with room for a loaded machine
    run.refresh()
    assert not run.waiting
    proposed = run.ask()
    assert proposed == config
    run.tell(proposed, Measurement(config.key(), ms=1.0), "test")
    assert run.search_finished(0.0, None)
    assert storage.get_trial(trial_id).state == TrialState.FAIL


def test_a_driver_killed_while_recording_a_result_leaves_a_config_measured_again(tmp_path):
    """Killed between writing a measurement's attributes and its state, a driver leaves a
    running claim that looks measured; once it expires, the config is measured again, once."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/k.db")
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, storage, Settings(trials=len(CONFIGS)))
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid of this host that no longer runs
    config = run.valid[CONFIGS[0]]
    half_written = run._frozen(config, None, {"config": config.key(), "measured": True,
                                              "claim": f"{socket.gethostname()}/{dead.pid}/x",
                                              "gbps": 1.0}, TrialState.RUNNING)
    storage.create_new_trial(run.claims.study_id, template_trial=half_written)

    resumed = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, storage, Settings(trials=len(CONFIGS)))
    keys = []
    while (proposed := resumed.ask()) is not None:
        keys.append(proposed.key())
        resumed.tell(proposed, Measurement(proposed.key(), ms=1.0), "test")
    assert sorted(keys) == CONFIGS, "each config measured once, the half-written one included"
    trials = storage.get_all_trials(run.claims.study_id)
    assert len(trials) == len(CONFIGS) + 1  # the measurements and the expired claim
