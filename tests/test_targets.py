"""Compiling for a GPU target without a GPU (kernels.targets), as the tuner's compile processes
do: the kernel lands in Triton's disk cache under the key that the next compile of the same
launch looks up, and a launch in such a process fails with a clear error. Runs Triton's real
compiler (no interpreter) in subprocesses; needs ptxas, no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Compiles one add_layernorm config for sm_90 through tuner's compile path, then tries a launch;
# prints whether Triton found the compile in its cache and the launch's error.
SCRIPT = """
import json, torch
from triton import knobs
from kernels.targets import GPUTarget, compile_only_for
from tuner.problems import get_kernel
from kernels import ADD_LAYERNORM, LaunchConfig

hits = []
knobs.compilation.listener = lambda **info: hits.append(info["cache_hit"])
compile_only_for(GPUTarget("cuda", 90, 32))
spec = get_kernel("add_layernorm")
problem = spec.problem("1000x200", "bfloat16")
spec.compile(problem, LaunchConfig(block_rows=2, block_w=256, num_warps=2), device="cpu")
compiled = list(hits)
x = torch.randn(1000, 200).to(torch.bfloat16)
try:  # the launcher itself, past the wrappers' check that x is on a GPU
    ADD_LAYERNORM.launch(x, torch.empty_like(x), None, None, None, 0.5, 1000, 200, 1e-5,
                         LaunchConfig(block_rows=2, block_w=256, num_warps=2))
    error = None
except AttributeError as caught:
    error = str(caught)
print(json.dumps({"hits": compiled, "error": error}))
"""


def run_compile_only(cache: Path) -> dict:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    if "ptxas" in result.stderr and result.returncode:
        pytest.skip("no ptxas for Triton's CUDA backend")
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_compile_for_a_target_is_found_by_the_next_process(tmp_path):
    first = run_compile_only(tmp_path)
    assert first["hits"] == [False]  # compiled, not found
    assert list(tmp_path.iterdir()), "nothing written to Triton's cache"
    second = run_compile_only(tmp_path)
    assert second["hits"] == [True]  # the same key: found in the cache


def test_a_compile_only_process_refuses_to_launch(tmp_path):
    error = run_compile_only(tmp_path)["error"]
    assert error is not None and "only compiles" in error and "arch=90" in error
