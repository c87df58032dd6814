"""Per-call host overhead of the runtime wrapper: validation plus the cached config lookup,
with the kernel launch itself stubbed out (what the wrapper adds on top of Triton's launch).
Runs on any machine, no GPU needed.

    python benchmarks/bench_overhead.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors are accepted; nothing is launched

import torch  # noqa: E402

from common import print_table  # noqa: E402
import kernels.add_layernorm as add_layernorm  # noqa: E402


def per_call_us(fn, calls: int = 20000) -> float:
    for _ in range(100):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    add_layernorm.ADD_LAYERNORM.launch = lambda *args, **kwargs: None  # the wrapper, not the kernel
    x = torch.randn(4096, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    sum_weight = torch.tensor(1.0)
    out = torch.empty_like(x)
    rows = [
        ["fused_add_layernorm (table/heuristic lookup)",
         per_call_us(lambda: add_layernorm.fused_add_layernorm(x, sum_weight, 64, weight, bias))],
        ["fused_add_layernorm(out=...)",
         per_call_us(lambda: add_layernorm.fused_add_layernorm(x, sum_weight, 64, weight, bias, out=out))],
        ["select_config (cached)",
         per_call_us(lambda: add_layernorm.select_config(4096, 64, torch.float32, "interpreter"))],
        ["torch.empty_like (for scale)", per_call_us(lambda: torch.empty_like(x))],
    ]
    print(f"torch {torch.__version__}, host CPU")
    print_table(["call", "us per call"], [[name, f"{us:.2f}"] for name, us in rows])


if __name__ == "__main__":
    main()
