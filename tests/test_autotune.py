"""Self-tuning on a table miss (TUNER_AUTOTUNE) and the miss log (TUNER_MISS_LOG), in process
and end to end: a runtime process tunes and logs, a second one reads the table, and
``python -m tuner sweep --misses`` tunes exactly the logged problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels.add_layernorm as add_layernorm_module
import kernels.autotune as autotune
import kernels.misses as misses
from kernels import LaunchConfig, load_table, reload_tables, select_config, user_table_path
from kernels.add_layernorm_pool_gelu import (
    ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
    PoolGeluCall,
    fused_add_layernorm_pool_gelu,
)
from tuner.cli import main
from tuner.problems import get_kernel
from tuner.sweep import SpecError, load_misses

REPO = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def tuning(no_tables, monkeypatch):
    monkeypatch.setenv("TUNER_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_tuned", {})


def inputs(rows, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=generator) * 2 + 0.6).to(dtype)
    weight = (torch.randn(width, generator=generator) * 0.5 + 1).to(dtype)
    bias = (torch.randn(width, generator=generator) * 0.5).to(dtype)
    return x, torch.tensor(0.75, dtype=dtype), weight, bias


def assert_layernorm(out, x, sum_weight, weight, bias):
    expected = F.layer_norm(x.double() + sum_weight.double(), x.shape[-1:], weight.double(),
                            bias.double())
    error = ((out.double() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE[x.dtype], error


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_miss_tunes_once_saves_and_keeps_the_callers_buffer(tuning, launch_grids, dtype):
    x, s, weight, bias = inputs(12, 48, dtype, seed=3)
    original = x.clone()
    out = torch.full_like(x, float("nan"))
    result = add_layernorm_module.fused_add_layernorm(x, s, 48, weight, bias, out=out)
    assert result is out and torch.equal(x, original)
    assert_layernorm(out, x, s, weight, bias)
    [entry] = load_table(user_table_path())
    assert (entry.kernel, entry.device, entry.dtype, entry.width, entry.rows) == \
        ("add_layernorm", "interpreter", str(dtype)[6:], 48, 12)
    assert entry.trials >= 1 and entry.ms > 0
    # Later calls of the bucket (rows 8 to 15) use the table and tune nothing.
    grids = launch_grids(add_layernorm_module, "_add_layernorm_kernel")
    assert select_config(12, 48, dtype) == (entry.config, "table")
    x2, s2, w2, b2 = inputs(13, 48, dtype, seed=4)
    assert_layernorm(add_layernorm_module.fused_add_layernorm(x2, s2, 48, w2, b2), x2, s2, w2, b2)
    assert len(grids) == 1 and len(load_table(user_table_path())) == 1
    # In place (out is x) keeps its meaning: candidates never touch the caller's tensors.
    autotune._tuned.clear()
    x3, s3, w3, b3 = inputs(40, 48, dtype, seed=5)
    inplace = x3.clone()
    add_layernorm_module.fused_add_layernorm(inplace, s3, 48, w3, b3, out=inplace)
    assert_layernorm(inplace, x3, s3, w3, b3)
    assert len(load_table(user_table_path())) == 2


def test_multi_dim_normalized_shape_and_strided_weight(tuning):
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, 12, generator=generator) * 2 + 0.5
    weight = (torch.randn(12, 4, generator=generator) + 1).t()  # not contiguous
    bias = torch.randn(4, 12, generator=generator)
    out = add_layernorm_module.fused_add_layernorm(x, 0.3, (4, 12), weight, bias)
    expected = F.layer_norm(x.double() + 0.3, (4, 12), weight.double(), bias.double())
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-4
    [entry] = load_table(user_table_path())
    assert (entry.width, entry.rows) == (48, 6) and entry.trials >= 1


def test_wrong_candidate_is_rejected(tuning, monkeypatch):
    """A candidate whose output is wrong (not only NaN) never wins, however fast."""
    fast_but_wrong = LaunchConfig(block_rows=2, block_w=64, num_warps=1)
    honest = LaunchConfig(block_rows=4, block_w=64, num_warps=2)
    descriptor = add_layernorm_module.ADD_LAYERNORM
    real_launch = descriptor.launch

    def launch(x, out, *args, **kwargs):
        real_launch(x, out, *args, **kwargs)
        if args[-1] == fast_but_wrong:
            out[0, 0] += 0.5  # one element off

    times = iter(range(100, 0, -1))  # every candidate looks faster than the one before
    monkeypatch.setattr(descriptor, "launch", launch)
    monkeypatch.setattr(autotune, "_neighbours", lambda *_: [honest, fast_but_wrong])
    monkeypatch.setattr(autotune, "_timer", lambda run: (run(), next(times))[1])
    x, s, weight, bias = inputs(8, 64, torch.float32, seed=6)
    out = add_layernorm_module.fused_add_layernorm(x, s, 64, weight, bias)
    assert_layernorm(out, x, s, weight, bias)
    assert [entry.config for entry in load_table(user_table_path())] == [honest]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_fused_tail_tunes_on_a_miss(tuning, dtype, channels_last):
    generator = torch.Generator().manual_seed(12)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = (torch.randn(2, 3, 4, 6, 8, generator=generator) * 2 + 0.5).to(dtype) \
        .contiguous(memory_format=layout)
    weight = (torch.randn(8, generator=generator) * 0.5 + 1).to(dtype)
    bias = (torch.randn(8, generator=generator) * 0.5).to(dtype)
    s = torch.tensor(0.4, dtype=dtype)
    out = torch.full((2, 3, 2, 3, 4), float("nan"), dtype=dtype).contiguous(memory_format=layout)
    fused_add_layernorm_pool_gelu(x, s, weight, bias, out=out)
    expected = F.gelu(F.avg_pool3d(F.layer_norm(x.double() + s.double(), (8,), weight.double(),
                                                bias.double()), 2))
    assert ((out.double() - expected).norm() / expected.norm()).item() < TOLERANCE[dtype]
    [entry] = load_table(user_table_path())
    assert (entry.kernel, entry.width, entry.rows) == ("add_layernorm_pool_gelu", 8, 36)
    assert entry.variant == "h6_k2x2x2_none" + ("_cl_c3" if channels_last else "")
    descriptor = ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST if channels_last else ADD_LAYERNORM_POOL_GELU
    assert descriptor.select(PoolGeluCall((2, 3, 4, 6, 8), dtype)) == (entry.config, "table")


def test_off_by_default_and_never_for_another_device_name(no_tables, monkeypatch):
    monkeypatch.setattr(autotune, "_tuned", {})
    x, s, weight, bias = inputs(8, 32, torch.float32, seed=7)
    add_layernorm_module.fused_add_layernorm(x, s, 32, weight, bias)
    monkeypatch.setenv("TUNER_AUTOTUNE", "1")
    monkeypatch.setenv("TUNER_DEVICE_NAME", "NVIDIA GeForce RTX 4090")  # interpreter posing as a GPU
    add_layernorm_module.fused_add_layernorm(x, s, 32, weight, bias)
    assert not user_table_path().exists()


def test_miss_log_once_per_problem_with_the_tuners_names(no_tables, monkeypatch, tmp_path):
    log = tmp_path / "misses.jsonl"
    monkeypatch.setenv("TUNER_MISS_LOG", str(log))
    monkeypatch.setattr(misses, "_logged", set())
    for _ in range(2):
        for dtype in (torch.float32, torch.bfloat16):
            x, s, weight, bias = inputs(6, 40, dtype, seed=8)
            add_layernorm_module.fused_add_layernorm(x, s, 40, weight, bias)
        x = torch.randn(2, 3, 4, 6, 8) + 0.5
        fused_add_layernorm_pool_gelu(x, 0.5)
        fused_add_layernorm_pool_gelu(x.contiguous(memory_format=torch.channels_last_3d), 0.5)
        fused_add_layernorm_pool_gelu(x, 0.5, approximate="tanh")  # not tunable: not logged
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 4 and len({json.dumps(record) for record in records}) == 4
    assert {(r["kernel"], r["dtype"], r["shape"]) for r in records[:2]} == {
        ("add_layernorm", "float32", "6x40"), ("add_layernorm", "bfloat16", "6x40")}
    # Each logged tail problem has the table key of the call that missed.
    for record, channels_last in zip(records[2:], (False, True)):
        spec = get_kernel(record["kernel"])
        key = spec.table_key(spec.problem(record["shape"], record["dtype"]))
        assert record["device"] == "interpreter"
        assert (key.width, key.rows) == (8, 2 * 3 * 2 * 3)
        assert key.variant == f"h6_k2x2x2_none{'_cl_c3' if channels_last else ''}"
        assert spec.descriptor.select(PoolGeluCall((2, 3, 4, 6, 8), torch.float32))[1] \
            == "heuristic"


@pytest.mark.parametrize("text, problem", [
    ('{"kernel": "add_layernorm"\n', ":1: not a JSON object"),
    ('\n{"kernel": "add_layernorm", "device": "d", "dtype": "float32"}\n', ":2: missing or not a non-empty string: shape"),
    ('{"kernel": "add_layernorm", "device": "d", "dtype": "float32", "shape": "8x", "x": 1}\n',
     ":1: unknown keys ['x']"),
    ('{"kernel": "softmax", "device": "d", "dtype": "float32", "shape": "8x8"}\n',
     ":1: unknown kernel 'softmax'"),
    ('{"kernel": "add_layernorm", "device": "d", "dtype": "float8", "shape": "8x8"}\n',
     ":1: unknown dtype 'float8'"),
    ('{"kernel": "add_layernorm", "device": "d", "dtype": "float32", "shape": "8y8"}\n',
     ":1: bad shape '8y8'"),
    ("[1, 2]\n", ":1: expected a mapping"),
    ("\n", "has no entries"),
])
def test_bad_miss_log_is_a_clear_error(tmp_path, capsys, text, problem):
    log = tmp_path / "misses.jsonl"
    log.write_text(text)
    with pytest.raises(SpecError, match=str(log)):
        load_misses(log)
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--misses", str(log), "--interpret"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(log) in err and problem in err, err


RUNTIME = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    from kernels import fused_add_layernorm, select_config
    errors = {}
    for rows, width in ((8, 48), (5, 24)):
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)) * 2 + 1
        out = fused_add_layernorm(x, 0.5, width)
        ref = F.layer_norm(x.double() + 0.5, (width,))
        errors[f"{rows}x{width}"] = ((out.double() - ref).norm() / ref.norm()).item()
        out = fused_add_layernorm(x, 0.5, width)  # a second call: no second line in the log
    print(json.dumps({"errors": errors, "source": select_config(8, 48, torch.float32)[1]}))
""")


def run_runtime(env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", RUNTIME], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_end_to_end_tune_log_reuse_and_sweep_the_misses(ray_cluster, tmp_path):
    env = {name: value for name, value in os.environ.items()
           if name not in ("TUNER_TABLE", "TUNER_DEVICE_NAME")}
    log = tmp_path / "misses.jsonl"
    env.update(TRITON_INTERPRET="1", TUNER_AUTOTUNE="1", TUNER_MISS_LOG=str(log),
               XDG_DATA_HOME=str(tmp_path / "data"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    first = run_runtime(env)
    assert all(error < 1e-4 for error in first["errors"].values()) and first["source"] == "table"
    table = tmp_path / "data" / "tuner" / "table.json"
    assert {(entry.width, entry.rows) for entry in load_table(table)} == {(48, 8), (24, 5)}
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kernel"], r["device"], r["dtype"], r["shape"]) for r in logged] == [
        ("add_layernorm", "interpreter", "float32", "8x48"),
        ("add_layernorm", "interpreter", "float32", "5x24")]
    # A later process finds both in the user table: nothing to log, nothing to tune.
    written = table.read_text()
    second = run_runtime(env)
    assert all(error < 1e-4 for error in second["errors"].values())
    assert len(log.read_text().splitlines()) == 2 and table.read_text() == written

    out = tmp_path / "tables"
    code = main(["sweep", "--misses", str(log), "--interpret", "--trials", "2", "--workers", "1",
                 "--storage", f"sqlite:///{tmp_path}/s.db", "--out", str(out)])
    assert code == 0
    entries = load_table(out / "interpreter.json")
    assert sorted((entry.kernel, entry.width, entry.rows) for entry in entries) == [
        ("add_layernorm", 24, 5), ("add_layernorm", 48, 8)]
    reload_tables()
