"""Every test runs Triton kernels through the CPU interpreter; set before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("TUNER_TABLE", None)

import tempfile

# Keep the user's own tuned table out of the tests.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tuner-test-data-")

import glob
import pwd
import random
import shutil
import socket
import subprocess

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


def _server_binaries() -> str | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's versioned folders."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    return None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (run as the user ``postgres`` when the tests
    run as root, which it refuses); its URL for SQLAlchemy. Skips when it cannot be had."""
    pytest.importorskip("psycopg", reason="psycopg (3) is not installed: the [postgres] extra")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                    "/usr/lib/postgresql/*/bin")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="tuner-pg-")
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no user 'postgres' to run PostgreSQL as")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), free_port()

    def run(*command: str) -> None:
        done = subprocess.run(as_user + [os.path.join(binaries, command[0]), *command[1:]],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log_path = os.path.join(root, "log")
            log = open(log_path).read() if os.path.exists(log_path) else ""
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr}{log}")

    run("initdb", "-D", data, "-U", "tuner", "--auth=trust", "--no-sync", "-E", "UTF8")
    run("pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o",
        f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50", "start")
    try:
        yield f"postgresql+psycopg://tuner@127.0.0.1:{port}/postgres"
    finally:
        run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


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
