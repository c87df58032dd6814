"""Driver-side cost of one measured trial: the proposal (TPE over the valid configs, and the
claim on storages other drivers may share) plus the storage writes, with instant fake
measurements. No GPU needed.
This bounds how many GPUs one driver can keep busy: GPUs x trials/s per GPU x cost < 1 s.

    python benchmarks/bench_driver.py [--trials 192]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import optuna  # noqa: E402

from common import print_table  # noqa: E402
from tuner import Measurement, Settings, StudyRun, get_kernel, load_space  # noqa: E402


def cost_ms(storage, trials: int) -> tuple[float, int]:
    """Milliseconds per measured trial, and the number of valid configs."""
    spec = get_kernel("add_layernorm")
    problem = spec.problem("4194304x64", "bfloat16")
    run = StudyRun(spec, problem, "simulated", load_space(spec.space_file), storage,
                   Settings(trials=trials))
    rng = random.Random(0)
    start = time.perf_counter()
    measured = 0
    while (config := run.ask()) is not None and measured < trials:
        fake_ms = 0.3 + 0.1 * rng.random() + 0.01 * config.num_warps
        run.tell(config, Measurement(config.key(), ms=fake_ms), "simulated")
        measured += 1
    return (time.perf_counter() - start) / measured * 1e3, len(run.valid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=192)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = tempfile.mkdtemp()
    rows = []
    for name, storage in (("sqlite", f"sqlite:///{folder}/driver.db"),
                          ("in-memory", optuna.storages.InMemoryStorage())):
        ms, valid = cost_ms(storage, args.trials)
        rows.append([name, min(args.trials, valid), f"{ms:.1f}", f"{1000 / ms:.0f}"])
    print(f"optuna {optuna.__version__}; 4194304x64 bf16 space ({valid} valid configs)")
    print_table(["storage", "measured", "ms per measured trial", "max trials/s"], rows)


if __name__ == "__main__":
    main()
