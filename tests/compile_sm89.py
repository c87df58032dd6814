"""Compiles the default config of every shipped kernel for an sm_89 GPU (RTX 4090) without
a GPU, and prints one JSON object per kernel launch: registers, spills and shared memory.

Run by tests/test_sm89.py in a subprocess: it must run without TRITON_INTERPRET (the
interpreter replaces @triton.jit kernels with Python). The launch arguments are recorded from
each kernel's own launcher, so the compiled kernel is exactly what a launch would run.
Compiled kernels land in Triton's on-disk cache: a second run only reads them back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402

import kernels._pool_gelu as pool_gelu  # noqa: E402
import kernels.add_layernorm as add_layernorm  # noqa: E402
import kernels.add_layernorm_pool_gelu as tail  # noqa: E402
import kernels.conv_transpose_tail as conv_tail  # noqa: E402
from kernels import (  # noqa: E402
    ADD_LAYERNORM,
    ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
    CONV_TRANSPOSE_TAIL,
    ConvTailCall,
    PoolGeluCall,
)
from kernels.defaults import DeviceProperties  # noqa: E402
from kernels.model import REFERENCE_INPUT_SHAPE  # noqa: E402
from kernels.targets import GPUTarget, compile_only_for  # noqa: E402

TARGET = GPUTarget("cuda", 89, 32)
RTX4090 = DeviceProperties(name="NVIDIA GeForce RTX 4090", sm_count=128, max_threads_per_sm=1536,
                           registers_per_sm=65536, shared_memory_per_block=101376,
                           l2_bytes=72 << 20, dram_gbps=1008.0, max_programs_per_sm=24,
                           capability=(8, 9))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYERNORM_WIDTHS = (30, 64, 477, 768, 4096, 5000, 8192, 11267, 16384, 20480, 45288, 65536)
# The tail's input: the reference conv output, [N, C_out, 2D, 2H, 2W].
N, C_IN, D, H, W = REFERENCE_INPUT_SHAPE
C_OUT = 64
TAIL_SHAPE = (N, C_OUT, 2 * D, 2 * H, 2 * W)


def ptxas() -> str | None:
    """The ptxas Triton would use, if any."""
    try:
        from triton import knobs
        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(bundled) if bundled.exists() else shutil.which("ptxas")


class Recorder:
    """Stands in for a @triton.jit kernel: keeps the arguments of a launch or warm-up."""

    def __init__(self, fn, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.fn, args, meta))

    def warmup(self, *args, grid, **meta):
        self.calls.append((self.fn, args, meta))


def record_launches() -> list[tuple[str, object, tuple, dict]]:
    """(label, kernel, args, meta) of the default-config launch of every case."""
    cases = []
    for module, name in ((add_layernorm, "_add_layernorm_kernel"),
                         (tail, "_add_layernorm_pool_gelu_kernel"),
                         (tail, "_add_layernorm_pool_gelu_cl_kernel"),
                         (conv_tail, "_conv_transpose_tail_kernel")):
        calls: list = []
        setattr(module, name, Recorder(getattr(module, name), calls))
        module.__dict__.setdefault("_recorded", {})[name] = calls
    # The defaults an RTX 4090 gets: every module that asks for the device's properties.
    for module in (add_layernorm, pool_gelu, conv_tail):
        module.device_properties = lambda device=None: RTX4090

    def take(module, name, label):
        fn, args, meta = module._recorded[name].pop()
        cases.append((label, fn, args, meta))

    for dtype_name, dtype in DTYPES.items():
        # 64 MB of rows, and fewer rows than SMs (a program each)
        for width, rows in ((width, rows) for width in LAYERNORM_WIDTHS
                            for rows in (max(1, (64 << 20) // (width * dtype.itemsize)), 100)):
            call = ADD_LAYERNORM.call_for_shape((rows, width), dtype)
            config = ADD_LAYERNORM.default_config(call, RTX4090.name)
            ADD_LAYERNORM.compile(call, config, device="cpu")
            take(add_layernorm, "_add_layernorm_kernel",
                 f"add_layernorm {rows}x{width} {dtype_name} {config.key()}")
    for dtype_name in ("float32", "bfloat16"):
        dtype = DTYPES[dtype_name]
        for descriptor, name in ((ADD_LAYERNORM_POOL_GELU, "_add_layernorm_pool_gelu_kernel"),
                                 (ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
                                  "_add_layernorm_pool_gelu_cl_kernel")):
            call = PoolGeluCall(TAIL_SHAPE, dtype, sum_weight_dtype=dtype)
            config, _ = descriptor.select(call, RTX4090.name)
            descriptor.compile(call, config, device="cpu")
            take(tail, name, f"{descriptor.name.replace('_channels_last', ' channels_last')} "
                             f"{'x'.join(map(str, TAIL_SHAPE))} {dtype_name} {config.key()}")
        call = ConvTailCall(REFERENCE_INPUT_SHAPE, C_OUT, dtype, sum_weight_dtype=dtype)
        config, _ = CONV_TRANSPOSE_TAIL.select(call, RTX4090.name)
        CONV_TRANSPOSE_TAIL.compile(call, config, device="cpu")
        take(conv_tail, "_conv_transpose_tail_kernel",
             f"conv_transpose_tail {'x'.join(map(str, REFERENCE_INPUT_SHAPE))} {dtype_name} "
             f"{config.key()}")
    return cases


def compile_for_sm89(fn, args: tuple, meta: dict):
    """One launch compiled for :data:`TARGET` through Triton's own JIT path (the process
    compiles only: :func:`kernels.targets.compile_only_for`)."""
    compile_only_for(TARGET)
    return fn.warmup(*args, grid=(1,), **meta)


def resources(compiled, ptxas_path: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` on the kernel's PTX, shared memory from
    Triton's metadata (a CompiledKernel only reads them from the driver, with a GPU)."""
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([ptxas_path, "-v", f"--gpu-name=sm_{TARGET.arch}", str(ptx),
                                 "-o", str(Path(folder) / "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = [int(value) for value in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    metadata = compiled.metadata
    shared = metadata["shared"] if isinstance(metadata, dict) else metadata.shared
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": sum(spills), "shared": shared,
            "num_warps": metadata["num_warps"] if isinstance(metadata, dict) else metadata.num_warps}


def main() -> int:
    path = ptxas()
    if path is None:
        print(json.dumps({"skip": "ptxas not found (Triton's bundled one, TRITON_PTXAS_PATH "
                                  "or PATH)"}))
        return 0
    for label, fn, args, meta in record_launches():
        compiled = compile_for_sm89(fn, args, meta)
        print(json.dumps({"case": label, **resources(compiled, path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
