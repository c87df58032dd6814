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

Channels-last x (``torch.channels_last_3d``) has its own kernel
(``kernels/add_layernorm_pool_gelu_channels_last.py``), so that a channels-last convolution in
front needs no ``.contiguous()`` copy; this module's launcher runs either. Both kernels share
the small ``@triton.jit`` helpers of ``kernels/_common.py`` for sum_weight, the normalisation,
the affine step and GELU. Their descriptors, :data:`ADD_LAYERNORM_POOL_GELU` and
:data:`ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST`, share one table kernel name.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    affine,
    check_approximate,
    check_device,
    check_eps,
    check_no_out_with_autograd,
    check_param,
    check_tensor,
    gelu,
    gradients_required,
    launch_or_compile,
    load_shift,
    normalized_rows,
    split_sum_weight,
    stand_in_tensors,
    store_stats,
    sum_weight_dtype,
)
# APPROXIMATE and POOL_KERNEL, the tuner's pooling and GELU, are re-exported for tuner/problems.
from ._pool_gelu import APPROXIMATE, POOL_KERNEL  # noqa: F401
from ._pool_gelu import PoolGeluCall, PoolGeluDescriptor, pool_kernel_tuple
from .add_layernorm_pool_gelu_backward import add_layernorm_pool_gelu_backward
from .add_layernorm_pool_gelu_channels_last import _add_layernorm_pool_gelu_cl_kernel
from .autotune import autotune_enabled, tune_add_layernorm_pool_gelu
from .config import MAX_TILE_ELEMENTS, LaunchConfig
from .device import device_name, interpreter_enabled

@triton.jit
def _add_layernorm_pool_gelu_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    sum_weight_ptr,
    sum_weight_value,
    mean_ptr,
    rstd_ptr,
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
    STORE_STATS: tl.constexpr,
):
    """x contiguous ``[N, C, D, H, W]``: ``BLOCK_ROWS`` pooled rows ``(n, c, do, ho)`` a program.

    With ``STORE_STATS`` the float32 mean and rstd of each input row ``(n, c, d, h)`` it reads
    go to ``mean_ptr`` and ``rstd_ptr`` (for the backward)."""
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
    shift = load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR)

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
                normalized, mean, rstd = normalized_rows(x, mask, shift, width, eps, 1, -1)
                acc += normalized
                if STORE_STATS:
                    store_stats(mean_ptr, rstd_ptr, first_row + (i * height + j), mean, rstd,
                                 row_mask)
        acc = affine(acc, weight_ptr, bias_ptr, cols, col_mask, 0, HAS_WEIGHT, HAS_BIAS,
                      KD * KH)
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
                normalized, mean, rstd = normalized_rows(x, mask, shift, width, eps, 2, 1)
                acc += normalized
                if STORE_STATS:
                    store_stats(mean_ptr, rstd_ptr, first_row + (i * height + j), mean, rstd,
                                 row_mask)
        acc = affine(acc, weight_ptr, bias_ptr, cols, col_mask, 0, HAS_WEIGHT, HAS_BIAS,
                      KD * KH)
        total = tl.sum(acc, axis=2)

    y = gelu(total * (1.0 / (KD * KH * KW)), APPROX_TANH)
    out_mask = row_mask[:, None] & (wo < out_width)[None, :]
    tl.store(out_ptr + pooled[:, None] * out_width + wo[None, :], y.to(out_ptr.dtype.element_ty),
             mask=out_mask, eviction_policy=EVICTION_POLICY)


class AddLayerNormPoolGelu(PoolGeluDescriptor):
    """The fused tail's forward kernel, on contiguous or (``channels_last``) channels-last x."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__("add_layernorm_pool_gelu", channels_last)

    def default_config(self, call: PoolGeluCall, device: str | None = None) -> LaunchConfig:
        return self.forward_default(call, device)

    def compile(self, call: PoolGeluCall, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """A no-op under the interpreter, which compiles nothing."""
        if interpreter_enabled():
            return
        x, weight, bias, sum_tensor = stand_in_tensors(call.dtype, call.has_weight, call.has_bias,
                                                       call.sum_weight_dtype, device)
        self.launch(x, x, weight, bias, sum_tensor, 0.0, 1e-5, call.shape, call.pool_kernel,
                    call.approximate, config, warmup=True)

    def launch(self, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None, sum_tensor: torch.Tensor | None, sum_value: float,
               eps: float, dims: tuple[int, ...], pool_kernel: tuple[int, int, int],
               approximate: str, config: LaunchConfig, warmup: bool = False,
               stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Launches the row or channels-last kernel for x of shape ``dims`` (or, with ``warmup``,
        only compiles it). ``stats``, float32 ``(mean, rstd)`` of ``N * C * D * H`` elements each,
        receive the statistics of the input rows (in x's layout: channels fastest when
        channels-last)."""
        batch, channels, depth, height, width = dims
        kd, kh, kw = pool_kernel
        out_depth, out_height, out_width = depth // kd, height // kh, width // kw
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
        args = (x, out,
                weight if weight is not None else x,
                bias if bias is not None else x,
                sum_tensor if sum_tensor is not None else x,
                sum_value) + (stats if stats is not None else (x, x))
        meta = dict(BLOCK_W=config.block_w, BLOCK_WO=block_wo, KD=kd, KH=kh, KW=kw, KW_PAD=kw_pad,
                    POOL_BY_RESHAPE=pool_by_reshape, HAS_WEIGHT=weight is not None,
                    HAS_BIAS=bias is not None, SUM_FROM_PTR=sum_tensor is not None,
                    APPROX_TANH=approximate == "tanh", EVICTION_POLICY=config.eviction_policy,
                    STORE_STATS=stats is not None, num_warps=config.num_warps,
                    num_stages=config.num_stages)
        if self.channels_last:
            # One program per (n, do, ho) and block of block_rows channels.
            channel_blocks = triton.cdiv(channels, config.block_rows)
            kernel = _add_layernorm_pool_gelu_cl_kernel
            grid = (batch * out_depth * out_height * channel_blocks,)
            args += (channels, channel_blocks)
            meta["BLOCK_C"] = config.block_rows
        else:
            kernel = _add_layernorm_pool_gelu_kernel
            grid = (triton.cdiv(batch * channels * out_depth * out_height, config.block_rows),)
            args += (batch * channels * out_depth * out_height,)
            meta["BLOCK_ROWS"] = config.block_rows
        args += (depth, height, width, out_depth, out_height, out_width, eps)
        launch_or_compile(kernel, grid, args, meta, warmup)


ADD_LAYERNORM_POOL_GELU = AddLayerNormPoolGelu(channels_last=False)
ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST = AddLayerNormPoolGelu(channels_last=True)


def _descriptor(channels_last: bool) -> AddLayerNormPoolGelu:
    return ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST if channels_last else ADD_LAYERNORM_POOL_GELU


class _AddLayerNormPoolGeluFunction(torch.autograd.Function):
    """The fused tail with a Triton backward (``kernels/add_layernorm_pool_gelu_backward.py``);
    the forward also saves the float32 mean and rstd of the input rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sum_tensor: torch.Tensor | None, sum_value: float,
                weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                pool_kernel: tuple[int, int, int], approximate: str, config: LaunchConfig,
                channels_last: bool) -> torch.Tensor:
        batch, channels, depth, height, width = x.shape
        kd, kh, kw = pool_kernel
        memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        out = torch.empty((batch, channels, depth // kd, height // kh, width // kw),
                          dtype=x.dtype, device=x.device, memory_format=memory_format)
        mean, rstd = torch.empty((2, batch * channels * depth * height), dtype=torch.float32,
                                 device=x.device)
        if out.numel():
            _descriptor(channels_last).launch(x, out, weight, bias, sum_tensor, sum_value, eps,
                                              tuple(x.shape), pool_kernel, approximate, config,
                                              stats=(mean, rstd))
        ctx.save_for_backward(x, weight, bias, mean, rstd, sum_tensor)
        ctx.sum_value, ctx.pool_kernel, ctx.approximate = sum_value, pool_kernel, approximate
        ctx.channels_last = channels_last
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, bias, mean, rstd, sum_tensor = ctx.saved_tensors
        need_dx, need_dsum, _, need_dweight, need_dbias = ctx.needs_input_grad[:5]
        memory_format = torch.channels_last_3d if ctx.channels_last else torch.contiguous_format
        grads = add_layernorm_pool_gelu_backward(
            dy.contiguous(memory_format=memory_format), x, weight, bias, mean, rstd,
            sum_tensor if sum_tensor is not None else ctx.sum_value, ctx.pool_kernel,
            ctx.approximate, channels_last=ctx.channels_last,
            needs=(need_dx, need_dweight, need_dbias, False))
        # Zero in exact arithmetic (kernels/add_layernorm_backward.py), made in its own dtype.
        dsum = torch.zeros_like(sum_tensor) if need_dsum else None
        return grads.dx, dsum, None, grads.dweight, grads.dbias, None, None, None, None, None


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
    in float32; the output ``[N, C, D // kd, H // kh, W // kw]`` has x's dtype.

    Layouts: contiguous x runs the row kernel and gives a contiguous output; x in
    ``torch.channels_last_3d`` (and not also contiguous) runs the channels-last kernel, which
    reads x in place and writes a ``channels_last_3d`` output; x of any other strides is
    copied with ``x.contiguous()`` first. ``config`` overrides the tuned/heuristic launch
    config; its ``block_w`` must cover W; for channels-last x its ``block_rows`` is the number
    of channels per program. ``out`` is an optional output tensor of the pooled shape, x's
    dtype and device, in the output's layout (contiguous, or ``channels_last_3d`` for
    channels-last x).

    Differentiable in x, a tensor ``sum_weight``, weight and bias: when grad mode is on and
    one of them requires grad, the forward also saves the float32 mean and rstd of the input
    rows and the backward runs the Triton kernels of
    ``kernels/add_layernorm_pool_gelu_backward.py`` (either layout; dx in x's layout). ``out``
    cannot be given then.
    """
    check_tensor("x", x)
    if x.dim() != 5:
        raise ValueError(f"x must be 5-D [N, C, D, H, W], got shape {tuple(x.shape)}")
    batch, channels, depth, height, width = x.shape
    kd, kh, kw = pool_kernel_tuple(pool_kernel)
    if kd > depth or kh > height or kw > width:
        raise ValueError(f"pool_kernel {(kd, kh, kw)} is larger than x's spatial dims "
                         f"(D, H, W) = {(depth, height, width)}")
    check_approximate(approximate)
    check_param("weight", weight, x, (width,))
    check_param("bias", bias, x, (width,))
    sum_tensor, sum_value = split_sum_weight(sum_weight, x)
    check_eps(eps)
    check_device(x)

    track = gradients_required(x, sum_weight, weight, bias)
    check_no_out_with_autograd(out, track)
    # A tensor both contiguous and channels-last (C == 1, or size-1 spatial dims) takes the
    # row kernel: the two layouts coincide there.
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    out_depth, out_height, out_width = depth // kd, height // kh, width // kw
    out_shape = (batch, channels, out_depth, out_height, out_width)
    if out is None:
        if not track:  # the autograd path allocates its own
            out = torch.empty(out_shape, dtype=x.dtype, device=x.device,
                              memory_format=memory_format)
    else:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape \
                or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be a tensor of shape {out_shape} with x's dtype and "
                             "device")
        if not out.is_contiguous(memory_format=memory_format):
            if channels_last:
                raise ValueError(
                    "out must be in channels_last_3d memory format (out.is_contiguous("
                    "memory_format=torch.channels_last_3d)) because x is channels-last and the "
                    "output is written in x's layout; allocate it with torch.empty(..., "
                    f"memory_format=torch.channels_last_3d); got strides {out.stride()}")
            raise ValueError("out must be a contiguous tensor (out.is_contiguous()) because x "
                             "is contiguous or not channels-last and the output is written in "
                             f"the contiguous NCDHW layout; got strides {out.stride()}")
    if not track and out.numel() == 0:
        return out
    descriptor = _descriptor(channels_last)
    if config is None:
        call = PoolGeluCall(tuple(x.shape), x.dtype, (kd, kh, kw), approximate, weight is not None,
                            bias is not None, sum_weight_dtype(sum_tensor))
        config, source = descriptor.select(call, device_name(x.device))
        if source != "table" and autotune_enabled():
            config = tune_add_layernorm_pool_gelu(descriptor, call, x, sum_tensor, sum_value,
                                                  weight, bias, float(eps), config)
    elif not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig or None, got {type(config).__name__}")
    if config.block_w < width:
        raise ValueError(f"config.block_w={config.block_w} is less than the row width {width}: "
                         f"this kernel keeps whole rows in registers, so block_w must be a power "
                         f"of two >= {width}")
    if not channels_last:
        x = x.contiguous()
    # The kernels index weight and bias as flat contiguous arrays of ``width`` elements.
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if track:
        return _AddLayerNormPoolGeluFunction.apply(x, sum_tensor, sum_value, weight, bias,
                                                   float(eps), (kd, kh, kw), approximate, config,
                                                   channels_last)
    descriptor.launch(x, out, weight, bias, sum_tensor, sum_value, float(eps), tuple(x.shape),
                      (kd, kh, kw), approximate, config)
    return out
