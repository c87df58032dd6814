"""The kernels the tuner knows, by name (each a KernelSpec over its kernel's descriptor): the built-in ones in ``KERNELS``, plus other packages'
kernels by ``module:attribute`` reference or ``tuner.kernels`` entry point (tuner.plugins)."""

from __future__ import annotations

from .add_layernorm import AddLayerNorm
from .add_layernorm_backward import AddLayerNormBackward
from .add_layernorm_pool_gelu import AddLayerNormPoolGelu, AddLayerNormPoolGeluChannelsLast
from .add_layernorm_pool_gelu_backward import (
    AddLayerNormPoolGeluBackward,
    AddLayerNormPoolGeluBackwardChannelsLast,
)
from ..errors import InputError
from .base import DTYPES, KernelSpec, Problem, TableKey, parse_dims, parse_dtype
from .conv_transpose_tail import ConvTransposeTail

KERNELS: dict[str, KernelSpec] = {spec.name: spec for spec in (
    AddLayerNorm(), AddLayerNormBackward(), AddLayerNormPoolGelu(), AddLayerNormPoolGeluChannelsLast(),
    AddLayerNormPoolGeluBackward(), AddLayerNormPoolGeluBackwardChannelsLast(),
    ConvTransposeTail())}


def get_kernel(name: str) -> KernelSpec:
    """The kernel called ``name``: built in, a ``module:attribute`` reference or an installed
    ``tuner.kernels`` entry point; an InputError lists the known ones."""
    if name in KERNELS:
        return KERNELS[name]
    from ..plugins import entry_point_names, resolve_plugin

    spec = resolve_plugin(name)
    if spec is None:
        known = ", ".join(sorted(KERNELS) + entry_point_names())
        raise InputError(f"unknown kernel {name!r}; known kernels: {known}, or a KernelSpec as "
                         "module:attribute (e.g. my_pkg.my_module:MyKernel)")
    return spec


__all__ = ["DTYPES", "KERNELS", "KernelSpec", "Problem", "TableKey", "get_kernel",
           "parse_dims", "parse_dtype"]
