"""Every test runs Triton kernels through the CPU interpreter; set before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("TUNER_TABLE", None)

import tempfile

# Keep the user's own tuned table out of the tests.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tuner-test-data-")

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
