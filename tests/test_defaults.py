"""Device-derived default configs (kernels/defaults.py): read from the device's properties,
within its registers and shared memory, filling its SMs, and correct when run."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
import triton

from kernels import fused_add_layernorm, fused_add_layernorm_pool_gelu
from kernels.defaults import (
    INTERPRETER_PROPERTIES,
    DeviceProperties,
    MIN_CHUNK_ELEMENTS,
    rows_aligned,
    add_layernorm_default,
    add_layernorm_pool_gelu_default,
    conv_tail_block_co,
    conv_tail_shared_bytes,
    device_properties,
    properties_from_torch,
    registers_per_thread,
)

RTX4090 = DeviceProperties(name="NVIDIA GeForce RTX 4090", sm_count=128, max_threads_per_sm=1536,
                           registers_per_sm=65536, shared_memory_per_block=101376,
                           l2_bytes=72 << 20, dram_gbps=1008.0, max_programs_per_sm=24,
                           capability=(8, 9))
H100 = DeviceProperties(name="NVIDIA H100 80GB HBM3", sm_count=132, max_threads_per_sm=2048,
                        registers_per_sm=65536, shared_memory_per_block=232448,
                        l2_bytes=50 << 20, dram_gbps=3352.0, max_programs_per_sm=32,
                        capability=(9, 0))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def test_properties_from_torch():
    props = types.SimpleNamespace(
        name="NVIDIA GeForce RTX 4090", multi_processor_count=128,
        max_threads_per_multi_processor=1536, regs_per_multiprocessor=65536,
        shared_memory_per_block_optin=101376, L2_cache_size=72 << 20,
        memory_clock_rate=10501000, memory_bus_width=384)
    read = properties_from_torch(props, (8, 9))
    assert read.dram_gbps == pytest.approx(1008, rel=0.01)
    assert dataclasses.replace(read, dram_gbps=1008.0) == RTX4090
    # An older PyTorch without the newer fields: safe fallbacks.
    old = properties_from_torch(types.SimpleNamespace(name="GPU", multi_processor_count=80), (7, 0))
    assert (old.sm_count, old.max_threads_per_sm, old.registers_per_sm) == (80, 2048, 65536)
    assert old.shared_memory_per_block == 49152 and old.dram_gbps > 0


def test_interpreter_uses_fixed_properties():
    assert device_properties() is INTERPRETER_PROPERTIES
    assert device_properties("NVIDIA GeForce RTX 4090") is INTERPRETER_PROPERTIES


@pytest.mark.parametrize("props", [RTX4090, H100, INTERPRETER_PROPERTIES], ids=lambda p: p.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_default_fits_the_device(props, dtype):
    for width in (1, 7, 30, 64, 100, 477, 768, 1000, 4096, 5000, 11267, 16384, 45288, 65536):
        for rows in (1, 100, 10_000, 4_000_000):
            config = add_layernorm_default(rows, width, dtype.itemsize, props)
            threads = 32 * config.num_warps
            lanes = config.tile_elements // threads
            aligned = rows_aligned(width, dtype.itemsize)
            # Within an SM's register file; the 255 a thread is ptxas's to keep without
            # spilling (64 unaligned lanes of a chunk: about 250), checked by test_sm89.py.
            registers = min(255, registers_per_thread(max(1, lanes), aligned))
            assert registers * threads <= props.registers_per_sm, \
                (rows, width, config)
            assert config.block_rows <= triton.next_power_of_2(rows)
            assert config.block_w >= width or config.block_w >= MIN_CHUNK_ELEMENTS
            # Enough programs for every SM whenever the rows allow it.
            programs = triton.cdiv(rows, config.block_rows)
            assert programs >= min(rows, props.sm_count) or config.block_rows == 1


def test_layernorm_default_follows_loads_and_layout():
    """Narrow rows: one warp of 16 loads a thread (16 lanes of odd widths, 32 of 16-byte
    vectors of float16, at most 64 bytes); wider rows two a program; wide unaligned rows in
    minimum-size chunks; few rows a program each, spread over every SM (on an RTX 4090 too)."""
    for props in (RTX4090, H100):
        odd = add_layernorm_default(4_000_000, 59, 2, props)
        assert (odd.num_warps, odd.tile_elements // 32) == (1, 16)
        vector = add_layernorm_default(4_000_000, 64, 2, props)
        assert (vector.num_warps, vector.tile_elements // 32) == (1, 32)
        float32 = add_layernorm_default(4_000_000, 64, 4, props)
        assert float32.tile_elements // (32 * float32.num_warps) * 4 <= 64
        mid = add_layernorm_default(300_000, 427, 2, props)
        assert mid.block_rows == 2 and mid.num_warps > 1
        chunked = add_layernorm_default(20_000, 22559, 2, props)
        assert chunked.block_w == MIN_CHUNK_ELEMENTS < 22559
        for rows, width in ((402, 830), (72, 15935), (600, 11874)):
            few = add_layernorm_default(rows, width, 4, props)
            assert few.block_rows == 1 and 32 * few.num_warps * rows >= props.sm_count * 32


@pytest.mark.parametrize("props", [RTX4090, H100, INTERPRETER_PROPERTIES], ids=lambda p: p.name)
def test_layernorm_default_is_a_config_of_the_shipped_space(props):
    """The confirm stage re-times the default beside the search's best: inside the space, a
    trial has measured it first, and the search can start from it."""
    from tuner import get_kernel, load_space

    spec = get_kernel("add_layernorm")
    space = load_space(spec.space_file)
    for width in (16, 25, 100, 194, 768, 1000, 4407, 8192, 15935, 65536):
        for itemsize, dtype in ((4, "float32"), (2, "float16")):
            for rows in (1, 130, 262144, 4194304):
                key = spec.table_key(spec.problem(f"{rows}x{width}", dtype))
                config = add_layernorm_default(rows, width, itemsize, props)
                assert config in space.candidates(key), (rows, width, dtype, config.key())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", [(37, 30), (9, 477), (3, 5000), (2, 11267)])
def test_rtx4090_default_is_correct(dtype, rows, width):
    generator = torch.Generator().manual_seed(rows * width)
    x = (torch.randn(rows, width, generator=generator) * 2 + 0.5).to(dtype)
    weight = (torch.randn(width, generator=generator) * 0.5 + 1).to(dtype)
    bias = (torch.randn(width, generator=generator) * 0.5).to(dtype)
    out = torch.full_like(x, float("nan"))
    config = add_layernorm_default(rows, width, dtype.itemsize, RTX4090)
    fused_add_layernorm(x, 1.25, width, weight, bias, config=config, out=out)
    expected = F.layer_norm(x.double() + 1.25, (width,), weight.double(), bias.double())
    assert ((out.double() - expected).norm() / expected.norm()).item() < TOLERANCE[dtype]


def test_tail_default_within_shared_memory_and_registers():
    tiny = dataclasses.replace(RTX4090, shared_memory_per_block=1024)
    for channels_last in (False, True):
        roomy = add_layernorm_pool_gelu_default(1 << 20, 64, 4, 4, channels_last, 64, RTX4090)
        cramped = add_layernorm_pool_gelu_default(1 << 20, 64, 4, 4, channels_last, 64, tiny)
        assert 4 * cramped.tile_elements <= 1024 < 4 * roomy.tile_elements
        # A wide channels-last tile gets the warps its registers need.
        wide = add_layernorm_pool_gelu_default(16, 3000, 4, 4, channels_last, 64, RTX4090)
        assert 16 + 3 * wide.tile_elements // (32 * wide.num_warps) <= 255


def test_tail_default_is_correct():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn((2, 3, 4, 6, 20), generator=generator) * 2 + 0.5
    weight = torch.randn(20, generator=generator) * 0.5 + 1
    bias = torch.randn(20, generator=generator)
    config = add_layernorm_pool_gelu_default(2 * 3 * 2 * 3, 20, 4, 4, False, None, RTX4090)
    out = fused_add_layernorm_pool_gelu(x, 0.5, weight, bias, config=config)
    expected = F.gelu(F.avg_pool3d(F.layer_norm(x.double() + 0.5, (20,), weight.double(),
                                                bias.double()), 2))
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-4


def test_conv_tail_channels_shrink_to_fit_shared_memory():
    assert conv_tail_block_co(32, 64, 32, 4, RTX4090) == 64
    assert conv_tail_shared_bytes(32, 32, 64, 4) == 32768  # what Triton allocates on sm_89
    tiny = dataclasses.replace(RTX4090, shared_memory_per_block=20000)
    block_co = conv_tail_block_co(32, 64, 32, 4, tiny)
    assert block_co < 64 and conv_tail_shared_bytes(32, 32, block_co, 4) <= 20000
