"""How repeatable is a trial's timing, and does the host's load change it?

For the smaller held-out shapes (kernels of a few to a few tens of microseconds, where ranking
is hardest) and a dozen configs each, every config is timed three times by each method, first
on an idle host, then with every core busy (as when the tuner's compile processes run):

* ``do_bench quick``: ``triton.testing.do_bench`` (10 ms warm-up, 40 ms), the old trial timing;
* ``graph quick`` / ``graph careful``: ``ProblemBench.time`` (tuner.timing: launches replayed
  from a CUDA graph, inputs rotated through copies that overflow L2).

Reported per method: the median spread (max/min) of a config's three timings, the worst ratio
between its loaded and idle medians, and how often the loaded pass picks the idle pass's best.

    python benchmarks/bench_timing.py
Results: $OUT/bench_timing.json.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import statistics
import time

from common import print_table, versions, write_json
from heldout import heldout_shapes

MAX_SHAPE_BYTES = 64 << 20
CONFIGS_PER_SHAPE = 12
REPEATS = 3


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def measure_all(benches, quick_do_bench) -> dict:
    """{(shape, config): {method: [ms, ...]}} for every method, REPEATS times each."""
    results = {}
    for name, bench, configs in benches:
        for config in configs:
            samples = {"do_bench quick": [], "graph quick": [], "graph careful": []}
            for _ in range(REPEATS):
                samples["do_bench quick"].append(
                    quick_do_bench(lambda: bench.spec.run(bench.inputs, config, out=bench.out)))
                samples["graph quick"].append(bench.time(config, quick=True))
                samples["graph careful"].append(bench.time(config))
            results[(name, config.key())] = samples
    return results


def main() -> None:
    import torch

    from tuner import ProblemBench, get_kernel, load_space
    from tuner.timing import do_bench_ms

    device = torch.device("cuda", 0)
    spec = get_kernel("add_layernorm")
    space = load_space(spec.space_file)
    rng = random.Random(0)
    benches = []
    for rows, width, dtype in heldout_shapes():
        problem = spec.problem(f"{rows}x{width}", dtype)
        if spec.bytes_moved(problem) > MAX_SHAPE_BYTES:
            continue
        candidates = space.candidates(spec.table_key(problem))
        configs = rng.sample(candidates, min(CONFIGS_PER_SHAPE, len(candidates)))
        bench = ProblemBench(spec, problem, device, seed=0)
        for config in configs:
            bench.check(config)  # compiles
        benches.append((f"{problem.shape_text} {dtype}", bench, configs))

    idle = measure_all(benches, lambda fn: do_bench_ms(fn, quick=True))
    cores = os.cpu_count() or 2
    stop_at = time.time() + 600
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, args=(stop_at,))
                for _ in range(cores)]
    for spinner in spinners:
        spinner.start()
    try:
        loaded = measure_all(benches, lambda fn: do_bench_ms(fn, quick=True))
    finally:
        for spinner in spinners:
            spinner.kill()

    methods = ["do_bench quick", "graph quick", "graph careful"]
    rows, summary = [], {}
    for method in methods:
        spreads = [max(s[method]) / min(s[method]) for part in (idle, loaded) for s in part.values()]
        load_ratio = [statistics.median(loaded[key][method]) / statistics.median(idle[key][method])
                      for key in idle]
        same_best = 0
        for name, _, configs in benches:
            def best(part):
                return min(configs, key=lambda c: statistics.median(part[(name, c.key())][method])).key()
            same_best += best(idle) == best(loaded)
        summary[method] = {"median_spread": statistics.median(spreads), "max_spread": max(spreads),
                           "max_load_ratio": max(load_ratio), "min_load_ratio": min(load_ratio),
                           "same_best": same_best, "shapes": len(benches)}
        rows.append([method, f"{summary[method]['median_spread']:.3f}",
                     f"{summary[method]['max_spread']:.3f}",
                     f"{min(load_ratio):.2f}-{max(load_ratio):.2f}", f"{same_best}/{len(benches)}"])
    graph_vs_bench = [statistics.median(idle[key]["graph careful"])
                      / statistics.median(idle[key]["do_bench quick"]) for key in idle]
    write_json("bench_timing.json", {
        "versions": versions(), "cores": cores, "summary": summary,
        "graph_over_do_bench": {"min": min(graph_vs_bench), "median": statistics.median(graph_vs_bench),
                                "max": max(graph_vs_bench)},
        "samples": {f"{name} {config}": {"idle": idle[(name, config)], "loaded": loaded[(name, config)]}
                    for name, config in idle}})
    print(f"graph careful / do_bench quick (idle): median {statistics.median(graph_vs_bench):.3f}, "
          f"range {min(graph_vs_bench):.3f}-{max(graph_vs_bench):.3f}")
    print_table(["method", "median spread", "max spread", "loaded / idle", "same best"], rows)


if __name__ == "__main__":
    main()
