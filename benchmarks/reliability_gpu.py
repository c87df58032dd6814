"""GPU-only fault: a config whose kernel makes an illegal memory access (the CUDA context dies).

Expected: that config's trial fails with the CUDA error, its worker is replaced by a fresh
process, every other config is measured and the winner reaches the table. Needs a GPU:

    PYTHONPATH=$PWD python benchmarks/reliability_gpu.py [--repeat 3]

Writes benchmarks/results/reliability_gpu.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import optuna
import ray
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from tuner.driver import Driver, Progress  # noqa: E402
from tuner.problems import get_kernel  # noqa: E402
from tuner.problems.add_layernorm import AddLayerNorm  # noqa: E402
from tuner.space import parse_space  # noqa: E402
from tuner.study import Settings, study_name  # noqa: E402
from tuner.workers import PoolOptions, WorkerPool  # noqa: E402

FAULTY = "faulty_add_layernorm"
SPACE = parse_space({"kernel": FAULTY, "restrictions": {}, "parameters": {
    "block_rows": [2, 4], "block_w": [64], "num_warps": [1, 2], "num_stages": [1],
    "eviction_policy": ["", "evict_first"]}})  # 8 configs, 4 of them faulty (num_warps 1)


@triton.jit
def _scribble(out_ptr, offset):
    tl.store(out_ptr + offset, 1.0)  # far outside any allocation


class FaultyDescriptor(kernels.AddLayerNorm):
    """The add_layernorm kernel under a name of its own (its problems, study and table entries)."""

    name = FAULTY


class FaultyAddLayerNorm(AddLayerNorm):
    """add_layernorm whose num_warps=1 configs write 4 TiB past the output: a test-only
    kernel variant for the illegal-memory-access path."""

    descriptor = FaultyDescriptor()

    def run(self, inputs, config, out=None):
        out = super().run(inputs, config, out=out)
        if config is not None and config.num_warps == 1:
            _scribble[(1,)](out, 1 << 40)
        return out


# The faulty kernel as a user's own kernel reaches the workers: by a module:attribute reference.
REFERENCE = "benchmarks.reliability_gpu:FaultyAddLayerNorm"


class FaultyPool(WorkerPool):
    def _actor_options(self):
        options = super()._actor_options()
        runtime_env = options.setdefault("runtime_env", {})
        inherited = os.environ.get("PYTHONPATH")  # where an offline install put Ray itself
        runtime_env.setdefault("env_vars", {})["PYTHONPATH"] = \
            str(ROOT) + (os.pathsep + inherited if inherited else "")
        return options


def inject(tmp: Path) -> dict:
    problem = get_kernel(REFERENCE).problem("4096x64", "float32")
    storage = optuna.storages.InMemoryStorage()
    pool = FaultyPool(PoolOptions(workers=1))
    try:
        pool.start()
        first = {worker.info["pid"] for worker in pool.workers}
        device = pool.workers[0].device
        results = Driver(pool, storage, Settings(trials=8, confirm_top=2, confirm_rounds=3),
                         lambda device: tmp / "table.json", space=SPACE,
                         progress=Progress(stream=io.StringIO())).run([problem])
        replaced = len(first - {worker.info["pid"] for worker in pool.workers})
    finally:
        pool.shutdown()
    study = optuna.load_study(study_name=study_name(problem, device), storage=storage)
    trials = [t for t in study.trials if t.user_attrs.get("measured")]
    fatal = [t for t in trials if "illegal memory access" in t.user_attrs.get("error", "")]
    return {"trials": len(trials), "failed_illegal_access": len(fatal),
            "completed": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
            "workers_replaced_at_least": replaced, "table_written": (tmp / "table.json").exists(),
            "winner_is_safe": bool(results) and results[0].config.num_warps != 1,
            "confirm_error": study.user_attrs.get("confirm_error"),
            "errors": sorted({t.user_attrs["error"][:300] for t in trials
                              if "error" in t.user_attrs})[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    runs = []
    for attempt in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(inject(Path(tmp)))
        print(f"#{attempt + 1}: {runs[-1]}", flush=True)
    out = ROOT / "benchmarks" / "results" / "reliability_gpu.json"
    out.write_text(json.dumps({"fault": "illegal memory access in 4 of 8 configs",
                               "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
