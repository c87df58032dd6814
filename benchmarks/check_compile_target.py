"""On a GPU host: configs compiled ahead by the tuner's compile processes (for the GPU's target,
without touching the GPU) are the kernels the worker's launches then load from Triton's cache,
and how many configs a second the compile processes turn out.

    python benchmarks/check_compile_target.py [--processes 1,4,14] [--configs 48]

Each process count runs in a process of its own from an empty Triton cache: the compile
processes compile the first ``--configs`` valid configs of add_layernorm 128x64 float32, then
this process runs each config once and counts Triton's cache hits (every one should be a hit).
Prints one line per count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,4,14")
    parser.add_argument("--configs", type=int, default=48)
    parser.add_argument("--shape", default="128x64")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a process of its own: a fresh cache, compile processes and JIT caches
        print(json.dumps(run(int(args.processes), args.configs, args.shape)))
        return 0
    rows = []
    for processes in args.processes.split(","):
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-cache-"))
        result = subprocess.run([sys.executable, __file__, "--one", "--processes", processes,
                                 "--configs", str(args.configs), "--shape", args.shape],
                                env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "check_compile_target.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(row["hits"] == row["configs"] for row in rows) else 1


def run(processes: int, count: int, shape: str) -> dict:
    import torch
    from triton import knobs

    from kernels.targets import current_target
    from tuner import get_kernel, load_space
    from tuner.compiling import CompileAhead

    spec = get_kernel("add_layernorm")
    problem = spec.problem(shape, "float32")
    configs = load_space(spec.space_file).candidates(spec.table_key(problem))[:count + 1]
    compiles = CompileAhead(processes)
    compiles.start(current_target())
    # The first config waits for the processes to start (the fork server imports torch).
    warm_up, configs = configs[0], configs[1:]
    while True:
        compiles.prefetch([(problem, warm_up)])
        time.sleep(0.5)  # a config waited for before its compile started is cancelled
        if compiles.wait(problem, warm_up.key()) is not None:
            break
    started = time.perf_counter()
    compiles.prefetch([(problem, config) for config in configs])
    time.sleep(0.2)  # lets the feeder submit every config before any wait could cancel one
    seconds = [compiles.wait(problem, config.key()) for config in configs]
    wall = time.perf_counter() - started
    compiles.close()
    hits: list[bool] = []
    knobs.compilation.listener = lambda **info: hits.append(info["cache_hit"])
    inputs = spec.make_inputs(problem, torch.device("cuda"), torch.Generator("cuda").manual_seed(0))
    for config in configs:
        spec.run(inputs, config)
    torch.cuda.synchronize()
    knobs.compilation.listener = None
    done = [value for value in seconds if value is not None]
    return {"processes": processes, "configs": len(configs), "compiled_ahead": len(done),
            "hits": sum(hits), "misses": len(hits) - sum(hits),
            "wall_s": round(wall, 2), "configs_per_s": round(len(done) / wall, 1),
            "median_compile_s": round(sorted(done)[len(done) // 2], 3) if done else None,
            "device": torch.cuda.get_device_name(), "triton": __import__("triton").__version__}


if __name__ == "__main__":
    sys.exit(main())
