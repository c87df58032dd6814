"""The lookup table: round trip, lookup (exact and nearest), isolation, precedence, errors,
concurrent writers and caching."""

from __future__ import annotations

import json
import multiprocessing
import os
import re

import pytest
import torch

import kernels.add_layernorm as add_layernorm_module
import kernels.table as table_module
from kernels import (
    SCHEMA_VERSION,
    LaunchConfig,
    TableEntry,
    TableError,
    fused_add_layernorm,
    heuristic_config,
    load_table,
    lookup_config,
    merge_entries,
    reload_tables,
    select_config,
    table_paths,
    user_table_path,
)

H100 = "NVIDIA H100 80GB HBM3"
RTX4090 = "NVIDIA GeForce RTX 4090"
INTERPRETER = "interpreter"

CONFIG_A = LaunchConfig(block_rows=2, block_w=64, num_warps=2)
CONFIG_B = LaunchConfig(block_rows=4, block_w=64, num_warps=4, num_stages=2,
                        eviction_policy="evict_first")
CONFIG_C = LaunchConfig(block_rows=8, block_w=64, num_warps=8, eviction_policy="evict_last")


def entry(rows=1024, width=64, dtype="float32", device=INTERPRETER, config=CONFIG_A,
          kernel="add_layernorm", **extra) -> TableEntry:
    return TableEntry(kernel=kernel, device=device, dtype=dtype, width=width, rows=rows,
                      config=config, **extra)


@pytest.fixture
def tables(monkeypatch, tmp_path):
    """An isolated table world: TUNER_TABLE, the user table and the shipped tables all point
    into tmp_path; caches are dropped before and after."""
    env_table = tmp_path / "env" / "table.json"
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv("TUNER_TABLE", str(env_table))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("TUNER_DEVICE_NAME", raising=False)
    monkeypatch.setattr(table_module, "SHIPPED_TABLES_DIR", shipped)
    reload_tables()
    yield env_table
    reload_tables()


def write_json(path, document):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def good_entry_json(**changes):
    data = entry(ms=0.5, trials=3).to_json()
    data.update(changes)
    return data


# --------------------------------------------------------------------------------------------
# Round trip and merge
# --------------------------------------------------------------------------------------------

def test_round_trip(tables, tmp_path):
    path = tmp_path / "round_trip" / "table.json"   # parent does not exist yet
    entries = [
        entry(rows=1 << 22, width=64, dtype="bfloat16", device=H100, config=CONFIG_C, ms=0.36,
              gbps=2990.0, pct_of_copy=99.1, trials=48, compute_capability="9.0",
              torch="2.11.0", triton="3.6.0", date="2026-11-25"),
        entry(rows=1024, config=CONFIG_A),
        entry(rows=7, width=3, dtype="float16", config=CONFIG_B, variant="h4_k2_none",
              kernel="add_layernorm_pool_gelu"),
    ]
    assert merge_entries(path, entries) == 3
    loaded = load_table(path)
    assert sorted(loaded, key=repr) == sorted(entries, key=repr)
    document = json.loads(path.read_text())
    assert document["schema_version"] == SCHEMA_VERSION
    assert len(document["entries"]) == 3
    # Unset optional fields are not written as null.
    minimal = next(e for e in document["entries"] if e["rows"] == 1024)
    assert "ms" not in minimal and "trials" not in minimal
    assert minimal["config"] == CONFIG_A.as_dict()
    # No temporary files left behind.
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) \
        == ["table.json"]


def test_merge_replaces_same_key_and_keeps_others(tables, tmp_path):
    path = tmp_path / "table.json"
    assert merge_entries(path, [entry(rows=1024, config=CONFIG_A),
                                entry(rows=2048, config=CONFIG_A)]) == 2
    assert merge_entries(path, [entry(rows=1024, config=CONFIG_B, ms=1.0)]) == 2
    by_rows = {e.rows: e for e in load_table(path)}
    assert by_rows[1024].config == CONFIG_B and by_rows[1024].ms == 1.0
    assert by_rows[2048].config == CONFIG_A
    # A different key field (variant, dtype, device, width, kernel) is a different entry.
    merge_entries(path, [entry(rows=1024, variant="v"), entry(rows=1024, dtype="float16"),
                         entry(rows=1024, device=H100), entry(rows=1024, width=128),
                         entry(rows=1024, kernel="other")])
    assert len(load_table(path)) == 7


def test_merge_is_seen_by_lookup_without_manual_reload(tables):
    assert select_config(1024, 64, torch.float32)[1] == "heuristic"
    merge_entries(tables, [entry(rows=1024, config=CONFIG_B)])
    assert select_config(1024, 64, torch.float32) == (CONFIG_B, "table")


def test_entry_key_and_json():
    e = entry(rows=5, width=7, dtype="float16", device=H100, variant="x")
    assert e.key == ("add_layernorm", H100, "float16", 7, "x", 5)
    assert e.to_json()["config"] == CONFIG_A.as_dict()


# --------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------

def test_exact_match(tables):
    merge_entries(tables, [entry(rows=1024, config=CONFIG_B),
                           entry(rows=4096, config=CONFIG_C)])
    reload_tables()
    config, source = select_config(1024, 64, torch.float32)
    assert config == CONFIG_B
    assert "table" in source and "nearest" not in source
    assert select_config(4096, 64, torch.float32, device=INTERPRETER) == (CONFIG_C, "table")


def test_launcher_uses_table_config(tables, launch_grids):
    """fused_add_layernorm launches with the table's config: grid = cdiv(rows, block_rows)."""
    merge_entries(tables, [entry(rows=10, width=64, config=CONFIG_A)])  # block_rows 2
    reload_tables()
    assert heuristic_config(10, 64, torch.float32).block_rows != CONFIG_A.block_rows
    grids = launch_grids(add_layernorm_module, "_add_layernorm_kernel")
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1)) * 2 + 1
    out = fused_add_layernorm(x, 0.5, 64)
    assert grids == [(5,)]
    expected = torch.nn.functional.layer_norm(x.double() + 0.5, (64,))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "rows,expected_rows",
    [(2000, 1024), (1, 1024), (1024, 1024), (8191, 1024), (8193, 65536), (40000, 65536),
     (65536, 65536), (10 ** 8, 65536)],
)
def test_nearest_entry_fallback(tables, rows, expected_rows):
    merge_entries(tables, [entry(rows=1024, config=CONFIG_A),
                           entry(rows=65536, config=CONFIG_B)])
    reload_tables()
    config, source = select_config(rows, 64, torch.float32)
    assert config == (CONFIG_A if expected_rows == 1024 else CONFIG_B)
    assert "table" in source
    if rows == expected_rows:
        assert source == "table"
    else:
        assert "nearest" in source and str(expected_rows) in source


def test_nearest_tie_prefers_more_rows(tables):
    # 2048 is exactly one octave from both 1024 and 4096.
    merge_entries(tables, [entry(rows=1024, config=CONFIG_A), entry(rows=4096, config=CONFIG_B)])
    assert select_config(2048, 64, torch.float32)[0] == CONFIG_B


@pytest.mark.parametrize("query_rows", [1024, 2000])
def test_device_isolation(tables, monkeypatch, query_rows):
    merge_entries(tables, [entry(rows=1024, device=H100, config=CONFIG_B)])
    reload_tables()
    for device in (INTERPRETER, RTX4090, "NVIDIA H100 PCIe", "nvidia h100 80gb hbm3", None):
        config, source = select_config(query_rows, 64, torch.float32, device=device)
        assert source == "heuristic", device
        assert config == heuristic_config(query_rows, 64, torch.float32)
    # The launcher on the interpreter never picks it up either.
    assert select_config(query_rows, 64, torch.float32)[1] == "heuristic"
    # Only the exact device name matches.
    assert select_config(query_rows, 64, torch.float32, device=H100)[0] == CONFIG_B
    # TUNER_DEVICE_NAME lets the interpreter stand in for that GPU.
    monkeypatch.setenv("TUNER_DEVICE_NAME", H100)
    assert select_config(query_rows, 64, torch.float32)[0] == CONFIG_B


def test_dtype_isolation(tables):
    merge_entries(tables, [entry(rows=1024, dtype="float16", config=CONFIG_B)])
    reload_tables()
    assert select_config(1024, 64, torch.float16) == (CONFIG_B, "table")
    for dtype in (torch.float32, torch.bfloat16):
        assert select_config(1024, 64, dtype)[1] == "heuristic"
        assert select_config(3000, 64, dtype)[1] == "heuristic"


def test_width_isolation(tables):
    merge_entries(tables, [entry(rows=1024, width=64, config=CONFIG_B)])
    reload_tables()
    for width in (32, 63, 65, 128):
        config, source = select_config(1024, width, torch.float32)
        assert source == "heuristic"
        assert config == heuristic_config(1024, width, torch.float32)


def test_kernel_and_variant_isolation(tables):
    merge_entries(tables, [entry(rows=1024, kernel="add_layernorm_pool_gelu", variant="v1",
                                 config=CONFIG_B)])
    reload_tables()
    assert select_config(1024, 64, torch.float32)[1] == "heuristic"

    def heuristic():
        return CONFIG_C

    def lookup(variant):
        return lookup_config("add_layernorm_pool_gelu", INTERPRETER, "float32", 64, 1024,
                             heuristic=heuristic, variant=variant)

    assert lookup("v1") == (CONFIG_B, "table")
    assert lookup("v2") == (CONFIG_C, "heuristic")
    assert lookup("") == (CONFIG_C, "heuristic")


# --------------------------------------------------------------------------------------------
# Precedence
# --------------------------------------------------------------------------------------------

def test_table_paths_order(tables, monkeypatch, tmp_path):
    shipped = table_module.SHIPPED_TABLES_DIR
    write_json(shipped / "b.json", {"schema_version": 1, "entries": []})
    write_json(shipped / "a.json", {"schema_version": 1, "entries": []})
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    monkeypatch.setenv("TUNER_TABLE", f"{first}{os.pathsep}{os.pathsep}{second}")
    assert table_paths() == [first, second, user_table_path(), shipped / "a.json",
                             shipped / "b.json"]
    assert user_table_path() == tmp_path / "data" / "tuner" / "table.json"
    monkeypatch.delenv("TUNER_TABLE")
    assert table_paths()[0] == user_table_path()


def test_tuner_table_precedence(tables, monkeypatch, tmp_path):
    shipped = table_module.SHIPPED_TABLES_DIR
    merge_entries(shipped / "h.json", [entry(rows=1024, config=CONFIG_A)])
    merge_entries(user_table_path(), [entry(rows=1024, config=CONFIG_B)])
    merge_entries(tables, [entry(rows=1024, config=CONFIG_C)])

    reload_tables()
    assert select_config(1024, 64, torch.float32) == (CONFIG_C, "table")

    monkeypatch.delenv("TUNER_TABLE")
    reload_tables()
    assert select_config(1024, 64, torch.float32) == (CONFIG_B, "table")

    user_table_path().unlink()
    reload_tables()
    assert select_config(1024, 64, torch.float32) == (CONFIG_A, "table")

    # Several TUNER_TABLE files: the first listed wins.
    other = tmp_path / "other.json"
    merge_entries(other, [entry(rows=1024, config=CONFIG_B)])
    monkeypatch.setenv("TUNER_TABLE", f"{other}{os.pathsep}{tables}")
    reload_tables()
    assert select_config(1024, 64, torch.float32) == (CONFIG_B, "table")


def test_missing_file_is_empty_table(tables, tmp_path):
    assert load_table(tmp_path / "nope.json") == []
    assert not tables.exists()
    reload_tables()
    assert select_config(1024, 64, torch.float32)[1] == "heuristic"


# --------------------------------------------------------------------------------------------
# Bad tables
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["{not json", "", '{"schema_version": 1, "entries": [', "\x00"],
                         ids=["garbage", "empty", "truncated", "nul"])
def test_corrupt_json(tables, text):
    write_json(tables, text)
    with pytest.raises(TableError, match=re.escape(str(tables)) + ".*not valid JSON"):
        load_table(tables)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_schema_version(tables, version):
    write_json(tables, {"schema_version": version, "entries": []})
    with pytest.raises(TableError, match=re.escape(str(tables)) + ".*schema_version"):
        load_table(tables)


@pytest.mark.parametrize("document", [{"entries": []}, [], 3, {"schema_version": 1},
                                      {"schema_version": 1, "entries": {}}],
                         ids=["no_version", "list", "number", "no_entries", "entries_dict"])
def test_not_a_table(tables, document):
    with pytest.raises(TableError, match=re.escape(str(tables))):
        load_table(write_json(tables, document))


def _without(key):
    data = good_entry_json()
    del data[key]
    return data


@pytest.mark.parametrize(
    "bad,match",
    [
        (_without("config"), r"entry is missing \['config'\]"),
        (_without("rows"), r"entry is missing \['rows'\]"),
        (_without("device"), r"entry is missing \['device'\]"),
        (good_entry_json(config={"block_rows": 1, "block_w": 48, "num_warps": 4}),
         r"bad config: .*block_w=48"),
        (good_entry_json(config={"block_rows": 1, "block_w": 64, "num_warps": 3}),
         r"bad config: .*num_warps=3"),
        (good_entry_json(config={"block_rows": 1, "block_w": 64}), r"bad config: .*missing"),
        (good_entry_json(config={"block_rows": 1, "block_w": 64, "num_warps": 4, "x": 1}),
         r"bad config: .*unknown"),
        (good_entry_json(config={"block_rows": "1", "block_w": 64, "num_warps": 4}),
         r"bad config"),
        (good_entry_json(config=[1, 64, 4]), r"config must be an object"),
        (good_entry_json(width=0), r"width must be a positive integer"),
        (good_entry_json(width="64"), r"width must be a positive integer"),
        (good_entry_json(rows=True), r"rows must be a positive integer"),
        (good_entry_json(rows=1.5), r"rows must be a positive integer"),
        (good_entry_json(device=""), r"device must be a non-empty string"),
        (good_entry_json(dtype=16), r"dtype must be a non-empty string"),
        (good_entry_json(ms="fast"), r"ms has the wrong type"),
        (good_entry_json(colour="red"), r"unknown entry keys \['colour'\]"),
        ("entry", r"an entry must be an object"),
    ],
    ids=["no_config", "no_rows", "no_device", "block_w48", "warps3", "config_missing",
         "config_unknown", "config_str", "config_list", "width0", "width_str", "rows_bool",
         "rows_float", "device_empty", "dtype_int", "ms_str", "unknown_key", "not_object"],
)
def test_bad_entry(tables, bad, match):
    write_json(tables, {"schema_version": 1, "entries": [good_entry_json(rows=7), bad]})
    with pytest.raises(TableError, match=re.escape(str(tables)) + r", entry 1: " + match):
        load_table(tables)


def test_table_error_is_value_error():
    assert issubclass(TableError, ValueError)


# --------------------------------------------------------------------------------------------
# Concurrent writers
# --------------------------------------------------------------------------------------------

WRITERS = 4
ENTRIES_PER_WRITER = 20


def _writer(path: str, writer: int, start) -> None:
    start.wait(timeout=60)
    for index in range(ENTRIES_PER_WRITER):
        merge_entries(path, [entry(rows=1 + writer * 1000 + index,
                                   config=(CONFIG_A, CONFIG_B, CONFIG_C)[index % 3],
                                   trials=writer)])


def test_concurrent_writers(tmp_path):
    path = tmp_path / "shared" / "table.json"
    context = multiprocessing.get_context("fork")
    start = context.Event()
    processes = [context.Process(target=_writer, args=(str(path), writer, start))
                 for writer in range(WRITERS)]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * WRITERS

    document = json.loads(path.read_text())   # valid JSON
    assert document["schema_version"] == SCHEMA_VERSION
    entries = load_table(path)
    assert len(entries) == WRITERS * ENTRIES_PER_WRITER
    expected = {(1 + writer * 1000 + index, writer)
                for writer in range(WRITERS) for index in range(ENTRIES_PER_WRITER)}
    assert {(e.rows, e.trials) for e in entries} == expected
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------------------------
# Caching
# --------------------------------------------------------------------------------------------

def test_tables_are_read_once(tables, monkeypatch):
    merge_entries(tables, [entry(rows=1024, config=CONFIG_B)])
    reload_tables()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)) + 3
    first = fused_add_layernorm(x, 0.5, 64)
    assert select_config(1024, 64, torch.float32) == (CONFIG_B, "table")

    def no_reads(path):
        raise AssertionError(f"table {path} read again")

    monkeypatch.setattr(table_module, "read_table_leniently", no_reads)
    # Same and different problems: all answered from the cache.
    second = fused_add_layernorm(x, 0.5, 64)
    assert torch.equal(first, second)
    fused_add_layernorm(x[:, :32].contiguous(), 0.5, 32)
    assert select_config(1024, 64, torch.float32) == (CONFIG_B, "table")
    assert select_config(3000, 64, torch.float32)[0] == CONFIG_B
    assert select_config(3000, 128, torch.bfloat16)[1] == "heuristic"

    # reload_tables() really does drop the cache.
    reload_tables()
    with pytest.raises(AssertionError, match="read again"):
        select_config(1024, 64, torch.float32)


def test_each_table_read_once(tables, monkeypatch):
    merge_entries(tables, [entry(rows=1024, config=CONFIG_B)])
    reload_tables()
    reads = []
    real_read = table_module.read_table_leniently

    def counting(path):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(table_module, "read_table_leniently", counting)
    for rows in (1, 10, 1024, 5000):
        for dtype in (torch.float32, torch.float16):
            select_config(rows, 64, dtype)
            select_config(rows, 64, dtype)
    assert sorted(map(str, reads)) == sorted(map(str, table_paths()))
