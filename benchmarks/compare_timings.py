"""The same configs timed four ways, to see where timing methods disagree (one GPU):

- ``graph``: what a trial and the confirm stage measure (tuner.timing: CUDA-graph replays, each
  launch on its own copy of the inputs, careful);
- ``graph quick``: the same, as a screening trial times it;
- ``do_bench flushed``: ``triton.testing.do_bench`` on one input, L2 flushed before each launch
  (how ``bench_default.py`` times);
- ``back to back``: CUDA events around 200 launches on one input, no flush (a loop in a
  user's job).

    python benchmarks/compare_timings.py                  # every case
    python benchmarks/compare_timings.py 10508x41880      # the cases of these shapes
Results: $OUT/compare_timings.json.
"""

from __future__ import annotations

import sys

import torch

from common import print_table, versions, write_json
from kernels import LaunchConfig
from tuner import ProblemBench, get_kernel
from tuner.timing import do_bench_ms

# Shapes of the held-out sets where the grid (graph) and do_bench disagreed, with the configs
# whose order they disagreed on (BENCHMARKS.md).
CASES = [
    ("5799x49299", "float16", ["r2_w4096_warps8_s1_none", "r2_w4096_warps4_s1_evict_first"]),
    ("2704x194", "float32", ["r2_w256_warps1_s1_none", "r2_w256_warps1_s1_evict_first"]),
    ("76833x25", "float16", ["r16_w32_warps1_s1_none", "r16_w32_warps2_s1_none"]),
    ("4194304x64", "bfloat16", ["r16_w64_warps2_s1_evict_last", "r8_w64_warps1_s1_none"]),
    # Eviction-hinted configs whose times differed by 15-21% between two H200 machines, the
    # same on every trial of each (set 20261132's grid and a later search): against the plain one.
    ("10508x41880", "bfloat16", ["r1_w16384_warps16_s1_none", "r1_w16384_warps16_s1_evict_first",
                                 "r1_w16384_warps8_s1_evict_last"]),
]
BACK_TO_BACK = 200


def back_to_back_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(BACK_TO_BACK):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / BACK_TO_BACK


def main() -> None:
    device = torch.device("cuda")
    spec = get_kernel("add_layernorm")
    rows = []
    wanted = sys.argv[1:]
    for shape, dtype, keys in CASES:
        if wanted and shape not in wanted:
            continue
        bench = ProblemBench(spec, spec.problem(shape, dtype), device, seed=0)
        for key in keys:
            config = LaunchConfig.from_key(key)
            bench.check(config)

            def run(config=config, bench=bench):
                return spec.run(bench.inputs, config, out=bench.out)

            rows.append({"shape": f"{shape} {dtype}", "config": key,
                         "graph": bench.time(config), "graph quick": bench.time(config, quick=True),
                         "do_bench flushed": do_bench_ms(run), "back to back": back_to_back_ms(run)})
            print(rows[-1], flush=True)
        del bench
        torch.cuda.empty_cache()
    write_json("compare_timings.json", {"versions": versions(), "rows": rows})
    methods = ["graph", "graph quick", "do_bench flushed", "back to back"]
    print_table(["shape", "config", *[f"{name} ms" for name in methods]],
                [[row["shape"], row["config"], *[f"{row[name]:.4f}" for name in methods]]
                 for row in rows])


if __name__ == "__main__":
    main()
