"""Sweep scaling: the same sweep on 1, 2 (and 4) GPUs of one host; trials per second, each
GPU's busy fraction, and the quality of the tuned tables.

    python benchmarks/bench_sweep.py --gpus 1,2 --spec search_spaces/sweeps/reference_model.yaml
Results in $OUT/bench_sweep.json; each run's table in $OUT/table_<n>gpu.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import out_dir, print_table, versions, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts to run")
    parser.add_argument("--spec", default="search_spaces/sweeps/reference_model.yaml")
    parser.add_argument("--trials", type=int, default=None, help="override the spec's trials")
    args = parser.parse_args()

    import optuna
    import ray
    import torch

    from tuner import Driver, PoolOptions, Progress, Settings, WorkerPool, load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(args.spec)
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, logging_level="WARNING")
    runs = []
    for gpus in [int(n) for n in args.gpus.split(",")]:
        pool = WorkerPool(PoolOptions(workers=gpus))
        pool.start()
        table = out_dir() / f"table_{gpus}gpu.json"
        settings = Settings(trials=args.trials or spec.trials or 48, patience=None)
        # A fresh SQLite file, as `tuner sweep` uses by default.
        storage = f"sqlite:///{tempfile.mkdtemp()}/sweep.db"
        driver = Driver(pool, storage, settings, lambda device: table,
                        progress=Progress(interval=20))
        start = time.perf_counter()
        results = driver.run(list(spec.problems))
        elapsed = time.perf_counter() - start
        pool.shutdown()
        measured = sum(run.n_measured for run in driver.runs)
        runs.append({
            "gpus": gpus, "seconds": elapsed, "measured": measured, "trials_per_s": measured / elapsed,
            "busy": {str(slot): fraction for slot, fraction in driver.busy_fractions().items()},
            "results": [{"shape": r.problem.shape_text, "dtype": r.problem.dtype,
                         "config": r.config.key(), "ms": r.ms, "pct_of_copy": r.pct_of_copy,
                         "vs_heuristic": r.speedup_vs_heuristic} for r in results]})
        print(f"{gpus} GPU(s): {measured} trials in {elapsed:.0f} s = {measured / elapsed:.2f} trials/s; "
              f"busy {sorted(round(f, 2) for f in driver.busy_fractions().values())}", flush=True)
    write_json("bench_sweep.json", {"versions": versions(), "spec": args.spec, "runs": runs})
    base = runs[0]["trials_per_s"]
    print_table(["GPUs", "trials", "seconds", "trials/s", "scaling", "min busy"],
                [[r["gpus"], r["measured"], f"{r['seconds']:.0f}", f"{r['trials_per_s']:.2f}",
                  f"{r['trials_per_s'] / base:.2f}x", f"{min(r['busy'].values()):.0%}"] for r in runs])
    print()
    print_table(["GPUs", "shape", "dtype", "config", "ms", "% copy", "vs heuristic"],
                [[r["gpus"], x["shape"], x["dtype"], x["config"], f"{x['ms']:.4f}",
                  f"{x['pct_of_copy']:.0f}", f"{x['vs_heuristic']:.2f}x"]
                 for r in runs for x in r["results"]])


if __name__ == "__main__":
    main()
