"""Tuning the fused tail's backward (kernels.add_layernorm_pool_gelu_backward)."""

from __future__ import annotations

import math
from typing import Any

import torch

from kernels import (
    ADD_LAYERNORM_POOL_GELU_BACKWARD,
    ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST,
    LaunchConfig,
)
from kernels.add_layernorm_pool_gelu_backward import add_layernorm_pool_gelu_backward

from .add_layernorm_pool_gelu import APPROXIMATE, POOL_KERNEL, AddLayerNormPoolGelu
from .base import DTYPES, Problem

EPS = 1e-5


class AddLayerNormPoolGeluBackward(AddLayerNormPoolGelu):
    """The backward of ``gelu(avg_pool3d(layer_norm(x + s, (W,)), 2))`` for contiguous x of
    shape NxCxDxHxW: dx (the checked output) with dweight, dbias and dsum_weight, as a training
    step runs it."""

    descriptor = ADD_LAYERNORM_POOL_GELU_BACKWARD
    sliced_inputs = ("x", "dy")

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> dict[str, Any]:
        inputs = super().make_inputs(problem, device, generator)
        x = inputs["x"]
        pooled = super().output_like(inputs)  # the forward's output: dy's shape and layout
        inputs["dy"] = (torch.randn(pooled.shape, generator=generator, device=generator.device)
                        .to(device=device, dtype=x.dtype)
                        .contiguous(memory_format=self._memory_format()))
        # The forward's saved statistics of each row (n, c, d, h), in float32 and in x's layout
        # (channels fastest when channels-last), as the forward kernel stores them.
        shifted = x.float() + inputs["sum_weight"].float()
        mean = shifted.mean(dim=-1)
        rstd = torch.rsqrt(shifted.var(dim=-1, unbiased=False) + EPS)
        if self.channels_last:
            mean, rstd = mean.permute(0, 2, 3, 1), rstd.permute(0, 2, 3, 1)
        inputs["mean"], inputs["rstd"] = mean.flatten(), rstd.flatten()
        return inputs

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def run(self, inputs: dict[str, Any], config: LaunchConfig | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        return add_layernorm_pool_gelu_backward(
            inputs["dy"], inputs["x"], inputs["weight"], inputs["bias"], inputs["mean"],
            inputs["rstd"], inputs["sum_weight"], POOL_KERNEL, APPROXIMATE, config,
            channels_last=self.channels_last, dx_out=out).dx

    def _dx(self, inputs: dict[str, Any], dtype: torch.dtype | None) -> torch.Tensor:
        """dx by PyTorch autograd (forward and backward), in ``dtype`` or the inputs' own."""
        x, sum_weight, weight, bias, dy = (inputs[name] if dtype is None else inputs[name].to(dtype)
                                           for name in ("x", "sum_weight", "weight", "bias", "dy"))
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            [dx] = torch.autograd.grad(self._tail(x, sum_weight, weight, bias), x, dy)
        return dx

    def reference_slice(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        return self._dx(inputs, dtype)

    def eager(self, inputs: dict[str, Any]) -> torch.Tensor:
        # What PyTorch would run for it: its own forward, then autograd's backward.
        return self._dx(inputs, None)

    def output_like(self, inputs: dict[str, Any]) -> torch.Tensor:
        return torch.empty_like(inputs["x"], memory_format=self._memory_format())

    def bytes_moved(self, problem: Problem) -> int:
        # The forward's count (x, and the pooled size for dy) plus dx written.
        dx_bytes = math.prod(problem.shape) * DTYPES[problem.dtype].itemsize
        return super().bytes_moved(problem) + dx_bytes


class AddLayerNormPoolGeluBackwardChannelsLast(AddLayerNormPoolGeluBackward):
    """The same backward on ``channels_last_3d`` x, dy and dx (ModelNew's training layout); its
    configs (``block_rows`` = channels per tile) are a table variant of their own."""

    descriptor = ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST
