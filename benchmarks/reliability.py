"""Fault injection on the CPU (Triton interpreter, local Ray): injects every fault ``--repeat``
times, counts trials lost and tables corrupted, throws random bad input at every parser, and
writes RELIABILITY.md.

    PYTHONPATH=$PWD python benchmarks/reliability.py --repeat 3 --out RELIABILITY.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from kernels import LaunchConfig, TableEntry, TableError, load_table, merge_entries  # noqa: E402
from bad_inputs import bad_inputs  # noqa: E402
from tuner.driver import Driver, Progress  # noqa: E402
from tuner.problems import get_kernel  # noqa: E402
from tuner.space import parse_space  # noqa: E402
from tuner.study import Settings, study_name  # noqa: E402
from tuner.local import descendants  # noqa: E402
from tuner.workers import PoolOptions, WorkerPool  # noqa: E402

from tests.faults import inject  # noqa: E402

SPEC = get_kernel("add_layernorm")
PROBLEM = SPEC.problem("128x64", "float32")
SPACE_YAML = ("kernel: add_layernorm\nrestrictions: {}\nparameters:\n  block_rows: [2, 4]\n"
              "  block_w: [64]\n  num_warps: [1, 2]\n  num_stages: [1]\n"
              "  eviction_policy: ['', evict_first]\n")
SPACE = parse_space(__import__("yaml").safe_load(SPACE_YAML))  # 8 configs
SETTINGS = Settings(trials=6, confirm_top=2, confirm_rounds=1)
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def measured(storage, problem=PROBLEM) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=study_name(problem, "interpreter"), storage=storage)
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("measured")]


def lost(trials, budget: int) -> int:
    """Budgeted trials with no stored outcome, plus configs stored twice."""
    configs = [t.user_attrs["config"] for t in trials]
    return max(0, budget - len(set(configs))) + len(configs) - len(set(configs))


def table_ok(path: Path) -> bool:
    try:
        return len(load_table(path)) == 1
    except TableError:
        return False


def signal_worker(sig: int):
    """A fault: ``sig`` to the worker's process."""
    return lambda worker: os.kill(worker.info["pid"], sig)


def run_driver(tmp: Path, fault, workers: int = 2, settings=SETTINGS):
    """A search whose third trial's worker suffers ``fault(worker)`` right after it is sent."""
    storage = optuna.storages.InMemoryStorage()
    pool = WorkerPool(PoolOptions(workers=workers, interpret=True))
    try:
        pool.start()
        inject(pool, 3, fault)
        Driver(pool, storage, settings, lambda d: tmp / "t.json", space=SPACE,
               progress=Progress(stream=io.StringIO())).run([PROBLEM])
    finally:
        pool.shutdown()
    return measured(storage)


def fault_worker_sigkill(tmp: Path) -> dict:
    trials = run_driver(tmp, signal_worker(signal.SIGKILL))
    failed = sum(t.state != TrialState.COMPLETE for t in trials)
    return {"lost": lost(trials, SETTINGS.trials) + failed, "corrupt": not table_ok(tmp / "t.json")}


def fault_worker_hang(tmp: Path) -> dict:
    settings = Settings(trials=6, confirm_top=2, confirm_rounds=1, trial_timeout=5.0)
    trials = run_driver(tmp, signal_worker(signal.SIGSTOP), settings=settings)
    timed_out = [t for t in trials if "timed out" in t.user_attrs.get("error", "")]
    return {"lost": lost(trials, settings.trials), "corrupt": not table_ok(tmp / "t.json"),
            "note": f"{len(timed_out)} hung trial failed with a timeout, worker replaced"}


def fault_concurrent_drivers(tmp: Path) -> dict:
    url = f"sqlite:///{tmp}/shared.db"
    settings = Settings(trials=8, confirm_top=2, confirm_rounds=1)
    errors: list[BaseException] = []

    def drive(index: int) -> None:
        pool = WorkerPool(PoolOptions(workers=1, interpret=True))
        try:
            pool.start()
            Driver(pool, url, settings, lambda d: tmp / f"t{index}.json", space=SPACE,
                   progress=Progress(stream=io.StringIO())).run([PROBLEM])
        except BaseException as error:
            errors.append(error)
        finally:
            pool.shutdown()

    threads = [threading.Thread(target=drive, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    trials = measured(url)
    return {"lost": lost(trials, 8) + len(errors),
            "corrupt": not (table_ok(tmp / "t0.json") and table_ok(tmp / "t1.json")),
            "note": f"{len({t.user_attrs['claim'] for t in trials})} drivers measured"}


def fault_storage_creation_race(tmp: Path) -> dict:
    from tuner.storage import open_storage

    def race(url: str, open_it) -> int:
        errors, barrier = [], threading.Barrier(4)

        def one() -> None:
            try:
                barrier.wait()
                optuna.create_study(study_name="s", storage=open_it(url), load_if_exists=True)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return len(errors)

    # Plain Optuna, for comparison: the schema creation race the file lock prevents.
    baseline = race(f"sqlite:///{tmp}/plain.db", optuna.storages.RDBStorage)
    return {"lost": 0, "corrupt": False, "failed": race(f"sqlite:///{tmp}/new.db", open_storage),
            "note": f"plain optuna.storages.RDBStorage: {baseline} of 4 failed"}


def cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuner", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def fault_driver_sigkill(tmp: Path) -> dict:
    url, problems = f"sqlite:///{tmp}/k.db", [SPEC.problem(s, "float32") for s in ("128x64", "64x64")]
    argv = ["sweep", "--shapes", "128x64,64x64", "--interpret", "--trials", "4", "--workers", "1",
            "--storage", url, "--out", str(tmp / "tables")]
    driver = cli(argv, tmp)
    deadline = time.monotonic() + 300
    before: set = set()
    while time.monotonic() < deadline and len(before) < 3:
        time.sleep(0.5)
        try:
            before = {(p, t.user_attrs["config"]) for p in problems for t in measured(url, p)}
        except (KeyError, Exception):  # the storage or the studies are not there yet
            continue
    ray_processes = descendants(driver.pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {(p, t.user_attrs["config"]) for p in problems for t in measured(url, p)}
    time.sleep(10)
    left = [pid for pid in ray_processes if Path(f"/proc/{pid}/stat").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    resumed = cli(argv, tmp)
    _, err = resumed.communicate(timeout=600)
    after = [(p, t.user_attrs["config"]) for p in problems for t in measured(url, p)]
    running = sum(t.state == TrialState.RUNNING for p in problems for t in optuna.load_study(
        study_name=study_name(p, "interpreter"), storage=url).trials)
    table = tmp / "tables" / "interpreter.json"
    try:
        corrupt = len(load_table(table)) != 2
    except TableError:
        corrupt = True
    return {"lost": len(before - set(after)) + max(0, 8 - len(set(after))) + running
            + len(after) - len(set(after)) + (resumed.returncode != 0),
            "corrupt": corrupt, "note": f"killed after {len(before)} trials; "
                                        f"{len(left)} Ray processes left after 10 s"}


def fault_node_killed(tmp: Path) -> dict:
    """A worker node of a local multi-node cluster dies with a trial in flight."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

    def kill_node(worker) -> None:
        [node] = [n for n in nodes if n.node_id == worker.info["node"]]
        cluster.remove_node(node, allow_graceful=False)

    started = time.monotonic()
    try:
        trials = run_driver(tmp, kill_node)
    finally:
        ray.shutdown()
        cluster.shutdown()
    failed = sum(t.state != TrialState.COMPLETE for t in trials)
    return {"lost": lost(trials, SETTINGS.trials) + failed, "corrupt": not table_ok(tmp / "t.json"),
            "note": f"search finished on the surviving node in {time.monotonic() - started:.0f} s"}


KILL_POINTS = itertools.cycle(["json.dump", "os.fsync", "os.replace"])


def fault_table_write_crash(tmp: Path) -> dict:
    """SIGKILL at one of three points of a table merge; the table must be the old or the new."""
    table = tmp / "t.json"
    merge_entries(table, [entry(128)])
    point = next(KILL_POINTS)
    before_death = {"json.dump": "a[1].write(a[0].__class__.__name__[:3]); a[1].flush()",
                    "os.fsync": "real(*a)", "os.replace": "pass"}[point]
    code = (f"import os, signal, json\nimport kernels.table as t\nreal = {point}\n"
            f"def die(*a, **k):\n    {before_death}\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"{point} = die\nfrom kernels import TableEntry, LaunchConfig\n"
            f"t.merge_entries({str(table)!r}, [TableEntry(kernel='add_layernorm', device='x', "
            "dtype='float32', width=64, rows=1, config=LaunchConfig(block_rows=4, block_w=64, "
            "num_warps=2))])\n")
    subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, timeout=120)
    try:
        corrupt = [e.rows for e in load_table(table)] not in ([128], [1, 128], [128, 1])
    except TableError:
        corrupt = True
    merge_entries(table, [entry(256)])  # the next write proceeds: the dead writer's lock is gone
    return {"lost": 0, "corrupt": corrupt or len(load_table(table)) < 2,
            "note": f"killed in {point}"}


def entry(rows: int) -> TableEntry:
    return TableEntry(kernel="add_layernorm", device="interpreter", dtype="float32", width=64,
                      rows=rows, config=LaunchConfig(block_rows=4, block_w=64, num_warps=2))


def fault_unreachable_address(tmp: Path, address: str = "192.0.2.123:6379",
                              timeout: str = "30") -> dict:
    started = time.monotonic()
    process = cli(["search", "--shape", "128x64", "--interpret", "--address", address,
                   "--connect-timeout", timeout, "--storage", f"sqlite:///{tmp}/t.db",
                   "--table", str(tmp / "t.json")], tmp)
    _, err = process.communicate(timeout=300)
    ok = process.returncode == 2 and err.count("\n") == 1
    return {"lost": 0, "corrupt": False, "failed": int(not ok),
            "note": f"exit {process.returncode} within {time.monotonic() - started:.0f} s"}


def fault_silent_port(tmp: Path) -> dict:
    with socket.socket() as listener:  # accepts connections, never speaks Ray
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        return fault_unreachable_address(tmp, f"127.0.0.1:{listener.getsockname()[1]}", "10")


FAULTS = {
    "worker process SIGKILLed mid-trial": fault_worker_sigkill,
    "worker hung mid-trial (SIGSTOP; --trial-timeout 5)": fault_worker_hang,
    "two drivers on one SQLite study at once": fault_concurrent_drivers,
    "four drivers creating one new SQLite storage at once": fault_storage_creation_race,
    "table write SIGKILLed (in dump, fsync or rename)": fault_table_write_crash,
    "unreachable --address (TEST-NET host; --connect-timeout 30)": fault_unreachable_address,
    "--address port that answers but is no Ray head (--connect-timeout 10)": fault_silent_port,
    "driver SIGKILLed mid-sweep, then the same command again": fault_driver_sigkill,
    "Ray worker node killed with a trial in flight (2-node cluster)": fault_node_killed,
}


# -- report ------------------------------------------------------------------------------------
def versions() -> str:
    import torch
    import triton

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()}-core CPU ({cpu}), no GPU (Triton interpreter); Python "
            f"{platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"ray {ray.__version__}, optuna {optuna.__version__}")


def report(results: dict[str, list[dict]], tally: dict, repeat: int, seconds: float) -> str:
    lines = ["# Reliability", "",
             f"Produced by `PYTHONPATH=$PWD python benchmarks/reliability.py --repeat {repeat}` on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, in "
             f"{seconds / 60:.0f} min.", "", f"Machine: {versions()}.", "",
             "## Faults injected", "",
             "| fault | injected | trials lost | tables corrupted | runs failed | observed |",
             "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        notes = sorted({run["note"] for run in runs if run.get("note")})
        lines.append(f"| {name} | {len(runs)} | {sum(run['lost'] for run in runs)} | "
                     f"{sum(bool(run['corrupt']) for run in runs)} | "
                     f"{sum(run.get('failed', 0) for run in runs)} | {'; '.join(notes)} |")
    lines += ["", "Trials lost: budgeted trials with no stored outcome, configs measured twice, "
              "trials left RUNNING, and runs that raised. A hung or crashed config's trial is "
              "stored as failed (with its error) and is not lost.", "",
              "## Bad input", "", "| input class | tried | answered with |", "|---|---|---|"]
    for name, counts in tally.items():
        answered = ", ".join(f"{outcome} {count}" for outcome, count in sorted(counts.items()))
        lines.append(f"| {name} | {sum(counts.values())} | {answered} |")
    tracebacks = sum(count for counts in tally.values() for outcome, count in counts.items()
                     if outcome.startswith("TRACEBACK"))
    lines += ["", f"Tracebacks: {tracebacks} (goal 0). `exit 2` is the CLI's one-line error; "
              "ValueError subclasses (SpaceError, SpecError, TableError, StorageError) are the "
              "API's answers.", "", "## Not run here", "",
              "A config whose kernel makes an illegal memory access needs a GPU: "
              "`PYTHONPATH=$PWD python benchmarks/reliability_gpu.py` (writes "
              "`benchmarks/results/reliability_gpu.json`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="injections per fault (default 3)")
    parser.add_argument("--inputs", type=int, default=200, help="bad inputs per class (default 200)")
    parser.add_argument("--out", default=str(ROOT / "RELIABILITY.md"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    random.seed(0)
    started = time.monotonic()
    results: dict[str, list[dict]] = {}
    for name, fault in FAULTS.items():
        if fault is not fault_node_killed and not ray.is_initialized():
            ray.init(address="local", num_gpus=4, num_cpus=4, include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False)
        if fault is fault_node_killed:
            ray.shutdown()  # it runs its own multi-node cluster
        for attempt in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="tuner-fault-") as tmp:
                result = fault(Path(tmp))
            print(f"{name} #{attempt + 1}: {result}", flush=True)
            results.setdefault(name, []).append(result)
    with tempfile.TemporaryDirectory(prefix="tuner-inputs-") as tmp:
        tally = bad_inputs(args.inputs, Path(tmp), SPACE_YAML,
                           json.dumps({"schema_version": 1, "entries": [entry(128).to_json()]}))
    text = report(results, tally, args.repeat, time.monotonic() - started)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
