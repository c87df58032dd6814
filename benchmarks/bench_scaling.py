"""Scaling across the GPUs of one host, as the user waits for it: wall clock of whole
`python -m tuner` commands, fresh Triton cache and storage each run.

- a sweep of 16 studies x 32 trials on shapes the project never saw (a seeded set apart from
  the held-out one), on 1, 2 and 4 GPUs;
- one study (48 trials of a 64-wide problem) on 1 and 4 GPUs: its trials per second per GPU.

    python benchmarks/bench_scaling.py --gpus 1,2,4
    python benchmarks/bench_scaling.py --gpus 4 --runs sweep --compile-processes 14,7,3
Each run's `--verbose` line gives the dispatch loop's trials/s and each worker's busy fraction.
Results: $OUT/bench_scaling.json.
"""

from __future__ import annotations

import argparse
import re
import sys

from bench_startup import fresh_env, timed
from common import print_table, write_json
from heldout import SEED, heldout_shapes

LOOP = re.compile(r"(\d+) trials in ([\d.]+) s of dispatch loop \(([\d.]+)/s\); each worker busy (.*)")


def run(command: list[str], gpus: int, what: str, compile_processes: int | None = None) -> dict:
    env, scratch = fresh_env()
    if compile_processes is not None:
        command = [*command, "--compile-processes", str(compile_processes)]
        what = f"{what}, {compile_processes} compile processes a worker"
    result = timed([sys.executable, "-m", "tuner", *command, "--workers", str(gpus), "--verbose",
                    "--quiet", "--storage", f"sqlite:///{scratch}/tuner.db",
                    *(["--out", f"{scratch}/tables"] if command[0] == "sweep" else
                      ["--table", f"{scratch}/table.json"])], env, timeout=580)
    match = LOOP.search(result["stderr"])
    busy = [float(part.strip().rstrip("%")) / 100 for part in match.group(4).split(",")] if match else []
    record = {"what": what, "gpus": gpus, "wall_s": result["seconds"], "rc": result["rc"],
              "trials": int(match.group(1)) if match else None,
              "loop_s": float(match.group(2)) if match else None,
              "loop_trials_per_s": float(match.group(3)) if match else None, "busy": busy,
              "stderr": result["stderr"][-3000:]}
    print(f"{what}, {gpus} GPU(s): {record['wall_s']:.1f} s wall, loop {record['loop_s']} s, "
          f"{record['loop_trials_per_s']} trials/s, busy {busy}, rc {result['rc']}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4")
    parser.add_argument("--runs", default="sweep,study", help="sweep, study or both")
    parser.add_argument("--compile-processes", default=None,
                        help="comma-separated compile processes a worker, each run in turn "
                             "(default: the tuner's own choice)")
    args = parser.parse_args()
    counts = [int(n) for n in args.gpus.split(",")]
    runs = args.runs.split(",")
    processes = [int(n) for n in args.compile_processes.split(",")] \
        if args.compile_processes else [None]
    shapes = ",".join(f"{rows}x{width}" for rows, width, _ in heldout_shapes(SEED + 1, 8))
    sweep = ["sweep", "--shapes", shapes, "--dtypes", "float32,bfloat16", "--trials", "32"]
    study = ["search", "--shape", "4194304x64", "--dtype", "bfloat16", "--trials", "48"]
    records = [run(sweep, gpus, "sweep 16x32", count) for count in processes for gpus in counts
               if "sweep" in runs]
    records += [run(study, gpus, "one study 48", count) for count in processes
                for gpus in sorted({counts[0], counts[-1]}) if "study" in runs]
    write_json("bench_scaling.json", {"shapes": shapes, "runs": records})
    base = {}  # each kind of run against its first (fewest GPUs, first process count)
    for record in records:
        base.setdefault(record["what"].split(",")[0], record)
    print_table(["run", "GPUs", "wall s", "wall speed-up", "loop s", "loop trials/s",
                 "per GPU", "min busy"],
                [[r["what"], r["gpus"], f"{r['wall_s']:.1f}",
                  f"{base[r['what'].split(',')[0]]['wall_s'] / r['wall_s']:.2f}x",
                  r["loop_s"], r["loop_trials_per_s"],
                  f"{(r['loop_trials_per_s'] or 0) / r['gpus']:.1f}",
                  f"{min(r['busy']):.0%}" if r["busy"] else "-"] for r in records])
    for record in records:  # where each run's trials spent their time (--verbose)
        phases = [line for line in record["stderr"].splitlines() if line.startswith("per trial")]
        print(f"{record['what']}, {record['gpus']} GPU(s): {phases[-1] if phases else '-'}")


if __name__ == "__main__":
    main()
