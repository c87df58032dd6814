"""``--storage postgresql://...`` against a real PostgreSQL server started on loopback for these
tests: drivers opening a fresh database together, and two ``tuner sweep`` drivers run at once on
one storage, both finishing with studies, table and report that agree."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import optuna
import pytest
from optuna.trial import TrialState

from kernels import load_table
from tuner.report import write_report
from tuner.storage import open_storage

SHAPES = ("32x16", "16x32")
TRIALS = 3


@pytest.fixture(scope="module")
def postgres_url(postgres):
    """The test server's URL as a user writes it (the driver is found by tuner.storage)."""
    return postgres.replace("postgresql+psycopg://", "postgresql://")


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
