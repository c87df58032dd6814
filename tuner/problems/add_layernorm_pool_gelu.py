"""Tuning the fused tail kernel: add + LayerNorm + AvgPool3d + GELU."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels import (
    ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
    LaunchConfig,
    fused_add_layernorm_pool_gelu,
)
from kernels.add_layernorm_pool_gelu import APPROXIMATE, POOL_KERNEL

from .base import DTYPES, KernelSpec, Problem


class AddLayerNormPoolGelu(KernelSpec):
    """``gelu(avg_pool3d(layer_norm(x + s, (W,)), 2))`` for x of shape NxCxDxHxW (contiguous)."""

    descriptor = ADD_LAYERNORM_POOL_GELU

    @property
    def channels_last(self) -> bool:
        return self.descriptor.channels_last

    def canonical_shape(self, dims: tuple[int, ...]) -> tuple[int, ...]:
        if self.channels_last:  # programs split C: it stays a dim of its own
            return tuple(dims)
        # N and C only multiply the rows: fold them into one leading dim.
        return (dims[0] * dims[1], 1) + tuple(dims[2:])

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> dict[str, Any]:
        dtype = DTYPES[problem.dtype]

        def randn(shape: tuple[int, ...], scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
            values = torch.randn(shape, generator=generator, device=generator.device)
            return (values * scale + shift).to(device=device, dtype=dtype)

        width = problem.shape[4]
        layout = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        return {"x": randn(problem.shape, scale=2.0, shift=0.5).contiguous(memory_format=layout),
                "sum_weight": randn((), scale=0.5, shift=1.0),
                "weight": randn((width,), scale=0.5, shift=1.0),
                "bias": randn((width,), scale=0.5)}

    def run(self, inputs: dict[str, Any], config: LaunchConfig | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        return fused_add_layernorm_pool_gelu(inputs["x"], inputs["sum_weight"], inputs["weight"],
                                             inputs["bias"], pool_kernel=POOL_KERNEL,
                                             approximate=APPROXIMATE, config=config, out=out)

    def _tail(self, x, sum_weight, weight, bias) -> torch.Tensor:
        normed = F.layer_norm(x + sum_weight, x.shape[-1:], weight, bias)
        return F.gelu(F.avg_pool3d(normed, POOL_KERNEL), approximate=APPROXIMATE)

    def reference_slice(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        return self._tail(*(inputs[name].to(dtype) for name in ("x", "sum_weight", "weight", "bias")))

    def eager(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self._tail(inputs["x"], inputs["sum_weight"], inputs["weight"], inputs["bias"])

    def output_like(self, inputs: dict[str, Any]) -> torch.Tensor:
        n, c, d, h, w = inputs["x"].shape
        kd, kh, kw = POOL_KERNEL
        layout = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        return torch.empty((n, c, d // kd, h // kh, w // kw), dtype=inputs["x"].dtype,
                           device=inputs["x"].device, memory_format=layout)

    def bytes_moved(self, problem: Problem) -> int:
        batch, channels, depth, height, width = problem.shape
        kd, kh, kw = POOL_KERNEL
        outputs = batch * channels * (depth // kd) * (height // kh) * (width // kw)
        return (batch * channels * depth * height * width + outputs) * DTYPES[problem.dtype].itemsize


class AddLayerNormPoolGeluChannelsLast(AddLayerNormPoolGelu):
    """The same tail on a ``channels_last_3d`` conv output (ModelNew's layout); its configs
    (``block_rows`` = channels per program) are a table variant of their own."""

    descriptor = ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST
