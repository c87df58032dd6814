"""The two worker pools behind the driver: local processes (the default without a cluster) and
the warm pool of `tuner serve` (named detached Ray actors shared by several clients).

Both run interpreter workers on the CPU; the CLI runs in subprocesses, as a user runs it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from kernels import load_table
from tuner import Driver, Progress, Settings, get_kernel, study_name
from tuner.local import LocalPool, visible_gpus
from tuner.pools import PoolOptions, NoGPUError

from tests.faults import inject

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = get_kernel("add_layernorm").problem("128x64", "float32")


def tuner_command(*argv: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def processes_marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (a command's leftovers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


@pytest.fixture
def cli_env(tmp_path):
    marker = f"TUNER_TEST_MARK={tmp_path.name}"
    env = dict(os.environ, TUNER_TEST_MARK=tmp_path.name, XDG_DATA_HOME=str(tmp_path / "data"),
               PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    return env, marker


def test_search_without_a_cluster_runs_on_local_processes_and_leaves_none(tmp_path, cli_env):
    env, marker = cli_env
    done = tuner_command("search", "--shape", "128x64", "--trials", "4", "--interpret",
                         "--workers", "2", "--storage", f"sqlite:///{tmp_path}/t.db",
                         "--table", str(tmp_path / "table.json"), "--verbose", env=env)
    assert done.returncode == 0, done.stderr
    assert "ray" not in done.stderr.lower()  # no Ray cluster was started
    assert "2 workers on interpreter" in done.stderr
    timeline = next(line for line in done.stderr.splitlines()
                    if line.startswith("seconds since the command started"))
    for phase in ("workers launched", "first worker up", "last worker up", "workers ready",
                  "first trial sent", "first result", "shutdown"):
        assert phase in timeline
    stamps = dict(mark.rsplit(" ", 1) for mark in timeline.split(": ", 1)[1].split(", "))
    # The workers' own clocks fall between their launch and the driver seeing them ready.
    assert float(stamps["workers launched"]) <= float(stamps["first worker up"]) \
        <= float(stamps["last worker up"]) <= float(stamps["workers ready"])
    [entry] = load_table(tmp_path / "table.json")
    assert entry.trials == 4 and entry.device == "interpreter"
    study = optuna.load_study(study_name=study_name(PROBLEM, "interpreter"),
                              storage=f"sqlite:///{tmp_path}/t.db")
    assert len({t.user_attrs["config"] for t in study.trials if t.user_attrs.get("measured")}) == 4
    time.sleep(1)
    assert processes_marked(marker) == []  # workers and their compile processes are gone


def test_a_local_worker_killed_mid_trial_is_replaced_and_its_trial_rerun(tmp_path):
    pool = LocalPool(PoolOptions(workers=2, interpret=True))
    storage = optuna.storages.InMemoryStorage()
    try:
        pool.start()
        before = {worker.info["pid"] for worker in pool.workers}
        faults = inject(pool, 1, lambda worker: worker.call("crash"))
        driver = Driver(pool, storage, Settings(trials=3, confirm_top=2, confirm_rounds=1),
                        lambda device: tmp_path / "table.json",
                        progress=Progress(stream=io.StringIO()))
        [result] = driver.run([PROBLEM])
        after = {worker.info["pid"] for worker in pool.workers}
    finally:
        pool.shutdown()
    [(killed, _, config)] = faults.faulted
    assert faults.replaced == [killed]
    assert len(after) == 2 and killed.info["pid"] not in after and before & after
    measured = [t for t in optuna.load_study(study_name=study_name(PROBLEM, "interpreter"),
                                             storage=storage).trials if t.user_attrs.get("measured")]
    assert len(measured) == 3 and all("error" not in t.user_attrs for t in measured)
    assert config.key() in {t.user_attrs["config"] for t in measured}
    assert result.trials == 3


def test_local_workers_join_as_they_come_up_with_studies_for_a_new_gpu_model(tmp_path, monkeypatch):
    """With ``first_only`` the pool starts measuring on its first worker; a worker that comes
    up later joins the run, and one of a GPU model nobody had gets its own studies."""
    import concurrent.futures
    import threading

    pool = LocalPool(PoolOptions(workers=2, interpret=True))
    spawn, late, spawned = pool._spawn, concurrent.futures.Future(), []

    def second_comes_up_late(gpu):
        executor, gpu, prefetches, info = spawn(gpu)
        spawned.append(gpu)
        if len(spawned) == 2:  # the second worker: up only once the first measured

            def report(real=info) -> None:
                late.set_result({**real.result(), "device": "Late GPU"})

            threading.Thread(target=lambda: (first_result.wait(120), report()), daemon=True).start()
            info = late
        return executor, gpu, prefetches, info

    first_result = threading.Event()
    tell = Driver._handle

    def handle(self, *args):
        tell(self, *args)
        first_result.set()

    monkeypatch.setattr(pool, "_spawn", second_comes_up_late)
    monkeypatch.setattr(Driver, "_handle", handle)
    try:
        pool.launch()
        assert [worker.device for worker in pool.start(first_only=True)] == ["interpreter"]
        assert pool.starting == 1
        driver = Driver(pool, optuna.storages.InMemoryStorage(),
                        Settings(trials=4, confirm_top=1, confirm_rounds=1),
                        lambda device: tmp_path / f"{device}.json",
                        progress=Progress(stream=io.StringIO()))
        results = driver.run([PROBLEM])
        assert pool.starting == 0 and len(pool.workers) == 2
        assert sorted(result.device for result in results) == ["Late GPU", "interpreter"]
        assert all(result.trials == 4 for result in results)
        assert {job_slot for job_slot in driver.busy_seconds} == {w.slot for w in pool.workers}
    finally:
        pool.shutdown()


def test_local_pool_refuses_cluster_only_options_and_missing_gpus(monkeypatch):
    with pytest.raises(ValueError, match="--address"):
        LocalPool(PoolOptions(resource="rtx4090"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    with pytest.raises(NoGPUError, match="--interpret"):
        LocalPool(PoolOptions()).launch()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert visible_gpus() == ["0", "2"]


def test_serve_keeps_a_warm_pool_that_concurrent_clients_share(tmp_path, cli_env):
    env, marker = cli_env
    started = tuner_command("serve", "--interpret", "--workers", "2", env=env)
    try:
        assert started.returncode == 0, started.stderr
        assert "serving 2 warm workers" in started.stderr
        clients = [subprocess.Popen(
            [sys.executable, "-m", "tuner", "search", "--shape", shape, "--trials", "3",
             "--interpret", "--address", "auto", "--storage", f"sqlite:///{tmp_path}/{index}.db",
             "--table", str(tmp_path / f"{index}.json")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for index, shape in enumerate(("128x64", "96x32"))]
        outputs = [client.communicate(timeout=240) for client in clients]
        for client, (_, err) in zip(clients, outputs):
            assert client.returncode == 0, err
            assert "2 workers on interpreter (the warm pool of tuner serve)" in err
        for index in range(2):
            assert load_table(tmp_path / f"{index}.json")[0].trials == 3
    finally:
        stopped = tuner_command("serve", "--stop", env=env)
    assert stopped.returncode == 0 and "stopped 2 workers" in stopped.stderr, stopped.stderr
    time.sleep(3)
    assert processes_marked(marker) == []  # the cluster serve started is gone too
