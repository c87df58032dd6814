"""How often the driver's compile lookahead foresees a study's next config, on the CPU.

Replays studies against recorded exhaustive grids as ``simulate_search.py`` does (``--parallel``
trials in flight), and after each ask records the configs the study says come next
(``StudyRun.likely_next``, which the driver hands to the workers' compile processes). Prints
the share of asks whose config was in one of the previous three such lists: those configs had
up to three trials' time to compile before they were asked for.

    python benchmarks/simulate_lookahead.py results/bench_exhaustive_h100_seed20261127.json \\
        results/bench_exhaustive_h100_seed20261128.json results/bench_exhaustive_h100_seed20261130.json
"""

from __future__ import annotations

import argparse
import json

import optuna

from tuner import Settings, StudyRun, get_kernel, load_space
from tuner.measure import Measurement

# Asks back whose "likely next" lists count: a compile takes a few trials' time.
LOOKBACK = 3


def foreseen(grid: dict, shape_name: str, seed: int, trials: int, parallel: int) -> tuple[int, int]:
    """(asks foreseen, asks) of one study after its first ask."""
    spec = get_kernel("add_layernorm")
    shape, dtype = shape_name.split()
    timings = {row["config"]: row for row in grid["configs"]}
    run = StudyRun(spec, spec.problem(shape, dtype), "simulated", load_space(spec.space_file),
                   optuna.storages.InMemoryStorage(), Settings(trials=trials, seed=seed))
    lists: list[set[str]] = []
    inflight = []
    hits = asks = 0
    while True:
        while len(inflight) < parallel and not run.search_finished(0.0, None):
            config = run.ask()
            if config is None:
                break
            if lists:
                asks += 1
                hits += any(config.key() in likely for likely in lists[-LOOKBACK:])
            lists.append({likely.key() for likely in run.likely_next()})
            inflight.append(config)
        if not inflight:
            return hits, asks
        config = inflight.pop(0)
        row = timings.get(config.key())
        ms = None if row is None else row.get("quick_ms") or row.get("ms")
        run.tell(config, Measurement(config.key(), ms=ms, error=None if ms else "not in the grid"),
                 "sim")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", help="bench_exhaustive.py JSON files")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--parallel", type=int, default=2, help="trials in flight")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hits = asks = 0
    for path in args.grids:
        for name, grid in sorted(json.load(open(path))["shapes"].items()):
            for seed in (int(s) for s in args.seeds.split(",")):
                study_hits, study_asks = foreseen(grid, name, seed, args.trials, args.parallel)
                hits, asks = hits + study_hits, asks + study_asks
    print(f"{hits} of {asks} asks foreseen by one of the {LOOKBACK} lists before ({hits / asks:.0%})")


if __name__ == "__main__":
    main()
