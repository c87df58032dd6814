"""Search quality and speed on one GPU: the exhaustive grid of the search space (ground truth)
versus `tuner search` with 48 trials and three seeds.

    python benchmarks/bench_search.py --part exhaustive   # one pass over every valid config
    python benchmarks/bench_search.py --part search       # Driver with 1 GPU worker, 3 seeds
Results go to $OUT/bench_search_<part>.json; benchmarks/summarize_search.py compares them.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import out_dir, print_table, versions, write_json

SHAPES = [("4194304x64", "bfloat16"), ("65536x1024", "bfloat16")]


def exhaustive(shapes) -> dict:
    from tuner import ProblemBench, copy_bandwidth_gbps, get_kernel, load_space

    device = torch.device("cpu") if torch.cuda.device_count() == 0 else torch.device("cuda", 0)
    copy = copy_bandwidth_gbps(device)
    results = {"versions": versions(), "copy_gbps": copy, "shapes": {}}
    for shape, dtype in shapes:
        spec = get_kernel("add_layernorm")
        problem = spec.problem(shape, dtype)
        candidates = load_space(spec.space_file).candidates(spec.table_key(problem))
        bench = ProblemBench(spec, problem, device, seed=0)
        start = time.perf_counter()
        rows = []
        for config in candidates:
            m = bench.measure(config, copy)
            rows.append({"config": config.key(), "ms": m.ms, "compile_s": m.compile_s, "error": m.error})
        elapsed = time.perf_counter() - start
        heuristic = spec.heuristic(problem).key()
        valid = sorted((row["ms"], row["config"]) for row in rows if row["ms"] is not None)
        results["shapes"][f"{shape} {dtype}"] = {
            "configs": rows, "seconds": elapsed, "best": valid[0], "heuristic": heuristic,
            "heuristic_ms": next(row["ms"] for row in rows if row["config"] == heuristic)}
        print(f"{shape} {dtype}: {len(rows)} configs in {elapsed:.0f} s, best {valid[0]}, "
              f"median {valid[len(valid) // 2][0]:.4f} ms, worst {valid[-1][0]:.4f} ms", flush=True)
    return results


def search(shapes, seeds, trials: int, compile_processes: list[int]) -> dict:
    """Each run gets a fresh Triton cache, so compilation is paid as a real search pays it."""
    import tempfile

    import optuna
    import ray

    from tuner import Driver, PoolOptions, Progress, Settings, WorkerPool, get_kernel

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    results = {"versions": versions(), "runs": []}
    for processes in compile_processes:
        for shape, dtype in shapes:
            problem = get_kernel("add_layernorm").problem(shape, dtype)
            for seed in seeds:
                cache = tempfile.mkdtemp(prefix="triton-cache-")
                pool = WorkerPool(PoolOptions(workers=1, compile_processes=processes,
                                              env_vars={"TRITON_CACHE_DIR": cache}))
                pool.start()
                driver = Driver(pool, optuna.storages.InMemoryStorage(), Settings(trials=trials, seed=seed),
                                lambda device: out_dir() / "search_table.json",
                                progress=Progress(interval=30))
                start = time.perf_counter()
                [result] = driver.run([problem])
                elapsed = time.perf_counter() - start
                pool.shutdown()
                measured = [t for t in driver.runs[0].study.trials if t.user_attrs.get("measured")]
                compile_s = sum(t.user_attrs.get("compile_s", 0.0) for t in measured)
                results["runs"].append({
                    "shape": shape, "dtype": dtype, "seed": seed, "compile_processes": processes,
                    "seconds": elapsed, "measured": len(measured), "compile_s": compile_s,
                    "winner": result.config.key(), "ms": result.ms,
                    "heuristic_ms": result.heuristic_ms, "eager_ms": result.eager_ms,
                    "pct_of_copy": result.pct_of_copy, "trials_per_s": len(measured) / elapsed})
                print(f"{shape} {dtype} seed {seed}, {processes} compile processes: "
                      f"{result.config.key()} {result.ms:.4f} ms ({result.pct_of_copy:.0f}% of copy), "
                      f"heuristic {result.heuristic_ms:.4f} ms, {len(measured)} trials in {elapsed:.1f} s "
                      f"({len(measured) / elapsed:.2f}/s, compile {compile_s:.0f} s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["exhaustive", "search"], required=True)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--compile-processes", default="0,4",
                        help="comma-separated compile-process counts per worker to compare")
    parser.add_argument("--shapes", default=",".join(f"{s}:{d}" for s, d in SHAPES),
                        help="comma-separated SHAPE:DTYPE list")
    args = parser.parse_args()
    shapes = [tuple(item.split(":")) for item in args.shapes.split(",")]
    if args.part == "exhaustive":
        data = exhaustive(shapes)
        write_json("bench_search_exhaustive.json", data)
        print_table(["shape", "configs", "seconds", "best", "best ms", "heuristic ms"],
                    [[name, len(d["configs"]), f"{d['seconds']:.0f}", d["best"][1],
                      f"{d['best'][0]:.4f}", f"{d['heuristic_ms']:.4f}"] for name, d in data["shapes"].items()])
    else:
        data = search(shapes, [int(s) for s in args.seeds.split(",")], args.trials,
                      [int(n) for n in args.compile_processes.split(",")])
        write_json("bench_search_search.json", data)
        print_table(["shape", "seed", "compile procs", "winner", "ms", "heuristic ms", "trials/s", "compile s"],
                    [[f"{r['shape']} {r['dtype']}", r["seed"], r["compile_processes"], r["winner"], f"{r['ms']:.4f}",
                      f"{r['heuristic_ms']:.4f}", f"{r['trials_per_s']:.2f}", f"{r['compile_s']:.0f}"]
                     for r in data["runs"]])


if __name__ == "__main__":
    main()
