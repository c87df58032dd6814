"""Replays the add+LayerNorm default against exhaustive grids already measured: for every shape
of each ``bench_exhaustive.py`` result file, the default's time over the best config's, both
read from the grid (no GPU needed; the device's properties are given by name).

    python benchmarks/replay_default.py --device h100 results/bench_exhaustive_h100_seed20261128.json ...
"""

from __future__ import annotations

import argparse
import json

from common import print_table

from kernels.defaults import DeviceProperties, add_layernorm_default

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
DEVICES = {
    "h100": DeviceProperties("NVIDIA H100 80GB HBM3", 132, 2048, 65536, 232448, 50 << 20,
                             3352.0, 32, (9, 0)),
    "h200": DeviceProperties("NVIDIA H200", 132, 2048, 65536, 232448, 60 << 20, 4800.0, 32,
                             (9, 0)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100")
    parser.add_argument("grids", nargs="+", help="bench_exhaustive.py JSON files")
    args = parser.parse_args()
    rows_out, worst = [], 0.0
    for path in args.grids:
        for shape, result in json.load(open(path))["shapes"].items():
            dims, dtype = shape.split()
            rows, width = map(int, dims.split("x"))
            times = {c["config"]: c["ms"] for c in result["configs"] if c["error"] is None and c["ms"]}
            best = min(times, key=times.get)
            default = add_layernorm_default(rows, width, ITEMSIZE[dtype], DEVICES[args.device]).key()
            ratio = times[default] / times[best] if default in times else float("nan")
            worst = max(worst, ratio)
            rows_out.append([shape, default, best, f"{ratio:.2f}"])
    print_table(["shape", "default", "best in grid", "default / best"], rows_out)
    print(f"worst default / best: {worst:.2f}")


if __name__ == "__main__":
    main()
