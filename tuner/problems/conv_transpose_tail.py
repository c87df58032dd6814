"""Tuning the whole-model kernel: ConvTranspose3d (3, stride 2, padding 1, output padding 1)
with add + LayerNorm + AvgPool3d(2) + GELU as its epilogue."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels import CONV_TRANSPOSE_TAIL, LaunchConfig, fused_conv_transpose_tail
from kernels.conv_transpose_tail import OUTPUT_PADDING, PADDING, STRIDE

from .base import DTYPES, KernelSpec, Problem

APPROXIMATE = "none"


class ConvTransposeTail(KernelSpec):
    """A shape is the conv input and the output channels: NxC_inxDxHxWxC_out, such as
    32x32x16x32x32x64 for the reference model at batch 32."""

    descriptor = CONV_TRANSPOSE_TAIL
    # float32 runs on TF32 tensor cores (as cuDNN's convolution does by default).
    tolerance = {"float32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2}

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> dict[str, Any]:
        batch, c_in, depth, height, width, c_out = problem.shape
        dtype = DTYPES[problem.dtype]

        def randn(shape: tuple[int, ...], scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
            values = torch.randn(shape, generator=generator, device=generator.device)
            return (values * scale + shift).to(device=device, dtype=dtype)

        return {"x": randn((batch, c_in, depth, height, width), shift=0.3),
                "weight": randn((c_in, c_out, 3, 3, 3), scale=(c_in * 27) ** -0.5),
                "conv_bias": randn((c_out,), scale=0.1),
                "sum_weight": randn((), scale=0.5, shift=1.0),
                "ln_weight": randn((2 * width,), scale=0.5, shift=1.0),
                "ln_bias": randn((2 * width,), scale=0.5)}

    def run(self, inputs: dict[str, Any], config: LaunchConfig | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        return fused_conv_transpose_tail(
            inputs["x"], inputs["weight"], inputs["conv_bias"], inputs["sum_weight"],
            inputs["ln_weight"], inputs["ln_bias"], approximate=APPROXIMATE, config=config, out=out)

    def _model(self, x, weight, conv_bias, sum_weight, ln_weight, ln_bias) -> torch.Tensor:
        conv = F.conv_transpose3d(x, weight, conv_bias, stride=STRIDE, padding=PADDING,
                                  output_padding=OUTPUT_PADDING)
        normed = F.layer_norm(conv + sum_weight, conv.shape[-1:], ln_weight, ln_bias)
        return F.gelu(F.avg_pool3d(normed, 2), approximate=APPROXIMATE)

    def reference_slice(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        return self._model(*(inputs[name].to(dtype) for name in
                             ("x", "weight", "conv_bias", "sum_weight", "ln_weight", "ln_bias")))

    def eager(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self._model(*(inputs[name] for name in
                             ("x", "weight", "conv_bias", "sum_weight", "ln_weight", "ln_bias")))

    def output_like(self, inputs: dict[str, Any]) -> torch.Tensor:
        batch, _, depth, height, width = inputs["x"].shape
        c_out = inputs["weight"].shape[1]
        return inputs["x"].new_empty((batch, c_out, depth, height, width))

    def bytes_moved(self, problem: Problem) -> int:
        batch, c_in, depth, height, width, c_out = problem.shape
        elements = (batch * c_in + batch * c_out) * depth * height * width + c_in * c_out * 27
        return elements * DTYPES[problem.dtype].itemsize
