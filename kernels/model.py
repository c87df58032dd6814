"""The reference model (ConvTranspose3d -> +sum_weight -> LayerNorm -> AvgPool3d -> GELU) and
``ModelNew``, the same model with the add + LayerNorm replaced by the fused Triton kernel."""

from __future__ import annotations

import torch
from torch import nn

from .add_layernorm import fused_add_layernorm

# Constructor arguments of the reference problem (shared/reference/README.md).
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


class ModelNew(Model):
    """``Model`` with x + sum_weight and LayerNorm fused into one Triton kernel; same state_dict."""

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        x = fused_add_layernorm(x, self.sum_weight.to(x.dtype), self.norm.normalized_shape,
                                self.norm.weight, self.norm.bias, self.norm.eps)
        return self.gelu(self.avg_pool(x))
