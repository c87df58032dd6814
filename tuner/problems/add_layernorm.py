"""Tuning the fused add + LayerNorm kernel (kernels.add_layernorm)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kernels import ADD_LAYERNORM, LaunchConfig, fused_add_layernorm

from .base import DTYPES, KernelSpec, Problem


class AddLayerNorm(KernelSpec):
    """``LayerNorm(x + s)`` over the last dim; a shape is ROWSxWIDTH or a full tensor shape."""

    descriptor = ADD_LAYERNORM

    def canonical_shape(self, dims: tuple[int, ...]) -> tuple[int, ...]:
        # Only rows and width matter to the kernel: 32x64x32x64x64 tunes as 4194304x64.
        return (math.prod(dims[:-1]), dims[-1])

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> dict[str, Any]:
        rows, width = problem.shape
        dtype = DTYPES[problem.dtype]

        def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
            values = torch.randn(shape, generator=generator, device=generator.device)
            return (values * scale + shift).to(device=device, dtype=dtype)

        return {"x": randn(rows, width, scale=2.0, shift=0.5),
                "sum_weight": randn(scale=0.5, shift=1.0),
                "weight": randn(width, scale=0.5, shift=1.0),
                "bias": randn(width, scale=0.5)}

    def run(self, inputs: dict[str, Any], config: LaunchConfig | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        x = inputs["x"]
        return fused_add_layernorm(x, inputs["sum_weight"], x.shape[-1], inputs["weight"],
                                   inputs["bias"], config=config, out=out)

    def reference_slice(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        x = inputs["x"].to(dtype) + inputs["sum_weight"].to(dtype)
        return F.layer_norm(x, x.shape[-1:], inputs["weight"].to(dtype), inputs["bias"].to(dtype))

    def eager(self, inputs: dict[str, Any]) -> torch.Tensor:
        x = inputs["x"] + inputs["sum_weight"]
        return F.layer_norm(x, x.shape[-1:], inputs["weight"], inputs["bias"])

    def output_like(self, inputs: dict[str, Any]) -> torch.Tensor:
        return torch.empty_like(inputs["x"])

    def bytes_moved(self, problem: Problem) -> int:
        rows, width = problem.shape
        return 2 * rows * width * DTYPES[problem.dtype].itemsize
