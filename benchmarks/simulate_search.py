"""Replays the tuner's search against recorded exhaustive grids, on the CPU (no GPU needed).

Each study asks and tells exactly as the driver does, with ``--parallel`` trials in flight,
but a trial's time is looked up in the grid (its quick timing, as a trial records it) instead of
measured (with ``--noise``, times a seeded log-normal error); the confirm stage takes the full
timings of its candidates. Reports, per shape and
seed, the winner's full time over the grid's best.

    python benchmarks/simulate_search.py benchmarks/results/bench_exhaustive_h200.json --trials 32
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import optuna

from tuner import Settings, StudyRun, get_kernel, load_space
from tuner.measure import Measurement


def simulate(grid: dict, shape_name: str, seed: int, trials: int, parallel: int,
             noise: float = 0.0) -> dict:
    spec = get_kernel("add_layernorm")
    shape, dtype = shape_name.split()
    problem = spec.problem(shape, dtype)
    timings = {row["config"]: row for row in grid["configs"]}
    run = StudyRun(spec, problem, grid.get("device", "simulated"), load_space(spec.space_file),
                   optuna.storages.InMemoryStorage(), Settings(trials=trials, seed=seed))
    inflight = []
    while True:
        while len(inflight) < parallel and not run.search_finished(0.0, None):
            config = run.ask()
            if config is None:
                break
            inflight.append(config)
        if not inflight:
            break
        config = inflight.pop(0)
        row = timings.get(config.key())
        ms = None if row is None else row.get("quick_ms") or row.get("ms")
        if ms and noise:  # a trial's timing error, fixed per (seed, config): log-normal
            ms *= random.Random(f"{seed} {config.key()}").lognormvariate(0.0, noise)
        run.tell(config, Measurement(config.key(), ms=ms,
                                            error=None if ms else "not in the grid"), "sim")
    candidates = run.confirm_candidates()
    confirmed = {c.key(): timings[c.key()]["ms"] for c in candidates
                 if c.key() in timings and timings[c.key()]["ms"]}
    confirmed.setdefault(spec.heuristic(problem).key(), grid["heuristic_ms"])
    winner = min(confirmed, key=confirmed.get)
    best = grid["best"][0]
    return {"shape": shape_name, "seed": seed, "measured": run.n_measured,
            "winner": winner, "ratio": confirmed[winner] / best,
            "found_within_2pct_at": next((index + 1 for index, key in enumerate(run.measured)
                                          if timings.get(key, {}).get("ms")
                                          and timings[key]["ms"] <= 1.02 * best), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="bench_exhaustive.json")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--parallel", type=int, default=4, help="trials in flight (GPUs x prefetch)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="a trial timing's relative error (log-normal sigma)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = json.load(open(args.grid))
    ratios = []
    for name, grid in sorted(data["shapes"].items()):
        row = []
        for seed in (int(s) for s in args.seeds.split(",")):
            result = simulate(grid, name, seed, args.trials, args.parallel, args.noise)
            ratios.append(result["ratio"])
            row.append(f"{result['ratio']:.3f} (hit@{result['found_within_2pct_at']})")
        print(f"{name:22s} {'  '.join(row)}")
    print(f"worst {max(ratios):.3f}, median {statistics.median(ratios):.3f}, "
          f"within 2%: {sum(r <= 1.02 for r in ratios)}/{len(ratios)}")


if __name__ == "__main__":
    main()
