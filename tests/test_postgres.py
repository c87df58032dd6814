"""``--storage postgresql://...`` against a real PostgreSQL server started on loopback for these
tests: drivers opening a fresh database together, and two ``tuner sweep`` drivers run at once on
one storage, both finishing with studies, table and report that agree."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import optuna
import pytest
from optuna.trial import TrialState

from kernels import load_table
from tuner.report import write_report
from tuner.storage import open_storage

SHAPES = ("32x16", "16x32")
TRIALS = 3


def _server_binaries() -> str | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's versioned folders."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1; skips when it cannot be had."""
    pytest.importorskip("psycopg", reason="psycopg (3) is not installed: the [postgres] extra")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                    "/usr/lib/postgresql/*/bin")
    # PostgreSQL refuses to run as root: as root, run it as the user postgres.
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="tuner-pg-")
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no user 'postgres' to run PostgreSQL as")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()

    def run(*command: str) -> None:
        done = subprocess.run(as_user + [os.path.join(binaries, command[0]), *command[1:]],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = open(os.path.join(root, "log")).read() if os.path.exists(os.path.join(root, "log")) else ""
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr}{log}")

    run("initdb", "-D", data, "-U", "tuner", "--auth=trust", "--no-sync", "-E", "UTF8")
    run("pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o",
        f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50", "start")
    try:
        yield f"postgresql://tuner@127.0.0.1:{port}/postgres"
    finally:
        run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_drivers_opening_a_fresh_database_together_all_succeed(postgres_url):
    """Optuna creates its tables on first use; drivers racing to do so must all get a storage."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE DATABASE fresh")
    url = postgres_url.rsplit("/", 1)[0] + "/fresh"
    errors: list[str] = []

    def open_one() -> None:
        try:
            open_storage(url)
        except Exception as error:  # collected: an exception in a thread would be lost
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_two_concurrent_sweeps_on_one_postgres_storage(ray_cluster, postgres_url, tmp_path):
    out = tmp_path / "tables"
    argv = [sys.executable, "-m", "tuner", "sweep", "--shapes", ",".join(SHAPES),
            "--dtypes", "float32", "--trials", str(TRIALS), "--interpret", "--workers", "1",
            "--storage", postgres_url, "--out", str(out), "--json", "--quiet",
            "--address", ray_cluster.get_runtime_context().gcs_address]
    drivers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [driver.communicate(timeout=300) for driver in drivers]
    for driver, (stdout, stderr) in zip(drivers, outputs):
        assert driver.returncode == 0, stderr
        document = json.loads(stdout)
        assert document["unfinished"] == []
        assert sorted(result["problem"]["shape"] for result in document["results"]) == [[16, 32], [32, 16]]

    entries = {(entry.rows, entry.width): entry for entry in load_table(out / "interpreter.json")}
    assert sorted(entries) == [(16, 32), (32, 16)]
    for shape in SHAPES:
        study = optuna.load_study(study_name=f"add_layernorm:interpreter:float32:{shape}",
                                  storage=postgres_url)
        measured = [trial for trial in study.get_trials() if trial.user_attrs.get("measured")]
        assert len({trial.user_attrs["config"] for trial in measured}) >= TRIALS
        assert all(trial.state == TrialState.COMPLETE for trial in measured)
        rows, width = map(int, shape.split("x"))
        entry = entries[(rows, width)]
        assert (entry.kernel, entry.device, entry.dtype) == ("add_layernorm", "interpreter", "float32")
        # The winner is a config one of the drivers measured correct on this study.
        assert entry.config.key() in {trial.user_attrs["config"] for trial in measured}
        assert study.user_attrs["result"]["problem"]["shape"] == [rows, width]

    pages = write_report(postgres_url, tmp_path / "report")
    assert len(pages) == len(SHAPES)
