"""What tuning adds to the RMSNorm example: ``examples.rmsnorm.spec:RMSNorm``, over the
kernel's descriptor (``rmsnorm.RMSNORM``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kernels import LaunchConfig
from tuner import KernelSpec, Problem
from tuner.problems import DTYPES

from .rmsnorm import RMSNORM, rmsnorm


class RMSNorm(KernelSpec):
    """RMSNorm over the last dim; a shape is ROWSxWIDTH or a full tensor shape."""

    descriptor = RMSNORM  # name, table key, default config, search space: the launcher's own

    def canonical_shape(self, dims: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(dims[:-1]), dims[-1])

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> dict[str, Any]:
        rows, width = problem.shape
        dtype = DTYPES[problem.dtype]
        x = torch.randn(rows, width, generator=generator, device=generator.device) * 2 + 0.5
        weight = torch.rand(width, generator=generator, device=generator.device) + 0.5
        return {"x": x.to(device=device, dtype=dtype), "weight": weight.to(device=device, dtype=dtype)}

    def run(self, inputs: dict[str, Any], config: LaunchConfig | None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        return rmsnorm(inputs["x"], inputs["weight"], config=config, out=out)

    def reference_slice(self, inputs: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
        x = inputs["x"].to(dtype)
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * inputs["weight"].to(dtype)

    def eager(self, inputs: dict[str, Any]) -> torch.Tensor:
        x = inputs["x"]
        return F.rms_norm(x, x.shape[-1:], inputs["weight"], eps=1e-6)

    def output_like(self, inputs: dict[str, Any]) -> torch.Tensor:
        return torch.empty_like(inputs["x"])

    def bytes_moved(self, problem: Problem) -> int:
        rows, width = problem.shape
        return (2 * rows + 1) * width * DTYPES[problem.dtype].itemsize
