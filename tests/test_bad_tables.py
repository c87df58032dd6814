"""One bad table file must not break kernel calls (issue 13, item 1): the runtime skips a bad
file or bad entry with one warning naming it and uses the next table or the default; the CLI
still reports it as an error (one line, exit 2)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels.add_layernorm as add_layernorm_module
import kernels.table as table_module
from kernels import LaunchConfig, TableEntry, fused_add_layernorm, merge_entries, reload_tables
from kernels.table import TableWarning
from tuner.cli import main

GOOD = LaunchConfig(block_rows=4, block_w=64, num_warps=2, eviction_policy="evict_last")
GOOD_ENTRY = {"kernel": "add_layernorm", "device": "interpreter", "dtype": "float32", "width": 64,
              "rows": 24, "config": GOOD.as_dict()}
BAD_FILES = {
    "truncated": '{"schema_version": 1, "entries": [{"kernel": "add_lay',
    "empty": "",
    "not_json": "block_rows: 4\n",
    "wrong_schema": json.dumps({"schema_version": 2, "entries": []}),
    "not_a_table": json.dumps([GOOD_ENTRY]),
    "entries_not_list": json.dumps({"schema_version": 1, "entries": {"a": 1}}),
}
BAD_ENTRIES = {
    "block_rows_0": {**GOOD_ENTRY, "width": 32, "config": {**GOOD.as_dict(), "block_rows": 0}},
    "num_warps_3": {**GOOD_ENTRY, "width": 32, "config": {**GOOD.as_dict(), "num_warps": 3}},
}
PROBLEMS = {"truncated": "not valid JSON", "empty": "not valid JSON", "not_json": "not valid JSON",
            "wrong_schema": "schema_version 2", "not_a_table": "no schema_version",
            "entries_not_list": "'entries' must be a list", "block_rows_0": "block_rows=0",
            "num_warps_3": "num_warps=3"}


@pytest.fixture
def world(monkeypatch, tmp_path):
    """TUNER_TABLE, the user table and the shipped tables in tmp_path; warnings forgotten."""
    env_table = tmp_path / "env.json"
    monkeypatch.setenv("TUNER_TABLE", str(env_table))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("TUNER_DEVICE_NAME", raising=False)
    monkeypatch.setattr(table_module, "SHIPPED_TABLES_DIR", tmp_path / "shipped")
    monkeypatch.setattr(table_module, "_warned", set())
    reload_tables()
    yield env_table
    reload_tables()


def write_bad(path, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in BAD_ENTRIES:
        # The bad entry sits between good ones: only it is skipped.
        document = {"schema_version": 1, "entries": [GOOD_ENTRY, BAD_ENTRIES[kind]]}
        path.write_text(json.dumps(document))
    else:
        path.write_text(BAD_FILES[kind])


def layernorm(rows, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=generator) * 2 + 0.7).to(dtype)
    weight = (torch.randn(width, generator=generator) * 0.5 + 1).to(dtype)
    bias = (torch.randn(width, generator=generator) * 0.5).to(dtype)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    fused_add_layernorm(x, 0.25, width, weight, bias, out=out)
    expected = F.layer_norm(x.double() + 0.25, (width,), weight.double(), bias.double())
    tolerance = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert ((out.double() - expected).norm() / expected.norm()).item() < tolerance


@pytest.mark.parametrize("where", ["TUNER_TABLE", "user"])
@pytest.mark.parametrize("kind", list(BAD_FILES) + list(BAD_ENTRIES))
def test_runtime_skips_bad_table_with_one_warning(world, launch_grids, where, kind):
    bad = world if where == "TUNER_TABLE" else table_module.user_table_path()
    write_bad(bad, kind)
    # The next table (the user's, else a shipped one) still answers.
    following = (table_module.user_table_path() if where == "TUNER_TABLE"
                 else table_module.SHIPPED_TABLES_DIR / "interpreter.json")
    merge_entries(following, [TableEntry(kernel="add_layernorm", device="interpreter",
                                         dtype="float32", width=64, rows=24, config=GOOD)])
    reload_tables()
    grids = launch_grids(add_layernorm_module, "_add_layernorm_kernel")
    with pytest.warns(TableWarning) as caught:
        layernorm(24, 64, torch.float32, seed=1)
    messages = [str(warning.message) for warning in caught if warning.category is TableWarning]
    assert len(messages) == 1 and str(bad) in messages[0] and PROBLEMS[kind] in messages[0]
    assert grids == [(6,)]  # GOOD (4 rows a program) from the good entry or the next table
    # Once per process: neither another call nor a reload warns again.
    with warnings.catch_warnings():
        warnings.simplefilter("error", TableWarning)
        reload_tables()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            layernorm(10, 32, dtype, seed=2)


@pytest.mark.parametrize("kind", ["truncated", "wrong_schema", "num_warps_3"])
def test_cli_reports_bad_table(world, tmp_path, capsys, kind):
    bad = tmp_path / "bad.json"
    write_bad(bad, kind)
    for argv in (["show", "--table", str(bad)],
                 ["search", "--shape", "8x64", "--interpret", "--table", str(bad)],
                 ["export", "--storage", f"sqlite:///{tmp_path}/s.db", "--out", str(bad)]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("tuner: error: ") and "\n" not in err, err
        assert str(bad) in err and PROBLEMS[kind] in err, err


def test_writes_into_a_bad_table_refuse_and_keep_it(world, tmp_path):
    bad = tmp_path / "bad.json"
    write_bad(bad, "truncated")
    with pytest.raises(table_module.TableError, match="not valid JSON"):
        merge_entries(bad, [TableEntry(kernel="add_layernorm", device="interpreter",
                                       dtype="float32", width=64, rows=8, config=GOOD)])
    assert bad.read_text() == BAD_FILES["truncated"]  # never overwritten
