"""A user's own kernel: ``module:attribute`` references, the ``tuner.kernels`` entry-point group,
the RMSNorm example tuned end to end and read back by its runtime, and the table exported as
``triton.Config`` lists for ``@triton.autotune``."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import triton

from examples.rmsnorm import rmsnorm as rmsnorm_module
from examples.rmsnorm.rmsnorm import RMSNORM, heuristic_config, rmsnorm
from examples.rmsnorm.spec import RMSNorm
from kernels import LaunchConfig, RowsCall, TableEntry, load_table, reload_tables
from tuner import cli, plugins
from tuner.export import parse_meta_names, triton_configs, triton_configs_module
from tuner.problems import get_kernel
from tuner.sweep import parse_spec

REFERENCE = "examples.rmsnorm.spec:RMSNorm"


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Each test resolves plugins anew (resolution is cached per process)."""
    monkeypatch.setattr(plugins, "_resolved", {})


@pytest.fixture
def fake_module(monkeypatch):
    """A module ``fake_plugin`` with a spec instance, a non-spec, a spec needing arguments and
    one without a descriptor."""
    class NeedsArguments(RMSNorm):
        def __init__(self, eps: float) -> None:
            super().__init__()
            self.eps = eps

    class NoDescriptor(RMSNorm):
        descriptor = "rmsnorm"

    module = types.ModuleType("fake_plugin")
    module.SPEC, module.NOT_A_SPEC, module.NeedsArguments = RMSNorm(), 3, NeedsArguments
    module.NoDescriptor = NoDescriptor
    monkeypatch.setitem(sys.modules, "fake_plugin", module)
    return module


def test_reference_to_a_subclass_registers_it_under_the_reference():
    spec = get_kernel(REFERENCE)
    assert isinstance(spec, RMSNorm)
    # Problems carry the reference (workers import it again); tables keep the kernel's name.
    assert spec.name == REFERENCE and spec.table_name == "rmsnorm"
    problem = spec.problem("4x8x48", "bfloat16")
    assert (problem.kernel, problem.shape, problem.dtype) == (REFERENCE, (32, 48), "bfloat16")
    assert get_kernel(REFERENCE) is spec


def test_sweep_specs_take_references():
    spec = parse_spec({"kernels": [REFERENCE, "add_layernorm"], "shapes": ["8x16"],
                       "dtypes": ["float32"]})
    assert [problem.kernel for problem in spec.problems] == [REFERENCE, "add_layernorm"]


def test_reference_to_an_instance_leaves_the_users_object_alone(fake_module):
    spec = get_kernel("fake_plugin:SPEC")
    assert spec.name == "fake_plugin:SPEC" and spec.table_name == "rmsnorm"
    assert fake_module.SPEC.name == "rmsnorm"


@pytest.mark.parametrize("name, message", [
    ("examples.rmsnorm.spec", "unknown kernel 'examples.rmsnorm.spec'; known kernels: add_layernorm"),
    ("no_such_module_xyz:Spec", "cannot import no_such_module_xyz"),
    ("examples.rmsnorm.spec:Missing", "examples.rmsnorm.spec has no attribute Missing"),
    ("fake_plugin:NOT_A_SPEC", "is a int, expected a tuner.KernelSpec subclass or instance"),
    ("fake_plugin:NeedsArguments", "cannot instantiate NeedsArguments without arguments"),
    ("fake_plugin:NoDescriptor", "`descriptor` is a str, expected a kernels.KernelDescriptor"),
    ("a b:c", "bad kernel reference 'a b:c': expected module:attribute"),
])
def test_bad_references_are_one_line_errors(fake_module, name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        get_kernel(name)
    assert "\n" not in str(error.value)


def test_unknown_kernel_exits_2_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", "--kernel", "no_such_module_xyz:Spec", "--shape", "8x8"])
    assert exit_info.value.code == 2
    assert "cannot import no_such_module_xyz" in capsys.readouterr().err


def test_entry_point_plugins_are_found_by_name(tmp_path, monkeypatch):
    dist = tmp_path / "demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[tuner.kernels]\ndemo_rmsnorm = {REFERENCE}\nbroken = no_such_module_xyz:Spec\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"demo_rmsnorm", "broken"} <= set(plugins.entry_point_names())
    spec = get_kernel("demo_rmsnorm")
    assert spec.name == "demo_rmsnorm" and spec.table_name == "rmsnorm"
    with pytest.raises(ValueError, match="entry point no_such_module_xyz:Spec of group tuner.kernels"):
        get_kernel("broken")
    with pytest.raises(ValueError, match="known kernels: .*demo_rmsnorm"):
        get_kernel("nothing_by_this_name")


def test_example_search_then_runtime_uses_the_tuned_entry(ray_cluster, tmp_path, monkeypatch,
                                                          launch_grids, no_tables, capsys):
    table = tmp_path / "table.json"
    argv = ["search", "--kernel", REFERENCE, "--space", "examples/rmsnorm/rmsnorm.yaml",
            "--shape", "64x48", "--trials", "3", "--interpret", "--workers", "2",
            "--storage", f"sqlite:///{tmp_path}/t.db", "--table", str(table), "--quiet", "--json"]
    assert cli.main(argv) == 0
    [entry] = load_table(table)
    # --json: the results alone on stdout; --quiet: nothing else on stderr.
    out, err = capsys.readouterr()
    document = json.loads(out)
    [result] = document["results"]
    assert result["study"] == f"{REFERENCE}:interpreter:float32:64x48"
    assert result["config"] == entry.config.as_dict() and result["trials"] == 3
    assert document["unfinished"] == [] and document["tables"] == {"interpreter": str(table)}
    assert err == ""
    assert (entry.kernel, entry.device, entry.dtype, entry.width, entry.rows, entry.trials) == \
        ("rmsnorm", "interpreter", "float32", 48, 64, 3)

    monkeypatch.setenv("TUNER_TABLE", str(table))
    reload_tables()
    assert RMSNORM.select(RowsCall(64, 48, torch.float32)) == (entry.config, "table")
    assert RMSNORM.select(RowsCall(64, 40, torch.float32)) == \
        (heuristic_config(64, 40, torch.float32), "heuristic")
    kernel = rmsnorm_module._rmsnorm_kernel
    grids = launch_grids(rmsnorm_module, "_rmsnorm_kernel")
    x, weight = torch.randn(4, 16, 48), torch.rand(48) + 0.5
    torch.testing.assert_close(rmsnorm(x, weight), F.rms_norm(x, (48,), weight, eps=1e-6))
    assert grids == [(triton.cdiv(64, entry.config.block_rows),)]

    # The same winners for a kernel that keeps @triton.autotune.
    module_file = tmp_path / "rmsnorm_configs.py"
    assert cli.main(["export", "--format", "triton-configs", "--table", str(table),
                     "--kernel", "rmsnorm", "--out", str(module_file)]) == 0
    loader = importlib.util.spec_from_file_location("rmsnorm_configs", module_file)
    configs_module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(configs_module)
    [config] = configs_module.CONFIGS
    assert config.kwargs == {"BLOCK_ROWS": entry.config.block_rows,
                             "BLOCK_W": entry.config.block_w,
                             "EVICTION_POLICY": entry.config.eviction_policy}
    assert (config.num_warps, config.num_stages) == (entry.config.num_warps, entry.config.num_stages)
    autotuned = triton.autotune(configs=configs_module.CONFIGS, key=["rows", "width"])(kernel)
    out = torch.empty_like(x)
    autotuned[lambda meta: (triton.cdiv(64, meta["BLOCK_ROWS"]),)](
        x, weight, out, 64, 48, 1e-6, SINGLE_PASS=True)
    torch.testing.assert_close(out, F.rms_norm(x, (48,), weight, eps=1e-6))


def entry(rows: int, config: LaunchConfig, dtype: str = "float32", kernel: str = "rmsnorm",
          device: str = "NVIDIA H100 80GB HBM3") -> TableEntry:
    return TableEntry(kernel=kernel, device=device, dtype=dtype, width=1024, rows=rows,
                      config=config)


def test_triton_configs_are_distinct_filtered_and_renamed():
    small, large = LaunchConfig(4, 1024, 4), LaunchConfig(1, 1024, 8, 2, "evict_first")
    entries = [entry(64, small), entry(4096, large), entry(8192, large),
               entry(64, LaunchConfig(8, 1024, 8), dtype="bfloat16"),
               entry(64, LaunchConfig(16, 1024, 8), kernel="add_layernorm")]
    configs = triton_configs(entries, "rmsnorm", dtype="float32")
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in configs] == [
        ({"BLOCK_ROWS": 4, "BLOCK_W": 1024, "EVICTION_POLICY": ""}, 4, 1),
        ({"BLOCK_ROWS": 1, "BLOCK_W": 1024, "EVICTION_POLICY": "evict_first"}, 8, 2)]
    assert len(triton_configs(entries, "rmsnorm")) == 3

    names = parse_meta_names("block_rows=BLOCK_M, block_w=BLOCK_N,eviction_policy=")
    [renamed] = triton_configs(entries[:1], "rmsnorm", meta_names=names)
    assert renamed.kwargs == {"BLOCK_M": 4, "BLOCK_N": 1024}
    text = triton_configs_module([renamed], "table.json")
    assert "triton.Config({'BLOCK_M': 4, 'BLOCK_N': 1024}, num_warps=4, num_stages=1)," in text

    with pytest.raises(SystemExit):
        cli.main(["export", "--kernel", "rmsnorm", "--out", "-"])  # --format table takes no --kernel
    with pytest.raises(ValueError, match=r"no entries for kernel 'softmax'; the entries are for: "
                                         r"add_layernorm \(NVIDIA H100 80GB HBM3, float32\)"):
        triton_configs(entries, "softmax")
    for bad in ("block_m=BLOCK_M", "block_rows", "block_w=1X"):
        with pytest.raises(ValueError, match="expected KNOB=NAME"):
            parse_meta_names(bad)
