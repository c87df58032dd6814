"""Faults the tuner must survive or refuse cleanly: an unreachable cluster, concurrent drivers on
one storage, dead drivers' claims, unwritable storages and tables, problems too large for the
device, a mistyped storage on export, a driver killed with SIGKILL and resumed, and a crash in
the middle of a table write. Kernels run through the Triton interpreter on a local Ray cluster."""

from __future__ import annotations

import io
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from kernels import LaunchConfig, TableEntry, load_table, merge_entries
from tuner import cli
from tuner.claims import HOST
from tuner.driver import Driver, Progress
from tuner.measure import Measurement
from tuner.preflight import PreflightError, check_fits, connect_deadline, parse_address
from tuner.problems import get_kernel
from tuner.space import parse_space
from tuner.storage import StorageError, open_storage
from tuner.study import Settings, StudyRun, study_name
from tuner.local import descendants
from tuner.workers import PoolOptions, WorkerPool

ROOT = Path(__file__).resolve().parents[1]
SPEC = get_kernel("add_layernorm")
PROBLEM = SPEC.problem("128x64", "float32")
SPACE_YAML = ("kernel: add_layernorm\nrestrictions: {}\nparameters:\n  block_rows: [2, 4]\n"
              "  block_w: [64]\n  num_warps: [1, 2]\n  num_stages: [1]\n  eviction_policy: ['']\n")
SPACE = parse_space(yaml.safe_load(SPACE_YAML))  # 4 configs: few trials keep these tests short
CONFIGS = sorted(config.key() for config in SPACE.candidates(SPEC.table_key(PROBLEM)))


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def measured(url: str, problem=PROBLEM) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=study_name(problem, "interpreter"), storage=url)
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("measured")]


def cli_error(argv: list[str], capsys) -> str:
    """Runs the CLI expecting exit status 2; returns its stderr, which must be one line."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tuner: error: ") and err.count("\n") == 1, err
    return err


# -- an unreachable --address --------------------------------------------------------------------
def test_unreachable_address_exits_2_within_the_connect_timeout(tmp_path, capsys):
    started = time.monotonic()
    err = cli_error(["search", "--shape", "128x64", "--interpret", "--address",
                     "192.0.2.123:6379", "--connect-timeout", "1",
                     "--storage", f"sqlite:///{tmp_path}/t.db", "--table", str(tmp_path / "t.json")],
                    capsys)
    assert time.monotonic() - started < 10
    assert "cannot reach the Ray cluster at 192.0.2.123:6379" in err


def test_a_port_that_is_no_ray_head_exits_2_within_the_connect_timeout(tmp_path):
    with socket.socket() as listener:  # accepts connections, never speaks Ray
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "tuner", "search", "--shape", "128x64", "--interpret",
             "--address", address, "--connect-timeout", "3", "--storage",
             f"sqlite:///{tmp_path}/t.db", "--table", str(tmp_path / "t.json")],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"tuner: error: the Ray cluster at {address} did not "
                                    "answer within 3 s") and result.stderr.count("\n") == 1
    assert time.monotonic() - started < 60


def test_output_held_during_a_connect_is_shown_when_it_ends(capfd):
    with pytest.raises(RuntimeError):
        with connect_deadline("10.0.0.1:6379", 60):
            os.write(2, b"ray: warning while connecting\n")
            assert capfd.readouterr().err == ""
            raise RuntimeError("connection refused")
    assert capfd.readouterr().err == "ray: warning while connecting\n"


@pytest.mark.parametrize("address,parsed", [("local", None), ("auto", None),
                                            ("10.0.0.1:6380", ("10.0.0.1", 6380)),
                                            ("ray://head:10001", ("head", 10001)),
                                            ("head", ("head", 6379)), ("[::1]:7000", ("::1", 7000))])
def test_parse_address(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", [":6379", "host:0", "host:99999", "host:port", "[::1]:x"])
def test_bad_address_is_a_clear_error(address):
    with pytest.raises(PreflightError, match="bad --address"):
        parse_address(address)


# -- concurrent drivers on one storage ------------------------------------------------------------
def test_concurrent_drivers_split_a_study_and_measure_nothing_twice(ray_cluster, tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    settings = Settings(trials=4, confirm_top=1, confirm_rounds=1)
    results, errors, pools = {}, [], [WorkerPool(PoolOptions(workers=1, interpret=True))
                                      for _ in range(2)]

    def drive(index: int) -> None:
        try:
            pools[index].start()
            driver = Driver(pools[index], url, settings, lambda d: tmp_path / f"t{index}.json",
                            space=SPACE, progress=Progress(stream=io.StringIO()))
            results[index] = driver.run([PROBLEM])
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=drive, args=(index,)) for index in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    finally:
        for pool in pools:
            pool.shutdown()
    assert not errors, errors
    configs = sorted(t.user_attrs["config"] for t in measured(url))
    assert configs == CONFIGS, f"each config measured once: {configs}"
    # Both results stand for all four trials, whichever driver measured them.
    assert all(results[index][0].trials == 4 for index in range(2))
    study = optuna.load_study(study_name=study_name(PROBLEM, "interpreter"), storage=url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


def test_new_sqlite_storage_opened_by_many_at_once(tmp_path):
    url = f"sqlite:///{tmp_path}/new.db"
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_it() -> None:
        try:
            barrier.wait()
            storage = open_storage(url)
            optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def claim_by(storage, owner: str, config: LaunchConfig) -> None:
    """A RUNNING claim of ``config`` (with a heartbeat) as another driver would leave it."""
    run = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, storage, Settings(trials=8))
    frozen = run._frozen(config, None, {"config": config.key(), "claim": owner},
                         TrialState.RUNNING)
    trial_id = run.storage.create_new_trial(run.claims.study_id, template_trial=frozen)
    run.storage.record_heartbeat(trial_id)
    run.claims.close()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def propose_all(run: StudyRun) -> list[str]:
    keys = []
    while (config := run.ask()) is not None:
        keys.append(config.key())
        run.tell(config, Measurement(config.key(), ms=1.0), "test")
    return keys


@pytest.mark.parametrize("owner", ["closed", "dead pid"])
def test_claims_of_a_dead_driver_on_this_host_expire_at_once(tmp_path, owner):
    url = f"sqlite:///{tmp_path}/t.db"
    config = SPACE.candidates(SPEC.table_key(PROBLEM))[0]
    if owner == "closed":  # a driver of this process that died without releasing its claims
        dead = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=8))
        dead.enqueue(config)
        assert dead.ask() == config
        dead.claims.close()
    else:
        claim_by(url, f"{HOST}/{dead_pid()}/token", config)
    resumed = StudyRun(SPEC, PROBLEM, "interpreter", SPACE, url, Settings(trials=8))
    assert not resumed.others and not resumed.waiting
    keys = propose_all(resumed)
    assert sorted(keys) == sorted(c.key() for c in SPACE.candidates(SPEC.table_key(PROBLEM)))
    study = optuna.load_study(study_name=study_name(PROBLEM, "interpreter"), storage=url)
    [expired] = [t for t in study.trials if not t.user_attrs.get("measured")]
    assert expired.state == TrialState.FAIL and expired.user_attrs["released"].startswith("expired")


# -- unwritable storage or table ---------------------------------------------------------------
def test_unwritable_storage_and_table_are_refused_before_any_trial(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    good_table, good_url = str(tmp_path / "t.json"), f"sqlite:///{tmp_path}/t.db"
    base = ["search", "--shape", "128x64", "--interpret"]
    err = cli_error(base + ["--storage", f"sqlite:///{blocker}/t.db", "--table", good_table], capsys)
    assert f"{blocker} is a file, not a folder" in err
    err = cli_error(base + ["--storage", good_url, "--table", str(blocker / "t.json")], capsys)
    assert "table" in err and "is a file, not a folder" in err
    (tmp_path / "corrupt.json").write_text("{")
    err = cli_error(base + ["--storage", good_url, "--table", str(tmp_path / "corrupt.json")], capsys)
    assert "not valid JSON" in err


def test_read_only_folder_is_refused_for_a_regular_user():
    """As root nothing is read-only, so the check runs in a child process as ``nobody``."""
    base = Path(tempfile.mkdtemp(prefix="tuner-ro-"))
    folder = base / "ro"
    folder.mkdir()
    (folder / "t.db").write_bytes(b"")
    os.chmod(base, 0o755)
    os.chmod(folder, 0o555)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no Ray, only the check
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_storage(f"sqlite:///{folder}/t.db")
                message = "no error"
            except StorageError as error:
                message = str(error)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)  # a child forked beside threads may hang
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read) as pipe:
        message = pipe.read() if ready else "the child hung"
    os.waitpid(pid, 0)
    shutil.rmtree(base)
    assert f"cannot write in folder {folder}: Permission denied" in message


# -- problems too large, a mistyped storage, no table written ----------------------------------
def test_problem_too_large_is_refused_with_the_bytes_it_needs(tmp_path, capsys):
    err = cli_error(["search", "--shape", "99999999999x64", "--interpret", "--storage",
                     f"sqlite:///{tmp_path}/t.db", "--table", str(tmp_path / "t.json")], capsys)
    assert "needs at least" in err and "51199999999488 bytes" in err
    assert not (tmp_path / "t.db").exists()
    with pytest.raises(PreflightError, match=r"more than the 80 GiB of NVIDIA H100"):
        check_fits([SPEC.problem("1000000000x64", "float32")], {"NVIDIA H100": 80 << 30})
    check_fits([PROBLEM], {"NVIDIA H100": 80 << 30})


def test_export_of_a_missing_storage_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = cli_error(["export", "--storage", "sqlite:///typo.db", "--out", "x.json"], capsys)
    assert "no such database file typo.db" in err
    assert not (tmp_path / "typo.db").exists() and not (tmp_path / "x.json").exists()
    with pytest.raises(StorageError, match="no such database file"):
        open_storage(f"sqlite:///{tmp_path}/nope.db", readonly=True)


def test_no_table_line_when_no_table_was_written(tmp_path, capsys):
    # Every config of this space fails: the tail kernel keeps whole rows, W = 32 > block_w.
    space = tmp_path / "failing.yaml"
    space.write_text("kernel: add_layernorm_pool_gelu\nrestrictions: {}\nparameters:\n"
                     "  block_rows: [1, 2]\n  block_w: [16]\n  num_warps: [1]\n"
                     "  num_stages: [1]\n  eviction_policy: ['']\n")
    code = cli.main(["search", "--kernel", "add_layernorm_pool_gelu", "--shape", "1x1x2x2x32",
                     "--space", str(space), "--interpret", "--trials", "2", "--workers", "1",
                     "--storage", f"sqlite:///{tmp_path}/t.db", "--table", str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert code == 1 and "no result for" in err and "2 failed trials" in err
    assert "block_w=16 is less than the row width 32" in err
    assert "table for" not in err and not (tmp_path / "t.json").exists()


# -- a driver killed with SIGKILL mid-search, then resumed -----------------------------------------
def test_driver_sigkilled_mid_search_leaves_no_ray_behind_and_resumes(ray_cluster, tmp_path):
    url = f"sqlite:///{tmp_path}/k.db"
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE_YAML)
    driver = subprocess.Popen(
        [sys.executable, "-m", "tuner", "search", "--shape", "128x64", "--interpret", "--trials",
         "4", "--workers", "1", "--space", str(space_file), "--storage", url,
         "--table", str(tmp_path / "t.json")],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if (tmp_path / "k.db").exists():
                try:
                    if measured(url):
                        break
                except KeyError:  # the study is not created yet
                    pass
        ray_processes = descendants(driver.pid)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = {t.user_attrs["config"] for t in measured(url)}
    assert 1 <= len(before) < 4
    # Its Ray instance (GCS, raylet and their agents) goes with it.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in ray_processes):
        time.sleep(0.5)
    left = [p for p in ray_processes if Path(f"/proc/{p}/stat").exists()
            and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
    assert not left, f"processes left behind: {left}"

    pool = WorkerPool(PoolOptions(workers=1, interpret=True))
    try:
        pool.start()
        [result] = Driver(pool, url, Settings(trials=4, confirm_top=1, confirm_rounds=1),
                          lambda d: tmp_path / "t.json", space=SPACE,
                          progress=Progress(stream=io.StringIO())).run([PROBLEM])
    finally:
        pool.shutdown()
    configs = [t.user_attrs["config"] for t in measured(url)]
    assert sorted(configs) == CONFIGS and before <= set(configs)
    assert result.trials == 4 and load_table(tmp_path / "t.json")[0].config == result.config
    study = optuna.load_study(study_name=study_name(PROBLEM, "interpreter"), storage=url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


# -- a crash in the middle of a table write ------------------------------------------------------
def entry(rows: int) -> TableEntry:
    return TableEntry(kernel="add_layernorm", device="interpreter", dtype="float32", width=64,
                      rows=rows, config=LaunchConfig(block_rows=4, block_w=64, num_warps=2))


def test_table_write_killed_midway_leaves_the_previous_table(tmp_path):
    table = tmp_path / "t.json"
    merge_entries(table, [entry(128)])
    before = table.read_text()
    code = ("import os, signal, kernels.table as t\n"
            "real = t.json.dump\n"
            "def dump(document, handle, **kw):\n"
            "    handle.write('{\"schema_version\": 1, \"entr'); handle.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "t.json.dump = dump\n"
            f"t.merge_entries({str(table)!r}, [])\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert table.read_text() == before and [e.rows for e in load_table(table)] == [128]
    merge_entries(table, [entry(256)])  # the lock died with its holder: the next write proceeds
    assert [e.rows for e in load_table(table)] == [128, 256]
