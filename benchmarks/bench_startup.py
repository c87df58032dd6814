"""What the user waits for: wall clock of whole `python -m tuner search` commands, cold Triton
cache and fresh storage each run, on 1 and on every GPU of the host; plus the start-up pieces
alone (importing the CLI, starting Ray).

    python benchmarks/bench_startup.py --gpus 1,4 --trials 48
    python benchmarks/bench_startup.py --gpus 4 --serve      # also against a warm `tuner serve` pool
    python benchmarks/bench_startup.py --gpus 2 --trials 5 --interpret   # on the CPU

Each search runs with `--verbose`, whose start-up breakdown is kept in the results.
Results: $OUT/bench_startup.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import out_dir, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str], env: dict[str, str], timeout: float = 300) -> dict:
    start = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        print(process.stderr[-3000:], file=sys.stderr)
    return {"command": " ".join(command), "seconds": seconds, "rc": process.returncode,
            "stderr": process.stderr[-6000:], "stdout": process.stdout[-3000:]}


def fresh_env() -> tuple[dict[str, str], str]:
    scratch = tempfile.mkdtemp(prefix="tuner-startup-")
    env = dict(os.environ, TRITON_CACHE_DIR=f"{scratch}/triton", PYTHONUNBUFFERED="1")
    return env, scratch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,4")
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--shape", default="128x64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help="also time searches against a warm pool")
    parser.add_argument("--no-verbose", action="store_true", help="for versions without --verbose")
    parser.add_argument("--interpret", action="store_true",
                        help="searches on the CPU through the Triton interpreter (--gpus: workers)")
    args = parser.parse_args()
    python = sys.executable
    runs = []
    env, _ = fresh_env()
    runs.append({"what": "import tuner.cli", **timed([python, "-c", "import tuner.cli"], env)})
    runs.append({"what": "ray.init (local)", **timed([python, "-c", (
        "import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False, "
        "logging_level='ERROR'); print(time.perf_counter() - t)")], env)})
    verbose = [] if args.no_verbose else ["--verbose", "--quiet"]
    for gpus in [int(n) for n in args.gpus.split(",")]:
        for repeat in range(args.repeats):
            env, scratch = fresh_env()
            command = [python, "-m", "tuner", "search", "--shape", args.shape, "--trials",
                       str(args.trials), "--workers", str(gpus), "--storage",
                       f"sqlite:///{scratch}/tuner.db", "--table", f"{scratch}/table.json", *verbose,
                       *(["--interpret"] if args.interpret else [])]
            runs.append({"what": f"search, {gpus} GPU(s), cold", "gpus": gpus, **timed(command, env)})
    if args.serve:
        gpus = max(int(n) for n in args.gpus.split(","))
        env, scratch = fresh_env()
        runs.append({"what": "serve (start)", **timed([python, "-m", "tuner", "serve",
                                                       "--workers", str(gpus)], env)})
        try:
            for repeat in range(max(2, args.repeats)):
                env2, scratch2 = fresh_env()
                env2["TRITON_CACHE_DIR"] = env["TRITON_CACHE_DIR"]  # the pool's own cache
                command = [python, "-m", "tuner", "search", "--shape", args.shape, "--trials",
                           str(args.trials), "--address", "auto", "--storage",
                           f"sqlite:///{scratch2}/tuner.db", "--table", f"{scratch2}/table.json",
                           "--seed", str(repeat), *verbose]
                runs.append({"what": f"search, warm {gpus}-GPU pool (seed {repeat})", "gpus": gpus,
                             **timed(command, env2)})
        finally:
            runs.append({"what": "serve --stop", **timed([python, "-m", "tuner", "serve", "--stop"], env)})
    write_json("bench_startup.json", {"runs": runs})
    for run in runs:
        print(f"--- {run['what']}: {run['seconds']:.1f} s (rc {run['rc']})\n{run['stderr'][-1500:]}")
    print_table(["what", "wall s", "rc"], [[r["what"], f"{r['seconds']:.1f}", r["rc"]] for r in runs])


if __name__ == "__main__":
    main()
