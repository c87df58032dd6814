"""Every test runs Triton kernels through the CPU interpreter; set before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("TUNER_TABLE", None)

import tempfile

# Keep the user's own tuned table out of the tests.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tuner-test-data-")
