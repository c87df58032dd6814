"""Registers, spills and shared memory of the whole-model kernel (kernels/conv_transpose_tail.py)
for sm_90, compiled without a GPU (Triton's own toolchain) and read with cuobjdump.

    python benchmarks/resources_conv_tail.py [DTYPE:WARPS:BLOCK_CO:BLOCK_M ...]   (default: a small grid)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
warnings.filterwarnings("ignore")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from common import print_table  # noqa: E402
import kernels.conv_transpose_tail as conv_tail  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SCALARS = {"sum_weight_value": "fp32", "c_in": "i32", "c_out": "i32", "in_d": "i32", "in_h": "i32",
           "in_w": "i32", "co_blocks": "i32", "h_blocks": "i32", "eps": "fp32"}


def resources(dtype: str, warps: int, block_co: int, block_m: int) -> list:
    fn = conv_tail._conv_transpose_tail_kernel
    constants = dict(BLOCK_CI=32, BLOCK_CO=block_co, BLOCK_M=block_m, ROW_W=32, HAS_CONV_BIAS=True,
                     HAS_LN_WEIGHT=True, HAS_LN_BIAS=True, SUM_FROM_PTR=True, APPROX_TANH=False,
                     DOT_PRECISION="tf32", DOT_IN_FLOAT32=False, EVICTION_POLICY="", INDEX_64=False,
                     EXACT_CHANNELS=True)
    signature = {name: SCALARS.get(name, f"*{dtype}") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": 1})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", handle.name],
                           capture_output=True, text=True).stdout
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    return [dtype, warps, block_co, block_m, fields.get("REG"), fields.get("STACK"), compiled.metadata.shared]


def main() -> None:
    specs = sys.argv[1:] or [f"{d}:{w}:64:{m}" for d in ("fp32", "bf16") for w in (2, 4, 8)
                             for m in (32, 64)]
    rows = [resources(dtype, int(warps), int(block_co), int(block_m))
            for dtype, warps, block_co, block_m in (spec.split(":") for spec in specs)]
    print(f"triton {triton.__version__}, sm_90, W_in 32, C_in 32")
    print_table(["dtype", "warps", "channels", "W positions", "registers", "stack (spills)", "shared bytes"], rows)


if __name__ == "__main__":
    main()
