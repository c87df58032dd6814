"""The fused add + LayerNorm + AvgPool3d + GELU kernel against PyTorch in float64 (interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import add_layernorm_pool_gelu as module
from kernels.add_layernorm_pool_gelu import (
    KERNEL_NAME,
    fused_add_layernorm_pool_gelu,
    heuristic_config,
    select_config,
    table_variant,
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


def test_heuristic_config():
    config = heuristic_config(4194304 // 4, 64, torch.float32, (2, 2, 2))
    assert config.block_w == 64
    # About 8 KiB of input per program: 8 pooled rows x 4 input rows x 256 bytes.
    assert config.block_rows * 4 * 64 * 4 == 8192
    assert config.num_warps == 2  # 32 bytes per thread of one 2 KiB row tile
    bf16 = heuristic_config(4194304 // 4, 64, torch.bfloat16, (2, 2, 2))
    assert (bf16.block_rows, bf16.block_w, bf16.num_warps) == (16, 64, 2)
    assert heuristic_config(4194304 // 4, 64, torch.float32, (2, 2, 2)) is config  # cached
    assert heuristic_config(3, 9, torch.bfloat16, (2, 2, 2)).block_rows == 4  # <= rows
    wide = heuristic_config(16, 3000, torch.float32, (2, 2, 2))
    assert (wide.block_rows, wide.block_w, wide.num_warps) == (1, 4096, 16)
    for width in (1, 9, 64, 100, 1024):
        for dtype in (torch.float32, torch.bfloat16):
            config = heuristic_config(1000, width, dtype, (3, 1, 1))
            assert config.block_w >= width


def test_select_config_uses_variant(monkeypatch, tmp_path):
    assert table_variant(64, (2, 2, 2), "none") == "h64_k2x2x2_none"
    assert table_variant(7, 2, "tanh") == "h7_k2x2x2_tanh"
    config, source = select_config(36, 9, torch.float32, (2, 2, 2), 7, "none")
    assert source == "heuristic" and config == heuristic_config(36, 9, torch.float32, (2, 2, 2))

    tuned = LaunchConfig(block_rows=2, block_w=32, num_warps=2, eviction_policy="evict_first")
    path = tmp_path / "table.json"
    monkeypatch.setenv("TUNER_TABLE", str(path))
    merge_entries(path, [TableEntry(kernel=KERNEL_NAME, device="interpreter", dtype="float32",
                                    width=9, rows=36, variant="h7_k2x2x2_none", config=tuned)])
    try:
        assert select_config(36, 9, torch.float32, (2, 2, 2), 7, "none") == (tuned, "table")
        assert select_config(40, 9, torch.float32, (2, 2, 2), 7, "none")[0] == tuned
        # Another height, pool kernel or approximation is another variant.
        assert select_config(36, 9, torch.float32, (2, 2, 2), 8, "none")[1] == "heuristic"
        assert select_config(36, 9, torch.float32, (1, 2, 2), 7, "none")[1] == "heuristic"
        assert select_config(36, 9, torch.float32, (2, 2, 2), 7, "tanh")[1] == "heuristic"
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
