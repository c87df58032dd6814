"""The kernel descriptor is the one identity of a kernel: the runtime wrapper looks up exactly
the table key the tuner writes, for every kernel, forward and training paths alike; a miss is
logged under a tuner shape with the call's key; and the tuner's problems take their table key,
default config and search space from it."""

from __future__ import annotations

import pytest
import torch

import kernels.descriptor as descriptor_module
from kernels import (
    ADD_LAYERNORM,
    ADD_LAYERNORM_BACKWARD,
    ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_BACKWARD,
    ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
    CONV_TRANSPOSE_TAIL,
    DESCRIPTORS,
    AddLayerNormCall,
    ConvTailCall,
    LaunchConfig,
    PoolGeluCall,
    TableEntry,
    fused_add_layernorm,
    fused_add_layernorm_pool_gelu,
    merge_entries,
    reload_tables,
)
from tuner import InputError
from tuner.problems import KERNELS, get_kernel

# A small problem of each kernel the tuner knows.
SHAPES = {
    "add_layernorm": "3x5x40", "add_layernorm_backward": "6x24",
    "add_layernorm_pool_gelu": "2x3x5x6x8", "add_layernorm_pool_gelu_channels_last": "2x3x4x6x8",
    "add_layernorm_pool_gelu_backward": "2x3x4x7x8",
    "add_layernorm_pool_gelu_backward_channels_last": "1x4x2x6x8",
    "conv_transpose_tail": "2x3x2x2x4x16",
}
TUNED = LaunchConfig(block_rows=16, block_w=16, num_warps=2, eviction_policy="evict_last")


@pytest.fixture
def lookups(monkeypatch, no_tables):
    """Every table lookup a kernel call makes: (kernel, device, dtype, width, rows, variant,
    source)."""
    seen = []
    real = descriptor_module.lookup_config

    def spy(kernel, device, dtype, width, rows, *, variant="", **kwargs):
        config, source = real(kernel, device, dtype, width, rows, variant=variant, **kwargs)
        seen.append((kernel, device, dtype, width, rows, variant, source))
        return config, source

    monkeypatch.setattr(descriptor_module, "lookup_config", spy)
    return seen


def tuned_table(monkeypatch, tmp_path, entries: list[TableEntry]) -> None:
    path = tmp_path / "tuned.json"
    merge_entries(path, entries)
    monkeypatch.setenv("TUNER_TABLE", str(path))
    reload_tables()


def tuner_entry(kernel: str, shape: str, dtype: str = "float32") -> TableEntry:
    """The entry the tuner writes for a problem (as entry_from_result keys it)."""
    spec = get_kernel(kernel)
    key = spec.table_key(spec.problem(shape, dtype))
    return TableEntry(kernel=spec.table_name, device="interpreter", dtype=dtype, width=key.width,
                      rows=key.rows, variant=key.variant, config=TUNED)


@pytest.mark.parametrize("kernel", sorted(SHAPES))
def test_the_runtime_finds_the_entry_the_tuner_writes(kernel, lookups, monkeypatch, tmp_path):
    entry = tuner_entry(kernel, SHAPES[kernel])
    tuned_table(monkeypatch, tmp_path, [entry])
    spec = get_kernel(kernel)
    problem = spec.problem(SHAPES[kernel], "float32")
    inputs = spec.make_inputs(problem, torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        spec.run(inputs, None)  # the runtime chooses: it asks the tables
    assert lookups == [(entry.kernel, "interpreter", "float32", entry.width, entry.rows,
                        entry.variant, "table")]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_a_training_step_finds_the_forward_and_backward_entries(channels_last, lookups,
                                                                monkeypatch, tmp_path):
    suffix = "_channels_last" if channels_last else ""
    shape = (2, 3, 4, 6, 8)
    text = "x".join(map(str, shape))
    tuned_table(monkeypatch, tmp_path, [tuner_entry("add_layernorm_pool_gelu" + suffix, text),
                                        tuner_entry("add_layernorm_pool_gelu_backward" + suffix,
                                                    text)])
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    weight = torch.rand(8, requires_grad=True)
    fused_add_layernorm_pool_gelu(x, torch.tensor(0.5, requires_grad=True), weight,
                                  torch.zeros(8)).sum().backward()
    assert [(kernel, source) for kernel, *_, source in lookups] == [
        ("add_layernorm_pool_gelu", "table"), ("add_layernorm_pool_gelu_backward", "table")]

    lookups.clear()
    tuned_table(monkeypatch, tmp_path, [tuner_entry("add_layernorm", "12x8"),
                                        tuner_entry("add_layernorm_backward", "12x8")])
    x = torch.randn(3, 4, 8, requires_grad=True)
    fused_add_layernorm(x, 0.5, 8, weight).sum().backward()
    assert [(kernel, rows, source) for kernel, _, _, _, rows, _, source in lookups] == [
        ("add_layernorm", 12, "table"), ("add_layernorm_backward", 12, "table")]


CALLS = [
    (ADD_LAYERNORM, AddLayerNormCall(4096, 768, torch.float16)),
    (ADD_LAYERNORM_BACKWARD, ADD_LAYERNORM_BACKWARD.make_call(30, 7, torch.bfloat16)),
    # Odd depth and height: the pooling drops the remainders.
    (ADD_LAYERNORM_POOL_GELU, PoolGeluCall((3, 5, 7, 9, 64), torch.float32)),
    (ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST, PoolGeluCall((3, 5, 7, 9, 64), torch.float32)),
    (ADD_LAYERNORM_POOL_GELU_BACKWARD, PoolGeluCall((2, 64, 32, 64, 64), torch.bfloat16)),
    (ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST,
     PoolGeluCall((2, 64, 32, 64, 64), torch.bfloat16)),
    (CONV_TRANSPOSE_TAIL, ConvTailCall((32, 32, 16, 32, 32), 64, torch.float32)),
]


@pytest.mark.parametrize("descriptor, call", CALLS, ids=[d.name for d, _ in CALLS])
def test_a_miss_names_a_tuner_problem_with_the_calls_key(descriptor, call):
    shape = descriptor.shape_for_call(call)
    spec = get_kernel(descriptor.name)
    problem = spec.problem("x".join(map(str, shape)), str(call.dtype)[6:])
    assert spec.table_key(problem) == descriptor.table_key(call)


@pytest.mark.parametrize("descriptor, call", [
    (ADD_LAYERNORM_POOL_GELU, PoolGeluCall((2, 3, 4, 6, 8), torch.float32, approximate="tanh")),
    (ADD_LAYERNORM_POOL_GELU, PoolGeluCall((2, 3, 4, 6, 8), torch.float32, (1, 2, 2))),
    (CONV_TRANSPOSE_TAIL, ConvTailCall((1, 3, 2, 2, 4), 16, torch.float32, "tanh")),
], ids=["tanh", "pool_1x2x2", "conv_tanh"])
def test_calls_the_tuner_does_not_cover_are_not_logged(descriptor, call):
    assert descriptor.shape_for_call(call) is None


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_tuner_problems_take_their_identity_from_the_descriptor(kernel):
    spec = KERNELS[kernel]
    assert DESCRIPTORS[kernel] is spec.descriptor and spec.name == kernel
    assert spec.space_file.is_file() and spec.table_name == spec.descriptor.table_name
    problem = spec.problem(SHAPES[kernel], "bfloat16")
    call = spec.descriptor.call_for_shape(problem.shape, torch.bfloat16)
    assert spec.heuristic(problem) == spec.descriptor.default_config(call)
    # The canonical shape names the same table entry as the shape it came from.
    dims = tuple(int(dim) for dim in SHAPES[kernel].split("x"))
    assert spec.table_key(problem) == \
        spec.descriptor.table_key(spec.descriptor.call_for_shape(dims, torch.bfloat16))


@pytest.mark.parametrize("kernel, shape, message", [
    ("add_layernorm_pool_gelu", "32x64x32x64", "takes a 5-D shape NxCxDxHxW"),
    ("add_layernorm_pool_gelu_backward", "2x3x1x4x8", r"spatial dims \(1, 4, 8\) are smaller"),
    ("conv_transpose_tail", "32x32x16x32x32", "takes NxC_inxDxHxWxC_out"),
])
def test_a_shape_the_kernel_does_not_take_is_an_input_error(kernel, shape, message):
    with pytest.raises(InputError, match=message):
        get_kernel(kernel).problem(shape, "float32")
