"""Replays the search against every recorded exhaustive grid, at several parallelisms, and
totals the shapes x seeds whose winner is within 2% of the grid's best (CPU only).

    python benchmarks/simulate_all.py --parallel 2,4 --exclude seed20261131
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from pathlib import Path

import optuna

from simulate_search import simulate

RESULTS = Path(__file__).parent / "results"


def _run(job: tuple[str, str, int, int, int, float]) -> tuple[str, int, dict]:
    path, shape, seed, trials, parallel, noise = job
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = json.load(open(path))["shapes"][shape]
    return Path(path).stem, parallel, simulate(grid, shape, seed, trials, parallel, noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--parallel", default="2,4")
    parser.add_argument("--only", default="", help="comma-separated substrings of grid names")
    parser.add_argument("--exclude", default="", help="comma-separated substrings of grid names")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="a trial timing's relative error (log-normal sigma)")
    parser.add_argument("--verbose", action="store_true", help="print every miss")
    args = parser.parse_args()
    paths = sorted(str(p) for p in RESULTS.glob("bench_exhaustive_*.json"))
    if args.only:
        paths = [p for p in paths if any(s in p for s in args.only.split(","))]
    if args.exclude:
        paths = [p for p in paths if not any(s in p for s in args.exclude.split(","))]
    jobs = [(path, shape, seed, args.trials, parallel, args.noise)
            for path in paths for shape in json.load(open(path))["shapes"]
            for seed in (int(s) for s in args.seeds.split(","))
            for parallel in (int(p) for p in args.parallel.split(","))]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        results = pool.map(_run, jobs, chunksize=1)
    table: dict[tuple[str, int], list[dict]] = {}
    for grid, parallel, result in results:
        table.setdefault((grid, parallel), []).append(result)
    total = hits = 0
    for (grid, parallel), rows in sorted(table.items()):
        within = sum(r["ratio"] <= 1.02 for r in rows)
        total, hits = total + len(rows), hits + within
        print(f"{grid.removeprefix('bench_exhaustive_'):32s} p{parallel}  "
              f"{within:2d}/{len(rows):2d}  worst {max(r['ratio'] for r in rows):.3f}")
        if args.verbose:
            for r in rows:
                if r["ratio"] > 1.02:
                    print(f"    miss {r['shape']:22s} seed {r['seed']} {r['ratio']:.3f} "
                          f"hit@{r['found_within_2pct_at']} {r['winner']}")
    print(f"total within 2%: {hits}/{total}")


if __name__ == "__main__":
    main()
