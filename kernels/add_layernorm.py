"""Fused ``LayerNorm(x + sum_weight)``: the Triton kernel and its launcher, side by side.

Each program normalises a tile of ``BLOCK_ROWS`` rows. When ``BLOCK_W >= width`` the rows stay
in registers and x is read once; otherwise the row is walked in ``BLOCK_W`` chunks twice (once
for the statistics, merged chunk by chunk with Chan's formula, once to normalise), reading x
again rather than storing anything intermediate. The only store is the final output, plus,
when autograd needs them (``STORE_STATS``), the float32 row mean and rstd for the backward.
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .add_layernorm_backward import add_layernorm_backward
from .autotune import autotune_enabled, tune_add_layernorm
from .config import LaunchConfig
from .defaults import add_layernorm_default, device_properties
from .device import device_name, interpreter_enabled
from .table import lookup_config

KERNEL_NAME = "add_layernorm"
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _affine(y, weight_ptr, bias_ptr, cols, col_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y * weight + bias`` over the columns ``cols`` of a [rows, columns] tile."""
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _store_stats(mean_ptr, rstd_ptr, row_ids, mean, rstd, row_mask):
    """Saves the per-row mean of ``x + sum_weight`` and rstd (float32) for the backward."""
    tl.store(mean_ptr + row_ids, mean, mask=row_mask)
    tl.store(rstd_ptr + row_ids, rstd, mask=row_mask)


@triton.jit
def _add_layernorm_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    sum_weight_ptr,
    sum_weight_value,
    mean_ptr,
    rstd_ptr,
    rows,
    width,
    eps,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SUM_FROM_PTR: tl.constexpr,
    STORE_STATS: tl.constexpr,
    EVICTION_POLICY: tl.constexpr,
):
    # 64-bit row offsets: rows * width may pass 2**31 elements.
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_starts = row_ids * width
    cols = tl.arange(0, BLOCK_W)
    if SUM_FROM_PTR:
        shift = tl.load(sum_weight_ptr).to(tl.float32)
    else:
        shift = sum_weight_value

    if SINGLE_PASS:
        col_mask = cols < width
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_starts[:, None] + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION_POLICY)
        x = tl.where(mask, x.to(tl.float32) + shift, 0.0)
        mean = tl.sum(x, axis=1) / width
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / width + eps)
        if STORE_STATS:
            _store_stats(mean_ptr, rstd_ptr, row_ids, mean, rstd, row_mask)
        y = _affine(centered * rstd[:, None], weight_ptr, bias_ptr, cols, col_mask, HAS_WEIGHT, HAS_BIAS)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask,
                 eviction_policy=EVICTION_POLICY)
    else:
        # Pass 1: per-chunk mean and squared deviations, merged exactly (Chan et al.), which
        # stays accurate where a running sum of squares would cancel.
        mean = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for start in range(0, width, BLOCK_W):
            col_ids = start + cols
            mask = row_mask[:, None] & (col_ids < width)[None, :]
            x = tl.load(x_ptr + row_starts[:, None] + col_ids[None, :], mask=mask, other=0.0,
                        eviction_policy=EVICTION_POLICY)
            x = tl.where(mask, x.to(tl.float32) + shift, 0.0)
            seen = start * 1.0  # as float32; .to() is not available on the interpreter's ints
            chunk_count = tl.minimum(width - start, BLOCK_W) * 1.0
            chunk_mean = tl.sum(x, axis=1) / chunk_count
            centered = tl.where(mask, x - chunk_mean[:, None], 0.0)
            chunk_m2 = tl.sum(centered * centered, axis=1)
            total = seen + chunk_count
            delta = chunk_mean - mean
            mean = mean + delta * (chunk_count / total)
            m2 = m2 + chunk_m2 + delta * delta * (seen * chunk_count / total)
        rstd = tl.rsqrt(m2 / width + eps)
        if STORE_STATS:
            _store_stats(mean_ptr, rstd_ptr, row_ids, mean, rstd, row_mask)
        # Pass 2: read x again and write the normalised output.
        for start in range(0, width, BLOCK_W):
            col_ids = start + cols
            col_mask = col_ids < width
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = row_starts[:, None] + col_ids[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION_POLICY)
            y = _affine((x.to(tl.float32) + shift - mean[:, None]) * rstd[:, None], weight_ptr,
                        bias_ptr, col_ids, col_mask, HAS_WEIGHT, HAS_BIAS)
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask,
                     eviction_policy=EVICTION_POLICY)


@functools.lru_cache(maxsize=4096)
def heuristic_config(rows: int, width: int, dtype: torch.dtype,
                     device: str | None = None) -> LaunchConfig:
    """A good launch config without measuring, derived from the properties of the GPU model
    ``device`` (None: the current one) and the row's bytes (:mod:`kernels.defaults`)."""
    return add_layernorm_default(rows, width, dtype.itemsize, device_properties(device))


def select_config(
    rows: int, width: int, dtype: torch.dtype, device: str | None = None
) -> tuple[LaunchConfig, str]:
    """The launch config for a problem and where it came from.

    Looks in the tables (exact entry, then the nearest row count for the same device, dtype
    and width), else falls back to :func:`heuristic_config`. ``source`` contains ``table``
    for a table entry and is ``heuristic`` otherwise. Results are cached.
    """
    device = device if device is not None else device_name()
    return lookup_config(KERNEL_NAME, device, _dtype_name(dtype), width, rows,
                         heuristic=lambda: heuristic_config(rows, width, dtype, device),
                         miss=lambda: (KERNEL_NAME, f"{rows}x{width}"))


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; accepted: float32, float16, bfloat16")
    return str(dtype).removeprefix("torch.")


def _check_param(name: str, tensor: torch.Tensor | None, x: torch.Tensor,
                 normalized_shape: tuple[int, ...]) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(tensor).__name__}")
    if tuple(tensor.shape) != normalized_shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected normalized_shape "
                         f"{normalized_shape}")
    if tensor.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; they must match")
    if tensor.device != x.device:
        raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def split_sum_weight(sum_weight: float | torch.Tensor,
                     x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """``(tensor, 0.0)`` for a one-element tensor on x's device (read by the kernel, no sync),
    ``(None, value)`` for a Python number."""
    if isinstance(sum_weight, torch.Tensor):
        if sum_weight.numel() != 1:
            raise ValueError(f"sum_weight must have one element, got shape {tuple(sum_weight.shape)}")
        if sum_weight.device != x.device:
            raise ValueError(f"sum_weight is on {sum_weight.device} but x is on {x.device}")
        return sum_weight, 0.0
    if isinstance(sum_weight, Real) and not isinstance(sum_weight, bool):
        return None, float(sum_weight)
    raise TypeError(f"sum_weight must be a number or a tensor, got {type(sum_weight).__name__}")


def check_device(x: torch.Tensor) -> None:
    """CPU tensors run only through the Triton interpreter."""
    if x.device.type == "cpu" and not interpreter_enabled():
        raise ValueError("x is on the CPU: run on a CUDA device, or set TRITON_INTERPRET=1 "
                         "to use the Triton interpreter")


def _launch(x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor | None,
            bias: torch.Tensor | None, sum_tensor: torch.Tensor | None, sum_value: float,
            rows: int, width: int, eps: float, config: LaunchConfig, warmup: bool = False,
            stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Launches the kernel on ``rows x width`` (or, with ``warmup``, only compiles it);
    ``stats``, float32 ``(mean, rstd)`` of ``rows`` elements each, receive the row statistics."""
    grid = (triton.cdiv(rows, config.block_rows),)
    mean, rstd = stats if stats is not None else (x, x)
    args = (x, out,
            weight if weight is not None else x,
            bias if bias is not None else x,
            sum_tensor if sum_tensor is not None else x,
            sum_value, mean, rstd, rows, width, eps)
    meta = dict(BLOCK_ROWS=config.block_rows, BLOCK_W=config.block_w,
                SINGLE_PASS=config.block_w >= width, HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None, SUM_FROM_PTR=sum_tensor is not None,
                STORE_STATS=stats is not None,
                EVICTION_POLICY=config.eviction_policy, num_warps=config.num_warps,
                num_stages=config.num_stages)
    if warmup:
        _add_layernorm_kernel.warmup(*args, grid=grid, **meta)
    else:
        _add_layernorm_kernel[grid](*args, **meta)


class _AddLayerNormFunction(torch.autograd.Function):
    """``LayerNorm(x + sum_weight)`` on ``[rows, width]`` with a Triton backward
    (``kernels/add_layernorm_backward.py``); the forward also saves the float32 row mean and
    rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sum_tensor: torch.Tensor | None, sum_value: float,
                weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                config: LaunchConfig) -> torch.Tensor:
        rows, width = x.shape
        out = torch.empty_like(x)
        mean, rstd = torch.empty((2, rows), dtype=torch.float32, device=x.device)
        if rows:
            _launch(x, out, weight, bias, sum_tensor, sum_value, rows, width, eps, config,
                    stats=(mean, rstd))
        ctx.save_for_backward(x, weight, mean, rstd, sum_tensor)
        ctx.sum_value = sum_value
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd, sum_tensor = ctx.saved_tensors
        need_dx, need_dsum, _, need_dweight, need_dbias = ctx.needs_input_grad[:5]
        grads = add_layernorm_backward(
            dy.contiguous(), x, weight, mean, rstd,
            sum_tensor if sum_tensor is not None else ctx.sum_value,
            needs=(need_dx, need_dweight, need_dbias, False))
        # Zero in exact arithmetic (kernels/add_layernorm_backward.py), made in its own dtype.
        dsum = torch.zeros_like(sum_tensor) if need_dsum else None
        return grads.dx, dsum, None, grads.dweight, grads.dbias, None, None


def gradients_required(*tensors: torch.Tensor | float | None) -> bool:
    """True when autograd records: grad mode is on and a tensor among ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(tensor, torch.Tensor) and tensor.requires_grad for tensor in tensors)


def compile_config(rows: int, width: int, dtype: torch.dtype, config: LaunchConfig, *,
                   has_weight: bool = True, has_bias: bool = True,
                   sum_weight_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cuda") -> None:
    """Compiles, without launching, the kernel that a ``rows x width`` problem in ``dtype``
    runs with ``config``, into Triton's cache (e.g. ahead of timing, or at start-up).

    ``sum_weight_dtype`` is the dtype of a tensor ``sum_weight``; None for a Python number.
    A no-op under the interpreter, which compiles nothing.
    """
    if interpreter_enabled():
        return
    x, weight, bias, sum_tensor = stand_in_tensors(dtype, has_weight, has_bias, sum_weight_dtype,
                                                   device)
    _launch(x, x, weight, bias, sum_tensor, 0.0, rows, width, 1e-5, config, warmup=True)


def stand_in_tensors(dtype: torch.dtype, has_weight: bool, has_bias: bool,
                     sum_weight_dtype: torch.dtype | None, device: torch.device | str):
    """Tiny tensors that specialise a kernel as real inputs of these dtypes would (for compiling
    without launching): x (also the output), weight or None, bias or None, sum_weight or None."""
    _dtype_name(dtype)
    tiny = torch.empty(16, dtype=dtype, device=device)  # 16-byte aligned, like any allocation
    sum_tensor = None if sum_weight_dtype is None else torch.empty(1, dtype=sum_weight_dtype, device=device)
    return tiny, tiny if has_weight else None, tiny if has_bias else None, sum_tensor


def fused_add_layernorm(
    x: torch.Tensor,
    sum_weight: float | torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.layer_norm(x + sum_weight, normalized_shape, weight, bias, eps)`` in one pass.

    ``sum_weight`` is a Python number or a one-element tensor on x's device (read on the
    device, never synchronised). Statistics are computed in float32; the output has x's dtype.
    ``config`` overrides the tuned/heuristic launch config; ``out`` is an optional contiguous
    output tensor of x's shape, dtype and device (only without autograd).

    Differentiable in x, a tensor ``sum_weight``, weight and bias: when grad mode is on and
    one of them requires grad, the forward also saves the float32 row mean and rstd and the
    backward runs the Triton kernels of ``kernels/add_layernorm_backward.py``. Otherwise
    nothing but the output is written.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    _dtype_name(x.dtype)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if not normalized_shape or x.dim() < len(normalized_shape) or \
            tuple(x.shape[x.dim() - len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} does not match the trailing "
                         f"dims of x with shape {tuple(x.shape)}")
    _check_param("weight", weight, x, normalized_shape)
    _check_param("bias", bias, x, normalized_shape)
    sum_tensor, sum_value = split_sum_weight(sum_weight, x)
    check_device(x)

    width = math.prod(normalized_shape)
    track = gradients_required(x, sum_weight, weight, bias)
    if out is not None and track:
        raise ValueError("out= cannot be used while gradients are required (autograd needs an "
                         "output of its own): drop out=, or call under torch.no_grad()")
    if out is None:
        if not track:  # the autograd path allocates its own
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype \
            or out.device != x.device or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor with x's shape, dtype and device")
    if x.numel() == 0:
        # Nothing to launch; PyTorch gives an empty output that autograd can still record.
        return F.layer_norm(x + sum_weight, normalized_shape, weight, bias, eps) if track else out
    rows = x.numel() // width
    if config is None:
        config, source = select_config(rows, width, x.dtype, device_name(x.device))
        if source != "table" and autotune_enabled():
            config = tune_add_layernorm(x, sum_tensor, sum_value, weight, bias, eps, rows,
                                        width, config)
    elif not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig or None, got {type(config).__name__}")
    x = x.contiguous()
    # The kernel indexes weight and bias as flat contiguous arrays of ``width`` elements.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if track:
        flat_weight = weight.reshape(width) if weight is not None else None
        flat_bias = bias.reshape(width) if bias is not None else None
        out = _AddLayerNormFunction.apply(x.reshape(rows, width), sum_tensor, sum_value,
                                          flat_weight, flat_bias, eps, config)
        return out.reshape(x.shape)
    _launch(x, out, weight, bias, sum_tensor, sum_value, rows, width, eps, config)
    return out
