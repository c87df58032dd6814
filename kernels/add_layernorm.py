"""Fused ``LayerNorm(x + sum_weight)``: the Triton kernel, its descriptor (:data:`ADD_LAYERNORM`:
table key, default config, compile, launch) and the differentiable wrapper, side by side.

Each program normalises a tile of ``BLOCK_ROWS`` rows. When ``BLOCK_W >= width`` the rows stay
in registers and x is read once; otherwise the row is walked in ``BLOCK_W`` chunks twice (once
for the statistics, merged chunk by chunk with Chan's formula, once to normalise), reading x
again rather than storing anything intermediate. The only store is the final output, plus,
when autograd needs them (``STORE_STATS``), the float32 row mean and rstd for the backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    affine,
    check_device,
    check_eps,
    check_no_out_with_autograd,
    check_param,
    check_tensor,
    first_row,
    gradients_required,
    known_multiple,
    launch_or_compile,
    load_shift,
    needs_64bit_offsets,
    split_sum_weight,
    stand_in_tensors,
    store_stats,
    sum_weight_dtype,
    width_multiple,
)
from .add_layernorm_backward import add_layernorm_backward
from .autotune import autotune_enabled, tune_add_layernorm
from .config import LaunchConfig
from .defaults import add_layernorm_default, device_properties
from .descriptor import RowsCall, RowsDescriptor
from .device import device_name, interpreter_enabled
from .launch import launch
from .table import on_reload


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
    INDEX_64: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
):
    width = known_multiple(width, WIDTH_MULTIPLE)
    row_ids = first_row(tl.program_id(0), BLOCK_ROWS, INDEX_64) + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_starts = row_ids * width
    cols = tl.arange(0, BLOCK_W)
    shift = load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR)

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
            store_stats(mean_ptr, rstd_ptr, row_ids, mean, rstd, row_mask)
        y = affine(centered * rstd[:, None], weight_ptr, bias_ptr, cols, col_mask, 0, HAS_WEIGHT,
                   HAS_BIAS, 1)
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
            store_stats(mean_ptr, rstd_ptr, row_ids, mean, rstd, row_mask)
        # Pass 2: read x again and write the normalised output.
        for start in range(0, width, BLOCK_W):
            col_ids = start + cols
            col_mask = col_ids < width
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = row_starts[:, None] + col_ids[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION_POLICY)
            y = affine((x.to(tl.float32) + shift - mean[:, None]) * rstd[:, None], weight_ptr,
                       bias_ptr, col_ids, col_mask, 0, HAS_WEIGHT, HAS_BIAS, 1)
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
    """The launch config for a problem and where it came from (:meth:`AddLayerNorm.select`).

    Looks in the tables (exact entry, then the nearest row count for the same device, dtype
    and width), else falls back to :func:`heuristic_config`. ``source`` contains ``table``
    for a table entry and is ``heuristic`` otherwise. Results are cached.
    """
    return ADD_LAYERNORM.select(AddLayerNormCall(rows, width, dtype), device)


@dataclasses.dataclass(frozen=True)
class AddLayerNormCall(RowsCall):
    """A call of :func:`fused_add_layernorm` on ``rows`` rows of ``width``: which of weight
    and bias are given, and sum_weight's dtype (None: a Python number)."""

    has_weight: bool = True
    has_bias: bool = True
    sum_weight_dtype: torch.dtype | None = None


class AddLayerNorm(RowsDescriptor[AddLayerNormCall]):
    """The fused add + LayerNorm kernel. The tuner measures it as ModelNew calls it: weight,
    bias and a sum_weight tensor of x's dtype."""

    name = "add_layernorm"

    def make_call(self, rows: int, width: int, dtype: torch.dtype) -> AddLayerNormCall:
        return AddLayerNormCall(rows, width, dtype, sum_weight_dtype=dtype)

    def default_config(self, call: AddLayerNormCall, device: str | None = None) -> LaunchConfig:
        return heuristic_config(call.rows, call.width, call.dtype, device)

    def compile(self, call: AddLayerNormCall, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """A no-op under the interpreter, which compiles nothing."""
        if interpreter_enabled():
            return
        x, weight, bias, sum_tensor = stand_in_tensors(call.dtype, call.has_weight, call.has_bias,
                                                       call.sum_weight_dtype, device)
        self.launch(x, x, weight, bias, sum_tensor, 0.0, call.rows, call.width, 1e-5, config,
                    warmup=True)

    def launch(self, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None, sum_tensor: torch.Tensor | None, sum_value: float,
               rows: int, width: int, eps: float, config: LaunchConfig, warmup: bool = False,
               stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Launches the kernel on ``rows x width`` (or, with ``warmup``, only compiles it);
        ``stats``, float32 ``(mean, rstd)`` of ``rows`` elements each, receive the row
        statistics."""
        # Plain ints: triton.cdiv unwraps constexprs on every call.
        grid = ((rows + config.block_rows - 1) // config.block_rows,)
        mean, rstd = stats if stats is not None else (x, x)
        args = (x, out,
                weight if weight is not None else x,
                bias if bias is not None else x,
                sum_tensor if sum_tensor is not None else x,
                float(sum_value), mean, rstd, rows, width, float(eps))  # fp32 in the kernel

        def meta() -> dict:
            return dict(BLOCK_ROWS=config.block_rows, BLOCK_W=config.block_w,
                        SINGLE_PASS=config.block_w >= width, HAS_WEIGHT=weight is not None,
                        HAS_BIAS=bias is not None, SUM_FROM_PTR=sum_tensor is not None,
                        STORE_STATS=stats is not None,
                        EVICTION_POLICY=config.eviction_policy,
                        INDEX_64=needs_64bit_offsets(grid[0] * config.block_rows, width,
                                                     config.block_w),
                        WIDTH_MULTIPLE=width_multiple(width),
                        num_warps=config.num_warps, num_stages=config.num_stages)

        if warmup:
            launch_or_compile(_add_layernorm_kernel, grid, args, meta(), warmup)
            return
        # Everything Triton specialises on besides the tensors' alignment (launch.launch).
        key = (rows, width, config, x.dtype, out.dtype, mean.dtype,
               None if weight is None else weight.dtype, None if bias is None else bias.dtype,
               None if sum_tensor is None else sum_tensor.dtype)
        launch(_add_layernorm_kernel, grid, args, meta, key)


ADD_LAYERNORM = AddLayerNorm()


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
            ADD_LAYERNORM.launch(x, out, weight, bias, sum_tensor, sum_value, rows, width, eps,
                                 config, stats=(mean, rstd))
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


# Configs chosen for CUDA calls, by device index and everything the table key and the tuner
# see: the tables, the default and the autotuner are consulted once per such call signature
# (until reload_tables()), so a repeated call costs one dict lookup.
_chosen: dict[tuple, LaunchConfig] = {}
MAX_CHOSEN = 4096
on_reload(_chosen.clear)


def _choose_config(x: torch.Tensor, rows: int, width: int, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, sum_tensor: torch.Tensor | None, sum_value: float,
                   eps: float) -> LaunchConfig:
    """The table's config for the call, else the default (tuned first with TUNER_AUTOTUNE=1)."""
    index = x.get_device()  # -1 on the CPU (the interpreter: never cached)
    key = (index, rows, width, x.dtype, weight is not None, bias is not None,
           sum_weight_dtype(sum_tensor))
    config = _chosen.get(key)
    if config is not None:
        return config
    call = AddLayerNormCall(*key[1:])
    config, source = ADD_LAYERNORM.select(call, device_name(x.device))
    if source != "table" and autotune_enabled():
        # Not kept here: the tuned config lands in the table, found exactly next time.
        return tune_add_layernorm(ADD_LAYERNORM, call, x, sum_tensor, sum_value, weight, bias,
                                  eps, config)
    if index >= 0:
        if len(_chosen) >= MAX_CHOSEN:  # many row counts (varying batches): start afresh
            _chosen.clear()
        _chosen[key] = config
    return config


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
    check_tensor("x", x)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if not normalized_shape or x.dim() < len(normalized_shape) or \
            tuple(x.shape[x.dim() - len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} does not match the trailing "
                         f"dims of x with shape {tuple(x.shape)}")
    check_param("weight", weight, x, normalized_shape)
    check_param("bias", bias, x, normalized_shape)
    sum_tensor, sum_value = split_sum_weight(sum_weight, x)
    check_eps(eps)
    check_device(x)

    width = math.prod(normalized_shape)
    track = gradients_required(x, sum_weight, weight, bias)
    check_no_out_with_autograd(out, track)
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
        config = _choose_config(x, rows, width, weight, bias, sum_tensor, sum_value, eps)
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
    ADD_LAYERNORM.launch(x, out, weight, bias, sum_tensor, sum_value, rows, width, eps, config)
    return out
