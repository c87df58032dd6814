"""Ground truth for the held-out shapes: every valid config of the search space, timed, on all
GPUs of one host (a process per GPU, shapes spread over them), plus torch eager, torch.compile
and the runtime's default config of each shape.

    python benchmarks/bench_exhaustive.py                     # the held-out set, every GPU
    python benchmarks/bench_exhaustive.py --shapes 4096x64:float32 --gpus 1

Every config is compiled ahead in a process pool (the host's cores split over the GPUs) into a
Triton cache (fresh, or ``--cache DIR`` to keep it for a later search), then checked against the
float64 reference and timed twice by ``ProblemBench.time`` (CUDA-graph replays over copies of
the inputs, tuner.timing): carefully (the ground truth) and quickly (what a search trial sees).
Results: $OUT/bench_exhaustive.json, rewritten as each shape finishes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import tempfile
import time

from common import out_dir, print_table, write_json
from heldout import heldout_shapes


def _compile(problem, config: dict) -> None:
    from kernels import LaunchConfig
    from tuner import get_kernel

    get_kernel(problem.kernel).compile(problem, LaunchConfig(**config))


def _torch_compile_ms(inputs: dict, time_ms) -> float | None:
    import torch
    import torch.nn.functional as F

    x = inputs["x"]

    def layer_norm(x, s, w, b):
        return F.layer_norm(x + s, x.shape[-1:], w, b)

    try:
        compiled = torch.compile(layer_norm, dynamic=False)
        return time_ms(lambda: compiled(x, inputs["sum_weight"], inputs["weight"], inputs["bias"]))
    except Exception as error:  # report, do not lose the grid
        print(f"torch.compile failed: {error}", flush=True)
        return None


def run_gpu(gpu: int, shapes: list[tuple[str, str]], compile_processes: int, cache: str,
            out: str) -> dict:
    """One GPU's share of the shapes; runs in its own process, writing ``out`` as it goes."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    os.environ["TRITON_CACHE_DIR"] = cache
    import torch

    from kernels.device import device_name
    from tuner import ProblemBench, copy_bandwidth_gbps, get_kernel, load_space
    from tuner.measure import time_ms

    device = torch.device("cuda", 0)
    copy = copy_bandwidth_gbps(device)
    spec = get_kernel("add_layernorm")
    space = load_space(spec.space_file)
    jobs = []
    for shape, dtype in shapes:
        problem = spec.problem(shape, dtype)
        jobs.append((problem, space.candidates(spec.table_key(problem))))
    pool = concurrent.futures.ProcessPoolExecutor(
        compile_processes, mp_context=multiprocessing.get_context("spawn"))
    futures = {(problem, config.key()): pool.submit(_compile, problem, config.as_dict())
               for problem, candidates in jobs for config in candidates}
    results = {}
    for problem, candidates in jobs:
        start = time.perf_counter()
        bench = ProblemBench(spec, problem, device, seed=0)
        rows = []
        for config in candidates:
            try:
                futures[(problem, config.key())].result()
            except Exception:  # measure() compiles again and records the error
                pass
            measured = bench.measure(config, copy, quick=True)
            careful = None
            if measured.ms is not None:
                careful = bench.time(config)
            rows.append({"config": config.key(), "ms": careful, "quick_ms": measured.ms,
                         "error": measured.error})
        heuristic = spec.heuristic(problem)
        heuristic_ms = next((row["ms"] for row in rows if row["config"] == heuristic.key()), None)
        if heuristic_ms is None:
            bench.check(heuristic)
            heuristic_ms = bench.time(heuristic)
        valid = sorted((row["ms"], row["config"]) for row in rows if row["ms"] is not None)
        eager_ms = bench.time_eager()
        compiled_ms = _torch_compile_ms(bench.inputs, lambda fn: time_ms(fn, device))
        name = f"{problem.shape_text} {problem.dtype}"
        results[name] = {
            "gpu": gpu, "configs": rows, "seconds": time.perf_counter() - start,
            "best": valid[0], "median_ms": valid[len(valid) // 2][0], "worst_ms": valid[-1][0],
            "heuristic": heuristic.key(), "heuristic_ms": heuristic_ms, "eager_ms": eager_ms,
            "torch_compile_ms": compiled_ms, "n_bytes": bench.n_bytes, "copy_gbps": copy,
            "device": device_name(device)}
        print(f"[gpu {gpu}] {name}: {len(rows)} configs in {results[name]['seconds']:.0f} s, "
              f"best {valid[0][1]} {valid[0][0]:.4f} ms, heuristic {heuristic_ms:.4f} ms, "
              f"compile {compiled_ms}", flush=True)
        write_json(out, results)
        del bench
        torch.cuda.empty_cache()
    pool.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help="ROWSxWIDTH:DTYPE,... (default: held-out set)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    parser.add_argument("--out", default="bench_exhaustive.json")
    parser.add_argument("--cache", default=None, help="Triton cache folder (default: a fresh one)")
    args = parser.parse_args()
    import torch
    import triton

    if args.shapes:
        shapes = [tuple(item.split(":")) for item in args.shapes.split(",")]
    else:
        shapes = [(f"{rows}x{width}", dtype) for rows, width, dtype in heldout_shapes()]
    gpus = args.gpus or torch.cuda.device_count()
    # Largest problems first, dealt round-robin, so every GPU gets a similar share.
    ordered = sorted(shapes, key=lambda item: -input_bytes(item))
    shares = [ordered[index::gpus] for index in range(gpus)]
    compile_processes = max(1, (os.cpu_count() or 2) // gpus - 1)
    cache = args.cache or tempfile.mkdtemp(prefix="triton-cache-")
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(
            gpus, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(run_gpu, range(gpus), shares, [compile_processes] * gpus, [cache] * gpus,
                              [f"{args.out}.gpu{gpu}" for gpu in range(gpus)]))
    shapes_out = {name: data for part in parts for name, data in part.items()}
    write_json(args.out, {"versions": {"torch": torch.__version__, "triton": triton.__version__},
                          "seconds": time.perf_counter() - start, "gpus": gpus,
                          "shapes": shapes_out})
    print_table(["shape", "configs", "best", "best ms", "median x", "heuristic x", "eager x",
                 "compile x", "% copy"],
                [[name, len(d["configs"]), d["best"][1], f"{d['best'][0]:.4f}",
                  f"{d['median_ms'] / d['best'][0]:.2f}", f"{d['heuristic_ms'] / d['best'][0]:.2f}",
                  f"{d['eager_ms'] / d['best'][0]:.2f}",
                  "-" if d["torch_compile_ms"] is None else f"{d['torch_compile_ms'] / d['best'][0]:.2f}",
                  f"{100 * d['n_bytes'] / d['best'][0] / 1e6 / d['copy_gbps']:.0f}"]
                 for name, d in sorted(shapes_out.items())])


def input_bytes(item: tuple[str, str]) -> int:
    """Bytes of a ROWSxWIDTH:DTYPE problem's input."""
    rows, width = (int(part) for part in item[0].split("x")[-2:])
    return rows * width * (4 if item[1] == "float32" else 2)


if __name__ == "__main__":
    main()
