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
