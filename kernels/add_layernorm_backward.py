"""The backward of ``LayerNorm(x + sum_weight)``: the Triton kernels, their descriptor
(:data:`ADD_LAYERNORM_BACKWARD`) and launcher.

The forward (``kernels/add_layernorm.py``) saves the per-row mean of ``x + sum_weight`` and
its rstd in float32. With ``xhat = (x + sum_weight - mean) * rstd`` and ``g = dy * weight``:

    dx          = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat))
    dweight     = sum over rows of dy * xhat
    dbias       = sum over rows of dy
    dsum_weight = sum of dx over every element

A fixed number of programs (enough resident warps to fill the GPU) each walk many tiles of
``BLOCK_ROWS`` rows, so that the column sums for dweight and dbias are accumulated in registers
across tiles and written once per program: a ``[programs, width]`` float32 array of partial
sums, which a second small kernel sums over programs (``reduction="partials"``). The other
variant, ``reduction="atomics"``, adds each program's sums into a single float32 row with
atomics instead. Rows wider than ``BLOCK_W`` are walked in chunks twice (the row sums first,
then dx); their column sums are added into the program's own partial row with atomics, as a
plain read-modify-write of global memory by one program is not ordered between its threads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import launch_or_compile, stand_in_tensors
from .config import LaunchConfig
from .descriptor import RowsCall, RowsDescriptor
from .device import device_name, interpreter_enabled

REDUCTIONS: tuple[str, ...] = ("partials", "atomics")
# The interpreter runs programs one after another: a few programs still walk several tiles each.
_INTERPRETER_MULTIPROCESSORS = 1
# Warps and programs one streaming multiprocessor keeps resident at most (Hopper).
_WARPS_PER_MULTIPROCESSOR = 64
_PROGRAMS_PER_MULTIPROCESSOR = 32
# Waves of programs (at most resident) per launch: the part-empty last one costs 1/8 on average.
_WAVES = 4
# Each program's partial sums (8 bytes a column, written and read again) cost 16 / (3 * 2 * 64)
# = 4% of the 16-bit backward's bytes (x, dy, dx) over 64 rows.
MIN_ROWS_PER_PROGRAM = 64


@triton.jit
def _add_partials(partial_ptr, offsets, values, mask, ATOMIC: tl.constexpr):
    """Writes a program's column sums: atomically added, or stored into its own row."""
    if ATOMIC:
        tl.atomic_add(partial_ptr + offsets, values, mask=mask)
    else:
        tl.store(partial_ptr + offsets, values, mask=mask)


@triton.jit
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
    dsum_partial_ptr,
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
    COMPUTE_DSUM: tl.constexpr,
    ATOMIC_REDUCE: tl.constexpr,
    EVICTION_POLICY: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    # The program's row of partial sums: its own, or the single shared row of the atomics.
    if ATOMIC_REDUCE:
        partial_start = 0
    else:
        partial_start = pid.to(tl.int64) * width
    cols = tl.arange(0, BLOCK_W)
    if SUM_FROM_PTR:
        shift = tl.load(sum_weight_ptr).to(tl.float32)
    else:
        shift = sum_weight_value
    dsum_acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)

    if SINGLE_PASS:
        col_mask = cols < width
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        # Column sums stay 2-D across tiles (elementwise adds); reduced over rows once at the end.
        dweight_acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_ROWS, BLOCK_W], dtype=tl.float32)
        for step in range(0, tiles_per_program):
            # Tiles interleaved over programs: programs running together read neighbouring rows.
            # 64-bit row offsets: rows * width may pass 2**31 elements.
            row_ids = (pid + step * programs).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_mask = row_ids < rows
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = row_ids[:, None] * width + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION_POLICY)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0,
                         eviction_policy=EVICTION_POLICY).to(tl.float32)
            mean = tl.load(mean_ptr + row_ids, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x.to(tl.float32) + shift - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_WEIGHT:
                g = dy * weight[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / width
            c2 = tl.sum(g, axis=1) / width
            dx = tl.where(mask, (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
            if STORE_DX:
                tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask,
                         eviction_policy=EVICTION_POLICY)
            if COMPUTE_DSUM:
                dsum_acc += tl.sum(dx, axis=1)
            if COMPUTE_DWEIGHT:
                dweight_acc += dy * xhat
            if COMPUTE_DBIAS:
                dbias_acc += dy
        if COMPUTE_DWEIGHT:
            _add_partials(dweight_partial_ptr, partial_start + cols, tl.sum(dweight_acc, axis=0),
                          col_mask, ATOMIC_REDUCE)
        if COMPUTE_DBIAS:
            _add_partials(dbias_partial_ptr, partial_start + cols, tl.sum(dbias_acc, axis=0),
                          col_mask, ATOMIC_REDUCE)
    else:
        for step in range(0, tiles_per_program):
            row_ids = (pid + step * programs).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_mask = row_ids < rows
            row_starts = row_ids * width
            mean = tl.load(mean_ptr + row_ids, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)
            # Pass 1: the row sums of g * xhat and g.
            sum_gxhat = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            sum_g = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
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
                if HAS_WEIGHT:
                    weight = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0)
                    g = dy * weight.to(tl.float32)[None, :]
                else:
                    g = dy
                sum_gxhat += tl.sum(g * xhat, axis=1)
                sum_g += tl.sum(g, axis=1)
            c1 = sum_gxhat / width
            c2 = sum_g / width
            # Pass 2: read x and dy again, write dx and add the column sums.
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
                if HAS_WEIGHT:
                    weight = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0)
                    g = dy * weight.to(tl.float32)[None, :]
                else:
                    g = dy
                dx = tl.where(mask, (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
                if STORE_DX:
                    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask,
                             eviction_policy=EVICTION_POLICY)
                if COMPUTE_DSUM:
                    dsum_acc += tl.sum(dx, axis=1)
                if COMPUTE_DWEIGHT:
                    tl.atomic_add(dweight_partial_ptr + partial_start + col_ids,
                                  tl.sum(dy * xhat, axis=0), mask=col_mask)
                if COMPUTE_DBIAS:
                    tl.atomic_add(dbias_partial_ptr + partial_start + col_ids, tl.sum(dy, axis=0),
                                  mask=col_mask)
    if COMPUTE_DSUM:
        if ATOMIC_REDUCE:
            tl.atomic_add(dsum_partial_ptr, tl.sum(dsum_acc, axis=0))
        else:
            tl.store(dsum_partial_ptr + pid, tl.sum(dsum_acc, axis=0))


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, partial_rows, width, BLOCK_P: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """``out[c] = sum_p partial[p, c]`` (float32 sums), ``BLOCK_C`` columns a program."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < width
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, partial_rows, BLOCK_P):
        part_ids = start + tl.arange(0, BLOCK_P)
        mask = (part_ids < partial_rows)[:, None] & col_mask[None, :]
        acc += tl.load(partial_ptr + part_ids.to(tl.int64)[:, None] * width + cols[None, :],
                       mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The column sums of a float32 ``[programs, width]`` array, as a ``[width]`` tensor of
    ``dtype``."""
    partial_rows, width = partials.shape
    out = torch.empty(width, dtype=dtype, device=partials.device)
    # Narrow column blocks: wide rows spread the sum over many programs.
    block_c = min(64, triton.next_power_of_2(width))
    block_p = max(1, min(64, 4096 // block_c, triton.next_power_of_2(partial_rows)))
    _sum_partials_kernel[(triton.cdiv(width, block_c),)](partials, out, partial_rows, width,
                                                         BLOCK_P=block_p, BLOCK_C=block_c,
                                                         num_warps=4)
    return out


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_count(row_tiles: int, rows_per_tile: int, num_warps: int,
                  device: torch.device) -> int:
    """How many programs walk ``row_tiles`` tiles of ``rows_per_tile`` rows.

    ``_WAVES`` times as many as the GPU could keep resident if registers allowed (registers
    usually allow fewer, which only adds waves), so that the last wave, part empty, costs
    little; but each with at least ``MIN_ROWS_PER_PROGRAM`` rows, so that writing and summing
    the ``[programs, width]`` partial sums stays a few percent of the backward's traffic.
    """
    if device.type == "cuda":
        multiprocessors = _multiprocessors(device.index if device.index is not None
                                           else torch.cuda.current_device())
    else:
        multiprocessors = _INTERPRETER_MULTIPROCESSORS
    per_multiprocessor = max(1, min(_PROGRAMS_PER_MULTIPROCESSOR,
                                    _WARPS_PER_MULTIPROCESSOR // num_warps))
    enough_rows = triton.cdiv(row_tiles, max(1, MIN_ROWS_PER_PROGRAM // rows_per_tile))
    return max(1, min(row_tiles, multiprocessors * per_multiprocessor * _WAVES, enough_rows))


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


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


@dataclasses.dataclass(frozen=True)
class AddLayerNormBackwardCall(RowsCall):
    """A call of :func:`add_layernorm_backward` on ``rows`` rows of ``width``: whether weight
    is given, sum_weight's dtype (None: a Python number) and the reduction of the column sums."""

    has_weight: bool = True
    sum_weight_dtype: torch.dtype | None = None
    reduction: str = "partials"


class AddLayerNormBackward(RowsDescriptor[AddLayerNormBackwardCall]):
    """The add + LayerNorm backward kernel, with all four gradients. The tuner measures it as
    a training step of ModelNew runs it: weight given, sum_weight a tensor of x's dtype."""

    name = "add_layernorm_backward"

    def make_call(self, rows: int, width: int, dtype: torch.dtype) -> AddLayerNormBackwardCall:
        return AddLayerNormBackwardCall(rows, width, dtype, sum_weight_dtype=dtype)

    def default_config(self, call: AddLayerNormBackwardCall,
                       device: str | None = None) -> LaunchConfig:
        return heuristic_config(call.rows, call.width, call.dtype)

    def compile(self, call: AddLayerNormBackwardCall, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """A no-op under the interpreter, which compiles nothing."""
        _check_reduction(call.reduction)
        if interpreter_enabled():
            return
        device = torch.device(device)
        tiny, weight, _, sum_tensor = stand_in_tensors(call.dtype, call.has_weight, False,
                                                       call.sum_weight_dtype, device)
        stats = torch.empty(16, dtype=torch.float32, device=device)
        row_tiles = triton.cdiv(call.rows, config.block_rows)
        programs = program_count(row_tiles, config.block_rows, config.num_warps, device)
        self.launch(tiny, tiny, tiny, weight, stats, stats, sum_tensor, 0.0,
                    (stats, stats, stats), call.rows, call.width, config, programs,
                    triton.cdiv(row_tiles, programs), (call.has_weight, True, True),
                    call.reduction == "atomics", warmup=True)

    def launch(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor | None,
               weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
               sum_tensor: torch.Tensor | None, sum_value: float, partials: tuple,
               rows: int, width: int, config: LaunchConfig, programs: int,
               tiles_per_program: int, compute: tuple[bool, bool, bool], atomic: bool,
               warmup: bool = False) -> None:
        """Launches the backward kernel (or, with ``warmup``, only compiles it)."""
        dweight_partial, dbias_partial, dsum_partial = partials
        args = (x, dy, dx if dx is not None else x, weight if weight is not None else x, mean, rstd,
                sum_tensor if sum_tensor is not None else x, sum_value,
                dweight_partial, dbias_partial, dsum_partial, rows, width, tiles_per_program)
        meta = dict(BLOCK_ROWS=config.block_rows, BLOCK_W=config.block_w,
                    SINGLE_PASS=config.block_w >= width, HAS_WEIGHT=weight is not None,
                    SUM_FROM_PTR=sum_tensor is not None, STORE_DX=dx is not None,
                    COMPUTE_DWEIGHT=compute[0], COMPUTE_DBIAS=compute[1], COMPUTE_DSUM=compute[2],
                    ATOMIC_REDUCE=atomic, EVICTION_POLICY=config.eviction_policy,
                    num_warps=config.num_warps, num_stages=config.num_stages)
        launch_or_compile(_add_layernorm_backward_kernel, (programs,), args, meta, warmup)


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
    reduction: str = "partials",
    dx_out: torch.Tensor | None = None,
) -> Gradients:
    """Gradients of ``LayerNorm(x + sum_weight)`` given the output gradient ``dy``.

    x and dy are contiguous ``[rows, width]`` of one dtype; ``mean`` and ``rstd`` are the
    forward's float32 per-row statistics of ``x + sum_weight``; ``weight`` is ``[width]`` or
    None; ``sum_weight`` a one-element tensor or a number. ``needs`` says which of
    (dx, dweight, dbias, dsum_weight) to compute; dweight and dbias come in x's dtype,
    dsum_weight as a float32 scalar. ``reduction`` is ``"partials"`` or ``"atomics"`` (how
    the column sums are reduced over programs); ``config`` overrides the table or heuristic
    config; ``dx_out`` is an optional contiguous buffer for dx.
    """
    _check_reduction(reduction)
    rows, width = x.shape
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
    if rows == 0:
        zeros = torch.zeros(width, dtype=x.dtype, device=x.device)
        return Gradients(dx, zeros if need_dweight else None, zeros if need_dbias else None,
                         torch.zeros((), device=x.device) if need_dsum else None)
    sum_tensor, sum_value = (sum_weight, 0.0) if isinstance(sum_weight, torch.Tensor) \
        else (None, float(sum_weight))
    row_tiles = triton.cdiv(rows, config.block_rows)
    programs = program_count(row_tiles, config.block_rows, config.num_warps, x.device)
    tiles_per_program = triton.cdiv(row_tiles, programs)
    atomic = reduction == "atomics"
    # Atomics add into zeros; the chunked loop adds chunk by chunk into the program's own row.
    chunked = config.block_w < width
    partial_rows = 1 if atomic else programs
    allocate = torch.zeros if atomic or chunked else torch.empty
    dweight_partial = allocate((partial_rows, width), dtype=torch.float32, device=x.device) \
        if need_dweight else mean
    dbias_partial = allocate((partial_rows, width), dtype=torch.float32, device=x.device) \
        if need_dbias else mean
    dsum_partial = (torch.zeros if atomic else torch.empty)(partial_rows, dtype=torch.float32,
                                                            device=x.device) \
        if need_dsum else mean
    ADD_LAYERNORM_BACKWARD.launch(x, dy, dx, weight, mean, rstd, sum_tensor, sum_value,
                                  (dweight_partial, dbias_partial, dsum_partial), rows, width,
                                  config, programs, tiles_per_program,
                                  (need_dweight, need_dbias, need_dsum), atomic)
    return Gradients(
        dx,
        sum_partials(dweight_partial, x.dtype) if need_dweight else None,
        sum_partials(dbias_partial, x.dtype) if need_dbias else None,
        sum_partials(dsum_partial[:, None], torch.float32)[0] if need_dsum else None,
    )
