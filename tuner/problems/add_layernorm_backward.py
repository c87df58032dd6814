"""Tuning the add + LayerNorm backward kernel (kernels.add_layernorm_backward)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels import ADD_LAYERNORM_BACKWARD, LaunchConfig
from kernels.add_layernorm_backward import add_layernorm_backward

from .add_layernorm import AddLayerNorm
from .base import DTYPES, Problem

EPS = 1e-5


class AddLayerNormBackward(AddLayerNorm):
    """The backward of ``LayerNorm(x + s)`` over the last dim: dx (the checked output) with
    dweight, dbias and dsum_weight, as a training step runs it. A shape is ROWSxWIDTH or a
    full tensor shape, as for the forward."""

    descriptor = ADD_LAYERNORM_BACKWARD
    sliced_inputs = ("x", "dy")

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> dict[str, Any]:
        inputs = super().make_inputs(problem, device, generator)
        x = inputs["x"]
        inputs["dy"] = (torch.randn(x.shape, generator=generator, device=generator.device)
                        .to(device=device, dtype=x.dtype))
        # The forward's saved statistics, in float32 as the forward kernel stores them.
        shifted = x.float() + inputs["sum_weight"].float()
        inputs["mean"] = shifted.mean(dim=-1)
        inputs["rstd"] = torch.rsqrt(shifted.var(dim=-1, unbiased=False) + EPS)
        return inputs

    def run(self, inputs: dict[str, Any], config: LaunchConfig | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        return add_layernorm_backward(inputs["dy"], inputs["x"], inputs["weight"], inputs["mean"],
                                      inputs["rstd"], inputs["sum_weight"], config=config,
                                      dx_out=out).dx

    def reference_slice(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        x = inputs["x"].to(dtype).requires_grad_()
        with torch.enable_grad():
            y = F.layer_norm(x + inputs["sum_weight"].to(dtype), x.shape[-1:],
                             inputs["weight"].to(dtype), inputs["bias"].to(dtype), EPS)
            [dx] = torch.autograd.grad(y, x, inputs["dy"].to(dtype))
        return dx

    def eager(self, inputs: dict[str, Any]) -> torch.Tensor:
        x = inputs["x"]
        dx, _, _ = torch.ops.aten.native_layer_norm_backward(
            inputs["dy"], x + inputs["sum_weight"], [x.shape[-1]], inputs["mean"][:, None],
            inputs["rstd"][:, None], inputs["weight"], inputs["bias"], [True, True, True])
        return dx

    def bytes_moved(self, problem: Problem) -> int:
        rows, width = problem.shape
        # x and dy read, dx written; the float32 mean and rstd read.
        return 3 * rows * width * DTYPES[problem.dtype].itemsize + 8 * rows
