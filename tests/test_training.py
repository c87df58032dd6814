"""Autograd of the fused kernels against float64 PyTorch references, run through the Triton
interpreter: add + LayerNorm, the fused add + LayerNorm + AvgPool3d + GELU tail, and ModelNew
training next to Model.

Every test draws fresh random data (shifted and scaled, never zeros) from its own seeded
generator; output gradients are random too, so that no gradient term can cancel by accident.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import kernels.add_layernorm as add_layernorm_module
import kernels.add_layernorm_backward as backward_module
import kernels.add_layernorm_pool_gelu as pool_gelu_module
from kernels import (
    LaunchConfig,
    ModelNew,
    fused_add_layernorm,
    fused_add_layernorm_pool_gelu,
    fused_conv_transpose_tail,
)
from kernels.add_layernorm_backward import (
    ADD_LAYERNORM_BACKWARD,
    AddLayerNormBackwardCall,
    add_layernorm_backward,
)
from kernels.backward_reduce import REDUCTIONS
from tests.models import model_pair

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")
# Relative error ||got - want|| / ||want|| allowed per dtype (inputs rounded to the dtype, the
# reference computed in float64 from the rounded values).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
EPS = 1e-5

pytestmark = pytest.mark.usefixtures("no_tables")


def randn(shape, generator, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=generator) * scale + shift).to(dtype)


def make_leaves(x_shape, width_shape, dtype, seed, sum_as_tensor=True):
    """x, sum_weight, weight and bias as leaves that require grad (sum_weight a float32 tensor,
    or a Python number)."""
    generator = torch.Generator().manual_seed(seed)
    x = randn(x_shape, generator, dtype, 2.5, 1.3).requires_grad_()
    weight = randn(width_shape, generator, dtype, 0.5, 1.0).requires_grad_()
    bias = randn(width_shape, generator, dtype, 0.5).requires_grad_()
    sum_weight = (torch.randn((), generator=generator) + 0.5).requires_grad_() if sum_as_tensor \
        else 0.75
    return [x, sum_weight, weight, bias]


def float64_leaves(*tensors):
    return [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t
            for t in tensors]


def relative_error(got, want, floor=1e-30):
    """||got - want|| / ||want||, with ||want|| taken as at least ``floor``."""
    return ((got.double() - want).norm() / want.norm().clamp_min(floor)).item()


def assert_gradients_match(ours, reference, dtype, dy):
    """Each leaf's gradient within the dtype's tolerance, relative to its norm or, for
    gradients that are zero in exact arithmetic (dx and dweight at width 1), to a thousandth of
    ||dy||. The sum_weight gradient is always zero in exact arithmetic (LayerNorm ignores a
    shift), so both sides are rounding noise: it must be small next to the sum of |dx|."""
    floor = 1e-3 * dy.double().norm().item()
    x_ref = reference[0]
    for name, got, want in zip(("x", "sum_weight", "weight", "bias"), ours, reference):
        if not isinstance(got, torch.Tensor):
            continue
        assert got.grad is not None, f"{name} got no gradient"
        assert got.grad.dtype == got.dtype and got.grad.shape == got.shape, name
        assert torch.isfinite(got.grad).all(), name
        if name == "sum_weight":
            bound = 10 * TOLERANCE[dtype] * max(x_ref.grad.abs().sum().item(), floor)
            assert abs(got.grad.item()) <= bound and abs(want.grad.item()) <= bound
        else:
            error = relative_error(got.grad, want.grad, floor)
            assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g}"


# -- add + LayerNorm ------------------------------------------------------------------------------
SHAPES = {
    # name: (x shape, normalized shape)
    "rows_of_64": ((37, 64), (64,)),
    "odd_width_3d": ((3, 5, 7), (7,)),
    "width_1": ((6, 1), (1,)),
    "width_300": ((4, 300), (300,)),
    "five_d_two_dim_norm": ((2, 3, 2, 2, 5), (2, 5)),
    "width_70000_chunked": ((2, 70000), (70000,)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape_name", SHAPES)
def test_add_layernorm_gradients_match_float64(dtype, shape_name):
    x_shape, norm_shape = SHAPES[shape_name]
    seed = len(shape_name) * 7 + DTYPES.index(dtype)
    leaves = make_leaves(x_shape, norm_shape, dtype, seed,
                         sum_as_tensor=shape_name != "width_300")
    reference = float64_leaves(*leaves)
    dy = randn(x_shape, torch.Generator().manual_seed(seed + 1), dtype)

    out = fused_add_layernorm(leaves[0], leaves[1], norm_shape, leaves[2], leaves[3], EPS)
    out.backward(dy)
    want = F.layer_norm(reference[0] + reference[1], norm_shape, reference[2], reference[3], EPS)
    want.backward(dy.double())

    assert out.dtype == dtype and relative_error(out.detach(), want.detach()) <= TOLERANCE[dtype]
    assert_gradients_match(leaves, reference, dtype, dy)


def test_add_layernorm_sum_weight_gradient_in_its_own_dtype_and_shape():
    x, _, weight, bias = make_leaves((5, 16), (16,), torch.bfloat16, seed=11)
    sum_weight = torch.full((1,), 0.3, dtype=torch.float32, requires_grad=True)
    fused_add_layernorm(x, sum_weight, 16, weight, bias).float().square().sum().backward()
    assert sum_weight.grad.dtype == torch.float32 and sum_weight.grad.shape == (1,)


@pytest.mark.parametrize("config", [
    LaunchConfig(block_rows=4, block_w=64, num_warps=2),     # several tiles a program
    LaunchConfig(block_rows=128, block_w=64, num_warps=4),   # tile taller than the problem
    LaunchConfig(block_rows=2, block_w=16, num_warps=1),     # chunked: 48 = 3 chunks of 16
], ids=["tiles", "tall", "chunked"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_configs_and_reductions_agree(config, reduction, launch_grids):
    grids = launch_grids(backward_module, "_add_layernorm_backward_kernel")
    rows, width = 129, 48 if config.block_w == 16 else 64
    generator = torch.Generator().manual_seed(rows + config.block_rows)
    x = randn((rows, width), generator, torch.float32, 2.0, 0.5)
    weight = randn(width, generator, torch.float32, 0.5, 1.0)
    dy = randn((rows, width), generator, torch.float32)
    sum_weight = torch.tensor([0.4])
    shifted = x + sum_weight
    mean = shifted.mean(-1)
    rstd = torch.rsqrt(shifted.var(-1, unbiased=False) + EPS)
    dx_out = torch.full_like(x, float("nan"))  # poisoned: every element must be written

    grads = add_layernorm_backward(dy, x, weight, mean, rstd, sum_weight, config=config,
                                   reduction=reduction, dx_out=dx_out)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    b64 = torch.zeros(width, dtype=torch.float64, requires_grad=True)
    F.layer_norm(x64 + 0.4, (width,), w64, b64, EPS).backward(dy.double())
    assert grads.dx is dx_out
    [(programs,)] = grids
    assert programs > 1  # partial sums of several programs are reduced
    for got, want in ((grads.dx, x64.grad), (grads.dweight, w64.grad), (grads.dbias, b64.grad)):
        assert relative_error(got, want) <= 2e-5
    assert abs(grads.dsum_weight.item()) <= 1e-4 * x64.grad.abs().sum().item()


def test_weight_only_gradient_matches():
    generator = torch.Generator().manual_seed(8)
    x = randn((9, 12), generator, torch.float32, 2.0, 1.0)
    weight = randn(12, generator, torch.float32, 0.5, 1.0).requires_grad_()
    dy = randn((9, 12), generator, torch.float32)
    fused_add_layernorm(x, 1.5, 12, weight, None).backward(dy)
    weight64 = weight.detach().double().requires_grad_()
    F.layer_norm(x.double() + 1.5, (12,), weight64).backward(dy.double())
    assert x.grad is None
    assert relative_error(weight.grad, weight64.grad) <= 2e-5


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_forward_without_autograd_stores_no_statistics(monkeypatch, mode):
    launches = []
    real_launch = add_layernorm_module.ADD_LAYERNORM.launch

    def spy(*args, **kwargs):
        launches.append(kwargs.get("stats"))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(add_layernorm_module.ADD_LAYERNORM, "launch", spy)
    x, sum_weight, weight, bias = make_leaves((6, 32), (32,), torch.float32, seed=9)
    if mode == "nothing_requires_grad":
        x, sum_weight, weight, bias = (t.detach() for t in (x, sum_weight, weight, bias))
        out = fused_add_layernorm(x, sum_weight, 32, weight, bias)
    else:
        context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with context:
            out = fused_add_layernorm(x, sum_weight, 32, weight, bias)
    assert out.grad_fn is None and launches == [None]

    launches.clear()
    x.requires_grad_()
    out = fused_add_layernorm(x, 0.5, 32)
    assert out.grad_fn is not None and launches and launches[0] is not None


def test_out_buffer_with_autograd_is_a_clear_error():
    x, sum_weight, weight, bias = make_leaves((4, 8), (8,), torch.float32, seed=10)
    with pytest.raises(ValueError, match="out= cannot be used while gradients are required"):
        fused_add_layernorm(x, sum_weight, 8, weight, bias, out=torch.empty(4, 8))


@pytest.mark.filterwarnings("ignore:Input #. requires gradient and is not a double")
def test_add_layernorm_gradcheck_float32():
    # float32 only (the kernels compute in float32): finite differences at eps=1e-3.
    x, sum_weight, weight, bias = make_leaves((3, 8), (8,), torch.float32, seed=12)
    assert torch.autograd.gradcheck(
        lambda *args: fused_add_layernorm(args[0], args[1], 8, args[2], args[3]),
        (x, sum_weight, weight, bias), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_backward_config_comes_from_the_tables(tmp_path, monkeypatch):
    from kernels import TableEntry, merge_entries, reload_tables

    tuned = LaunchConfig(block_rows=8, block_w=64, num_warps=2)
    table = tmp_path / "table.json"
    merge_entries(table, [TableEntry("add_layernorm_backward", "interpreter", "float32", 64, 100,
                                     tuned)])
    monkeypatch.setenv("TUNER_TABLE", str(table))
    reload_tables()
    config, source = ADD_LAYERNORM_BACKWARD.select(
        AddLayerNormBackwardCall(100, 64, torch.float32), "interpreter")
    assert config == tuned and source == "table"
    # The forward's entries are another kernel's.
    assert ADD_LAYERNORM_BACKWARD.select(
        AddLayerNormBackwardCall(100, 32, torch.float32), "interpreter")[1] == "heuristic"


# -- add + LayerNorm + AvgPool3d + GELU -------------------------------------------------------
POOL_CASES = {
    # name: (x shape, pool kernel, approximate, channels-last x)
    "k2": ((2, 3, 4, 4, 8), (2, 2, 2), "none", False),
    "floor_remainders_kw3_tanh": ((2, 2, 5, 5, 11), (2, 2, 3), "tanh", False),
    "k1x3x4": ((1, 2, 4, 6, 16), (1, 3, 4), "none", False),
    "channels_last": ((2, 4, 2, 2, 8), (2, 2, 2), "none", True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_gelu_gradients_match_float64(dtype, case):
    shape, pool_kernel, approximate, channels_last = POOL_CASES[case]
    seed = len(case) * 3 + DTYPES.index(dtype)
    leaves = make_leaves(shape, shape[-1:], dtype, seed, sum_as_tensor=case != "k1x3x4")
    if channels_last:
        leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last_3d) \
            .requires_grad_()
    reference = float64_leaves(*leaves)

    out = fused_add_layernorm_pool_gelu(leaves[0], leaves[1], leaves[2], leaves[3], EPS,
                                        pool_kernel, approximate)
    dy = randn(out.shape, torch.Generator().manual_seed(seed + 1), dtype)
    out.backward(dy)
    want = F.gelu(F.avg_pool3d(F.layer_norm(reference[0] + reference[1], shape[-1:], reference[2],
                                            reference[3], EPS), pool_kernel),
                  approximate=approximate)
    want.backward(dy.double())
    assert relative_error(out.detach(), want.detach()) <= TOLERANCE[dtype]
    assert_gradients_match(leaves, reference, dtype, dy)


def test_pool_gelu_without_autograd_is_todays_kernel(monkeypatch):
    launches = []
    real_launch = pool_gelu_module.ADD_LAYERNORM_POOL_GELU.launch
    monkeypatch.setattr(pool_gelu_module.ADD_LAYERNORM_POOL_GELU, "launch",
                        lambda *args, **kwargs: launches.append(kwargs.get("stats"))
                        or real_launch(*args, **kwargs))
    x, sum_weight, weight, bias = make_leaves((1, 2, 2, 2, 8), (8,), torch.float32, seed=13)
    with torch.no_grad():
        fused_add_layernorm_pool_gelu(x, sum_weight, weight, bias)
    assert launches == [None]
    with pytest.raises(ValueError, match="out= cannot be used while gradients are required"):
        fused_add_layernorm_pool_gelu(x, sum_weight, weight, bias,
                                      out=torch.empty(1, 2, 1, 1, 4))


@pytest.mark.filterwarnings("ignore:Input #. requires gradient and is not a double")
def test_pool_gelu_gradcheck_float32():
    x, sum_weight, weight, bias = make_leaves((1, 2, 2, 2, 6), (6,), torch.float32, seed=14)
    assert torch.autograd.gradcheck(
        lambda *args: fused_add_layernorm_pool_gelu(*args, EPS, (2, 2, 3), "tanh"),
        (x, sum_weight, weight, bias), eps=1e-3, atol=2e-3, rtol=1e-2)


# -- the model ------------------------------------------------------------------------------------
TINY_ARGS = dict(in_channels=3, out_channels=4, kernel_size=(3, 3, 3), stride=(2, 2, 2),
                 padding=(1, 1, 1), output_padding=(1, 1, 1), sum_weight=0.7, norm_shape=(8,),
                 pool_kernel_size=(2, 2, 2))
TINY_INPUT = (2, 3, 2, 4, 4)  # the LayerNorm sees rows of width 8


def tiny_models(seed, **changes):
    return model_pair({**TINY_ARGS, **changes}, seed)


@pytest.mark.parametrize("changes,channels_last_conv", [
    ({}, True), ({}, False), (dict(norm_shape=(8, 8)), True), (dict(pool_kernel_size=3), True),
], ids=["fused_tail_channels_last", "fused_tail_ncdhw", "add_ln", "pool3_floor"])
def test_modelnew_backward_matches_model_in_float64(changes, channels_last_conv):
    model, new = tiny_models(seed=20, **changes)
    new.channels_last_conv = channels_last_conv
    reference = copy.deepcopy(model).double()
    x = torch.randn(TINY_INPUT, generator=torch.Generator().manual_seed(21)) * 1.5 + 0.2
    x_new, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    dy_seed = torch.Generator().manual_seed(22)
    out = new(x_new)
    dy = torch.randn(out.shape, generator=dy_seed)
    out.backward(dy)
    reference(x_ref).backward(dy.double())
    assert relative_error(x_new.grad, x_ref.grad) <= 1e-4
    for (name, got), want in zip(new.named_parameters(), reference.parameters()):
        assert got.grad is not None, name
        if name in ("sum_weight", "conv_transpose.bias"):
            # Zero in exact arithmetic: LayerNorm over W ignores any shift constant along W.
            assert got.grad.abs().max() <= 1e-4 * x_ref.grad.abs().sum()
        else:
            assert relative_error(got.grad, want.grad) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modelnew_trains_like_model(dtype):
    model, new = tiny_models(seed=30)
    model, new = model.to(dtype), new.to(dtype)
    reference = copy.deepcopy(model).double()
    # Plain SGD: the gradients that are rounding noise (sum_weight, conv bias) stay negligible
    # steps, where Adam would scale them up to full steps of random sign.
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (new, reference)]
    generator = torch.Generator().manual_seed(31)
    x = torch.randn(TINY_INPUT, generator=generator) * 1.5 + 0.2
    target = torch.randn((2, 4, 2, 4, 4), generator=generator)
    losses = []
    for _ in range(3):
        step_losses = []
        for module, optimizer, precision in zip((new, reference), optimizers,
                                                (dtype, torch.float64)):
            optimizer.zero_grad()
            loss = (module(x.to(precision)).float() - target).square().mean()
            loss.backward()
            optimizer.step()
            step_losses.append(loss.item())
        losses.append(step_losses)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for ours, want in losses:
        assert abs(ours - want) <= tolerance * abs(want)
    for (name, got), want in zip(new.named_parameters(), reference.parameters()):
        scale = want.detach().abs().max().clamp_min(1e-3)
        assert (got.detach().double() - want.detach()).abs().max() <= 10 * tolerance * scale, name
    assert losses[-1][0] < losses[0][0]  # it learns


def test_modelnew_forward_raises_nothing_and_conv_tail_kernel_refuses_grad():
    model, new = tiny_models(seed=40)
    x = torch.randn(TINY_INPUT, generator=torch.Generator().manual_seed(41))
    new(x).sum().backward()  # the one-kernel path would have no backward
    assert new.norm.weight.grad is not None and new.conv_transpose.weight.grad is not None
    conv = new.conv_transpose
    with pytest.raises(RuntimeError, match="no backward"):
        fused_conv_transpose_tail(x, conv.weight, conv.bias, 0.5)
    with torch.no_grad():
        assert fused_conv_transpose_tail(x, conv.weight, conv.bias, 0.5).shape == (2, 4, 2, 4, 4)
    del model


@pytest.mark.parametrize("dtype,training,conv_layout", [
    (torch.float32, True, "channels_last"), (torch.bfloat16, True, "ncdhw"),
    (torch.float16, True, "ncdhw"), (torch.bfloat16, False, "channels_last"),
], ids=["fp32_training", "bf16_training", "fp16_training", "bf16_inference"])
def test_modelnew_conv_layout_by_dtype_when_training(monkeypatch, dtype, training, conv_layout):
    model, new = tiny_models(seed=50)
    new = new.to(dtype)
    new.conv_in_triton = False  # inference would take the one-kernel path otherwise
    calls = []
    real = ModelNew._conv_channels_last
    monkeypatch.setattr(ModelNew, "_conv_channels_last",
                        lambda self, x: calls.append(x.dtype) or real(self, x))
    x = torch.randn(TINY_INPUT, generator=torch.Generator().manual_seed(51)).to(dtype)
    with torch.set_grad_enabled(training):
        out = new(x)
    assert calls == ([dtype] if conv_layout == "channels_last" else [])
    want = model.double()(x.double())
    assert relative_error(out.detach(), want) <= TOLERANCE[dtype]
    if training:
        out.float().square().sum().backward()
        assert new.norm.weight.grad is not None and new.conv_transpose.weight.grad is not None
