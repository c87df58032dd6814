"""The reference model (ConvTranspose3d -> +sum_weight -> LayerNorm -> AvgPool3d -> GELU) and
``ModelNew``, the same model with the tail after the convolution done by fused Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import APPROXIMATIONS
from .add_layernorm import fused_add_layernorm
from .add_layernorm_pool_gelu import fused_add_layernorm_pool_gelu
from .conv_transpose_tail import (
    KERNEL_SIZE,
    OUTPUT_PADDING,
    PADDING,
    STRIDE,
    fused_conv_transpose_tail,
)

# Constructor arguments of the reference problem (the model this project serves; see README).
REFERENCE_ARGS = dict(in_channels=32, out_channels=64, kernel_size=(3, 3, 3), stride=(2, 2, 2),
                      padding=(1, 1, 1), output_padding=(1, 1, 1), sum_weight=1.0,
                      norm_shape=(64,), pool_kernel_size=(2, 2, 2))
REFERENCE_INPUT_SHAPE = (32, 32, 16, 32, 32)  # batch 32: [N, C_in, D, H, W]


class Model(nn.Module):
    """The reference PyTorch model."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, output_padding,
                 sum_weight, norm_shape, pool_kernel_size) -> None:
        super().__init__()
        self.conv_transpose = nn.ConvTranspose3d(in_channels, out_channels, kernel_size,
                                                 stride=stride, padding=padding,
                                                 output_padding=output_padding)
        self.sum_weight = nn.Parameter(torch.tensor(float(sum_weight)))
        self.norm = nn.LayerNorm(norm_shape)
        self.avg_pool = nn.AvgPool3d(kernel_size=pool_kernel_size)
        self.gelu = nn.GELU()

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Everything after the convolution."""
        return self.gelu(self.avg_pool(self.norm(x + self.sum_weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv_transpose(x))


def _triple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


class ModelNew(Model):
    """``Model`` with the tail fused into Triton kernels; same state_dict.

    When the convolution is the reference one (kernel 3, stride 2, padding 1, output padding 1)
    and the tail pools 2x2x2 with LayerNorm over the last dim, the whole forward pass is one
    Triton kernel (:attr:`conv_in_triton`, ``kernels/conv_transpose_tail.py``): the conv output
    is never written. Otherwise, when the tail allows it (LayerNorm over the last dim only,
    AvgPool3d with stride equal to its kernel, no padding, floor mode and no divisor override,
    GELU ``"none"`` or ``"tanh"``), add, LayerNorm, pooling and GELU run as one kernel that reads
    the convolution's output once (:attr:`uses_fused_tail`). Otherwise x + sum_weight and the
    LayerNorm are fused and PyTorch pools and applies GELU.

    Without the one-kernel path but with the fused tail, the transposed convolution runs in ``torch.channels_last_3d`` (input
    and weight converted per call; the module's parameters, hence the state_dict, are left
    as they are) and the tail kernel reads its channels-last output in place, so the result
    is ``channels_last_3d`` strided (same shape and values; should PyTorch return the
    convolution in NCDHW, as its CPU kernel does for a batch of 1, the tail takes the
    contiguous kernel and so does the result). cuDNN's channels-last convolution is the faster
    one, and converting its output back with ``.contiguous()`` would cost a full copy
    (BENCHMARKS.md). Set :attr:`channels_last_conv` to False for the NCDHW convolution and the
    contiguous tail kernel.

    Training: when autograd records (grad mode on, and x or a parameter requires grad), the
    one-kernel path, which has no backward, is skipped: the cuDNN convolution and the tail
    kernels run, whose backward is in Triton (``kernels/add_layernorm_pool_gelu_backward.py``
    for either layout, or ``kernels/add_layernorm_backward.py`` with PyTorch pooling and
    GELU). The convolution is channels-last as above only in the dtypes of
    :attr:`channels_last_training_dtypes`; in the others it runs in NCDHW, feeding the
    contiguous tail kernels. Under ``torch.no_grad()`` or ``torch.inference_mode()`` the
    one-kernel path applies as usual.
    """

    #: Run the convolution channels-last when the fused tail is used (see the class doc).
    channels_last_conv: bool = True
    #: Dtypes in which a training forward keeps the channels-last convolution. A training step
    #: adds cuDNN's two backward convolutions and the tail's backward, all in the layout the
    #: forward picked, so the layout that wins the forward need not win the step: measured
    #: whole (BENCHMARKS.md, Training), channels-last won in float32 and NCDHW in bfloat16. In
    #: 16-bit the channels-last tail kernels also fall further behind the contiguous ones (a
    #: tile's contiguous runs, a block of channels at one position, are half as many bytes);
    #: float16 shares bfloat16's element size and goes with it.
    channels_last_training_dtypes: tuple[torch.dtype, ...] = (torch.float32,)

    @property
    def uses_fused_tail(self) -> bool:
        """True when :meth:`tail` runs the single add+LayerNorm+AvgPool3d+GELU kernel."""
        norm, pool, gelu = self.norm, self.avg_pool, self.gelu
        if not (isinstance(norm, nn.LayerNorm) and isinstance(pool, nn.AvgPool3d)
                and isinstance(gelu, nn.GELU)):
            return False
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return (len(norm.normalized_shape) == 1
                and _triple(pool.kernel_size) == _triple(stride)
                and all(p == 0 for p in _triple(pool.padding))
                and not pool.ceil_mode
                and pool.divisor_override is None
                and gelu.approximate in APPROXIMATIONS)

    def _conv_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """``self.conv_transpose(x)`` with x (5-D) and the weight in channels_last_3d, so that
        the output is channels_last_3d (on CUDA; see the class doc). The weight conversion
        copies C_in*C_out*k^3 elements per call and is free when the weight already is
        channels-last (e.g. after ``conv_transpose.to(memory_format=torch.channels_last_3d)``)."""
        conv = self.conv_transpose
        cl = torch.channels_last_3d
        return F.conv_transpose3d(x.contiguous(memory_format=cl),
                                  conv.weight.contiguous(memory_format=cl), conv.bias,
                                  conv.stride, conv.padding, conv.output_padding, conv.groups,
                                  conv.dilation)

    #: Run convolution and tail as one Triton kernel (kernels/conv_transpose_tail.py) where the
    #: configuration allows: faster in float32 (TF32 dots, as cuDNN's default) and bfloat16
    #: than the channels-last cuDNN convolution plus the fused tail (BENCHMARKS.md). float32
    #: with ``torch.backends.cudnn.allow_tf32 = False`` keeps cuDNN.
    conv_in_triton: bool = True

    def _triton_conv_tail_applies(self, x: torch.Tensor) -> bool:
        conv = self.conv_transpose
        # Without TF32 the kernel's float32 dots run on CUDA cores, several times slower than
        # cuDNN (BENCHMARKS.md), so float32 then takes cuDNN and the fused tail.
        exact_float32 = x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32
        return (self.conv_in_triton and self.uses_fused_tail and x.dim() == 5 and not exact_float32
                and type(conv) is nn.ConvTranspose3d and conv.padding_mode == "zeros"
                and (conv.kernel_size, conv.stride, conv.padding, conv.output_padding)
                == (KERNEL_SIZE, STRIDE, PADDING, OUTPUT_PADDING)
                and conv.dilation == (1, 1, 1) and conv.groups == 1
                and _triple(self.avg_pool.kernel_size) == (2, 2, 2)
                and tuple(self.norm.normalized_shape) == (2 * x.shape[-1],))

    def _gradients_required(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(parameter.requires_grad for parameter in self.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv_transpose
        # The one-kernel path has no backward; the paths below have (cuDNN's and the tail's).
        training = self._gradients_required(x)
        if not training and self._triton_conv_tail_applies(x):
            return fused_conv_transpose_tail(
                x, conv.weight, conv.bias, self.sum_weight.to(x.dtype), self.norm.weight,
                self.norm.bias, self.norm.eps, self.gelu.approximate)
        channels_last = self.channels_last_conv and (
            not training or x.dtype in self.channels_last_training_dtypes)
        if not (channels_last and self.uses_fused_tail and x.dim() in (4, 5)
                and type(conv) is nn.ConvTranspose3d and conv.padding_mode == "zeros"):
            return super().forward(x)
        batched = x if x.dim() == 5 else x.unsqueeze(0)  # unbatched [C, D, H, W]
        out = self.tail(self._conv_channels_last(batched))
        return out if x.dim() == 5 else out.squeeze(0)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fused_tail and x.dim() in (4, 5):
            batched = x if x.dim() == 5 else x.unsqueeze(0)  # unbatched [C, D, H, W]
            out = fused_add_layernorm_pool_gelu(
                batched, self.sum_weight.to(x.dtype), self.norm.weight, self.norm.bias,
                self.norm.eps, _triple(self.avg_pool.kernel_size), self.gelu.approximate)
            return out if x.dim() == 5 else out.squeeze(0)
        x = fused_add_layernorm(x, self.sum_weight.to(x.dtype), self.norm.normalized_shape,
                                self.norm.weight, self.norm.bias, self.norm.eps)
        return self.gelu(self.avg_pool(x))
