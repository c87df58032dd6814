"""The add + LayerNorm backward called directly, and what the backward kernels share
(kernels/backward_reduce.py): the reduction chosen by width, the persistent grid, the column
sums; against float64 PyTorch references on fresh random data, run through the Triton
interpreter. Every buffer the kernels allocate starts poisoned with NaN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.add_layernorm_backward as backward_module
from kernels import LaunchConfig, fused_add_layernorm, fused_add_layernorm_pool_gelu
from kernels.add_layernorm_backward import add_layernorm_backward
from kernels.backward_reduce import (
    MIN_ROWS_PER_PROGRAM,
    PARTIALS_FROM_WIDTH,
    choose_reduction,
    column_sums,
    program_count,
    programs_per_multiprocessor,
)
from kernels.defaults import DeviceProperties

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")
# ||got - want|| / ||want|| per dtype: inputs rounded to the dtype, the reference in float64
# from the rounded values; dx is rounded to the dtype on its way out.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
EPS = 1e-5

pytestmark = pytest.mark.usefixtures("no_tables")


@pytest.fixture
def poisoned(monkeypatch):
    """``torch.empty`` and ``torch.empty_like`` give NaN-filled floating tensors, so that an
    element a kernel forgets to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def inputs(rows, width, dtype, seed, sum_kind="float32"):
    """x, dy, weight, sum_weight (a number, a float32 tensor, or a tensor of x's dtype) and the
    forward's float32 mean and rstd of x + sum_weight."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=generator) * 2.5 + 1.3).to(dtype)
    dy = torch.randn(rows, width, generator=generator).to(dtype)
    weight = (torch.randn(width, generator=generator) * 0.5 + 1.0).to(dtype)
    value = 0.4 + torch.rand((), generator=generator).item()
    sum_weight = {"number": value, "float32": torch.tensor([value]),
                  "own_dtype": torch.tensor(value).to(dtype)}[sum_kind]
    shifted = x.float() + (sum_weight if isinstance(sum_weight, float) else sum_weight.float())
    mean = shifted.mean(-1)
    rstd = torch.rsqrt(shifted.var(-1, unbiased=False) + EPS)
    return x, dy, weight, sum_weight, mean, rstd


def float64_gradients(x, dy, weight, sum_weight):
    """(dx, dweight, dbias) of LayerNorm(x + sum_weight) in float64."""
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = torch.zeros_like(w64, requires_grad=True)
    shift = sum_weight if isinstance(sum_weight, float) else sum_weight.double().reshape(())
    F.layer_norm(x64 + shift, x.shape[-1:], w64, b64, EPS).backward(dy.double())
    return x64.grad, w64.grad, b64.grad


def relative_error(got, want, floor=1e-30):
    """||got - want|| / ||want||, with ||want|| taken as at least ``floor``."""
    return ((got.double() - want).norm() / want.norm().clamp_min(floor)).item()


def kernel_launches(monkeypatch):
    """Wraps the backward kernel so that each launch still runs; returns the list of
    ``(grid, meta)`` of the launches."""
    launches, kernel = [], backward_module._add_layernorm_backward_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append((grid, meta))
                return kernel[grid](*args, **meta)
            return launch

    monkeypatch.setattr(backward_module, "_add_layernorm_backward_kernel", Spy())
    return launches


# -- the reduction chosen by width ------------------------------------------------------------
def test_reduction_by_width_with_an_override():
    assert choose_reduction(1) == choose_reduction(PARTIALS_FROM_WIDTH - 1) == "atomics"
    assert choose_reduction(PARTIALS_FROM_WIDTH) == choose_reduction(70000) == "partials"
    assert choose_reduction(64, "partials") == "partials"
    assert choose_reduction(4096, "atomics") == "atomics"
    with pytest.raises(ValueError, match="reduction must be one of"):
        choose_reduction(64, "shared")


def test_deterministic_algorithms_get_partial_sums():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert choose_reduction(64) == "partials"
        assert choose_reduction(64, "atomics") == "atomics"  # asked for explicitly
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("width", [48, PARTIALS_FROM_WIDTH])
def test_backward_launches_the_reduction_its_width_calls_for(monkeypatch, width):
    launches = kernel_launches(monkeypatch)
    x, dy, weight, sum_weight, mean, rstd = inputs(6, width, torch.float32, seed=width)
    add_layernorm_backward(dy, x, weight, mean, rstd, sum_weight)
    [(_, meta)] = launches
    assert meta["ATOMIC_REDUCE"] == (width < PARTIALS_FROM_WIDTH)


# -- gradients against float64 ------------------------------------------------------------------
CASES = {
    # name: (rows, width, config or None for the heuristic's)
    "rows_of_64": (70, 64, None),
    "odd_width_37": (33, 37, LaunchConfig(block_rows=4, block_w=64, num_warps=2)),
    "width_1": (9, 1, None),
    "width_1024": (5, 1024, None),
    "chunked_odd_width": (7, 300, LaunchConfig(block_rows=2, block_w=128, num_warps=2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", [None, "atomics", "partials"])
def test_backward_matches_float64(poisoned, dtype, case, reduction):
    rows, width, config = CASES[case]
    seed = len(case) * 5 + DTYPES.index(dtype)
    sum_kind = ("number", "float32", "own_dtype")[seed % 3]
    x, dy, weight, sum_weight, mean, rstd = inputs(rows, width, dtype, seed, sum_kind)
    dx_out = torch.empty_like(x)  # poisoned
    grads = add_layernorm_backward(dy, x, weight, mean, rstd, sum_weight, config=config,
                                   reduction=reduction, dx_out=dx_out)
    want = float64_gradients(x, dy, weight, sum_weight)
    assert grads.dx is dx_out
    for name, got, expected in zip(("dx", "dweight", "dbias"), grads[:3], want):
        assert got.dtype == dtype and got.shape == expected.shape, name
        assert torch.isfinite(got).all(), name
        # Relative to a thousandth of ||dy|| at least: at width 1, dx and dweight are zero in
        # exact arithmetic.
        assert relative_error(got, expected, 1e-3 * dy.double().norm()) <= TOLERANCE[dtype], name
    # LayerNorm ignores a shift of its row: the exact gradient, not rounding noise.
    assert grads.dsum_weight.dtype == torch.float32 and grads.dsum_weight.shape == ()
    assert grads.dsum_weight.item() == 0.0


@pytest.mark.parametrize("needs", [(False, True, False, False), (False, False, True, False),
                                   (True, False, False, False), (False, False, False, True)],
                         ids=["dweight", "dbias", "dx", "dsum"])
@pytest.mark.parametrize("width", [40, 200], ids=["single_pass", "chunked"])
def test_backward_computes_only_what_is_needed(poisoned, needs, width):
    config = LaunchConfig(block_rows=2, block_w=64 if width == 40 else 128, num_warps=1)
    x, dy, weight, sum_weight, mean, rstd = inputs(11, width, torch.float32, seed=width)
    dx_out = torch.empty_like(x)  # poisoned: stays so unless dx is asked for
    grads = add_layernorm_backward(dy, x, weight, mean, rstd, sum_weight, needs=needs,
                                   config=config, dx_out=dx_out)
    want = float64_gradients(x, dy, weight, sum_weight)
    for name, asked, got, expected in zip(("dx", "dweight", "dbias"), needs, grads[:3], want):
        if asked:
            assert relative_error(got, expected) <= TOLERANCE[torch.float32], name
        else:
            assert got is None, name
    assert (grads.dsum_weight is not None) == needs[3]
    assert torch.isnan(dx_out).all() != needs[0]


@pytest.mark.parametrize("reduction", ["atomics", "partials"])
def test_any_program_count_gives_the_same_gradients(monkeypatch, reduction):
    launches = kernel_launches(monkeypatch)
    config = LaunchConfig(block_rows=2, block_w=32, num_warps=1)
    x, dy, weight, sum_weight, mean, rstd = inputs(37, 32, torch.float32, seed=3)
    want = float64_gradients(x, dy, weight, sum_weight)
    for programs in (1, 5, 19, 40):  # 19 tiles of 2 rows: one each, or at most one each
        grads = add_layernorm_backward(dy, x, weight, mean, rstd, sum_weight, config=config,
                                       reduction=reduction, programs=programs)
        assert launches[-1][0] == (min(programs, 19),)
        for got, expected in zip(grads[:3], want):
            assert relative_error(got, expected) <= TOLERANCE[torch.float32]


# -- through autograd ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sum_dtype", [torch.float32, None], ids=["fp32_sum", "own_dtype_sum"])
def test_sum_weight_gradient_is_an_exact_zero_in_its_dtype(dtype, sum_dtype):
    generator = torch.Generator().manual_seed(DTYPES.index(dtype))
    x = (torch.randn(6, 2, 2, 2, 8, generator=generator) * 2 + 1).to(dtype).requires_grad_()
    sum_weight = torch.full((1,), 0.7, dtype=sum_dtype or dtype, requires_grad=True)
    fused_add_layernorm(x, sum_weight, 8).square().sum().backward()
    assert sum_weight.grad.dtype == sum_weight.dtype and sum_weight.grad.shape == (1,)
    assert sum_weight.grad.item() == 0.0
    sum_weight.grad = None
    fused_add_layernorm_pool_gelu(x, sum_weight).square().sum().backward()
    assert sum_weight.grad.dtype == sum_weight.dtype and sum_weight.grad.item() == 0.0


# -- the persistent grid and the column sums -----------------------------------------------------
H100_LIKE = DeviceProperties(name="h100-like", sm_count=132, max_threads_per_sm=2048,
                             registers_per_sm=65536, shared_memory_per_block=232448,
                             l2_bytes=50 << 20, dram_gbps=3350.0, max_programs_per_sm=32)


@pytest.mark.parametrize("registers,shared,warps,expected", [
    (84, 0, 4, 5),       # 2816 registers a warp: 5 per sub-partition, 20 warps, 5 programs
    (32, 0, 1, 32),      # the SM's limit on resident programs
    (16, 0, 16, 4),      # threads: 2048 / 512
    (40, 100 << 10, 2, 2),  # shared memory: 228 KiB / (100 + 1) KiB
    (255, 0, 32, 1),     # never zero
], ids=["registers", "programs", "threads", "shared", "at_least_one"])
def test_programs_per_multiprocessor(registers, shared, warps, expected):
    assert programs_per_multiprocessor(registers, shared, warps, H100_LIKE, 228 << 10) == expected


def test_program_count_is_one_wave_of_enough_rows():
    assert program_count(row_tiles=65536, rows_per_tile=1, resident=660) == 660
    # Each program covers MIN_ROWS_PER_PROGRAM rows at least.
    assert program_count(16384, 1, 100000) == 16384 // MIN_ROWS_PER_PROGRAM
    assert program_count(3, 128, 660) == 3  # tall tiles: a tile a program
    assert program_count(1, 1, 660) == 1


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_column_sums_match_float64(poisoned, count, dtype):
    generator = torch.Generator().manual_seed(count)
    width = 37
    partials = torch.randn(150, count * width, generator=generator) * 3 + 1  # 150 > a block
    sums = column_sums(partials, width, count, dtype)
    want = partials.double().sum(0)
    assert len(sums) == count
    for index, got in enumerate(sums):
        assert got.dtype == dtype and got.shape == (width,)
        assert relative_error(got, want[index * width:(index + 1) * width]) <= TOLERANCE[dtype]
