"""Fused ``GELU(AvgPool3d(LayerNorm(x + sum_weight)))``: the Triton kernel and its launcher.

x is ``[N, C, D, H, W]``; the LayerNorm is over W only and the pooling kernel equals its stride
(``KD, KH, KW``, floor mode, no padding), so one pooled output row (one ``(n, c, do, ho)``,
``Wo`` outputs) depends on exactly ``KD * KH`` whole input rows, and no input row feeds two
pooled rows. Each program takes ``BLOCK_ROWS`` pooled rows and, for each of the ``KD * KH``
input rows feeding them (a static loop), loads one ``[BLOCK_ROWS, BLOCK_W]`` tile of x (the
whole row stays in registers), takes the row statistics in float32 and adds the normalised
values into a float32 accumulator. The affine weight and bias are applied once to that sum,
the W direction is then pooled in registers, and GELU is applied. Every element of x is read
once from DRAM and the final pooled output is the only store.

Pooling along W: when ``KW`` is a power of two the ``[BLOCK_ROWS, BLOCK_W]`` tile is reshaped
to ``[BLOCK_ROWS, BLOCK_W // KW, KW]`` and summed over the last axis. For any other ``KW`` the
input tile itself is loaded as ``[BLOCK_ROWS, BLOCK_WO, KW_PAD]`` (column ``wo * KW + k``, with
``KW_PAD`` the next power of two), which covers each column of the row exactly once, so the
statistics and the pooling both come from that single load.
"""

from __future__ import annotations

import functools
from numbers import Real
from typing import Sequence

import torch
import triton
import triton.language as tl

from .add_layernorm import _check_param, _dtype_name, check_device, split_sum_weight
from .config import MAX_TILE_ELEMENTS, LaunchConfig
from .device import device_name
from .table import lookup_config

KERNEL_NAME = "add_layernorm_pool_gelu"
APPROXIMATIONS: tuple[str, ...] = ("none", "tanh")


@triton.jit
def _add_layernorm_pool_gelu_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    sum_weight_ptr,
    sum_weight_value,
    pooled_rows,
    depth,
    height,
    width,
    out_depth,
    out_height,
    out_width,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_WO: tl.constexpr,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KW_PAD: tl.constexpr,
    POOL_BY_RESHAPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SUM_FROM_PTR: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    EVICTION_POLICY: tl.constexpr,
):
    # Pooled row p = ((n * C + c) * Do + do) * Ho + ho; 64-bit, as rows * width may pass 2**31.
    pooled = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = pooled < pooled_rows
    ho = pooled % out_height
    rest = pooled // out_height
    do = rest % out_depth
    nc = rest // out_depth
    # The first input row (n, c, do * KD, ho * KH) of each pooled row.
    first_row = (nc * depth + do * KD) * height + ho * KH
    wo = tl.arange(0, BLOCK_WO)
    if SUM_FROM_PTR:
        shift = tl.load(sum_weight_ptr).to(tl.float32)
    else:
        shift = sum_weight_value

    if POOL_BY_RESHAPE:
        # Row tile [BLOCK_ROWS, BLOCK_W]; W pooled by a reshape to [.., BLOCK_WO, KW].
        cols = tl.arange(0, BLOCK_W)
        col_mask = cols < width
        mask = row_mask[:, None] & col_mask[None, :]
        acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                row_starts = (first_row + (i * height + j)) * width
                x = tl.load(x_ptr + row_starts[:, None] + cols[None, :], mask=mask, other=0.0,
                            eviction_policy=EVICTION_POLICY)
                x = tl.where(mask, x.to(tl.float32) + shift, 0.0)
                mean = tl.sum(x, axis=1) / width
                centered = tl.where(mask, x - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / width + eps)
                acc += centered * rstd[:, None]
        # Sum over the KD*KH rows of (n * w + b) = w * sum(n) + KD*KH * b.
        if HAS_WEIGHT:
            acc = acc * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc = acc + (KD * KH) * tl.load(bias_ptr + cols, mask=col_mask,
                                            other=0.0).to(tl.float32)[None, :]
        if KW == 1:
            total = acc
        else:
            total = tl.sum(tl.reshape(acc, [BLOCK_ROWS, BLOCK_WO, KW]), axis=2)
    else:
        # Row tile [BLOCK_ROWS, BLOCK_WO, KW_PAD] holding column wo * KW + k: every column of
        # the row once (k < KW), remainder columns included, so the statistics see all of W.
        ks = tl.arange(0, KW_PAD)
        cols = wo[:, None] * KW + ks[None, :]
        col_mask = (ks < KW)[None, :] & (cols < width)
        mask = row_mask[:, None, None] & col_mask[None, :, :]
        acc = tl.zeros([BLOCK_ROWS, BLOCK_WO, KW_PAD], dtype=tl.float32)
        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                row_starts = (first_row + (i * height + j)) * width
                x = tl.load(x_ptr + row_starts[:, None, None] + cols[None, :, :], mask=mask,
                            other=0.0, eviction_policy=EVICTION_POLICY)
                x = tl.where(mask, x.to(tl.float32) + shift, 0.0)
                mean = tl.sum(tl.sum(x, axis=2), axis=1) / width
                centered = tl.where(mask, x - mean[:, None, None], 0.0)
                rstd = tl.rsqrt(tl.sum(tl.sum(centered * centered, axis=2), axis=1) / width + eps)
                acc += centered * rstd[:, None, None]
        if HAS_WEIGHT:
            acc = acc * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :, :]
        if HAS_BIAS:
            acc = acc + (KD * KH) * tl.load(bias_ptr + cols, mask=col_mask,
                                            other=0.0).to(tl.float32)[None, :, :]
        total = tl.sum(acc, axis=2)

    v = total * (1.0 / (KD * KH * KW))
    if APPROX_TANH:
        # 0.5 * v * (1 + tanh(z)) == v * sigmoid(2 * z)
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        y = v * tl.sigmoid(2.0 * z)
    else:
        y = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    out_mask = row_mask[:, None] & (wo < out_width)[None, :]
    tl.store(out_ptr + pooled[:, None] * out_width + wo[None, :], y.to(out_ptr.dtype.element_ty),
             mask=out_mask, eviction_policy=EVICTION_POLICY)


def _pool_kernel_tuple(pool_kernel: int | Sequence[int]) -> tuple[int, int, int]:
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


def table_variant(height: int, pool_kernel: int | Sequence[int], approximate: str) -> str:
    """The lookup table's ``variant`` for this kernel, e.g. ``"h64_k2x2x2_none"``."""
    kd, kh, kw = _pool_kernel_tuple(pool_kernel)
    return f"h{int(height)}_k{kd}x{kh}x{kw}_{approximate}"


@functools.lru_cache(maxsize=4096)
def heuristic_config(pooled_rows: int, width: int, dtype: torch.dtype,
                     pool_kernel: tuple[int, int, int]) -> LaunchConfig:
    """A good launch config without measuring.

    The whole input row stays in registers (``block_w`` = next power of two >= width). Pooled
    rows are packed so that a program reads about 8 KiB of x in all (``KD * KH`` row tiles),
    with a warp per KiB of one tile (32 bytes per thread per load), 1 to 16 warps. Rows of
    2 KiB or more get a program per pooled row and a warp per KiB (4 to 16).

    Measured on an H100 (triton 3.6) at the reference shape [32, 64, 32, 64, 64], pool 2x2x2:
    float32 8 pooled rows / 2 warps 0.405 ms (best of 60 configs 0.399 ms, 3025 GB/s);
    bfloat16 16 rows / 2 warps 0.220 ms, the best; 16 bytes per thread (4 warps) 0.240 ms.
    """
    kd, kh, _ = _pool_kernel_tuple(pool_kernel)
    element_size = dtype.itemsize
    block_w = triton.next_power_of_2(width)
    row_bytes = block_w * element_size
    if row_bytes >= 2048:
        return LaunchConfig(block_rows=1, block_w=block_w,
                            num_warps=max(4, min(16, row_bytes // 1024)))
    # Largest power of two that keeps the program's input within 8 KiB, no more than the rows.
    budget = max(1, 8192 // (row_bytes * kd * kh))
    block_rows = min(1 << (budget.bit_length() - 1), triton.next_power_of_2(max(pooled_rows, 1)))
    tile_bytes = block_rows * row_bytes
    return LaunchConfig(block_rows=block_rows, block_w=block_w,
                        num_warps=max(1, min(16, tile_bytes // 1024)))


def select_config(
    pooled_rows: int, width: int, dtype: torch.dtype, pool_kernel: int | Sequence[int],
    height: int, approximate: str, device: str | None = None,
) -> tuple[LaunchConfig, str]:
    """The launch config for a problem and where it came from (``table...`` or ``heuristic``).

    Looks up the tables under :func:`table_variant` (exact entry, then the nearest pooled-row
    count for the same device, dtype, width and variant), else :func:`heuristic_config`.
    """
    device = device if device is not None else device_name()
    kernel = _pool_kernel_tuple(pool_kernel)
    return lookup_config(KERNEL_NAME, device, _dtype_name(dtype), width, pooled_rows,
                         variant=table_variant(height, kernel, approximate),
                         heuristic=lambda: heuristic_config(pooled_rows, width, dtype, kernel))


def fused_add_layernorm_pool_gelu(
    x: torch.Tensor,
    sum_weight: float | torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    pool_kernel: int | Sequence[int] = (2, 2, 2),
    approximate: str = "none",
    *,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.gelu(F.avg_pool3d(F.layer_norm(x + sum_weight, (W,), weight, bias, eps),
    pool_kernel), approximate=approximate)`` in one pass over x.

    x is ``[N, C, D, H, W]``; the LayerNorm is over W; the pooling has stride == kernel, no
    padding and floor mode (remainders dropped). ``sum_weight`` is a Python number or a
    one-element tensor on x's device (read on the device, never synchronised). All math is
    in float32; the output ``[N, C, D // kd, H // kh, W // kw]`` has x's dtype. ``config``
    overrides the tuned/heuristic launch config; its ``block_w`` must cover W. ``out`` is an
    optional contiguous output tensor of the pooled shape, x's dtype and device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    _dtype_name(x.dtype)
    if x.dim() != 5:
        raise ValueError(f"x must be 5-D [N, C, D, H, W], got shape {tuple(x.shape)}")
    batch, channels, depth, height, width = x.shape
    kd, kh, kw = _pool_kernel_tuple(pool_kernel)
    if kd > depth or kh > height or kw > width:
        raise ValueError(f"pool_kernel {(kd, kh, kw)} is larger than x's spatial dims "
                         f"(D, H, W) = {(depth, height, width)}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    _check_param("weight", weight, x, (width,))
    _check_param("bias", bias, x, (width,))
    sum_tensor, sum_value = split_sum_weight(sum_weight, x)
    if not isinstance(eps, Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    check_device(x)

    out_depth, out_height, out_width = depth // kd, height // kh, width // kw
    out_shape = (batch, channels, out_depth, out_height, out_width)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape or out.dtype != x.dtype \
            or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {out_shape} with x's dtype "
                         "and device")
    if out.numel() == 0:
        return out
    pooled_rows = batch * channels * out_depth * out_height
    if config is None:
        config, _ = select_config(pooled_rows, width, x.dtype, (kd, kh, kw), height, approximate,
                                  device_name(x.device))
    elif not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig or None, got {type(config).__name__}")
    if config.block_w < width:
        raise ValueError(f"config.block_w={config.block_w} is less than the row width {width}: "
                         f"this kernel keeps whole rows in registers, so block_w must be a power "
                         f"of two >= {width}")
    pool_by_reshape = kw & (kw - 1) == 0
    if pool_by_reshape:
        block_wo, kw_pad = config.block_w // kw, kw
    else:
        block_wo, kw_pad = triton.next_power_of_2(triton.cdiv(config.block_w, kw)), \
            triton.next_power_of_2(kw)
        if config.block_rows * block_wo * kw_pad > MAX_TILE_ELEMENTS:
            raise ValueError(f"config block_rows={config.block_rows}, block_w={config.block_w} "
                             f"with pool width {kw} needs a tile of "
                             f"{config.block_rows * block_wo * kw_pad} elements, over Triton's "
                             f"limit of {MAX_TILE_ELEMENTS}")
    x = x.contiguous()
    # The kernel indexes weight and bias as flat contiguous arrays of ``width`` elements.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    grid = (triton.cdiv(pooled_rows, config.block_rows),)
    _add_layernorm_pool_gelu_kernel[grid](
        x, out,
        weight if weight is not None else x,
        bias if bias is not None else x,
        sum_tensor if sum_tensor is not None else x,
        sum_value, pooled_rows, depth, height, width, out_depth, out_height, out_width,
        float(eps),
        BLOCK_ROWS=config.block_rows,
        BLOCK_W=config.block_w,
        BLOCK_WO=block_wo,
        KD=kd,
        KH=kh,
        KW=kw,
        KW_PAD=kw_pad,
        POOL_BY_RESHAPE=pool_by_reshape,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        SUM_FROM_PTR=sum_tensor is not None,
        APPROX_TANH=approximate == "tanh",
        EVICTION_POLICY=config.eviction_policy,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
