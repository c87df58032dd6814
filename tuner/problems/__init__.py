"""The kernels the tuner knows, by name. Registering a kernel is one entry in ``KERNELS``."""

from __future__ import annotations

from .add_layernorm import AddLayerNorm
from .add_layernorm_backward import AddLayerNormBackward
from .add_layernorm_pool_gelu import AddLayerNormPoolGelu, AddLayerNormPoolGeluChannelsLast
from .add_layernorm_pool_gelu_backward import (
    AddLayerNormPoolGeluBackward,
    AddLayerNormPoolGeluBackwardChannelsLast,
)
from .base import DTYPES, KernelSpec, Problem, TableKey, parse_dims, parse_dtype
from .conv_transpose_tail import ConvTransposeTail

KERNELS: dict[str, KernelSpec] = {spec.name: spec for spec in (
    AddLayerNorm(), AddLayerNormBackward(), AddLayerNormPoolGelu(), AddLayerNormPoolGeluChannelsLast(),
    AddLayerNormPoolGeluBackward(), AddLayerNormPoolGeluBackwardChannelsLast(),
    ConvTransposeTail())}


def get_kernel(name: str) -> KernelSpec:
    """The registered kernel called ``name``; a ValueError lists the known ones."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; known kernels: {', '.join(sorted(KERNELS))}")
    return KERNELS[name]


__all__ = ["DTYPES", "KERNELS", "KernelSpec", "Problem", "TableKey", "get_kernel",
           "parse_dims", "parse_dtype"]
