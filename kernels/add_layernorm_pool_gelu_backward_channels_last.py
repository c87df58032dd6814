"""The channels-last kernel of the backward of ``GELU(AvgPool3d(LayerNorm_W(x + sum_weight)))``
(its launcher, descriptors and the row kernel are ``kernels/add_layernorm_pool_gelu_backward.py``).

For x, dy and dx in ``torch.channels_last_3d`` (ModelNew's training
layout, behind cuDNN's channels-last convolution): the same steps on the channels-last
forward's tiles, one ``(n, do, ho)`` and ``BLOCK_C`` channels, ``[BLOCK_WO, KW_PAD, BLOCK_C]``
loads contiguous along the channels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import gelu_grad, load_shift


@triton.jit
def _xhat_cl(x_ptr, mean_ptr, rstd_ptr, row, chans, chan_mask, offsets, mask, shift, width,
             channels, EVICTION_POLICY: tl.constexpr):
    """The normalised ``[BLOCK_WO, KW_PAD, BLOCK_C]`` tile of channels-last input row ``row``
    (one ``(n, d, h)``; zero where masked) and the channels' rstd."""
    x = tl.load(x_ptr + row * width * channels + offsets, mask=mask, other=0.0,
                eviction_policy=EVICTION_POLICY)
    mean = tl.load(mean_ptr + row * channels + chans, mask=chan_mask, other=0.0)
    rstd = tl.load(rstd_ptr + row * channels + chans, mask=chan_mask, other=0.0)
    xhat = tl.where(mask, (x.to(tl.float32) + shift - mean[None, None, :]) * rstd[None, None, :],
                    0.0)
    return xhat, rstd


@triton.jit(do_not_specialize=["partial_stride", "tiles_per_program"],
            do_not_specialize_on_alignment=["dweight_partial_ptr", "dbias_partial_ptr"])
def _add_layernorm_pool_gelu_backward_cl_kernel(
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
    channels,
    channel_blocks,
    groups,
    depth,
    height,
    width,
    out_depth,
    out_height,
    out_width,
    tiles_per_program,
    BLOCK_C: tl.constexpr,
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
    """The row kernel's mirror for channels-last x, dy and dx (memory order N, D, H, W, C):
    a tile is one ``(n, do, ho)`` group and ``BLOCK_C`` channels (channel block fastest), as
    in the channels-last forward; a LayerNorm row is one channel's column of a ``[W, C]``
    slab, so its sums run over the tile's first two axes."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    wo = tl.arange(0, BLOCK_WO)
    ks = tl.arange(0, KW_PAD)
    cols = wo[:, None] * KW + ks[None, :]
    col_mask = (ks < KW)[None, :] & (cols < width)
    in_window = (ks < KW)[None, :] & (wo < out_width)[:, None]
    shift = load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, :, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, :, None]
    scale = 1.0 / (KD * KH * KW)
    dweight_acc = tl.zeros([BLOCK_WO, KW_PAD], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_WO, KW_PAD], dtype=tl.float32)
    for step in range(0, tiles_per_program):
        # 64-bit: offsets may pass 2**31.
        tile = (pid + step * programs).to(tl.int64)
        group = tile // channel_blocks
        chans = (tile % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        # No channel is valid past the last group (the last step's tiles may run over).
        chan_mask = chans < tl.where(group < groups, channels, 0)
        ho = group % out_height
        rest = group // out_height
        do = rest % out_depth
        n = rest // out_depth
        first_row = (n * depth + do * KD) * height + ho * KH
        offsets = cols.to(tl.int64)[:, :, None] * channels + chans[None, None, :]
        mask = col_mask[:, :, None] & chan_mask[None, None, :]

        # The pre-GELU pooled value v, rebuilt from x and the saved statistics.
        acc = tl.zeros([BLOCK_WO, KW_PAD, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                xhat, _ = _xhat_cl(x_ptr, mean_ptr, rstd_ptr, first_row + (i * height + j), chans,
                                   chan_mask, offsets, mask, shift, width, channels,
                                   EVICTION_POLICY)
                acc += xhat
        if HAS_WEIGHT:
            acc = acc * weight
        if HAS_BIAS:
            acc = acc + (KD * KH) * bias
        v = tl.sum(acc, axis=1) * scale
        out_mask = (wo < out_width)[:, None] & chan_mask[None, :]
        dy = tl.load(dy_ptr + (group * out_width + wo[:, None]) * channels + chans[None, :],
                     mask=out_mask, other=0.0).to(tl.float32)
        dv = dy * gelu_grad(v, APPROX_TANH) * scale
        dn = tl.where(in_window[:, :, None] & chan_mask[None, None, :], dv[:, None, :], 0.0)
        if HAS_WEIGHT:
            g = dn * weight
        else:
            g = dn
        if COMPUTE_DBIAS:
            dbias_acc += (KD * KH) * tl.sum(dn, axis=2)

        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                row = first_row + (i * height + j)
                xhat, rstd = _xhat_cl(x_ptr, mean_ptr, rstd_ptr, row, chans, chan_mask, offsets,
                                      mask, shift, width, channels, EVICTION_POLICY)
                if STORE_DX:
                    c1 = tl.sum(tl.sum(g * xhat, axis=1), axis=0) / width
                    c2 = tl.sum(tl.sum(g, axis=1), axis=0) / width
                    dx = (g - c2[None, None, :] - xhat * c1[None, None, :]) * rstd[None, None, :]
                    tl.store(dx_ptr + row * width * channels + offsets,
                             dx.to(dx_ptr.dtype.element_ty), mask=mask,
                             eviction_policy=EVICTION_POLICY)
                if COMPUTE_DWEIGHT:
                    dweight_acc += tl.sum(dn * xhat, axis=2)

    partial = pid.to(tl.int64) * partial_stride + cols
    if COMPUTE_DWEIGHT:
        tl.store(dweight_partial_ptr + partial, dweight_acc, mask=col_mask)
    if COMPUTE_DBIAS:
        tl.store(dbias_partial_ptr + partial, dbias_acc, mask=col_mask)
