"""Fused add + LayerNorm on the GPU: torch eager, torch.compile, the seed kernel, the wrapper's
heuristic config and the best config of a small grid, in GB/s and % of copy bandwidth.

Run on a GPU machine:  python benchmarks/bench_kernel.py  (results also in $OUT/bench_kernel.json)
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton

from common import copy_bandwidth_gbps, print_table, time_ms, versions, write_json
from kernels import LaunchConfig, fused_add_layernorm, heuristic_config
from seed_kernel import fused_add_layernorm_lastdim

SHAPES = [
    (4194304, 64, torch.float32), (4194304, 64, torch.bfloat16), (128, 64, torch.float32),
    (65536, 1024, torch.bfloat16), (16384, 4096, torch.bfloat16), (4096, 16384, torch.bfloat16),
]


def grid_configs(rows: int, width: int, dtype: torch.dtype) -> list[LaunchConfig]:
    """A small grid: whole-row tiles of 1-16K elements (plus chunked tiles for wide rows)."""
    full = triton.next_power_of_2(width)
    block_ws = [full] + [w for w in (2048, 4096, 8192) if w < full and width >= 8192]
    configs = []
    for block_w, block_rows, warps, policy in itertools.product(
            block_ws, [1, 2, 4, 8, 16, 32, 64, 128], [4, 8, 16, 32], ["", "evict_last"]):
        tile = block_w * block_rows
        if not 1024 <= tile <= 16384 and not (block_rows == 1 and tile <= 65536):
            continue
        if block_rows > triton.next_power_of_2(rows) or tile < 32 * warps:
            continue
        stages = [1] if block_w >= width else [1, 2]
        configs += [LaunchConfig(block_rows, block_w, warps, s, policy) for s in stages]
    return configs


def main() -> None:
    info = versions()
    copy = copy_bandwidth_gbps()
    print(f"{info}  copy bandwidth {copy:.0f} GB/s", flush=True)
    results = []
    for rows, width, dtype in SHAPES:
        x = torch.randn(rows, width, device="cuda", dtype=dtype)
        weight = torch.randn(width, device="cuda", dtype=dtype)
        bias = torch.randn(width, device="cuda", dtype=dtype)
        sum_weight = torch.tensor(1.0, device="cuda", dtype=dtype)
        n_bytes = 2 * x.numel() * x.element_size()
        ref = F.layer_norm(x.double() + 1.0, (width,), weight.double(), bias.double())

        def eager():
            return F.layer_norm(x + sum_weight, (width,), weight, bias)
        compiled = torch.compile(eager)
        candidates = {"torch eager": eager, "torch.compile": compiled}
        if width <= 1024:
            ln = torch.nn.LayerNorm(width, device="cuda", dtype=dtype)
            ln.weight.data.copy_(weight); ln.bias.data.copy_(bias)
            candidates["seed kernel"] = lambda: fused_add_layernorm_lastdim(x, sum_weight, ln)
        heuristic = heuristic_config(rows, width, dtype)
        candidates["heuristic"] = lambda: fused_add_layernorm(x, sum_weight, width, weight, bias,
                                                              config=heuristic)
        row = {"rows": rows, "width": width, "dtype": str(dtype)[6:], "heuristic config": heuristic.key()}
        for name, fn in candidates.items():
            err = ((fn().double() - ref).norm() / ref.norm()).item()
            assert err < 2e-2, (name, err)
            row[name] = time_ms(fn)
        grid = []
        for config in grid_configs(rows, width, dtype):
            fn = lambda: fused_add_layernorm(x, sum_weight, width, weight, bias, config=config)
            try:
                err = ((fn().double() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    raise AssertionError(f"relative error {err}")
                grid.append((time_ms(fn), config.key()))
            except Exception as error:  # a config that cannot run is skipped, not fatal
                print(f"  {config.key()}: {type(error).__name__}: {str(error)[:120]}")
        grid.sort()
        row["best grid"], row["best config"] = grid[0]
        row["grid"] = grid
        row["gbps"] = {name: n_bytes / row[name] / 1e6 for name in list(candidates) + ["best grid"]}
        results.append(row)
        print(f"{rows}x{width} {row['dtype']}: best {row['best config']} {row['gbps']['best grid']:.0f} GB/s,"
              f" heuristic {row['heuristic config']} {row['gbps']['heuristic']:.0f} GB/s, "
              f"{len(grid)} configs", flush=True)
    write_json("bench_kernel.json", {"versions": info, "copy_gbps": copy, "results": results})
    names = ["torch eager", "torch.compile", "seed kernel", "heuristic", "best grid"]
    table = []
    for row in results:
        cells = [f"{row['rows']}x{row['width']} {row['dtype']}"]
        for name in names:
            if name not in row["gbps"]:
                cells.append("-")
            elif row["rows"] * row["width"] < 1 << 20:
                cells.append(f"{row[name] * 1000:.1f}us")
            else:
                cells.append(f"{row['gbps'][name]:.0f} ({100 * row['gbps'][name] / copy:.0f}%)")
        cells.append(row["best config"])
        cells.append(f"{row['best grid'] / row['heuristic']:.2f}")
        table.append(cells)
    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}; copy {copy:.0f} GB/s; GB/s (% of copy)")
    print_table(["shape"] + names + ["best config", "heur/best"], table)


if __name__ == "__main__":
    main()
