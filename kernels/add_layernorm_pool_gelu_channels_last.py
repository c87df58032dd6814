"""The channels-last kernel of ``GELU(AvgPool3d(LayerNorm(x + sum_weight)))`` (its launcher,
descriptors and the row kernel are ``kernels/add_layernorm_pool_gelu.py``).

x is ``torch.channels_last_3d`` (memory order N, D, H, W, C), as a channels-last convolution in
front leaves it. One program takes one ``(n, do, ho)`` and ``BLOCK_C`` channels
(``LaunchConfig.block_rows`` counts channels there). For each of the ``KD * KH`` input rows
``(d, h)`` the ``[W, C]`` slab is contiguous, so the program loads a ``[BLOCK_W, BLOCK_C]``
tile, coalesced along C, whose column c is the LayerNorm row of channel c; the statistics are
taken along axis 0 and the rest mirrors the row kernel (W pooled by a reshape to
``[BLOCK_WO, KW, BLOCK_C]``, or a ``[BLOCK_WO, KW_PAD, BLOCK_C]`` tile for other ``KW``). The
output is written channels-last too: its ``[Wo, BLOCK_C]`` tile is contiguous, one store.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import affine, gelu, load_shift, normalized_rows, store_stats


@triton.jit
def _add_layernorm_pool_gelu_cl_kernel(
    x_ptr,
    out_ptr,
    weight_ptr,
    bias_ptr,
    sum_weight_ptr,
    sum_weight_value,
    mean_ptr,
    rstd_ptr,
    channels,
    channel_blocks,
    depth,
    height,
    width,
    out_depth,
    out_height,
    out_width,
    eps,
    BLOCK_C: tl.constexpr,
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
    """x channels-last (memory order N, D, H, W, C): one ``(n, do, ho)`` and ``BLOCK_C``
    channels a program; a LayerNorm row is one channel's column of a ``[W, C]`` slab.

    With ``STORE_STATS`` the float32 mean and rstd of each input row go to ``mean_ptr`` and
    ``rstd_ptr`` at ``(n, d, h, c)`` (channels fastest, as x)."""
    # Program -> (group, channel block), channel block fastest so that neighbouring programs
    # read neighbouring memory; group = (n * Do + do) * Ho + ho is also the output's (n, do, ho)
    # slab index. 64-bit, as offsets may pass 2**31.
    pid = tl.program_id(0).to(tl.int64)
    group = pid // channel_blocks
    chans = (pid % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_mask = chans < channels
    ho = group % out_height
    rest = group // out_height
    do = rest % out_depth
    n = rest // out_depth
    # The first input row (n, do * KD, ho * KH) of the group: its [W, C] slab starts at
    # first_row * W * C.
    first_row = (n * depth + do * KD) * height + ho * KH
    wo = tl.arange(0, BLOCK_WO)
    shift = load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR)

    if POOL_BY_RESHAPE:
        # Slab tile [BLOCK_W, BLOCK_C], contiguous along C; W pooled by a reshape to
        # [BLOCK_WO, KW, BLOCK_C].
        cols = tl.arange(0, BLOCK_W)
        col_mask = cols < width
        mask = col_mask[:, None] & chan_mask[None, :]
        offsets = cols.to(tl.int64)[:, None] * channels + chans[None, :]
        acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                slab_start = (first_row + (i * height + j)) * width * channels
                x = tl.load(x_ptr + slab_start + offsets, mask=mask, other=0.0,
                            eviction_policy=EVICTION_POLICY)
                normalized, mean, rstd = normalized_rows(x, mask, shift, width, eps, 0, -1)
                acc += normalized
                if STORE_STATS:
                    store_stats(mean_ptr, rstd_ptr, (first_row + (i * height + j)) * channels
                                 + chans, mean, rstd, chan_mask)
        acc = affine(acc, weight_ptr, bias_ptr, cols, col_mask, 1, HAS_WEIGHT, HAS_BIAS,
                      KD * KH)
        if KW == 1:
            total = acc
        else:
            total = tl.sum(tl.reshape(acc, [BLOCK_WO, KW, BLOCK_C]), axis=1)
    else:
        # Slab tile [BLOCK_WO, KW_PAD, BLOCK_C] holding W position wo * KW + k: every position
        # once (k < KW), remainder positions included, so the statistics see all of W.
        ks = tl.arange(0, KW_PAD)
        cols = wo[:, None] * KW + ks[None, :]
        col_mask = (ks < KW)[None, :] & (cols < width)
        mask = col_mask[:, :, None] & chan_mask[None, None, :]
        offsets = cols.to(tl.int64)[:, :, None] * channels + chans[None, None, :]
        acc = tl.zeros([BLOCK_WO, KW_PAD, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(KD):
            for j in tl.static_range(KH):
                slab_start = (first_row + (i * height + j)) * width * channels
                x = tl.load(x_ptr + slab_start + offsets, mask=mask, other=0.0,
                            eviction_policy=EVICTION_POLICY)
                normalized, mean, rstd = normalized_rows(x, mask, shift, width, eps, 1, 0)
                acc += normalized
                if STORE_STATS:
                    store_stats(mean_ptr, rstd_ptr, (first_row + (i * height + j)) * channels
                                 + chans, mean, rstd, chan_mask)
        acc = affine(acc, weight_ptr, bias_ptr, cols, col_mask, 2, HAS_WEIGHT, HAS_BIAS,
                      KD * KH)
        total = tl.sum(acc, axis=1)

    y = gelu(total * (1.0 / (KD * KH * KW)), APPROX_TANH)
    # Output channels-last too: the [Wo, BLOCK_C] tile of (n, do, ho) is contiguous along C.
    out_mask = (wo < out_width)[:, None] & chan_mask[None, :]
    out_offsets = (group * out_width + wo[:, None]) * channels + chans[None, :]
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=out_mask,
             eviction_policy=EVICTION_POLICY)
