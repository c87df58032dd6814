"""sm_89 (RTX 4090) readiness without a 4090: the default config of every shipped kernel,
compiled by Triton for an sm_89 target, neither spills registers nor needs more shared memory
than a block may have there (99 KB). Compiling needs ptxas, no GPU; it runs in a subprocess
because this test session runs Triton through the interpreter (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SM89_SHARED_PER_BLOCK = 99 * 1024


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(REPO / "tests" / "compile_sm89.py")], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if records and "skip" in records[0]:
        pytest.skip(records[0]["skip"])
    return records


def test_every_kernel_compiled(compiled):
    kernels = {record["case"].split()[0] for record in compiled}
    assert kernels == {"add_layernorm", "add_layernorm_pool_gelu", "conv_transpose_tail"}
    assert any("channels_last" in record["case"] for record in compiled)
    assert len(compiled) >= 27 + 6


def test_defaults_do_not_spill(compiled):
    spilling = [record for record in compiled if record["spill_bytes"]]
    assert not spilling, spilling


def test_defaults_fit_shared_memory(compiled):
    too_big = [record for record in compiled if record["shared"] > SM89_SHARED_PER_BLOCK]
    assert not too_big, too_big


def test_registers_within_the_register_file(compiled):
    for record in compiled:
        assert record["registers"] * 32 * record["num_warps"] <= 65536, record
