"""Driver-side cost of one measured trial: the proposal (TPE over the valid configs, and the
claim on storages other drivers may share) plus the storage writes, with instant fake
measurements. No GPU needed.
This bounds how many GPUs one driver can keep busy: GPUs x trials/s per GPU x cost < 1 s.

    python benchmarks/bench_driver.py [--trials 192]

With ``--sweep``, the whole driver (tuner.Driver, SQLite storage) runs a sweep of 16 studies
x 32 trials over simulated workers, threads that take ``--trial-ms`` a trial like a GPU: how
busy it keeps 1, 2, 4, 8 of them, and where its own time goes.

    python benchmarks/bench_driver.py --sweep [--workers 1,2,4,8] [--trial-ms 110] [--no-recorder]

``--no-recorder`` keeps every storage write in the dispatch loop (no tuner.recorder process),
as before the recorder, for comparison.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import random
import resource
import tempfile
import time
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import optuna  # noqa: E402

from common import print_table  # noqa: E402
from heldout import SEED, heldout_shapes  # noqa: E402
from tuner import (Confirmation, Driver, Measurement, Progress, Settings,  # noqa: E402
                   StudyRun, get_kernel, load_space)
import tuner.driver  # noqa: E402
from tuner.pools import Pool  # noqa: E402
from tuner.storage import open_storage  # noqa: E402

SIMULATED = "simulated"


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


def fake_ms(config_key: str) -> float:
    """A fixed, config-dependent time, so the search has something to find."""
    return 0.3 + (zlib.crc32(config_key.encode()) % 1000) / 1e4


class SimulatedWorker:
    """A worker that answers like a GPU worker after ``trial_s``, from a thread of its own
    (sleeping, so the driver has the interpreter to itself, as with worker processes)."""

    def __init__(self, slot: int, trial_s: float) -> None:
        self.slot, self.trial_s, self.device = slot, trial_s, SIMULATED
        self.info = {"device": SIMULATED, "node": "simulated"}
        self.executor = concurrent.futures.ThreadPoolExecutor(1)

    def call(self, method: str, *args) -> concurrent.futures.Future:
        return self.executor.submit(getattr(self, method), *args)

    def measure(self, problem, config) -> Measurement:
        time.sleep(self.trial_s)
        return Measurement(config.key(), ms=fake_ms(config.key()), gbps=1.0, pct_of_copy=1.0,
                           compile_s=0.1)

    def confirm(self, problem, configs, rounds) -> Confirmation:
        time.sleep(self.trial_s * len(configs))
        return Confirmation({config.key(): fake_ms(config.key()) for config in configs},
                            None, 1, 1.0)

    def close(self) -> None:
        pass

    def prefetch(self, *args) -> None:
        pass

    def kill(self) -> None:
        self.executor.shutdown(wait=False)


class SimulatedPool(Pool):
    compile_processes = 8  # a GPU worker's: trials are queued six deep with many studies
    lost_errors = ()

    def __init__(self, workers: int, trial_s: float) -> None:
        self.workers = [SimulatedWorker(slot, trial_s) for slot in range(workers)]


def sweep(workers: int, trial_s: float, folder: str) -> list:
    """One sweep of 16 studies x 32 trials on ``workers`` simulated GPUs."""
    spec = get_kernel("add_layernorm")
    problems = [spec.problem(f"{rows}x{width}", dtype)
                for rows, width, _ in heldout_shapes(SEED + 1, 8)
                for dtype in ("float32", "bfloat16")]
    storage = open_storage(f"sqlite:///{folder}/sweep{workers}.db")  # once, as the CLI does
    driver = Driver(SimulatedPool(workers, trial_s), storage, Settings(trials=32),
                    lambda device: f"{folder}/table{workers}.json",
                    progress=Progress(stream=io.StringIO()))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    driver.run(problems)
    wall = time.perf_counter() - started
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)  # the recorder's, once it has exited
    recorder_s = ended.ru_utime + ended.ru_stime - children.ru_utime - children.ru_stime
    trials = driver.progress.measured
    busy = sorted(driver.busy_fractions().values())
    phases = {name: 1e3 * seconds / trials for name, seconds in driver.phase_seconds.items()}
    return [workers, trials, f"{wall:.1f}", f"{wall - driver.wall_seconds:.1f}", f"{trials / wall:.1f}",
            f"{trials / wall / workers:.1f}", f"{100 * busy[0]:.0f}-{100 * busy[-1]:.0f}%",
            f"{phases.get('driver: asking', 0):.1f}", f"{phases.get('driver: telling', 0):.1f}",
            f"{1e3 * recorder_s / trials:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=192)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--trial-ms", type=float, default=110.0)
    parser.add_argument("--no-recorder", action="store_true",
                        help="write the storage from the dispatch loop, whatever the workers")
    args = parser.parse_args()
    if args.no_recorder:
        tuner.driver.BACKGROUND_WRITES_FROM_WORKERS = 1 << 30
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.sweep:
        folder = tempfile.mkdtemp()
        rows = [sweep(int(count), args.trial_ms / 1e3, folder) for count in args.workers.split(",")]
        print(f"optuna {optuna.__version__}; {args.trial_ms:g} ms a simulated trial; SQLite, "
              + ("no recorder" if args.no_recorder else "recorder from "
                 f"{tuner.driver.BACKGROUND_WRITES_FROM_WORKERS} workers"))
        print_table(["workers", "trials", "wall s", "after the loop s", "trials/s", "per worker", "busy",
                     "asking ms", "telling ms", "recorder CPU ms"], rows)
        return
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
