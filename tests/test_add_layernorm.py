"""fused_add_layernorm against a float64 PyTorch reference, run through the Triton interpreter.

Every test draws fresh random data (shifted and scaled, so that a wrong mean or variance
shows) from its own seeded generator. Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels.add_layernorm as add_layernorm_module
from kernels import (
    EVICTION_POLICIES,
    LaunchConfig,
    fused_add_layernorm,
    heuristic_config,
    select_config,
)
from kernels.config import MAX_TILE_ELEMENTS
from kernels._common import needs_64bit_offsets, width_multiple
from kernels.defaults import MIN_CHUNK_ELEMENTS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")
# Tolerance per dtype, applied as rtol and as atol scaled by the output's magnitude.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
EPS = 1e-5


# No tuned table may leak in: configs come from the heuristic unless a test passes one.
pytestmark = pytest.mark.usefixtures("no_tables")


def make_inputs(shape, normalized_shape, dtype, seed, *, shift=1.3, scale=2.5):
    """x, weight and bias of fresh random values (never zeros) in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * scale + shift
    weight = torch.randn(normalized_shape, generator=generator) * 0.5 + 1.0
    bias = torch.randn(normalized_shape, generator=generator) * 0.5
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def reference(x, sum_weight, normalized_shape, weight=None, bias=None, eps=EPS):
    """``F.layer_norm(x + sum_weight)`` in float64 from the same (already rounded) inputs."""
    if isinstance(sum_weight, torch.Tensor):
        sum_weight = sum_weight.double()
    return F.layer_norm(
        x.double() + sum_weight,
        tuple(normalized_shape),
        weight.double() if weight is not None else None,
        bias.double() if bias is not None else None,
        eps,
    )


def assert_matches(out, ref, dtype, tolerance=None):
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    assert out.dtype == dtype
    assert out.shape == ref.shape
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "output has non-finite elements (unwritten rows?)"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref, atol=tolerance * scale, rtol=tolerance)


def check(rows_shape, width, dtype, seed, *, sum_weight=0.75, config=None, weight=True,
          bias=True, tolerance=None, shift=1.3, scale=2.5):
    normalized_shape = (width,) if isinstance(width, int) else tuple(width)
    x, w, b = make_inputs(tuple(rows_shape) + normalized_shape, normalized_shape, dtype, seed,
                          shift=shift, scale=scale)
    w = w if weight else None
    b = b if bias else None
    out = fused_add_layernorm(x, sum_weight, normalized_shape, w, b, EPS, config=config)
    assert_matches(out, reference(x, sum_weight, normalized_shape, w, b), dtype, tolerance)
    return out


@pytest.fixture
def poisoned_output(monkeypatch):
    """Makes the launcher's ``torch.empty_like`` return NaN-filled memory, so unwritten
    elements show up as NaN instead of whatever the allocator happened to hand back."""
    real_empty_like = torch.empty_like

    def empty_like_nan(*args, **kwargs):
        tensor = real_empty_like(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(math.nan)
        return tensor

    monkeypatch.setattr(add_layernorm_module.torch, "empty_like", empty_like_nan)


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "rows,width",
    [(1, 1), (7, 1), (1, 3), (5, 3), (13, 64), (1, 100), (37, 100), (3, 1024)],
)
def test_matches_reference_heuristic_config(rows, width, dtype):
    check((rows,), width, dtype, seed=rows * 10007 + width)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "rows,width,config",
    [
        # rows not a multiple of block_rows; last tile partially masked.
        (37, 100, LaunchConfig(block_rows=8, block_w=128, num_warps=4)),
        (9, 64, LaunchConfig(block_rows=4, block_w=64, num_warps=2)),
        (11, 3, LaunchConfig(block_rows=2, block_w=4, num_warps=1)),
        # block_w much wider than the row.
        (6, 3, LaunchConfig(block_rows=1, block_w=256, num_warps=1)),
        (5, 1024, LaunchConfig(block_rows=2, block_w=1024, num_warps=8)),
    ],
    ids=["r37w100b8", "r9w64b4", "r11w3b2", "r6w3wide", "r5w1024b2"],
)
def test_matches_reference_explicit_single_pass(rows, width, config, dtype):
    check((rows,), width, dtype, seed=rows * 31 + width, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_stages", [1, 2])
@pytest.mark.parametrize("eviction_policy", EVICTION_POLICIES, ids=lambda p: p or "default")
def test_chunked_path(eviction_policy, num_stages, dtype):
    # width 300 with block_w 64: five chunks, the last one of 44 columns; 5 rows in tiles of 2.
    config = LaunchConfig(block_rows=2, block_w=64, num_warps=4, num_stages=num_stages,
                          eviction_policy=eviction_policy)
    assert config.block_w < 300
    check((5,), 300, dtype, seed=300 + num_stages, config=config)


@pytest.mark.parametrize(
    "rows,width,config",
    [
        (3, 1000, LaunchConfig(block_rows=1, block_w=256, num_warps=4)),
        (4, 1024, LaunchConfig(block_rows=4, block_w=128, num_warps=4, num_stages=3)),
        (7, 65, LaunchConfig(block_rows=8, block_w=32, num_warps=2)),  # one-column last chunk
        (3, 5, LaunchConfig(block_rows=2, block_w=1, num_warps=1)),    # one column per chunk
    ],
    ids=["w1000b256", "w1024b128", "w65b32", "w5b1"],
)
def test_chunked_path_shapes(rows, width, config):
    assert config.block_w < width
    check((rows,), width, torch.float32, seed=rows + width, config=config)


@pytest.mark.parametrize("eviction_policy", EVICTION_POLICIES, ids=lambda p: p or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eviction_policies_single_pass(eviction_policy, dtype):
    config = LaunchConfig(block_rows=4, block_w=128, num_warps=4, eviction_policy=eviction_policy)
    check((10,), 100, dtype, seed=17, config=config)


@pytest.mark.parametrize("config", [None, LaunchConfig(block_rows=2, block_w=32, num_warps=2)],
                         ids=["single_pass", "chunked"])
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True),
                                         (False, False)],
                         ids=["w+b", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_optional_weight_and_bias(weight, bias, config, dtype):
    check((6,), 100, dtype, seed=5, config=config, weight=weight, bias=bias)


def test_large_offset_is_numerically_stable():
    # A mean far larger than the spread: E[x^2] - E[x]^2 would cancel catastrophically.
    for config in (None, LaunchConfig(block_rows=2, block_w=64, num_warps=2)):
        check((6,), 300, torch.float32, seed=23, shift=1000.0, scale=1.0, sum_weight=0.5,
              config=config, tolerance=5e-4)


def test_constant_rows_give_bias():
    # Zero variance: the output is exactly the bias (rstd = 1/sqrt(eps) times zero).
    x = torch.full((4, 16), 3.0)
    _, weight, bias = make_inputs((4, 16), (16,), torch.float32, seed=3)
    out = fused_add_layernorm(x, 0.25, 16, weight, bias)
    assert_matches(out, reference(x, 0.25, (16,), weight, bias), torch.float32)
    torch.testing.assert_close(out, bias.expand(4, 16), atol=1e-6, rtol=0)


@pytest.mark.parametrize("eps", [1e-5, 1e-2, 1.0])
def test_eps_is_used(eps):
    x, weight, bias = make_inputs((5, 32), (32,), torch.float32, seed=11, scale=0.3)
    out = fused_add_layernorm(x, 0.0, 32, weight, bias, eps)
    ref = reference(x, 0.0, (32,), weight, bias, eps)
    assert_matches(out, ref, torch.float32)


# --------------------------------------------------------------------------------------------
# sum_weight
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "make_sum_weight",
    [
        lambda dtype: 0.625,
        lambda dtype: -2,
        lambda dtype: torch.tensor(0.625, dtype=dtype),          # 0-d, x's dtype
        lambda dtype: torch.tensor(-1.5, dtype=torch.float32),   # 0-d, other dtype
        lambda dtype: torch.tensor([0.375], dtype=dtype),        # one element, 1-d
        lambda dtype: torch.nn.Parameter(torch.tensor(2.0)),     # requires_grad
    ],
    ids=["float", "int", "tensor0d", "tensor0d_fp32", "tensor1", "parameter"],
)
def test_sum_weight_forms(make_sum_weight, dtype):
    sum_weight = make_sum_weight(dtype)
    x, weight, bias = make_inputs((9, 48), (48,), dtype, seed=29)
    out = fused_add_layernorm(x, sum_weight, 48, weight, bias)
    ref_sum = sum_weight.detach().double().reshape(()) if isinstance(sum_weight, torch.Tensor) \
        else sum_weight
    assert_matches(out, reference(x, ref_sum, (48,), weight, bias), dtype)


@pytest.mark.parametrize("config", [None, LaunchConfig(block_rows=2, block_w=16, num_warps=1)],
                         ids=["single_pass", "chunked"])
def test_sum_weight_tensor_is_not_synchronised(monkeypatch, config):
    """A tensor sum_weight is read by the kernel, never pulled to the host with .item()."""
    sum_weight = torch.tensor(0.8)
    x, weight, bias = make_inputs((5, 40), (40,), torch.float32, seed=31)

    def no_item(self):
        raise AssertionError("sum_weight was read with .item()")

    for method in ("item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, method, no_item)
    out = fused_add_layernorm(x, sum_weight, 40, weight, bias, config=config)
    monkeypatch.undo()
    assert_matches(out, reference(x, sum_weight, (40,), weight, bias), torch.float32)


def test_sum_weight_tensor_value_changes_are_seen():
    # Nothing about the value is cached between calls.
    x, weight, bias = make_inputs((4, 32), (32,), torch.float32, seed=37)
    sum_weight = torch.tensor(0.5)
    first = fused_add_layernorm(x, sum_weight, 32, weight, bias)
    sum_weight.fill_(7.0)
    second = fused_add_layernorm(x, sum_weight, 32, weight, bias)
    assert_matches(first, reference(x, 0.5, (32,), weight, bias), torch.float32)
    assert_matches(second, reference(x, 7.0, (32,), weight, bias), torch.float32)


# --------------------------------------------------------------------------------------------
# Shapes and layouts
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "x_shape,normalized_shape,config",
    [
        ((2, 3, 4, 5), (4, 5), None),
        ((2, 3, 4, 5), (3, 4, 5), None),
        ((2, 3, 4, 5), (2, 3, 4, 5), None),  # one row: everything is normalised
        ((2, 3, 4, 5), (4, 5), LaunchConfig(block_rows=4, block_w=8, num_warps=1)),
        ((3, 2, 7, 9), (7, 9), LaunchConfig(block_rows=2, block_w=16, num_warps=2)),
    ],
    ids=["4d_over_2", "4d_over_3", "4d_over_all", "4d_over_2_chunked", "4d_odd_chunked"],
)
def test_multidim_normalized_shape(x_shape, normalized_shape, config, dtype):
    rows_shape = x_shape[: len(x_shape) - len(normalized_shape)]
    out = check(rows_shape, normalized_shape, dtype, seed=41, config=config)
    assert out.shape == x_shape


def test_normalized_shape_forms():
    x, weight, bias = make_inputs((3, 4, 16), (16,), torch.float32, seed=43)
    expected = reference(x, 0.5, (16,), weight, bias)
    for normalized_shape in (16, (16,), [16], torch.Size([16])):
        assert_matches(fused_add_layernorm(x, 0.5, normalized_shape, weight, bias), expected,
                       torch.float32)


def test_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(47)
    base = torch.randn(24, 10, generator=generator) * 2 + 1
    x = base.t()                                               # [10, 24], non-contiguous
    weight = (torch.randn(48, generator=generator) + 1)[::2]   # stride 2
    bias = torch.randn(24, 3, generator=generator)[:, 1]       # stride 3
    assert not x.is_contiguous() and not weight.is_contiguous() and not bias.is_contiguous()
    out = fused_add_layernorm(x, 0.3, 24, weight, bias)
    assert_matches(out, reference(x, 0.3, (24,), weight, bias), torch.float32)


def test_non_contiguous_multidim_weight():
    generator = torch.Generator().manual_seed(53)
    x = torch.randn(3, 4, 6, generator=generator) * 2 - 1
    weight = (torch.randn(6, 4, generator=generator) + 1).t()   # shape (4, 6), transposed
    bias = torch.randn(6, 4, generator=generator).t()
    out = fused_add_layernorm(x, -0.4, (4, 6), weight, bias)
    assert_matches(out, reference(x, -0.4, (4, 6), weight, bias), torch.float32)


def test_does_not_modify_inputs():
    x, weight, bias = make_inputs((5, 20), (20,), torch.float16, seed=59)
    copies = [t.clone() for t in (x, weight, bias)]
    sum_weight = torch.tensor(0.5, dtype=torch.float16)
    fused_add_layernorm(x, sum_weight, 20, weight, bias)
    for before, after in zip(copies, (x, weight, bias)):
        assert torch.equal(before, after)
    assert sum_weight.item() == 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,normalized_shape", [((0, 64), (64,)), ((2, 0, 8), (8,)),
                                                    ((4, 0), (0,))])
def test_empty_input(shape, normalized_shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    weight = torch.ones(normalized_shape, dtype=dtype)
    out = fused_add_layernorm(x, 1.0, normalized_shape, weight, torch.zeros_like(weight))
    assert out.shape == x.shape and out.dtype == dtype and out.numel() == 0
    assert fused_add_layernorm(x, torch.tensor(1.0), normalized_shape).shape == x.shape


# --------------------------------------------------------------------------------------------
# Every element written
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "rows,width,config",
    [
        (3, 64, LaunchConfig(block_rows=16, block_w=64, num_warps=4)),    # block_rows > rows
        (1, 100, LaunchConfig(block_rows=64, block_w=128, num_warps=8)),  # one row, big tile
        (5, 300, LaunchConfig(block_rows=8, block_w=64, num_warps=4)),    # chunked, > rows
        (37, 100, LaunchConfig(block_rows=8, block_w=128, num_warps=4)),  # ragged last tile
        (17, 3, None),
    ],
    ids=["r3b16", "r1b64", "r5b8_chunked", "r37b8", "r17_heuristic"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_element_written_into_poisoned_output(poisoned_output, rows, width, config, dtype):
    out = check((rows,), width, dtype, seed=61, config=config)
    assert torch.isfinite(out).all()


def test_poison_fixture_works(poisoned_output):
    # The fixture really does hand the launcher NaN-filled memory.
    assert torch.isnan(add_layernorm_module.torch.empty_like(torch.ones(3))).all()


def test_rows_beyond_a_tile_are_not_touched():
    # Results of one row do not depend on its neighbours: the first rows of a bigger input
    # equal the output of those rows alone, whatever the tiling.
    x, weight, bias = make_inputs((13, 50), (50,), torch.float32, seed=67)
    config = LaunchConfig(block_rows=4, block_w=64, num_warps=2)
    full = fused_add_layernorm(x, 0.1, 50, weight, bias, config=config)
    part = fused_add_layernorm(x[:5], 0.1, 50, weight, bias, config=config)
    torch.testing.assert_close(full[:5], part, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _x(dtype=torch.float32, shape=(4, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(71)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.bool,
                                   torch.complex64])
def test_unsupported_x_dtype(dtype):
    x = torch.ones(4, 8, dtype=dtype)
    with pytest.raises(TypeError, match=r"unsupported dtype .*accepted: float32, float16, bfloat16"):
        fused_add_layernorm(x, 1.0, 8)


def test_x_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a tensor"):
        fused_add_layernorm([[1.0, 2.0]], 1.0, 2)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_mismatched_param_dtype(name):
    x = _x(torch.float16)
    param = torch.ones(8, dtype=torch.float32)
    with pytest.raises(TypeError, match=rf"{name} has dtype torch.float32 but x has torch.float16"):
        fused_add_layernorm(x, 1.0, 8, **{name: param})


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("shape", [(7,), (9,), (1, 8), (8, 1), ()])
def test_param_shape_mismatch(name, shape):
    param = torch.ones(shape)
    with pytest.raises(ValueError, match=rf"{name} has shape .* expected normalized_shape \(8,\)"):
        fused_add_layernorm(_x(), 1.0, 8, **{name: param})


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_param_not_a_tensor(name):
    with pytest.raises(TypeError, match=rf"{name} must be a tensor or None"):
        fused_add_layernorm(_x(), 1.0, 8, **{name: [1.0] * 8})


@pytest.mark.parametrize("normalized_shape", [7, (4,), (2, 8), (4, 8, 1), (3, 4, 8), ()])
def test_normalized_shape_mismatch(normalized_shape):
    with pytest.raises(ValueError, match=r"normalized_shape .* does not match the trailing dims "
                                         r"of x with shape \(4, 8\)"):
        fused_add_layernorm(_x(), 1.0, normalized_shape)


@pytest.mark.parametrize("shape", [(2,), (1, 2), (0,)])
def test_sum_weight_wrong_size(shape):
    sum_weight = torch.ones(shape)
    with pytest.raises(ValueError, match=r"sum_weight must have one element, got shape"):
        fused_add_layernorm(_x(), sum_weight, 8)


@pytest.mark.parametrize("sum_weight", ["1.0", None, True, [1.0], 1 + 2j])
def test_sum_weight_not_a_number(sum_weight):
    with pytest.raises(TypeError, match="sum_weight must be a number or a tensor"):
        fused_add_layernorm(_x(), sum_weight, 8)


def test_config_wrong_type():
    with pytest.raises(TypeError, match="config must be a LaunchConfig or None"):
        fused_add_layernorm(_x(), 1.0, 8,
                            config={"block_rows": 1, "block_w": 8, "num_warps": 1})


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused_add_layernorm(_x(), 1.0, 8)


# --------------------------------------------------------------------------------------------
# LaunchConfig validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_rows=1, block_w=48, num_warps=4), r"block_w=48 is not a power of two"),
        (dict(block_rows=1, block_w=0, num_warps=4), r"block_w=0 is not a power of two"),
        (dict(block_rows=3, block_w=64, num_warps=4), r"block_rows=3 is not a power of two"),
        (dict(block_rows=1, block_w=64, num_warps=3), r"num_warps=3 is not one of"),
        (dict(block_rows=1, block_w=64, num_warps=64), r"num_warps=64 is not one of"),
        (dict(block_rows=1, block_w=64, num_warps=4, num_stages=0), r"num_stages=0 must be >= 1"),
        (dict(block_rows=1, block_w=64, num_warps=4, eviction_policy="evict_normal"),
         r"eviction_policy='evict_normal' is not one of"),
        (dict(block_rows=1, block_w=64, num_warps=4, eviction_policy="first"),
         r"eviction_policy='first' is not one of"),
        (dict(block_rows=2, block_w=1 << 20, num_warps=4),
         r"block_rows\*block_w=2097152 exceeds Triton's limit of 1048576"),
        (dict(block_rows=1 << 11, block_w=1 << 10, num_warps=4), r"exceeds Triton's limit"),
    ],
    ids=["w48", "w0", "rows3", "warps3", "warps64", "stages0", "evict_normal", "evict_bad",
         "tile_2x2^20", "tile_2^21"],
)
def test_invalid_launch_config(kwargs, match):
    with pytest.raises(ValueError, match=r"invalid LaunchConfig: .*" + match):
        LaunchConfig(**kwargs)


@pytest.mark.parametrize("field", ["block_rows", "block_w", "num_warps", "num_stages"])
@pytest.mark.parametrize("value", [2.0, True, "4"])
def test_launch_config_non_int(field, value):
    kwargs = dict(block_rows=1, block_w=64, num_warps=4, num_stages=1)
    kwargs[field] = value
    with pytest.raises(TypeError, match=rf"LaunchConfig.{field} must be an int"):
        LaunchConfig(**kwargs)


def test_launch_config_limits_and_round_trip():
    largest = LaunchConfig(block_rows=1, block_w=MAX_TILE_ELEMENTS, num_warps=32)
    assert largest.tile_elements == MAX_TILE_ELEMENTS
    config = LaunchConfig(block_rows=4, block_w=256, num_warps=8, num_stages=3,
                          eviction_policy="evict_last")
    assert LaunchConfig.from_dict(config.as_dict()) == config
    assert config.key() == "r4_w256_warps8_s3_evict_last"
    assert LaunchConfig(1, 64, 4).key() == "r1_w64_warps4_s1_none"
    for named in (config, LaunchConfig(1, 64, 4)):
        assert LaunchConfig.from_key(named.key()) == named
    for bad in ("r4_w256_warps8_s3_evict", "4_w256_warps8_s3_none", "r3_w256_warps8_s1_none"):
        with pytest.raises(ValueError):
            LaunchConfig.from_key(bad)
    with pytest.raises(ValueError, match=r"unknown LaunchConfig keys \['warps'\]"):
        LaunchConfig.from_dict({"block_rows": 1, "block_w": 64, "warps": 4})
    with pytest.raises(ValueError, match=r"missing \['num_warps'\]"):
        LaunchConfig.from_dict({"block_rows": 1, "block_w": 64})


# --------------------------------------------------------------------------------------------
# Heuristic and config selection
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_heuristic_config_valid_for_all_widths(dtype):
    heuristic = heuristic_config.__wrapped__  # skip the cache: 65536 widths would churn it
    for rows in (1, 3, 1 << 22):
        for width in range(1, 65537):
            config = heuristic(rows, width, dtype)
            # LaunchConfig checked powers of two, warps and tile size; check the rest.
            assert config.block_rows <= max(1, triton.next_power_of_2(rows))
            if config.block_w >= width:  # the whole row, in its power-of-two span
                assert config.block_w < 2 * width, (rows, width, config)
            else:  # chunks the search space also holds: >= 4096 lanes, at most 16 of them
                assert config.block_w >= MIN_CHUNK_ELEMENTS and \
                    config.block_w * 16 >= width, (rows, width, config)
    assert heuristic_config(8, 100, dtype) == heuristic(8, 100, dtype)


@pytest.mark.parametrize(
    "rows,width,dtype",
    [(33, 100, torch.float32), (6, 1024, torch.bfloat16), (40, 7, torch.float16),
     (2, 20000, torch.float32)],
    ids=["r33w100", "r6w1024", "r40w7", "r2w20000_chunked"],
)
def test_heuristic_config_output_correct(rows, width, dtype):
    config = heuristic_config(rows, width, dtype)
    if width == 20000:
        assert config.block_w < width  # really exercises the chunked loop
    check((rows,), width, dtype, seed=rows + width, config=config)
    # And without a config the launcher picks the same one.
    check((rows,), width, dtype, seed=rows + width)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_select_config_without_table_is_heuristic(dtype):
    for rows, width in [(1, 1), (1000, 64), (4096, 4096), (7, 30000)]:
        config, source = select_config(rows, width, dtype)
        assert source == "heuristic"
        assert config == heuristic_config(rows, width, dtype)
        config, source = select_config(rows, width, dtype, device="NVIDIA H100 80GB HBM3")
        assert source == "heuristic"


def test_select_config_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="unsupported dtype torch.float64"):
        select_config(16, 64, torch.float64)


def test_launcher_uses_selected_config(launch_grids):
    """The grid is cdiv(rows, block_rows) of the selected config."""
    grids = launch_grids(add_layernorm_module, "_add_layernorm_kernel")
    x, weight, bias = make_inputs((37, 100), (100,), torch.float32, seed=73)
    fused_add_layernorm(x, 0.5, 100, weight, bias)
    expected = heuristic_config(37, 100, torch.float32)
    assert grids == [(triton.cdiv(37, expected.block_rows),)]
    fused_add_layernorm(x, 0.5, 100, weight, bias,
                        config=LaunchConfig(block_rows=4, block_w=128, num_warps=2))
    assert grids[-1] == (10,)


def test_addressing_hints():
    """The kernels learn the power of two dividing the width (for vector loads) and use 64-bit
    offsets only where 32 bits could overflow."""
    assert [width_multiple(width) for width in (1, 17, 20, 26, 48, 4096, 10828)] == \
        [1, 1, 4, 2, 16, 16, 4]
    assert not needs_64bit_offsets(1 << 20, 1 << 10, 1024)
    assert needs_64bit_offsets(1 << 21, 1 << 10, 0)
    assert needs_64bit_offsets((1 << 21) - 1, 1 << 10, 1024)
