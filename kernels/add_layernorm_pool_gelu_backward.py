"""The backward of ``GELU(AvgPool3d(LayerNorm_W(x + sum_weight)))``: the Triton kernels, their
descriptors and launcher (the forward is ``kernels/add_layernorm_pool_gelu.py``).

Row kernel, for contiguous x ``[N, C, D, H, W]``: each program walks tiles of ``BLOCK_ROWS`` pooled rows
(programs interleaved, as in ``kernels/add_layernorm_backward.py``). For a tile it rebuilds
the pre-GELU pooled value ``v`` from x and the forward's float32 row mean and rstd (the
forward stores nothing else), takes ``dv = dy * gelu'(v) / (KD * KH * KW)``, spreads it back
over each pooling window as the gradient ``dn`` of every LayerNorm output element (zero for
the columns the floor-mode pooling drops), then reads each of the ``KD * KH`` input rows again
for the LayerNorm backward: ``dx = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat))``
with ``g = dn * weight``. Input rows that no pooling window covers get a zero gradient.
A row is loaded as a ``[BLOCK_ROWS, BLOCK_WO, KW_PAD]`` tile holding column ``wo * KW + k``,
which for a power-of-two ``KW`` is the plain contiguous row. The grid is persistent and each
program stores its column sums for dweight and dbias into its own row of a float32 array of
partial sums, summed over programs by :func:`kernels.backward_reduce.column_sums`. The
gradient of sum_weight is zero in exact arithmetic (the LayerNorm ignores a shift of its row;
``kernels/add_layernorm_backward.py``) and is not computed.

The channels-last kernel (``kernels/add_layernorm_pool_gelu_backward_channels_last.py``)
takes ModelNew's training layout; this module's launcher runs either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import gelu_grad, launch_or_compile, load_shift, stand_in_tensors
from ._pool_gelu import PoolGeluCall, PoolGeluDescriptor
from .add_layernorm_backward import Gradients
from .add_layernorm_pool_gelu_backward_channels_last import (
    _add_layernorm_pool_gelu_backward_cl_kernel,
)
from .backward_reduce import column_sums, partial_sums, program_count, resident_programs
from .config import MAX_TILE_ELEMENTS, LaunchConfig
from .device import device_name, interpreter_enabled


@triton.jit
def _xhat(x_ptr, mean_ptr, rstd_ptr, row, row_mask, cols, mask, shift, width,
          EVICTION_POLICY: tl.constexpr):
    """The normalised ``[BLOCK_ROWS, BLOCK_WO, KW_PAD]`` tile of input rows ``row`` (zero where
    masked) and the rows' rstd."""
    x = tl.load(x_ptr + (row * width)[:, None, None] + cols[None, :, :], mask=mask, other=0.0,
                eviction_policy=EVICTION_POLICY)
    mean = tl.load(mean_ptr + row, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)
    xhat = tl.where(mask, (x.to(tl.float32) + shift - mean[:, None, None]) * rstd[:, None, None],
                    0.0)
    return xhat, rstd


# The tile count and the partial sums' row and pointers are touched once a program: not
# specialised, so that compiling ahead of the launch (resident_programs) with stand-ins gives
# the very kernel the launch runs.
@triton.jit(do_not_specialize=["partial_stride", "tiles_per_program"],
            do_not_specialize_on_alignment=["dweight_partial_ptr", "dbias_partial_ptr"])
def _add_layernorm_pool_gelu_backward_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    sum_weight_ptr,
    sum_weight_value,
    dweight_partial_ptr,
    dbias_partial_ptr,
    partial_stride,
    pooled_rows,
    depth,
    height,
    width,
    out_depth,
    out_height,
    out_width,
    tiles_per_program,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WO: tl.constexpr,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KW_PAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SUM_FROM_PTR: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    STORE_DX: tl.constexpr,
    COMPUTE_DWEIGHT: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    EVICTION_POLICY: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    wo = tl.arange(0, BLOCK_WO)
    ks = tl.arange(0, KW_PAD)
    cols = wo[:, None] * KW + ks[None, :]
    col_mask = (ks < KW)[None, :] & (cols < width)
    # Columns some pooling window covers (floor mode drops the last width % KW).
    in_window = (ks < KW)[None, :] & (wo < out_width)[:, None]
    shift = load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = 1.0 / (KD * KH * KW)
    dweight_acc = tl.zeros([BLOCK_WO, KW_PAD], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_WO, KW_PAD], dtype=tl.float32)
    for step in range(0, tiles_per_program):
        # 64-bit: rows * width may pass 2**31.
        pooled = (pid + step * programs).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = pooled < pooled_rows
        ho = pooled % out_height
        rest = pooled // out_height
        do = rest % out_depth
        nc = rest // out_depth
        first_row = (nc * depth + do * KD) * height + ho * KH
        mask = row_mask[:, None, None] & col_mask[None, :, :]

        # The pre-GELU pooled value v, rebuilt from x and the saved statistics.
        acc = tl.zeros([BLOCK_ROWS, BLOCK_WO, KW_PAD], dtype=tl.float32)
        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                xhat, _ = _xhat(x_ptr, mean_ptr, rstd_ptr, first_row + (i * height + j), row_mask,
                                cols, mask, shift, width, EVICTION_POLICY)
                acc += xhat
        if HAS_WEIGHT:
            acc = acc * weight[None, :, :]
        if HAS_BIAS:
            acc = acc + (KD * KH) * bias[None, :, :]
        v = tl.sum(acc, axis=2) * scale
        out_mask = row_mask[:, None] & (wo < out_width)[None, :]
        dy = tl.load(dy_ptr + pooled[:, None] * out_width + wo[None, :], mask=out_mask,
                     other=0.0).to(tl.float32)
        dv = dy * gelu_grad(v, APPROX_TANH) * scale
        # dn: the gradient of each LayerNorm output element of the window's rows.
        dn = tl.where(row_mask[:, None, None] & in_window[None, :, :], dv[:, :, None], 0.0)
        if HAS_WEIGHT:
            g = dn * weight[None, :, :]
        else:
            g = dn
        if COMPUTE_DBIAS:
            dbias_acc += (KD * KH) * tl.sum(dn, axis=0)

        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                row = first_row + (i * height + j)
                xhat, rstd = _xhat(x_ptr, mean_ptr, rstd_ptr, row, row_mask, cols, mask, shift,
                                   width, EVICTION_POLICY)
                if STORE_DX:
                    c1 = tl.sum(tl.sum(g * xhat, axis=2), axis=1) / width
                    c2 = tl.sum(tl.sum(g, axis=2), axis=1) / width
                    dx = (g - c2[:, None, None] - xhat * c1[:, None, None]) * rstd[:, None, None]
                    tl.store(dx_ptr + (row * width)[:, None, None] + cols[None, :, :],
                             dx.to(dx_ptr.dtype.element_ty), mask=mask,
                             eviction_policy=EVICTION_POLICY)
                if COMPUTE_DWEIGHT:
                    dweight_acc += tl.sum(dn * xhat, axis=0)

    partial = pid.to(tl.int64) * partial_stride + cols
    if COMPUTE_DWEIGHT:
        tl.store(dweight_partial_ptr + partial, dweight_acc, mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(dbias_partial_ptr + partial, dbias_acc, mask=col_mask)


def _tiling(dims: tuple[int, ...], pool_kernel: tuple[int, int, int],
            config: LaunchConfig, channels_last: bool) -> tuple[int, int, int]:
    """``(block_wo, kw_pad, row_tiles)`` of a launch; a ValueError for a config that cannot run
    the problem."""
    width = dims[4]
    kd, kh, kw = pool_kernel
    if config.block_w < width:
        raise ValueError(f"config.block_w={config.block_w} must be a power of two >= W={width}")
    block_wo = triton.next_power_of_2(triton.cdiv(config.block_w, kw))
    kw_pad = triton.next_power_of_2(kw)
    if config.block_rows * block_wo * kw_pad > MAX_TILE_ELEMENTS:
        raise ValueError(f"config block_rows={config.block_rows}, block_w={config.block_w} with "
                         f"pool width {kw} needs a tile over Triton's limit of "
                         f"{MAX_TILE_ELEMENTS} elements")
    batch, channels, depth, height, _ = dims
    groups = batch * (depth // kd) * (height // kh)
    if channels_last:
        row_tiles = groups * triton.cdiv(channels, config.block_rows)
    else:
        row_tiles = triton.cdiv(groups * channels, config.block_rows)
    return block_wo, kw_pad, row_tiles


class AddLayerNormPoolGeluBackward(PoolGeluDescriptor):
    """The fused tail's backward kernel, with all gradients, on contiguous or
    (``channels_last``) channels-last x, dy and dx."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__("add_layernorm_pool_gelu_backward", channels_last)

    def default_config(self, call: PoolGeluCall, device: str | None = None) -> LaunchConfig:
        """The forward's tile with a warp per 256 elements of it (1 to 16 warps, never fewer
        than the forward's), as the backward keeps several float32 values per element live
        where the forward keeps one."""
        forward = self.forward_default(call, device)
        kw = call.pool_kernel[2]
        tile = forward.block_rows * triton.next_power_of_2(triton.cdiv(forward.block_w, kw)) \
            * triton.next_power_of_2(kw)
        num_warps = max(forward.num_warps, min(16, triton.next_power_of_2(max(1, tile // 256))))
        return LaunchConfig(block_rows=forward.block_rows, block_w=forward.block_w,
                            num_warps=num_warps)

    def compile(self, call: PoolGeluCall, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """A no-op under the interpreter, which compiles nothing."""
        if interpreter_enabled():
            return
        device = torch.device(device)
        tiny, weight, bias, sum_tensor = stand_in_tensors(call.dtype, call.has_weight,
                                                          call.has_bias, call.sum_weight_dtype,
                                                          device)
        stats = torch.empty(16, dtype=torch.float32, device=device)
        self.launch(tiny, tiny, tiny, weight, bias, stats, stats, sum_tensor, 0.0, call.shape,
                    call.pool_kernel, call.approximate, config, (call.has_weight, call.has_bias),
                    warmup=True)

    def launch(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor | None,
               weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
               rstd: torch.Tensor, sum_tensor: torch.Tensor | None, sum_value: float,
               dims: tuple[int, ...], pool_kernel: tuple[int, int, int], approximate: str,
               config: LaunchConfig, compute: tuple[bool, bool],
               warmup: bool = False) -> torch.Tensor | None:
        """Launches the row or channels-last backward kernel for x of shape ``dims`` on its
        persistent grid and returns the float32 ``[programs, columns]`` partial sums it stored
        (dweight's columns first, then dbias's; None when neither is computed). With ``warmup``,
        only compiles the kernel."""
        batch, channels, depth, height, width = dims
        kd, kh, kw = pool_kernel
        out_depth, out_height, out_width = depth // kd, height // kh, width // kw
        block_wo, kw_pad, row_tiles = _tiling(dims, pool_kernel, config, self.channels_last)
        meta = dict(BLOCK_WO=block_wo, KD=kd, KH=kh, KW=kw, KW_PAD=kw_pad,
                    HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                    SUM_FROM_PTR=sum_tensor is not None, APPROX_TANH=approximate == "tanh",
                    STORE_DX=dx is not None, COMPUTE_DWEIGHT=compute[0], COMPUTE_DBIAS=compute[1],
                    EVICTION_POLICY=config.eviction_policy, num_warps=config.num_warps,
                    num_stages=config.num_stages)
        groups = batch * out_depth * out_height
        if self.channels_last:
            kernel = _add_layernorm_pool_gelu_backward_cl_kernel
            shape_args = (channels, triton.cdiv(channels, config.block_rows), groups)
            meta["BLOCK_C"] = config.block_rows
        else:
            kernel = _add_layernorm_pool_gelu_backward_kernel
            shape_args = (groups * channels,)
            meta["BLOCK_ROWS"] = config.block_rows

        def arguments(dweight_partial: torch.Tensor, dbias_partial: torch.Tensor, stride: int,
                      tiles_per_program: int) -> tuple:
            return (x, dy, dx if dx is not None else x, weight if weight is not None else x,
                    bias if bias is not None else x, mean, rstd,
                    sum_tensor if sum_tensor is not None else x, sum_value, dweight_partial,
                    dbias_partial, stride, *shape_args, depth, height, width, out_depth, out_height,
                    out_width, tiles_per_program)

        # Stand-ins for what is not specialised on (see the kernels): the kernel they compile is
        # the one launched.
        stand_ins = arguments(mean, mean, 0, 2)
        if warmup:
            launch_or_compile(kernel, (1,), stand_ins, meta, warmup=True)
            return None
        # A tile holds block_rows pooled rows (or channels), each of kd * kh input rows.
        programs = program_count(row_tiles, config.block_rows * kd * kh,
                                 resident_programs(kernel, stand_ins, meta, x))
        columns = (compute[0] + compute[1]) * width
        partials = partial_sums(programs, columns, False, False, x.device) if columns else None
        kernel[(programs,)](*arguments(partials if compute[0] else mean,
                                       partials[:, columns - width:] if compute[1] else mean,
                                       columns, triton.cdiv(row_tiles, programs)), **meta)
        return partials


ADD_LAYERNORM_POOL_GELU_BACKWARD = AddLayerNormPoolGeluBackward(channels_last=False)
ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST = AddLayerNormPoolGeluBackward(channels_last=True)


def add_layernorm_pool_gelu_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    sum_weight: torch.Tensor | float,
    pool_kernel: tuple[int, int, int],
    approximate: str,
    config: LaunchConfig | None = None,
    *,
    channels_last: bool = False,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    dx_out: torch.Tensor | None = None,
) -> Gradients:
    """Gradients of the fused tail given the pooled output's gradient ``dy``.

    x is ``[N, C, D, H, W]`` and dy ``[N, C, D // kd, H // kh, W // kw]``, both of x's dtype,
    both contiguous or, with ``channels_last``, both ``channels_last_3d`` (dx then is too);
    ``mean`` and ``rstd`` are the forward's float32 statistics of the ``N * C * D * H`` input
    rows in x's layout (only those a pooling window covers are read). ``needs`` says which of
    (dx, dweight, dbias, dsum_weight) to compute; dweight and dbias come in x's dtype,
    dsum_weight as a float32 scalar zero (see the module doc). ``config``: ``block_rows``
    pooled rows (channels, for channels-last) per tile, ``block_w`` covering W; None: the
    tables', else the default. ``dx_out`` is an optional buffer for dx in x's layout.
    """
    batch, channels, depth, height, width = x.shape
    kd, kh, kw = pool_kernel
    out_depth, out_height, out_width = depth // kd, height // kh, width // kw
    if tuple(dy.shape) != (batch, channels, out_depth, out_height, out_width):
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected the pooled shape "
                         f"{(batch, channels, out_depth, out_height, out_width)}")
    descriptor = ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST if channels_last \
        else ADD_LAYERNORM_POOL_GELU_BACKWARD
    if config is None:
        call = PoolGeluCall(tuple(x.shape), x.dtype, tuple(pool_kernel), approximate,
                            weight is not None, bias is not None,
                            sum_weight.dtype if isinstance(sum_weight, torch.Tensor) else None)
        config, _ = descriptor.select(call, device_name(x.device))
    _, _, row_tiles = _tiling(tuple(x.shape), pool_kernel, config, channels_last)
    need_dx, need_dweight, need_dbias, need_dsum = needs
    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    dx = None
    if need_dx:
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        dx = torch.empty_like(x, memory_format=memory_format) if dx_out is None else dx_out
        if depth != out_depth * kd or height != out_height * kh:
            # Rows no pooling window covers are never visited: their gradient is zero.
            dx.zero_()
    dsum = torch.zeros((), device=x.device) if need_dsum else None
    if row_tiles == 0:
        zeros = torch.zeros(width, dtype=x.dtype, device=x.device)
        return Gradients(dx, zeros if need_dweight else None, zeros if need_dbias else None, dsum)
    if not (need_dx or need_dweight or need_dbias):
        return Gradients(None, None, None, dsum)
    sum_tensor, sum_value = (sum_weight, 0.0) if isinstance(sum_weight, torch.Tensor) \
        else (None, float(sum_weight))
    partials = descriptor.launch(x, dy, dx, weight, bias, mean, rstd, sum_tensor, sum_value,
                                 tuple(x.shape), pool_kernel, approximate, config,
                                 (need_dweight, need_dbias))
    sums = column_sums(partials, width, need_dweight + need_dbias, x.dtype) \
        if partials is not None else []
    return Gradients(dx, sums[0] if need_dweight else None, sums[-1] if need_dbias else None, dsum)
