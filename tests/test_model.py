"""Model (PyTorch reference) against ModelNew (fused Triton tail) on tiny problems."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kernels.model import REFERENCE_ARGS, Model, ModelNew
from tests.models import model_pair

# Input [N, C_in, D, H, W] = [2, 3, 2, 4, 4]: the transposed convolution (stride 2, padding 1,
# output padding 1) doubles each spatial dim, so the LayerNorm sees rows of width 8.
SMALL_ARGS = dict(in_channels=3, out_channels=4, kernel_size=(3, 3, 3), stride=(2, 2, 2),
                  padding=(1, 1, 1), output_padding=(1, 1, 1), sum_weight=0.7,
                  norm_shape=(8,), pool_kernel_size=(2, 2, 2))
SMALL_INPUT = (2, 3, 2, 4, 4)

VARIANTS = {
    # name: (constructor changes, input shape)
    "default": ({}, SMALL_INPUT),
    "batch1_odd_dims": ({}, (1, 3, 3, 2, 4)),
    "pool3_floor": (dict(pool_kernel_size=(3, 3, 3)), SMALL_INPUT),
    "pool_122": (dict(pool_kernel_size=(1, 2, 2)), SMALL_INPUT),
    "norm_2d": (dict(norm_shape=(8, 8)), SMALL_INPUT),
    "negative_sum_weight": (dict(sum_weight=-2.5), SMALL_INPUT),
    "unbatched": ({}, SMALL_INPUT[1:]),
}


pytestmark = pytest.mark.usefixtures("no_tables")


def make_models(seed=0, **changes):
    """A Model with randomised parameters (LayerNorm affine too) and a ModelNew loaded from it."""
    model, new = model_pair({**SMALL_ARGS, **changes}, seed)
    return model.eval(), new.eval()


def make_input(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))


@pytest.mark.parametrize("args", [SMALL_ARGS, REFERENCE_ARGS], ids=["small", "reference"])
def test_state_dict_compatible(args):
    torch.manual_seed(0)
    model, new = Model(**args), ModelNew(**args)
    model_state, new_state = model.state_dict(), new.state_dict()
    assert list(model_state) == list(new_state)
    assert {k: v.shape for k, v in model_state.items()} == {k: v.shape for k, v in new_state.items()}
    assert {k: v.dtype for k, v in model_state.items()} == {k: v.dtype for k, v in new_state.items()}
    # Strict loading works both ways and copies the values.
    new.load_state_dict(model_state)
    for key, value in new.state_dict().items():
        assert torch.equal(value, model_state[key]), key
    torch.manual_seed(1)
    other = Model(**args)
    other.load_state_dict(new.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(value, model_state[key]), key
    assert "sum_weight" in model_state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_matches_model(variant):
    changes, input_shape = VARIANTS[variant]
    model, new = make_models(**changes)
    x = make_input(input_shape)
    with torch.no_grad():
        expected = model(x)
        out = new(x)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # Against float64 too, so that the float32 reference itself is not the yardstick.
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)


def test_float32_with_grad_enabled():
    # Parameters require grad; the forward still runs (and matches) outside no_grad.
    model, new = make_models(seed=3)
    x = make_input(SMALL_INPUT, seed=3)
    torch.testing.assert_close(new(x).detach(), model(x).detach(), atol=1e-4, rtol=1e-4)


def test_modelnew_does_not_use_torch_layer_norm(monkeypatch):
    model, new = make_models(seed=4)
    x = make_input(SMALL_INPUT, seed=4)
    with torch.no_grad():
        expected = model(x)

    def no_layer_norm(*args, **kwargs):
        raise AssertionError("ModelNew called torch's layer_norm")

    monkeypatch.setattr(F, "layer_norm", no_layer_norm)
    monkeypatch.setattr(torch, "layer_norm", no_layer_norm)
    with torch.no_grad():
        out = new(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["default", "pool3_floor", "batch1_odd_dims", "negative_sum_weight"])
def test_bfloat16_matches_float64_reference(variant):
    # torch's CPU avg_pool3d has no bfloat16 kernel, so the yardstick is the float64 Model run
    # on the same bfloat16-rounded parameters and input.
    changes, input_shape = VARIANTS[variant]
    model, new = make_models(seed=6, **changes)
    new = new.to(torch.bfloat16)
    x = make_input(input_shape, seed=6).to(torch.bfloat16)
    reference_model = copy.deepcopy(model).to(torch.bfloat16).double()
    with torch.no_grad():
        try:
            out = new(x)
        except NotImplementedError as error:  # a fallback path through torch's CPU pooling
            pytest.skip(f"PyTorch CPU op lacks bfloat16: {error}")
        reference = reference_model(x.double())
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert torch.isfinite(out).all()
    scale = max(1.0, reference.abs().max().item())
    torch.testing.assert_close(out.double(), reference, atol=2e-2 * scale, rtol=2e-2)


# Batch >= 2: PyTorch's CPU conv_transpose3d returns a contiguous (NCDHW) output for a batch
# of 1 even from channels-last input and weight (the tail then takes the contiguous kernel;
# the batch-1 and unbatched variants above check those values).
@pytest.mark.parametrize("variant", ["default", "pool3_floor", "negative_sum_weight"])
def test_modelnew_conv_and_tail_run_channels_last(variant, monkeypatch):
    # The fused path converts the input and the conv weight to channels_last_3d, and the tail
    # kernel reads the channels-last conv output in place (the contiguous kernel never runs).
    from kernels import add_layernorm_pool_gelu as tail_module

    changes, input_shape = VARIANTS[variant]
    model, new = make_models(seed=7, **changes)
    new.conv_in_triton = False  # the path used where the one-kernel model does not apply
    x = make_input(input_shape, seed=7)
    assert new.uses_fused_tail and new.channels_last_conv
    conv_inputs = []
    real_conv = F.conv_transpose3d

    def spy(input, weight, *args, **kwargs):
        conv_inputs.append((input.is_contiguous(memory_format=torch.channels_last_3d),
                            weight.is_contiguous(memory_format=torch.channels_last_3d)))
        return real_conv(input, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv_transpose3d", spy)
    monkeypatch.setattr(tail_module, "_add_layernorm_pool_gelu_kernel", None)
    with torch.no_grad():
        expected = model(x)
        out = new(x)
    assert conv_inputs[-1] == (True, True)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_modelnew_channels_last_conv_off_and_state_dict_untouched():
    model, new = make_models(seed=8)
    new.conv_in_triton = False
    x = make_input(SMALL_INPUT, seed=8)
    with torch.no_grad():
        expected = model(x)
        channels_last = new(x)
        new.channels_last_conv = False
        contiguous = new(x)
    assert contiguous.is_contiguous()
    torch.testing.assert_close(contiguous, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(channels_last, contiguous, atol=1e-5, rtol=1e-5)
    # Running channels-last converted no parameter: same keys, values, shapes and strides,
    # and a fresh Model still loads ModelNew's state_dict strictly.
    model_state, new_state = model.state_dict(), new.state_dict()
    assert list(model_state) == list(new_state)
    for key, value in new_state.items():
        assert torch.equal(value, model_state[key]) and value.stride() == model_state[key].stride()
    Model(**SMALL_ARGS).load_state_dict(new_state)
