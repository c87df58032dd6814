"""``tuner sweep`` on a local multi-node Ray cluster standing in for two GPU models.

The cluster (``ray.cluster_utils.Cluster``) has a CPU-only head and two worker nodes with
logical GPUs. Each worker node carries a custom resource (``fake_model_a`` / ``fake_model_b``)
and sets ``TUNER_DEVICE_NAME`` in its raylet's environment, which every worker process it starts
inherits: under the Triton interpreter ``kernels.device.device_name`` reports that name, so the
workers on the two nodes report two different GPU models, exactly as two kinds of real GPUs
would.

The pytest process never joins this cluster (another fixture may already have Ray initialised in
it): the CLI, and a small driver script for the killed-worker test, run in subprocesses that
connect with ``--address``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuner.cli import device_file_name
from tuner.problems import KERNELS
from tuner.sweep import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "search_spaces" / "sweeps"
MODELS = {"Fake GPU A": ("fake_model_a", 2), "Fake GPU B": ("fake_model_b", 1)}  # name: (resource, GPUs)
SHAPES = "96x64,40x200"
TRIALS = 3
RUN_TIMEOUT = 240  # seconds for one subprocess; a hang fails the test instead of the session


# -- the cluster -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Head (no GPU) + one node per fake GPU model; shut down when the module is done."""
    import ray.experimental.internal_kv as internal_kv
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        for name, (resource, gpus) in MODELS.items():
            cluster.add_node(num_cpus=2, num_gpus=gpus, resources={resource: gpus},
                             env_vars={"TUNER_DEVICE_NAME": name, "TRITON_INTERPRET": "1"})
        yield cluster
    finally:
        # Cluster.shutdown resets this process's internal KV client; keep it for a Ray
        # instance that another fixture may have initialised in-process.
        saved = internal_kv.global_gcs_client, internal_kv._initialized
        cluster.shutdown()
        internal_kv.global_gcs_client, internal_kv._initialized = saved


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("TUNER_DEVICE_NAME", "RAY_ADDRESS", "TUNER_TABLE"):
        env.pop(name, None)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _sweep(cluster, tmp: Path, trials: int = TRIALS) -> subprocess.CompletedProcess:
    result = _run(["-m", "tuner", "sweep", "--address", cluster.address, "--shapes", SHAPES,
                   "--dtypes", "float32", "--trials", str(trials), "--interpret",
                   "--storage", f"sqlite:///{tmp}/s.db", "--out", str(tmp / "tables")])
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-6000:]}"
    return result


def _studies(storage_url: str) -> dict[str, "optuna.Study"]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.get_storage(storage_url)
    return {summary.study_name: optuna.load_study(study_name=summary.study_name, storage=storage)
            for summary in optuna.get_all_study_summaries(storage)}


def _measured(study) -> list:
    return [trial for trial in study.get_trials(deepcopy=False) if trial.user_attrs.get("measured")]


def _table_entries(folder: Path) -> dict[str, list[dict]]:
    from kernels import load_table

    return {path.name: sorted((entry.to_json() for entry in load_table(path)),
                              key=lambda entry: (entry["width"], entry["rows"]))
            for path in sorted(folder.glob("*.json"))}


# -- sweep, resume, extend ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory):
    """The first sweep: 2 shapes x 2 fake GPU models, 3 trials per study."""
    tmp = tmp_path_factory.mktemp("sweep")
    result = _sweep(cluster, tmp)
    return tmp, result


def test_env_vars_reach_workers_on_each_node(swept):
    _, result = swept
    # 3 workers (2 on model A's node, 1 on B's), grouped into the two reported device names
    assert "3 workers on Fake GPU A, Fake GPU B; 2 problems" in result.stderr


def test_sweep_writes_one_table_per_model(swept):
    tmp, result = swept
    tables = _table_entries(tmp / "tables")
    assert sorted(tables) == sorted(device_file_name(name) for name in MODELS)
    for name in MODELS:
        entries = tables[device_file_name(name)]
        assert {entry["device"] for entry in entries} == {name}
        assert {(entry["rows"], entry["width"]) for entry in entries} == {(96, 64), (40, 200)}
        assert all(entry["kernel"] == "add_layernorm" and entry["dtype"] == "float32"
                   and entry["trials"] == TRIALS and entry["ms"] > 0 for entry in entries)
        assert f"table for {name}: {tmp / 'tables' / device_file_name(name)}" in result.stderr
    assert "Fake GPU A" in result.stdout and "Fake GPU B" in result.stdout  # the summary


def test_sweep_stores_one_study_per_shape_and_model(swept):
    tmp, _ = swept
    studies = _studies(f"sqlite:///{tmp}/s.db")
    assert sorted(studies) == sorted(f"add_layernorm:{name}:float32:{shape}"
                                     for name in MODELS for shape in SHAPES.split(","))
    nodes = {}
    for study_name, study in studies.items():
        assert study.user_attrs["result"]["device"] == study.user_attrs["device"]
        measured = _measured(study)
        assert len(measured) == TRIALS
        assert len({trial.user_attrs["config"] for trial in measured}) == TRIALS
        nodes.setdefault(study.user_attrs["device"], set()).update(
            trial.user_attrs["worker"] for trial in measured)
    # each model's trials ran on its own node only
    assert all(len(node_ids) == 1 for node_ids in nodes.values())
    assert nodes["Fake GPU A"] != nodes["Fake GPU B"]


def test_resume_skips_finished_studies_then_extends_them(cluster, swept):
    tmp, _ = swept
    url = f"sqlite:///{tmp}/s.db"

    def measured_configs() -> dict[str, list[str]]:
        return {name: [trial.user_attrs["config"] for trial in _measured(study)]
                for name, study in _studies(url).items()}

    before, tables_before = measured_configs(), _table_entries(tmp / "tables")

    result = _sweep(cluster, tmp)  # the same command again: nothing left to do
    assert measured_configs() == before
    assert _table_entries(tmp / "tables") == tables_before
    assert result.stdout.count("(resumed)") == 4

    _sweep(cluster, tmp, trials=TRIALS + 1)  # a bigger budget: one more trial per study
    after = measured_configs()
    assert sorted(after) == sorted(before)
    for name, configs in after.items():
        assert len(configs) == TRIALS + 1, name
        assert configs[:TRIALS] == before[name]
        assert len(set(configs)) == len(configs), f"{name}: a config measured twice: {configs}"
        assert _studies(url)[name].user_attrs["result"]["trials"] == TRIALS + 1
    for entries in _table_entries(tmp / "tables").values():
        assert len(entries) == 2 and all(entry["trials"] == TRIALS + 1 for entry in entries)


# -- a worker killed mid-sweep -----------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent('''
    """Runs the Driver on the cluster and kills the worker of the 2nd trial sent."""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import optuna, ray
    from pathlib import Path
    from tuner.driver import Driver, Progress
    from tuner.study import Settings, study_name
    from tuner.sweep import build_problems
    from tuner.workers import PoolOptions, WorkerPool
    from tests.faults import inject

    address, folder, trials = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    pool = WorkerPool(PoolOptions(interpret=True))
    started = [dict(slot=w.slot, device=w.device, pid=w.info["pid"]) for w in pool.start()]
    faults = inject(pool, 2, lambda worker: ray.kill(worker.actor, no_restart=True))
    storage = optuna.storages.get_storage(f"sqlite:///{folder}/kill.db")
    driver = Driver(pool, storage, Settings(trials=trials), lambda device: folder / "table.json",
                    progress=Progress(interval=1e9))
    results = driver.run(list(build_problems(["add_layernorm"], ["96x64", "40x200"], ["float32"])))
    final = [dict(slot=w.slot, device=w.device, pid=w.info["pid"]) for w in pool.workers]
    pool.shutdown()
    [(worker, problem, config)] = faults.faulted
    killed = dict(slot=worker.slot, device=worker.device, pid=worker.info["pid"],
                  study=study_name(problem, worker.device),
                  config=config.key())
    lost = [dict(slot=w.slot) for w in faults.replaced]
    studies = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        studies[summary.study_name] = dict(
            result="result" in study.user_attrs,
            measured=[dict(config=t.user_attrs["config"], state=t.state.name,
                           error=t.user_attrs.get("error"))
                      for t in study.get_trials(deepcopy=False) if t.user_attrs.get("measured")])
    print(json.dumps(dict(started=started, final=final, killed=killed, lost=lost,
                          results=len(results), studies=studies)))
''')


def test_worker_killed_mid_sweep_loses_nothing(cluster, tmp_path):
    script = tmp_path / "kill_worker.py"
    script.write_text(KILL_SCRIPT)
    result = _run([str(script), cluster.address, str(tmp_path), str(TRIALS)])
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    killed = report["killed"]
    assert killed, "no worker was killed"
    # the driver treated the worker as lost, exactly once
    assert [lost["slot"] for lost in report["lost"]] == [killed["slot"]]
    # the pool replaced the worker: same size, same models, a fresh process in the killed one's place
    started, final = report["started"], report["final"]
    assert sorted(w["device"] for w in final) == sorted(w["device"] for w in started)
    assert killed["slot"] not in {w["slot"] for w in final}
    assert killed["pid"] not in {w["pid"] for w in final}
    # nothing lost: every study measured its whole budget, the killed trial included, no errors
    studies = report["studies"]
    assert len(studies) == 4 and report["results"] == 4
    for name, study in studies.items():
        configs = [trial["config"] for trial in study["measured"]]
        assert study["result"], name
        assert len(configs) == TRIALS and len(set(configs)) == TRIALS, (name, configs)
        assert all(trial["error"] is None and trial["state"] == "COMPLETE"
                   for trial in study["measured"]), (name, study["measured"])
    assert killed["config"] in [trial["config"] for trial in studies[killed["study"]]["measured"]]


# -- sweep specs: validated on load, each bad one a clear error naming the file and key ----
def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


GOOD_SPEC = """\
kernels: [add_layernorm]
shapes: [128x64, 2x64x64, 40x200]
dtypes: [float32, bfloat16]
trials: 8
patience: 4
timeout: 60.5
"""


def test_valid_spec(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(GOOD_SPEC)
    spec = load_spec(path)
    assert spec.trials == 8 and spec.patience == 4 and spec.timeout == 60.5
    # 128x64 and 2x64x64 are one problem: canonical and without repeats
    assert [(p.shape, p.dtype) for p in spec.problems] == [
        ((128, 64), "float32"), ((128, 64), "bfloat16"),
        ((40, 200), "float32"), ((40, 200), "bfloat16")]
    minimal = parse_spec({"shapes": ["128x64"], "dtypes": ["float16"]})
    assert minimal.trials is None and minimal.problems[0].kernel == "add_layernorm"


BAD_SPECS = {
    "unknown key": (GOOD_SPEC + "workers: 4\n", r"unknown keys \['workers'\]"),
    "empty shapes": (edit(GOOD_SPEC, "shapes: [128x64, 2x64x64, 40x200]", "shapes: []"),
                     r"shapes: must not be empty"),
    "missing shapes": (edit(GOOD_SPEC, "shapes: [128x64, 2x64x64, 40x200]\n", ""),
                       r"missing shapes"),
    "missing dtypes": (edit(GOOD_SPEC, "dtypes: [float32, bfloat16]\n", ""), r"missing dtypes"),
    "shapes not a list": (edit(GOOD_SPEC, "shapes: [128x64, 2x64x64, 40x200]", "shapes: 128x64"),
                          r"shapes: expected list, got '128x64'"),
    "bad dtype": (edit(GOOD_SPEC, "dtypes: [float32, bfloat16]", "dtypes: [float32, float64]"),
                  r"unknown dtype 'float64'; accepted: float32, float16, bfloat16"),
    "bad shape": (edit(GOOD_SPEC, "40x200", "40x"), r"bad shape '40x'"),
    "bad kernel": (edit(GOOD_SPEC, "kernels: [add_layernorm]", "kernels: [softmax]"),
                   r"kernels: unknown kernel 'softmax'"),
    "zero trials": (edit(GOOD_SPEC, "trials: 8", "trials: 0"), r"trials: must be positive, got 0"),
    "negative patience": (edit(GOOD_SPEC, "patience: 4", "patience: -1"),
                          r"patience: must be positive, got -1"),
    "string trials": (edit(GOOD_SPEC, "trials: 8", "trials: many"), r"trials: expected int"),
    "bool trials": (edit(GOOD_SPEC, "trials: 8", "trials: true"), r"trials: expected int"),
    "not a mapping": ("- 128x64\n", r"expected a mapping"),
    "invalid YAML": ("shapes: [128x64\n", r"not valid YAML"),
}


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_bad_spec_is_a_clear_error(tmp_path, name):
    """Each problem is a SpecError that names the file first."""
    text, match = BAD_SPECS[name]
    (tmp_path / "sweep.yaml").write_text(text)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(tmp_path))}/sweep\.yaml: .*{match}"):
        load_spec(tmp_path / "sweep.yaml")


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: cannot read sweep spec"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_specs_load(path):
    spec = load_spec(path)
    assert spec.problems and all(problem.kernel in KERNELS for problem in spec.problems)
