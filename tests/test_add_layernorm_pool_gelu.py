"""The fused add + LayerNorm + AvgPool3d + GELU kernel against PyTorch in float64 (interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import add_layernorm_pool_gelu as module
from kernels.add_layernorm_pool_gelu import (
    ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
    PoolGeluCall,
    fused_add_layernorm_pool_gelu,
)
from kernels.config import LaunchConfig
from kernels.model import Model, ModelNew
from kernels.table import TableEntry, merge_entries, reload_tables

# (atol, rtol) against float64: float32 math throughout, one rounding of the output.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(shape, dtype, seed, affine=(True, True)):
    gen = _generator(seed)
    width = shape[-1]
    # Non-zero mean and a row-varying scale, so that the statistics matter.
    x = (torch.randn(shape, generator=gen) * (1.0 + torch.rand(shape[:-1] + (1,), generator=gen))
         + 0.5).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(width, generator=gen)).to(dtype) if affine[0] else None
    bias = (0.5 * torch.randn(width, generator=gen)).to(dtype) if affine[1] else None
    return x, weight, bias


def _reference(x, sum_weight, weight, bias, eps, pool_kernel, approximate):
    if isinstance(sum_weight, torch.Tensor):
        sum_weight = sum_weight.double()
    y = F.layer_norm(x.double() + sum_weight, (x.shape[-1],),
                     weight.double() if weight is not None else None,
                     bias.double() if bias is not None else None, eps)
    return F.gelu(F.avg_pool3d(y, pool_kernel), approximate=approximate)


def _check(out, ref, dtype):
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool_kernel", [(2, 2, 2), (1, 2, 2), (2, 1, 1)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_matches_torch_odd_sizes(dtype, pool_kernel, approximate):
    # D=5, H=7, W=9: every pooled dim of 2 drops a remainder, which must still count in the
    # LayerNorm statistics of W.
    seed = 100 * pool_kernel[0] + 10 * pool_kernel[1] + dtype.itemsize
    x, weight, bias = _inputs((2, 3, 5, 7, 9), dtype, seed=seed)
    out = fused_add_layernorm_pool_gelu(x, 0.75, weight, bias, 1e-5, pool_kernel, approximate)
    _check(out, _reference(x, 0.75, weight, bias, 1e-5, pool_kernel, approximate), dtype)


@pytest.mark.parametrize("pool_kernel", [(1, 1, 3), (3, 2, 3), (2, 2, 5), (1, 1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_pool_widths(pool_kernel, dtype):
    # kw of 3 and 5 take the [rows, Wo, KW_PAD] tile path; 4 the reshape path.
    x, weight, bias = _inputs((1, 2, 6, 5, 11), dtype, seed=sum(pool_kernel))
    out = fused_add_layernorm_pool_gelu(x, -0.3, weight, bias, 1e-5, pool_kernel, "none")
    _check(out, _reference(x, -0.3, weight, bias, 1e-5, pool_kernel, "none"), dtype)


CONFIGS = [
    LaunchConfig(block_rows=1, block_w=16, num_warps=1),
    LaunchConfig(block_rows=2, block_w=16, num_warps=2, eviction_policy="evict_first"),
    LaunchConfig(block_rows=4, block_w=32, num_warps=4, num_stages=2, eviction_policy="evict_last"),
    LaunchConfig(block_rows=8, block_w=16, num_warps=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.key())
@pytest.mark.parametrize("pool_kernel", [(2, 2, 2), (1, 1, 3)])
def test_configs(config, pool_kernel):
    x, weight, bias = _inputs((2, 2, 4, 5, 13), torch.float32, seed=7)
    out = fused_add_layernorm_pool_gelu(x, 1.0, weight, bias, 1e-5, pool_kernel, "tanh",
                                        config=config)
    _check(out, _reference(x, 1.0, weight, bias, 1e-5, pool_kernel, "tanh"), torch.float32)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_without_weight_or_bias(affine):
    x, weight, bias = _inputs((1, 2, 4, 4, 8), torch.float32, seed=3, affine=affine)
    out = fused_add_layernorm_pool_gelu(x, 0.5, weight, bias, 1e-3)
    _check(out, _reference(x, 0.5, weight, bias, 1e-3, (2, 2, 2), "none"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_weight_tensor_and_wide_rows(dtype):
    # W=64 as in the reference model; sum_weight a 0-d tensor read on the device.
    x, weight, bias = _inputs((1, 2, 4, 4, 64), dtype, seed=11)
    sum_weight = torch.tensor(1.25, dtype=dtype)
    out = fused_add_layernorm_pool_gelu(x, sum_weight, weight, bias, 1e-5, (2, 2, 2), "none")
    _check(out, _reference(x, sum_weight, weight, bias, 1e-5, (2, 2, 2), "none"), dtype)


def test_int_pool_kernel_and_non_contiguous_input():
    x, weight, bias = _inputs((2, 3, 4, 6, 10), torch.float32, seed=5)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not x.is_contiguous()
    out = fused_add_layernorm_pool_gelu(x, 0.1, weight, bias, pool_kernel=2)
    _check(out, _reference(x, 0.1, weight, bias, 1e-5, (2, 2, 2), "none"), torch.float32)


def test_strided_weight_and_bias():
    x, _, _ = _inputs((1, 2, 4, 4, 6), torch.float32, seed=9)
    params = 1.0 + 0.5 * torch.randn(6, 2, generator=_generator(10))
    weight, bias = params[:, 0], params[:, 1]  # shape (6,), stride 2
    assert not weight.is_contiguous()
    out = fused_add_layernorm_pool_gelu(x, 0.2, weight, bias)
    _check(out, _reference(x, 0.2, weight, bias, 1e-5, (2, 2, 2), "none"), torch.float32)


def test_empty_output_does_not_launch(monkeypatch):
    monkeypatch.setattr(module, "_add_layernorm_pool_gelu_kernel", None)  # a launch would fail
    x = torch.randn(0, 3, 4, 4, 8)
    out = fused_add_layernorm_pool_gelu(x, 1.0)
    assert out.shape == (0, 3, 2, 2, 4) and out.dtype == x.dtype


def _good():
    x = torch.randn(1, 2, 4, 4, 8) + 1.0
    return x, torch.ones(8), torch.zeros(8)


@pytest.mark.parametrize("change, error, match", [
    (dict(x=[1.0]), TypeError, "x must be a tensor"),
    (dict(x=torch.randn(1, 2, 4, 4, 8, dtype=torch.float64)), TypeError, "unsupported dtype"),
    (dict(x=torch.randn(2, 4, 4, 8)), ValueError, "must be 5-D"),
    (dict(weight=torch.ones(9)), ValueError, r"weight has shape \(9,\)"),
    (dict(bias=torch.ones(4, 8)), ValueError, "bias has shape"),
    (dict(weight=torch.ones(8, dtype=torch.float16)), TypeError, "weight has dtype"),
    (dict(weight=[1.0] * 8), TypeError, "weight must be a tensor"),
    (dict(pool_kernel=(2, 2)), TypeError, "pool_kernel must be an int or 3 ints"),
    (dict(pool_kernel=(2, 2.0, 2)), TypeError, "pool_kernel must be an int or 3 ints"),
    (dict(pool_kernel=(True, 2, 2)), TypeError, "pool_kernel must be an int or 3 ints"),
    (dict(pool_kernel="222"), TypeError, "pool_kernel must be an int or 3 ints"),
    (dict(pool_kernel=(0, 2, 2)), ValueError, "must be positive"),
    (dict(pool_kernel=(2, 5, 2)), ValueError, "larger than x's spatial dims"),
    (dict(pool_kernel=(2, 2, 9)), ValueError, "larger than x's spatial dims"),
    (dict(approximate="fast"), ValueError, "approximate must be one of"),
    (dict(sum_weight=torch.ones(2)), ValueError, "sum_weight must have one element"),
    (dict(sum_weight="1"), TypeError, "sum_weight must be a number or a tensor"),
    (dict(sum_weight=True), TypeError, "sum_weight must be a number or a tensor"),
    (dict(eps="1e-5"), TypeError, "eps must be a number"),
    (dict(config={"block_rows": 1}), TypeError, "config must be a LaunchConfig"),
    (dict(config=LaunchConfig(block_rows=1, block_w=4, num_warps=1)), ValueError,
     "block_w=4 is less than the row width 8"),
])
def test_bad_inputs(change, error, match):
    x, weight, bias = _good()
    args = dict(x=x, sum_weight=1.0, weight=weight, bias=bias, eps=1e-5, pool_kernel=(2, 2, 2),
                approximate="none", config=None)
    args.update(change)
    with pytest.raises(error, match=match):
        fused_add_layernorm_pool_gelu(**args)


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, bias = _good()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused_add_layernorm_pool_gelu(x, 1.0, weight, bias)


def _call(shape, dtype=torch.float32, pool_kernel=(2, 2, 2), approximate="none"):
    return PoolGeluCall(shape, dtype, pool_kernel, approximate)


def _default(shape, dtype=torch.float32, pool_kernel=(2, 2, 2), channels_last=False):
    descriptor = ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST if channels_last else ADD_LAYERNORM_POOL_GELU
    return descriptor.default_config(_call(shape, dtype, pool_kernel))


# x of the reference tail: [32, 64, 32, 64, 64], 2**20 pooled rows of W = 64.
REFERENCE_TAIL = (32, 64, 32, 64, 64)


def test_default_config():
    config = _default(REFERENCE_TAIL)
    assert config.block_w == 64
    # About 8 KiB of input per program: 8 pooled rows x 4 input rows x 256 bytes.
    assert config.block_rows * 4 * 64 * 4 == 8192
    assert config.num_warps == 2  # 32 bytes per thread of one 2 KiB row tile
    bf16 = _default(REFERENCE_TAIL, torch.bfloat16)
    assert (bf16.block_rows, bf16.block_w, bf16.num_warps) == (16, 64, 2)
    assert _default(REFERENCE_TAIL) is config  # cached
    assert _default((1, 3, 2, 2, 9), torch.bfloat16).block_rows == 4  # <= rows
    wide = _default((1, 16, 2, 2, 3000))
    assert (wide.block_rows, wide.block_w, wide.num_warps) == (1, 4096, 16)
    for width in (1, 9, 64, 100, 1024):
        for dtype in (torch.float32, torch.bfloat16):
            assert _default((1, 1000, 3, 1, width), dtype, (3, 1, 1)).block_w >= width


def test_table_key_names_height_pool_and_gelu():
    key = ADD_LAYERNORM_POOL_GELU.table_key(_call((2, 3, 4, 64, 9)))
    assert (key.width, key.rows, key.variant) == (9, 2 * 3 * 2 * 32, "h64_k2x2x2_none")
    assert ADD_LAYERNORM_POOL_GELU.table_key(
        _call((2, 3, 4, 7, 9), approximate="tanh")).variant == "h7_k2x2x2_tanh"
    channels_last = ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST.table_key(_call((2, 64, 4, 64, 9)))
    assert channels_last.variant == "h64_k2x2x2_none_cl_c64"
    assert ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST.table_name == ADD_LAYERNORM_POOL_GELU.name


def test_select_uses_variant(monkeypatch, tmp_path):
    def select(shape, pool_kernel=(2, 2, 2), approximate="none"):
        return ADD_LAYERNORM_POOL_GELU.select(_call(shape, torch.float32, pool_kernel,
                                                    approximate))

    # x [1, 12, 2, 7, 9]: 36 pooled rows of 9, H = 7.
    config, source = select((1, 12, 2, 7, 9))
    assert source == "heuristic" and config == _default((1, 12, 2, 7, 9))

    tuned = LaunchConfig(block_rows=2, block_w=32, num_warps=2, eviction_policy="evict_first")
    path = tmp_path / "table.json"
    monkeypatch.setenv("TUNER_TABLE", str(path))
    merge_entries(path, [TableEntry(kernel=ADD_LAYERNORM_POOL_GELU.name, device="interpreter",
                                    dtype="float32", width=9, rows=36, variant="h7_k2x2x2_none",
                                    config=tuned)])
    try:
        assert select((1, 12, 2, 7, 9)) == (tuned, "table")
        assert select((1, 13, 2, 7, 9))[0] == tuned  # 39 rows: the nearest entry
        # Another height, pool kernel or approximation is another variant.
        assert select((1, 12, 2, 8, 9))[1] == "heuristic"
        assert select((1, 12, 1, 7, 9), pool_kernel=(1, 2, 2))[1] == "heuristic"
        assert select((1, 12, 2, 7, 9), approximate="tanh")[1] == "heuristic"
        # The launcher picks the tuned config up.
        x, weight, bias = _inputs((2, 3, 5, 7, 9), torch.float32, seed=21)
        out = fused_add_layernorm_pool_gelu(x, 0.5, weight, bias)
        _check(out, _reference(x, 0.5, weight, bias, 1e-5, (2, 2, 2), "none"), torch.float32)
    finally:
        monkeypatch.delenv("TUNER_TABLE")
        reload_tables()


def test_exported():
    assert kernels.fused_add_layernorm_pool_gelu is fused_add_layernorm_pool_gelu


SMALL_MODEL = dict(in_channels=2, out_channels=3, kernel_size=(3, 3, 3), stride=(2, 2, 2),
                   padding=(1, 1, 1), output_padding=(1, 1, 1), sum_weight=0.5,
                   norm_shape=(10,), pool_kernel_size=(2, 2, 2))
SMALL_INPUT = (2, 2, 3, 3, 5)  # conv output [2, 3, 6, 6, 10]


def _models(dtype=torch.float32, **changes):
    torch.manual_seed(0)
    model = Model(**{**SMALL_MODEL, **changes})
    with torch.no_grad():  # a non-trivial affine LayerNorm
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    new = ModelNew(**{**SMALL_MODEL, **changes})
    new.load_state_dict(model.state_dict())
    assert new.state_dict().keys() == model.state_dict().keys()
    return model.to(dtype), new.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_model_new_fused_tail(dtype, approximate):
    model, new = _models(dtype)
    model.gelu = nn.GELU(approximate=approximate)
    new.gelu = nn.GELU(approximate=approximate)
    assert new.uses_fused_tail
    x = torch.randn(SMALL_INPUT, generator=_generator(1)).to(dtype)
    with torch.no_grad():
        conv = model.conv_transpose(x)
        reference = _reference(conv, model.sum_weight, model.norm.weight, model.norm.bias,
                               model.norm.eps, (2, 2, 2), approximate)
        out = new(x)
        _check(out, reference, dtype)
        if dtype == torch.float32:  # the CPU has no bfloat16 avg_pool3d
            torch.testing.assert_close(out, model(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("change", [
    dict(norm_shape=(6, 10)),
    dict(pool=nn.AvgPool3d(2, stride=1)),
    dict(pool=nn.AvgPool3d(2, padding=1)),
    dict(pool=nn.AvgPool3d(2, ceil_mode=True)),
    dict(gelu=nn.ReLU()),
], ids=["2d-norm", "stride", "padding", "ceil", "relu"])
def test_model_new_fallback(change):
    change = dict(change)
    pool, gelu = change.pop("pool", None), change.pop("gelu", None)
    model, new = _models(**change)
    for target in (model, new):
        if pool is not None:
            target.avg_pool = pool
        if gelu is not None:
            target.gelu = gelu
    assert not new.uses_fused_tail
    x = torch.randn(SMALL_INPUT, generator=_generator(2))
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-4)


def test_model_new_unbatched_and_int_pool():
    model, new = _models(pool_kernel_size=2)
    assert new.uses_fused_tail
    x = torch.randn(SMALL_INPUT[1:], generator=_generator(3))
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), atol=1e-5, rtol=1e-4)


# --- channels-last x (memory order N, D, H, W, C): the second kernel -------------------------

CL = torch.channels_last_3d


def _cl(x):
    x = x.contiguous(memory_format=CL)
    assert x.is_contiguous(memory_format=CL)
    return x


def _check_cl(out, ref, dtype):
    """Values as :func:`_check`, and the output written channels-last (not also contiguous)."""
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    _check(out, ref, dtype)


@pytest.fixture
def no_row_kernel(monkeypatch):
    """Any launch of the contiguous-layout kernel fails: the channels-last kernel must run."""
    monkeypatch.setattr(module, "_add_layernorm_pool_gelu_kernel", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool_kernel", [(2, 2, 2), (1, 2, 2), (2, 1, 1)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_channels_last_matches_torch_odd_sizes(dtype, pool_kernel, approximate, no_row_kernel):
    # C=6 (not a power of two); D=5, H=7, W=9 drop remainders that must count in the stats.
    seed = 300 + 100 * pool_kernel[0] + 10 * pool_kernel[1] + dtype.itemsize
    x, weight, bias = _inputs((1, 6, 5, 7, 9), dtype, seed=seed)
    out = fused_add_layernorm_pool_gelu(_cl(x), 0.75, weight, bias, 1e-5, pool_kernel,
                                        approximate)
    _check_cl(out, _reference(x, 0.75, weight, bias, 1e-5, pool_kernel, approximate), dtype)


@pytest.mark.parametrize("pool_kernel", [(1, 1, 3), (3, 2, 3), (2, 2, 5), (1, 1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_other_pool_widths(pool_kernel, dtype, no_row_kernel):
    # kw of 3 and 5 take the [Wo, KW_PAD, BLOCK_C] tile path; 4 the reshape path.
    x, weight, bias = _inputs((1, 3, 6, 5, 11), dtype, seed=40 + sum(pool_kernel))
    out = fused_add_layernorm_pool_gelu(_cl(x), -0.3, weight, bias, 1e-5, pool_kernel, "none")
    _check_cl(out, _reference(x, -0.3, weight, bias, 1e-5, pool_kernel, "none"), dtype)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.key())
@pytest.mark.parametrize("channels", [3, 6])
@pytest.mark.parametrize("pool_kernel", [(2, 2, 2), (1, 1, 3)])
def test_channels_last_configs(config, channels, pool_kernel, no_row_kernel):
    # block_rows = channels per program: 1 and 2 split C into several blocks (the last one
    # partial for C=3), 4 and 8 cover C with masked channels.
    x, weight, bias = _inputs((2, channels, 2, 2, 13), torch.float32, seed=50 + channels)
    out = fused_add_layernorm_pool_gelu(_cl(x), 1.0, weight, bias, 1e-5, pool_kernel, "tanh",
                                        config=config)
    _check_cl(out, _reference(x, 1.0, weight, bias, 1e-5, pool_kernel, "tanh"), torch.float32)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_channels_last_without_weight_or_bias(affine, no_row_kernel):
    x, weight, bias = _inputs((1, 5, 4, 4, 8), torch.float32, seed=60, affine=affine)
    out = fused_add_layernorm_pool_gelu(_cl(x), 0.5, weight, bias, 1e-3)
    _check_cl(out, _reference(x, 0.5, weight, bias, 1e-3, (2, 2, 2), "none"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_sum_weight_tensor_wide_rows_heuristic(dtype, no_row_kernel):
    # W=64 as in the reference model, the heuristic config, sum_weight a 0-d tensor.
    x, weight, bias = _inputs((1, 12, 4, 4, 64), dtype, seed=61)
    sum_weight = torch.tensor(1.25, dtype=dtype)
    out = fused_add_layernorm_pool_gelu(_cl(x), sum_weight, weight, bias, 1e-5, (2, 2, 2))
    _check_cl(out, _reference(x, sum_weight, weight, bias, 1e-5, (2, 2, 2), "none"), dtype)


def test_channels_last_out_argument(no_row_kernel):
    x, weight, bias = _inputs((2, 3, 4, 6, 8), torch.float32, seed=62)
    out = torch.full((2, 3, 2, 3, 4), float("nan")).contiguous(memory_format=CL)
    result = fused_add_layernorm_pool_gelu(_cl(x), 0.2, weight, bias, out=out)
    assert result is out
    _check_cl(out, _reference(x, 0.2, weight, bias, 1e-5, (2, 2, 2), "none"), torch.float32)


def test_out_memory_format_must_match_x():
    x, weight, bias = _inputs((2, 3, 4, 6, 8), torch.float32, seed=63)
    contiguous_out = torch.empty(2, 3, 2, 3, 4)
    cl_out = torch.empty(2, 3, 2, 3, 4, memory_format=CL)
    with pytest.raises(ValueError, match="out must be in channels_last_3d memory format"):
        fused_add_layernorm_pool_gelu(_cl(x), 0.2, weight, bias, out=contiguous_out)
    with pytest.raises(ValueError, match=r"out must be a contiguous tensor \(out.is_contiguous"):
        fused_add_layernorm_pool_gelu(x, 0.2, weight, bias, out=cl_out)
    with pytest.raises(ValueError, match="out must be a tensor of shape"):
        fused_add_layernorm_pool_gelu(_cl(x), 0.2, weight, bias,
                                      out=torch.empty(2, 3, 2, 3, 5, memory_format=CL))
    # Contiguous x still writes a contiguous out.
    assert fused_add_layernorm_pool_gelu(x, 0.2, weight, bias, out=contiguous_out) \
        is contiguous_out


@pytest.mark.parametrize("layout", ["ncdwh", "cl_sliced", "cl_channel_slice"])
def test_other_strides_fall_back_to_contiguous(layout, monkeypatch):
    monkeypatch.setattr(module, "_add_layernorm_pool_gelu_cl_kernel", None)  # never launched
    x, weight, bias = _inputs((2, 4, 4, 6, 9), torch.float32, seed=64)
    if layout == "ncdwh":  # memory order N, C, D, W, H: permuted the other way
        x = x.transpose(3, 4).contiguous().transpose(3, 4)
    elif layout == "cl_sliced":  # channels-last storage, but a slice of W
        x = _cl(torch.cat([x, x[..., :2]], dim=-1))[..., :9]
    else:  # channels-last storage, every other channel
        x = _cl(x.repeat_interleave(2, dim=1))[:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL)
    out = fused_add_layernorm_pool_gelu(x, 0.1, weight, bias)
    assert out.is_contiguous()
    _check(out, _reference(x, 0.1, weight, bias, 1e-5, (2, 2, 2), "none"), torch.float32)


def test_contiguous_and_channels_last_at_once_takes_row_kernel(monkeypatch):
    # With C == 1 the two layouts coincide: the contiguous kernel runs, the output is both.
    monkeypatch.setattr(module, "_add_layernorm_pool_gelu_cl_kernel", None)
    x, weight, bias = _inputs((2, 1, 4, 4, 8), torch.float32, seed=65)
    x = _cl(x)
    assert x.is_contiguous()
    out = fused_add_layernorm_pool_gelu(x, 0.1, weight, bias)
    assert out.is_contiguous() and out.is_contiguous(memory_format=CL)
    _check(out, _reference(x, 0.1, weight, bias, 1e-5, (2, 2, 2), "none"), torch.float32)


def test_channels_last_empty_output_does_not_launch(monkeypatch):
    monkeypatch.setattr(module, "_add_layernorm_pool_gelu_cl_kernel", None)
    monkeypatch.setattr(module, "_add_layernorm_pool_gelu_kernel", None)
    for shape in ((0, 3, 4, 4, 8), (2, 0, 4, 4, 8)):
        out = fused_add_layernorm_pool_gelu(_cl(torch.randn(shape)), 1.0)
        assert out.shape == shape[:2] + (2, 2, 4)


def test_channels_last_config_tile_limit():
    x = _cl(torch.randn(1, 2, 2, 2, 9))
    with pytest.raises(ValueError, match="block_w=4 is less than the row width 9"):
        fused_add_layernorm_pool_gelu(x, 1.0, pool_kernel=(1, 1, 3),
                                      config=LaunchConfig(block_rows=1, block_w=4, num_warps=1))
    huge = LaunchConfig(block_rows=64, block_w=16384, num_warps=4)
    with pytest.raises(ValueError, match="over Triton's limit"):
        fused_add_layernorm_pool_gelu(x, 1.0, pool_kernel=(1, 1, 3), config=huge)


def test_default_config_channels_last():
    # The reference tail: W=64, C=64: the tuned H100 winner, 16 channels and 1 warp.
    f32 = _default(REFERENCE_TAIL, channels_last=True)
    assert (f32.block_rows, f32.block_w, f32.num_warps) == (16, 64, 1)
    bf16 = _default(REFERENCE_TAIL, torch.bfloat16, channels_last=True)
    assert (bf16.block_rows, bf16.block_w, bf16.num_warps) == (16, 64, 1)
    # Few channels: block_rows <= next_pow2(C).
    small = _default((333, 3, 2, 2, 9), channels_last=True)
    assert (small.block_rows, small.block_w, small.num_warps) == (4, 16, 1)
    # Wide rows: one channel a program, a warp per 4 KiB.
    wide = _default((1, 64, 2, 2, 3000), channels_last=True)
    assert (wide.block_rows, wide.block_w, wide.num_warps) == (1, 4096, 4)
    for width in (1, 9, 64, 100, 1024):
        for channels in (1, 3, 6, 64, 1000):
            for dtype in (torch.float32, torch.bfloat16):
                config = _default((max(1, 1000 // channels), channels, 2, 2, width), dtype,
                                  channels_last=True)
                assert config.block_w >= width
                assert config.block_rows <= max(1, 1 << (channels - 1).bit_length())
                assert config.block_rows * config.block_w * dtype.itemsize <= max(
                    8192, config.block_w * dtype.itemsize)


def test_select_per_layout(monkeypatch, tmp_path, no_row_kernel):
    def select(shape, channels_last=False):
        descriptor = ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST if channels_last \
            else ADD_LAYERNORM_POOL_GELU
        return descriptor.select(_call(shape))

    # x [1, 6, 4, 7, 9]: 36 pooled rows of 9, H = 7, C = 6.
    config, source = select((1, 6, 4, 7, 9), channels_last=True)
    assert source == "heuristic"
    assert config == _default((1, 6, 4, 7, 9), channels_last=True)
    tuned_rows = LaunchConfig(block_rows=2, block_w=32, num_warps=2, eviction_policy="evict_first")
    tuned_cl = LaunchConfig(block_rows=2, block_w=16, num_warps=1, eviction_policy="evict_last")
    path = tmp_path / "table.json"
    monkeypatch.setenv("TUNER_TABLE", str(path))
    entry = dict(kernel=ADD_LAYERNORM_POOL_GELU.table_name, device="interpreter",
                 dtype="float32", width=9, rows=36)
    # A pooled row count of 2 * 6 * 2 * 3 = 72 for x [2, 6, 5, 7, 9], pool 2x2x2.
    merge_entries(path, [TableEntry(**entry, variant="h7_k2x2x2_none", config=tuned_rows)])
    try:
        # A config tuned for the contiguous layout is not used for channels-last x.
        assert select((1, 6, 4, 7, 9))[1] == "table"
        assert select((1, 6, 4, 7, 9), channels_last=True)[1] == "heuristic"
        merge_entries(path, [TableEntry(**entry, variant="h7_k2x2x2_none_cl_c6",
                                        config=tuned_cl)])
        assert select((1, 6, 4, 7, 9), channels_last=True) == (tuned_cl, "table")
        # Another channel count: x [3, 4, 2, 7, 9], also 36 pooled rows.
        assert select((3, 4, 2, 7, 9), channels_last=True)[1] == "heuristic"
        assert select((1, 6, 4, 7, 9)) == (tuned_rows, "table")
        # The launcher picks the channels-last entry up (nearest rows: 72 vs 36).
        seen = []
        real = ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST.select

        def spy(*args, **kwargs):
            seen.append(real(*args, **kwargs))
            return seen[-1]

        monkeypatch.setattr(ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST, "select", spy)
        x, weight, bias = _inputs((2, 6, 5, 7, 9), torch.float32, seed=66)
        out = fused_add_layernorm_pool_gelu(_cl(x), 0.5, weight, bias)
        assert len(seen) == 1 and seen[0][0] == tuned_cl and seen[0][1].startswith("table")
        _check_cl(out, _reference(x, 0.5, weight, bias, 1e-5, (2, 2, 2), "none"), torch.float32)
    finally:
        monkeypatch.delenv("TUNER_TABLE")
        reload_tables()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_new_runs_conv_and_tail_channels_last(dtype, monkeypatch):
    model, new = _models(dtype)
    new.conv_in_triton = False  # the path used where the one-kernel model does not apply
    assert new.uses_fused_tail and new.channels_last_conv
    x = torch.randn(SMALL_INPUT, generator=_generator(4)).to(dtype)
    with torch.no_grad():
        conv = model.conv_transpose(x)
        reference = _reference(conv, model.sum_weight, model.norm.weight, model.norm.bias,
                               model.norm.eps, (2, 2, 2), "none")
        monkeypatch.setattr(module, "_add_layernorm_pool_gelu_kernel", None)
        out = new(x)
        _check_cl(out, reference, dtype)
        monkeypatch.undo()
        # channels_last_conv=False: the NCDHW convolution and the contiguous kernel.
        monkeypatch.setattr(module, "_add_layernorm_pool_gelu_cl_kernel", None)
        new.channels_last_conv = False
        out = new(x)
        assert out.is_contiguous()
        _check(out, reference, dtype)
    # The parameters were not converted: same strides as Model's.
    for key, value in new.state_dict().items():
        assert value.stride() == model.state_dict()[key].stride(), key
