"""Search quality on the held-out shapes, on every GPU of one host.

1. Ground truth: every valid config of each held-out shape is measured (the tuner with a trial
   budget above the space's size, so exhaustive), or read from ``bench_exhaustive.py``'s
   results with ``--truth FILE`` (that script compiles every config ahead, so it is the faster
   way on one host; ``--cache`` then lets the searches reuse its Triton cache).
2. The search: 32 trials a shape, seeds 0, 1 and 2, the ten shapes as one sweep per seed.
3. Each seed's winner and the ground truth's are re-timed side by side, interleaved over
   several rounds on one GPU (``TuningWorker.confirm``), so both face the same clocks.

    python benchmarks/bench_quality.py --trials 32 --seeds 0,1,2
    python benchmarks/bench_exhaustive.py --cache /tmp/tc && \
        python benchmarks/bench_quality.py --truth $OUT/bench_exhaustive.json --cache /tmp/tc
Results: $OUT/bench_quality.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

from common import out_dir, print_table, write_json
from heldout import heldout_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved re-timing rounds")
    parser.add_argument("--truth", default=None, help="bench_exhaustive.py's JSON results")
    parser.add_argument("--cache", default=None, help="Triton cache folder for the workers")
    parser.add_argument("--top", type=int, default=3,
                        help="ground-truth configs re-timed beside the picks (with --truth)")
    args = parser.parse_args()
    if args.cache:
        os.environ["TRITON_CACHE_DIR"] = args.cache  # inherited by the worker processes

    from tuner import LocalPool, PoolOptions
    pool = LocalPool(PoolOptions(interpret=os.environ.get("TRITON_INTERPRET") == "1"))
    pool.launch()  # the workers start while this process imports the rest

    import optuna

    from tuner import Driver, Progress, Settings, get_kernel

    spec = get_kernel("add_layernorm")
    problems = [spec.problem(f"{rows}x{width}", dtype) for rows, width, dtype in heldout_shapes()]
    workers = pool.start()
    table = out_dir() / "quality_table.json"

    def sweep(trials: int, seed: int) -> tuple[dict, float, Driver]:
        driver = Driver(pool, optuna.storages.InMemoryStorage(), Settings(trials=trials, seed=seed),
                        lambda device: table, progress=Progress(stream=io.StringIO()))
        start = time.perf_counter()
        results = driver.run(problems)
        return {result.problem: result for result in results}, time.perf_counter() - start, driver

    from kernels import LaunchConfig

    if args.truth:
        with open(args.truth) as file:
            recorded = json.load(file)
        truth_s, recorded = recorded["seconds"], recorded["shapes"]
        truth_configs, valid, heuristic_ratio = {}, {}, {}
        for problem in problems:
            data = recorded[f"{problem.shape_text} {problem.dtype}"]
            ranked = sorted((row["ms"], row["config"]) for row in data["configs"] if row["ms"])
            truth_configs[problem] = [LaunchConfig.from_key(key) for _, key in ranked[:args.top]]
            valid[problem] = len(ranked)
            heuristic_ratio[problem] = data["heuristic_ms"] / ranked[0][0]
    else:
        truth, truth_s, truth_driver = sweep(1 << 20, 0)
        truth_configs = {problem: [result.config] for problem, result in truth.items()}
        valid = {run.problem: len(run.valid) for run in truth_driver.runs}
        heuristic_ratio = {problem: result.heuristic_ms / result.ms for problem, result in truth.items()}
    print(f"exhaustive: {sum(valid.values())} configs in {truth_s:.0f} s", flush=True)
    picks: dict[int, dict] = {}
    seconds: dict[int, float] = {}
    measured: dict[int, dict] = {}  # seed -> problem -> each trial's config key and ms
    for seed in (int(s) for s in args.seeds.split(",")):
        picks[seed], seconds[seed], driver = sweep(args.trials, seed)
        measured[seed] = {run.problem: dict(run.measured) for run in driver.runs}
        print(f"seed {seed}: {sum(r.trials for r in picks[seed].values())} trials in "
              f"{seconds[seed]:.1f} s", flush=True)

    # Re-time each shape's candidates interleaved, shapes spread over the GPUs.
    futures = {}
    for index, problem in enumerate(problems):
        configs = truth_configs[problem] + [picks[seed][problem].config for seed in picks
                                            if problem in picks[seed]]
        unique = list(dict.fromkeys(configs))
        futures[problem] = workers[index % len(workers)].call("confirm", problem, unique, args.rounds)
    rows, records = [], []
    for problem in problems:
        medians = futures[problem].result().ms
        best_key = min(medians, key=medians.get)  # the fastest re-timed: ground truth or a pick
        ratios = {seed: medians[picks[seed][problem].config.key()] / medians[best_key]
                  for seed in picks if problem in picks[seed]}
        records.append({"shape": problem.shape_text, "dtype": problem.dtype,
                        "valid_configs": valid[problem], "best": best_key,
                        "best_ms": medians[best_key], "heuristic_over_best": heuristic_ratio[problem],
                        "picks": {seed: picks[seed][problem].config.key() for seed in ratios},
                        "trials": {seed: picks[seed][problem].trials for seed in ratios},
                        "ratio": ratios,
                        "measured": {seed: measured[seed].get(problem, {}) for seed in ratios}})
        rows.append([f"{problem.shape_text} {problem.dtype}", valid[problem], best_key,
                     f"{medians[best_key]:.4f}"] + [f"{ratios[seed]:.3f}" for seed in sorted(ratios)]
                    + [f"{heuristic_ratio[problem]:.2f}"])
    pool.shutdown()
    write_json("bench_quality.json", {"device": workers[0].device, "gpus": len(workers),
                                      "trials": args.trials, "exhaustive_seconds": truth_s,
                                      "search_seconds": seconds, "shapes": records})
    worst = max(ratio for record in records for ratio in record["ratio"].values())
    print_table(["shape", "valid", "exhaustive best", "ms"]
                + [f"seed {seed} / best" for seed in sorted(picks)] + ["heuristic / best"], rows)
    print(f"worst pick / exhaustive best: {worst:.3f}; within 2% on "
          f"{sum(r <= 1.02 for rec in records for r in rec['ratio'].values())} of "
          f"{sum(len(rec['ratio']) for rec in records)}")


if __name__ == "__main__":
    main()
