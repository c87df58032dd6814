"""The call, table key and default tile shared by the fused tail's forward and backward
descriptors (``add_layernorm_pool_gelu.py``, ``add_layernorm_pool_gelu_backward.py``)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import torch

from .config import LaunchConfig
from .defaults import add_layernorm_pool_gelu_default, device_properties
from .descriptor import KernelDescriptor, TableKey

# The pooling and GELU of the tuner's problems: the reference model's (kernels/model.py).
POOL_KERNEL = (2, 2, 2)
APPROXIMATE = "none"


def pool_kernel_tuple(pool_kernel: int | Sequence[int]) -> tuple[int, int, int]:
    """``pool_kernel`` as three positive ints (an int means the same size on each dim)."""
    if isinstance(pool_kernel, int) and not isinstance(pool_kernel, bool):
        pool_kernel = (pool_kernel,) * 3
    try:
        kernel = tuple(pool_kernel)
    except TypeError:
        raise TypeError(f"pool_kernel must be an int or 3 ints, got {pool_kernel!r}") from None
    if len(kernel) != 3 or any(not isinstance(k, int) or isinstance(k, bool) for k in kernel):
        raise TypeError(f"pool_kernel must be an int or 3 ints, got {pool_kernel!r}")
    if any(k < 1 for k in kernel):
        raise ValueError(f"pool_kernel {kernel} must be positive")
    return kernel


@dataclasses.dataclass(frozen=True)
class PoolGeluCall:
    """A call of the fused tail (forward or backward) on x of ``shape`` [N, C, D, H, W]: the
    pooling, the GELU, which of weight and bias are given and sum_weight's dtype (None: a
    Python number)."""

    shape: tuple[int, int, int, int, int]
    dtype: torch.dtype
    pool_kernel: tuple[int, int, int] = POOL_KERNEL
    approximate: str = APPROXIMATE
    has_weight: bool = True
    has_bias: bool = True
    sum_weight_dtype: torch.dtype | None = None

    @property
    def pooled_rows(self) -> int:
        """Pooled output rows ``N * C * (D // kd) * (H // kh)``, each ``W // kw`` wide."""
        batch, channels, depth, height, _ = self.shape
        kd, kh, _ = self.pool_kernel
        return batch * channels * (depth // kd) * (height // kh)


class PoolGeluDescriptor(KernelDescriptor[PoolGeluCall]):
    """The tail's kernels on contiguous x, or on ``channels_last_3d`` x (another Triton kernel
    whose ``block_rows`` counts channels): one table kernel, two tuner kernels, and entries
    of one layout never used for the other (the channels-last variant names C)."""

    def __init__(self, table_kernel: str, channels_last: bool) -> None:
        self.table_kernel = table_kernel
        self.channels_last = channels_last
        self.name = table_kernel + ("_channels_last" if channels_last else "")

    def call_for_shape(self, shape: tuple[int, ...], dtype: torch.dtype) -> PoolGeluCall:
        """The reference model's tail (pool 2x2x2, exact GELU) with weight, bias and a
        sum_weight tensor of x's dtype."""
        if len(shape) != 5:
            raise ValueError(f"{self.name} takes a 5-D shape NxCxDxHxW such as 32x64x32x64x64, "
                             f"got {'x'.join(map(str, shape))}")
        if any(dim < kernel for dim, kernel in zip(shape[2:], POOL_KERNEL)):
            raise ValueError(f"spatial dims {tuple(shape[2:])} are smaller than the pool kernel "
                             f"{POOL_KERNEL}")
        return PoolGeluCall(tuple(shape), dtype, sum_weight_dtype=dtype)

    def shape_for_call(self, call: PoolGeluCall) -> tuple[int, ...] | None:
        """A shape with the call's table key (depth folded into the rows); None for the
        pooling and GELU the tuner's problems do not cover."""
        if call.pool_kernel != POOL_KERNEL or call.approximate != APPROXIMATE:
            return None
        _, channels, _, height, width = call.shape
        out_height = height // POOL_KERNEL[1]
        if self.channels_last:
            return (call.pooled_rows // (channels * out_height), channels, POOL_KERNEL[0],
                    height, width)
        return (call.pooled_rows // out_height, 1, POOL_KERNEL[0], height, width)

    def table_key(self, call: PoolGeluCall) -> TableKey:
        """Width W and the pooled rows; the variant names H, the pooling and the GELU, e.g.
        ``h64_k2x2x2_none``, and for channels-last also C: ``h64_k2x2x2_none_cl_c64``."""
        _, channels, _, height, width = call.shape
        kd, kh, kw = call.pool_kernel
        variant = f"h{height}_k{kd}x{kh}x{kw}_{call.approximate}"
        if self.channels_last:
            variant += f"_cl_c{channels}"
        return TableKey(width=width, rows=call.pooled_rows, variant=variant)

    def forward_default(self, call: PoolGeluCall, device: str | None = None) -> LaunchConfig:
        """The forward's default tile (:func:`kernels.defaults.add_layernorm_pool_gelu_default`);
        for channels-last x ``block_rows`` counts channels."""
        kd, kh, _ = call.pool_kernel
        return _forward_default(call.pooled_rows, call.shape[4], call.dtype, kd * kh,
                                self.channels_last, call.shape[1] if self.channels_last else None,
                                device)


@functools.lru_cache(maxsize=4096)
def _forward_default(pooled_rows: int, width: int, dtype: torch.dtype, rows_per_output: int,
                     channels_last: bool, channels: int | None,
                     device: str | None) -> LaunchConfig:
    return add_layernorm_pool_gelu_default(pooled_rows, width, dtype.itemsize, rows_per_output,
                                           channels_last, channels, device_properties(device))
