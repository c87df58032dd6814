"""Every test runs Triton kernels through the CPU interpreter; set before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("TUNER_TABLE", None)

import tempfile

# Keep the user's own tuned table out of the tests.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tuner-test-data-")

import random
import shutil
import socket
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session, with logical GPUs (shared by test files).

    The interpreter-mode workers run on these logical GPUs; the machine's CPUs are few, so
    every test that needs Ray reuses this instance instead of starting its own.
    """
    import ray

    started = False
    if not ray.is_initialized():
        # address="local": always a fresh instance, never one already running on the machine
        # (ray.init() without an address joins any local cluster it finds).
        ray.init(address="local", num_gpus=4, num_cpus=4, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def no_tables(monkeypatch, tmp_path):
    """No tuned table may leak in: configs come from the heuristic unless a test passes one."""
    from kernels import reload_tables

    monkeypatch.delenv("TUNER_TABLE", raising=False)
    monkeypatch.delenv("TUNER_DEVICE_NAME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setattr("kernels.table.SHIPPED_TABLES_DIR", tmp_path / "shipped")
    reload_tables()
    yield
    reload_tables()


@pytest.fixture
def launch_grids(monkeypatch):
    """``launch_grids(module, name)`` wraps the ``@triton.jit`` kernel ``module.name`` so that
    each launch still runs and its grid is appended to the returned list."""
    def spy(module, name: str) -> list:
        grids, kernel = [], getattr(module, name)

        class Spy:
            def __getitem__(self, grid):
                grids.append(grid)
                return kernel[grid]

        monkeypatch.setattr(module, name, Spy())
        return grids
    return spy


# -- storages: SQLite, and a throwaway PostgreSQL server ------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server, run as the ``postgres`` user (it refuses root)."""
    if not shutil.which("initdb") or not shutil.which("runuser"):
        pytest.skip("PostgreSQL is not installed")
    folder = Path(tempfile.mkdtemp(prefix="tuner-pg-"))
    shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"

    def as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, timeout=120)

    as_postgres("initdb", "-A", "trust", "-U", "postgres", "-D", str(data))
    as_postgres("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                f"-p {port} -k {folder} -h 127.0.0.1", "start")
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    as_postgres("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/claims.db"
    database = f"t{random.getrandbits(32)}"  # a fresh database per test
    server = request.getfixturevalue("postgres")
    engine = __import__("sqlalchemy").create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {database}")
    engine.dispose()
    return server.rsplit("/", 1)[0] + f"/{database}"
