"""The whole reference model in one kernel: ConvTranspose3d with the tail as its epilogue,
against a float64 PyTorch reference (Triton interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from kernels import LaunchConfig, Model, ModelNew, fused_conv_transpose_tail

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference(x, weight, conv_bias, sum_weight, ln_weight, ln_bias, eps, approximate):
    def f64(t):
        return None if t is None else t.double()
    conv = F.conv_transpose3d(f64(x), f64(weight), f64(conv_bias), stride=2, padding=1,
                              output_padding=1)
    normed = F.layer_norm(conv + sum_weight, conv.shape[-1:], f64(ln_weight), f64(ln_bias), eps)
    return F.gelu(F.avg_pool3d(normed, 2), approximate=approximate)


def rand(*shape, dtype, generator, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=generator) * scale + shift).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
# (n, c_in, c_out, d, h, w); the last has channel blocks that fit exactly (no channel masks).
@pytest.mark.parametrize("dims", [(1, 3, 5, 2, 3, 4), (2, 4, 16, 3, 2, 5), (1, 2, 20, 1, 1, 17),
                                  (1, 16, 32, 2, 3, 8)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_matches_float64_reference(dtype, dims, approximate):
    n, c_in, c_out, d, h, w = dims
    g = torch.Generator().manual_seed(sum(dims))
    x = rand(n, c_in, d, h, w, dtype=dtype, generator=g, shift=0.3)
    weight = rand(c_in, c_out, 3, 3, 3, dtype=dtype, generator=g, scale=0.3)
    conv_bias = rand(c_out, dtype=dtype, generator=g)
    ln_weight = rand(2 * w, dtype=dtype, generator=g, shift=1.0)
    ln_bias = rand(2 * w, dtype=dtype, generator=g)
    y = fused_conv_transpose_tail(x, weight, conv_bias, 0.7, ln_weight, ln_bias, 1e-5, approximate)
    expected = reference(x, weight, conv_bias, 0.7, ln_weight, ln_bias, 1e-5, approximate)
    assert y.shape == expected.shape and y.dtype == dtype and torch.isfinite(y).all()
    assert ((y.double() - expected).norm() / expected.norm()).item() < TOLERANCE[dtype]


# block_w / 8 (W=6 rounded up) pooled rows a program: 2, 4 and 8 of H=5, the last block partial.
@pytest.mark.parametrize("config", [LaunchConfig(16, 16, 1, 1, "evict_first"),
                                    LaunchConfig(32, 32, 4, 2, "evict_last"),
                                    LaunchConfig(16, 64, 2, 1)])
def test_configs_and_optional_parameters(config):
    g = torch.Generator().manual_seed(7)
    x = rand(2, 3, 2, 5, 6, dtype=torch.float32, generator=g)
    weight = rand(3, 20, 3, 3, 3, dtype=torch.float32, generator=g, scale=0.3)
    s = torch.tensor(-0.4)
    y = fused_conv_transpose_tail(x, weight, None, s, None, None, 1e-5, config=config)
    expected = reference(x, weight, None, -0.4, None, None, 1e-5, "none")
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_bad_inputs_are_named():
    x = torch.randn(1, 3, 2, 2, 4)
    weight = torch.randn(3, 16, 3, 3, 3)
    with pytest.raises(ValueError, match="conv_weight must be"):
        fused_conv_transpose_tail(x, torch.randn(4, 16, 3, 3, 3), None, 1.0)
    with pytest.raises(ValueError, match="ln_weight has shape"):
        fused_conv_transpose_tail(x, weight, None, 1.0, torch.randn(4))
    with pytest.raises(TypeError, match="dtype"):
        fused_conv_transpose_tail(x, weight.double(), None, 1.0)
    with pytest.raises(ValueError, match="block_rows"):
        fused_conv_transpose_tail(x, weight, None, 1.0, config=LaunchConfig(8, 16, 1))
    with pytest.raises(ValueError, match="approximate"):
        fused_conv_transpose_tail(x, weight, None, 1.0, approximate="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_new_with_the_conv_in_triton_matches_model(dtype):
    args = dict(in_channels=3, out_channels=16, kernel_size=3, stride=2, padding=1,
                output_padding=1, sum_weight=0.5, norm_shape=(8,), pool_kernel_size=2)
    torch.manual_seed(0)
    model = Model(**args).double()
    new = ModelNew(**args)
    new.load_state_dict(model.state_dict())
    new = new.to(dtype)
    x = torch.randn(2, 3, 2, 3, 4, dtype=torch.float64)
    assert new._triton_conv_tail_applies(x.to(dtype))  # on by default
    with torch.no_grad():
        y = new(x.to(dtype))
        expected = Model(**args).double()
        expected.load_state_dict({k: v.to(dtype).double() for k, v in model.state_dict().items()})
        expected = expected(x.to(dtype).double())
    assert ((y.double() - expected).norm() / expected.norm()).item() < TOLERANCE[dtype]
    # float32 without TF32 keeps cuDNN (the kernel's exact-float32 dots are 4x slower).
    torch.backends.cudnn.allow_tf32, allow_tf32 = False, torch.backends.cudnn.allow_tf32
    try:
        assert new._triton_conv_tail_applies(x.to(dtype)) == (dtype != torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32
    # A configuration the kernel does not cover falls back to the other paths.
    other = ModelNew(**{**args, "stride": 1, "padding": 1, "output_padding": 0, "norm_shape": (4,)})
    assert not other._triton_conv_tail_applies(x.float())
