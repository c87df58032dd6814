"""A reference Model with randomised LayerNorm affine parameters and a ModelNew loaded from it,
for the tests that compare the two."""

from __future__ import annotations

from typing import Any

import torch

from kernels import Model, ModelNew


def model_pair(args: dict[str, Any], seed: int) -> tuple[Model, ModelNew]:
    """``Model(**args)`` seeded by ``seed``, its LayerNorm weight and bias drawn at random
    (not the default ones and zeros), and a ``ModelNew`` with the same state."""
    torch.manual_seed(seed)
    model = Model(**args)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.norm.weight.copy_(torch.randn(model.norm.weight.shape, generator=generator) * 0.3 + 1)
        model.norm.bias.copy_(torch.randn(model.norm.bias.shape, generator=generator) * 0.3)
    new = ModelNew(**args)
    new.load_state_dict(model.state_dict())
    return model, new
