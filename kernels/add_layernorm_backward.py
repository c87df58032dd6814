"""The backward of ``LayerNorm(x + sum_weight)``: the Triton kernel, its descriptor
(:data:`ADD_LAYERNORM_BACKWARD`) and launcher.

The forward (``kernels/add_layernorm.py``) saves the per-row mean of ``x + sum_weight`` and
its rstd in float32. With ``xhat = (x + sum_weight - mean) * rstd`` and ``g = dy * weight``:

    dx          = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat))
    dweight     = sum over rows of dy * xhat
    dbias       = sum over rows of dy
    dsum_weight = 0

dsum_weight, the sum of dx over every element, is zero in exact arithmetic whatever the inputs:
LayerNorm subtracts the row mean, so adding a constant to a row changes nothing. Summing dx
would only add up its rounding errors, at the cost of a third row reduction a tile, so it is
returned as an exact zero.

A persistent grid (``kernels/backward_reduce.py``) of programs each walks many tiles of
``BLOCK_ROWS`` rows, so that the column sums for dweight and dbias are accumulated in registers
across tiles and added out once per program, into a program's own row of partial sums or, with
atomics, into one shared row (``reduction``). Rows wider than ``BLOCK_W`` are walked in chunks
twice (the row sums dx needs first, then dx; once when dx is not wanted); their column sums
are added into the program's row with atomics, as a plain read-modify-write of global memory
by one program is not ordered between its threads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    first_row,
    known_multiple,
    launch_or_compile,
    load_shift,
    needs_64bit_offsets,
    stand_in_tensors,
    width_multiple,
)
from .backward_reduce import (
    choose_reduction,
    column_sums,
    partial_sums,
    program_count,
    resident_programs,
)
from .config import LaunchConfig
from .descriptor import RowsCall, RowsDescriptor
from .device import device_name, interpreter_enabled


@triton.jit
def _add_column_sums(partial_ptr, offsets, values, mask, ATOMIC: tl.constexpr):
    """Writes a program's column sums: atomically added, or stored into its own row."""
    if ATOMIC:
        tl.atomic_add(partial_ptr + offsets, values, mask=mask)
    else:
        tl.store(partial_ptr + offsets, values, mask=mask)


# The tile count and the partial sums' row and pointers are touched once a program: not
# specialised, so that compiling ahead of the launch (resident_programs) with stand-ins gives
# the very kernel the launch runs.
@triton.jit(do_not_specialize=["partial_stride", "tiles_per_program"],
            do_not_specialize_on_alignment=["dweight_partial_ptr", "dbias_partial_ptr"])
def _add_layernorm_backward_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    sum_weight_ptr,
    sum_weight_value,
    dweight_partial_ptr,
    dbias_partial_ptr,
    partial_stride,
    rows,
    width,
    tiles_per_program,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SUM_FROM_PTR: tl.constexpr,
    STORE_DX: tl.constexpr,
    COMPUTE_DWEIGHT: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    ATOMIC_REDUCE: tl.constexpr,
    EVICTION_POLICY: tl.constexpr,
    INDEX_64: tl.constexpr,
    WIDTH_MULTIPLE: tl.constexpr,
):
    width = known_multiple(width, WIDTH_MULTIPLE)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    # The program's row of partial sums: its own, or the single shared row of the atomics.
    if ATOMIC_REDUCE:
        partial_start = 0
    else:
        partial_start = pid.to(tl.int64) * partial_stride
    cols = tl.arange(0, BLOCK_W)
    shift = load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR)

    if SINGLE_PASS:
        col_mask = cols < width
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        # Column sums stay 2-D across tiles (elementwise adds); reduced over rows once at the end.
        dweight_acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
        for step in range(0, tiles_per_program):
            # Tiles interleaved over programs: programs running together read neighbouring rows.
            row_ids = first_row(pid + step * programs, BLOCK_ROWS, INDEX_64) \
                + tl.arange(0, BLOCK_ROWS)
            row_mask = row_ids < rows
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = row_ids[:, None] * width + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION_POLICY)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0,
                         eviction_policy=EVICTION_POLICY).to(tl.float32)
            mean = tl.load(mean_ptr + row_ids, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x.to(tl.float32) + shift - mean[:, None]) * rstd[:, None], 0.0)
            if STORE_DX:
                if HAS_WEIGHT:
                    g = dy * weight[None, :]
                else:
                    g = dy
                c1 = tl.sum(g * xhat, axis=1) / width
                c2 = tl.sum(g, axis=1) / width
                dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
                tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask,
                         eviction_policy=EVICTION_POLICY)
            if COMPUTE_DWEIGHT:
                dweight_acc += dy * xhat
            if COMPUTE_DBIAS:
                dbias_acc += dy
        if COMPUTE_DWEIGHT:
            _add_column_sums(dweight_partial_ptr, partial_start + cols,
                             tl.sum(dweight_acc, axis=0), col_mask, ATOMIC_REDUCE)
        if COMPUTE_DBIAS:
            _add_column_sums(dbias_partial_ptr, partial_start + cols, tl.sum(dbias_acc, axis=0),
                             col_mask, ATOMIC_REDUCE)
    else:
        for step in range(0, tiles_per_program):
            row_ids = first_row(pid + step * programs, BLOCK_ROWS, INDEX_64) \
                + tl.arange(0, BLOCK_ROWS)
            row_mask = row_ids < rows
            row_starts = row_ids * width
            mean = tl.load(mean_ptr + row_ids, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)
            if STORE_DX:
                # Pass 1 (only dx needs it): the row sums of g * xhat and g.
                sum_gxhat = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                sum_g = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                for start in range(0, width, BLOCK_W):
                    col_ids = start + cols
                    col_mask = col_ids < width
                    mask = row_mask[:, None] & col_mask[None, :]
                    offsets = row_starts[:, None] + col_ids[None, :]
                    x = tl.load(x_ptr + offsets, mask=mask, other=0.0,
                                eviction_policy=EVICTION_POLICY)
                    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0,
                                 eviction_policy=EVICTION_POLICY).to(tl.float32)
                    xhat = tl.where(mask, (x.to(tl.float32) + shift - mean[:, None])
                                    * rstd[:, None], 0.0)
                    if HAS_WEIGHT:
                        weight = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0)
                        g = dy * weight.to(tl.float32)[None, :]
                    else:
                        g = dy
                    sum_gxhat += tl.sum(g * xhat, axis=1)
                    sum_g += tl.sum(g, axis=1)
                c1 = sum_gxhat / width
                c2 = sum_g / width
            # Pass 2: read x and dy (again), write dx and add the column sums.
            for start in range(0, width, BLOCK_W):
                col_ids = start + cols
                col_mask = col_ids < width
                mask = row_mask[:, None] & col_mask[None, :]
                offsets = row_starts[:, None] + col_ids[None, :]
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION_POLICY)
                dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0,
                             eviction_policy=EVICTION_POLICY).to(tl.float32)
                xhat = tl.where(mask, (x.to(tl.float32) + shift - mean[:, None]) * rstd[:, None],
                                0.0)
                if STORE_DX:
                    if HAS_WEIGHT:
                        weight = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0)
                        g = dy * weight.to(tl.float32)[None, :]
                    else:
                        g = dy
                    dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
                    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask,
                             eviction_policy=EVICTION_POLICY)
                if COMPUTE_DWEIGHT:
                    tl.atomic_add(dweight_partial_ptr + partial_start + col_ids,
                                  tl.sum(dy * xhat, axis=0), mask=col_mask)
                if COMPUTE_DBIAS:
                    tl.atomic_add(dbias_partial_ptr + partial_start + col_ids, tl.sum(dy, axis=0),
                                  mask=col_mask)


@functools.lru_cache(maxsize=4096)
def heuristic_config(rows: int, width: int, dtype: torch.dtype) -> LaunchConfig:
    """A good launch config without measuring.

    The backward holds about five float32 values per element (x, dy, xhat, g, dx), so tiles
    are half the forward's: rows stay in registers up to 8192 columns and are walked in
    4096-column chunks beyond; rows of 1024 columns or more get a program each with about
    eight columns per thread (4 to 16 warps); narrower rows are packed into tiles of 4096
    elements with a warp per 512.
    """
    del dtype  # the tile is sized in float32 values, whatever the input dtype
    block_w = triton.next_power_of_2(width) if width <= 8192 else 4096
    if block_w >= 1024:
        return LaunchConfig(block_rows=1, block_w=block_w,
                            num_warps=max(4, min(16, block_w // 256)))
    block_rows = max(1, min(4096 // block_w, triton.next_power_of_2(rows)))
    return LaunchConfig(block_rows=block_rows, block_w=block_w,
                        num_warps=max(1, min(8, block_rows * block_w // 512)))


class Gradients(NamedTuple):
    """The backward's results; None where not asked for."""

    dx: torch.Tensor | None
    dweight: torch.Tensor | None
    dbias: torch.Tensor | None
    #: float32 scalar (shape ``()``)
    dsum_weight: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class AddLayerNormBackwardCall(RowsCall):
    """A call of :func:`add_layernorm_backward` on ``rows`` rows of ``width``: whether weight
    is given, sum_weight's dtype (None: a Python number) and the reduction of the column sums
    (None: chosen by width, :func:`kernels.backward_reduce.choose_reduction`)."""

    has_weight: bool = True
    sum_weight_dtype: torch.dtype | None = None
    reduction: str | None = None


class AddLayerNormBackward(RowsDescriptor[AddLayerNormBackwardCall]):
    """The add + LayerNorm backward kernel, with all gradients. The tuner measures it as a
    training step of ModelNew runs it: weight given, sum_weight a tensor of x's dtype."""

    name = "add_layernorm_backward"

    def make_call(self, rows: int, width: int, dtype: torch.dtype) -> AddLayerNormBackwardCall:
        return AddLayerNormBackwardCall(rows, width, dtype, sum_weight_dtype=dtype)

    def default_config(self, call: AddLayerNormBackwardCall,
                       device: str | None = None) -> LaunchConfig:
        return heuristic_config(call.rows, call.width, call.dtype)

    def compile(self, call: AddLayerNormBackwardCall, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """A no-op under the interpreter, which compiles nothing."""
        atomic = choose_reduction(call.width, call.reduction) == "atomics"
        if interpreter_enabled():
            return
        device = torch.device(device)
        tiny, weight, _, sum_tensor = stand_in_tensors(call.dtype, call.has_weight, False,
                                                       call.sum_weight_dtype, device)
        stats = torch.empty(16, dtype=torch.float32, device=device)
        self.launch(tiny, tiny, tiny, weight, stats, stats, sum_tensor, 0.0, call.rows,
                    call.width, config, (call.has_weight, True), atomic, warmup=True)

    def launch(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor | None,
               weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
               sum_tensor: torch.Tensor | None, sum_value: float, rows: int, width: int,
               config: LaunchConfig, compute: tuple[bool, bool], atomic: bool,
               programs: int | None = None, warmup: bool = False) -> torch.Tensor | None:
        """Launches the backward kernel on its persistent grid (``programs`` programs, at most
        one a row tile; default one wave) and returns the float32 ``[rows, columns]`` column sums it added out (dweight's
        columns first, then dbias's; None when neither is computed). With ``warmup``, only
        compiles the kernel."""
        kernel = _add_layernorm_backward_kernel
        meta = dict(BLOCK_ROWS=config.block_rows, BLOCK_W=config.block_w,
                    SINGLE_PASS=config.block_w >= width, HAS_WEIGHT=weight is not None,
                    SUM_FROM_PTR=sum_tensor is not None, STORE_DX=dx is not None,
                    COMPUTE_DWEIGHT=compute[0], COMPUTE_DBIAS=compute[1], ATOMIC_REDUCE=atomic,
                    EVICTION_POLICY=config.eviction_policy,
                    # The last program's tiles may run up to one grid of tiles past the rows.
                    INDEX_64=needs_64bit_offsets(
                        2 * triton.cdiv(rows, config.block_rows) * config.block_rows, width,
                        config.block_w),
                    WIDTH_MULTIPLE=width_multiple(width),
                    num_warps=config.num_warps,
                    num_stages=config.num_stages)

        def arguments(dweight_partial: torch.Tensor, dbias_partial: torch.Tensor, stride: int,
                      tiles_per_program: int) -> tuple:
            return (x, dy, dx if dx is not None else x, weight if weight is not None else x, mean,
                    rstd, sum_tensor if sum_tensor is not None else x, sum_value, dweight_partial,
                    dbias_partial, stride, rows, width, tiles_per_program)

        # Stand-ins for what is not specialised on (see the kernel): the kernel they compile is
        # the one launched.
        stand_ins = arguments(mean, mean, 0, 2)
        if warmup:
            launch_or_compile(kernel, (1,), stand_ins, meta, warmup=True)
            return None
        row_tiles = triton.cdiv(rows, config.block_rows)
        if programs is None:
            programs = program_count(row_tiles, config.block_rows,
                                     resident_programs(kernel, stand_ins, meta, x))
        # More programs than tiles would only idle, and walk tiles past INDEX_64's bound.
        programs = max(1, min(programs, row_tiles))
        columns = (compute[0] + compute[1]) * width
        # The chunked loop adds chunk by chunk into the program's own row: it starts from zeros.
        partials = partial_sums(programs, columns, atomic, config.block_w < width, x.device) \
            if columns else None
        kernel[(programs,)](*arguments(partials if compute[0] else mean,
                                       partials[:, columns - width:] if compute[1] else mean,
                                       columns, triton.cdiv(row_tiles, programs)), **meta)
        return partials


ADD_LAYERNORM_BACKWARD = AddLayerNormBackward()


def add_layernorm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    sum_weight: torch.Tensor | float,
    *,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    config: LaunchConfig | None = None,
    reduction: str | None = None,
    programs: int | None = None,
    dx_out: torch.Tensor | None = None,
) -> Gradients:
    """Gradients of ``LayerNorm(x + sum_weight)`` given the output gradient ``dy``.

    x and dy are contiguous ``[rows, width]`` of one dtype; ``mean`` and ``rstd`` are the
    forward's float32 per-row statistics of ``x + sum_weight``; ``weight`` is ``[width]`` or
    None; ``sum_weight`` a one-element tensor or a number. ``needs`` says which of
    (dx, dweight, dbias, dsum_weight) to compute; dweight and dbias come in x's dtype,
    dsum_weight as a float32 scalar zero (see the module doc). ``reduction``, ``"partials"``
    or ``"atomics"``, says how the column sums are reduced over programs (None: chosen by
    width, :func:`kernels.backward_reduce.choose_reduction`); ``programs`` overrides the size
    of the persistent grid (for measuring; None: one wave); ``config`` overrides the table or
    heuristic config; ``dx_out`` is an optional contiguous buffer for dx.
    """
    rows, width = x.shape
    reduction = choose_reduction(width, reduction)
    if tuple(dy.shape) != (rows, width) or dy.dtype != x.dtype:
        raise ValueError(f"dy must have x's shape {(rows, width)} and dtype {x.dtype}, got "
                         f"{tuple(dy.shape)} {dy.dtype}")
    need_dx, need_dweight, need_dbias, need_dsum = needs
    need_dweight = need_dweight and weight is not None
    if config is None:
        call = AddLayerNormBackwardCall(
            rows, width, x.dtype, weight is not None,
            sum_weight.dtype if isinstance(sum_weight, torch.Tensor) else None, reduction)
        config, _ = ADD_LAYERNORM_BACKWARD.select(call, device_name(x.device))
    dx = None
    if need_dx:
        dx = torch.empty_like(x) if dx_out is None else dx_out
    dsum = torch.zeros((), device=x.device) if need_dsum else None
    if rows == 0:
        zeros = torch.zeros(width, dtype=x.dtype, device=x.device)
        return Gradients(dx, zeros if need_dweight else None, zeros if need_dbias else None, dsum)
    if not (need_dx or need_dweight or need_dbias):
        return Gradients(None, None, None, dsum)
    sum_tensor, sum_value = (sum_weight, 0.0) if isinstance(sum_weight, torch.Tensor) \
        else (None, float(sum_weight))
    partials = ADD_LAYERNORM_BACKWARD.launch(x, dy, dx, weight, mean, rstd, sum_tensor, sum_value,
                                             rows, width, config, (need_dweight, need_dbias),
                                             reduction == "atomics", programs)
    sums = column_sums(partials, width, need_dweight + need_dbias, x.dtype) \
        if partials is not None else []
    return Gradients(dx, sums[0] if need_dweight else None, sums[-1] if need_dbias else None, dsum)
