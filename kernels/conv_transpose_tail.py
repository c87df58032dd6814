"""The reference model in one kernel: ConvTranspose3d (kernel 3, stride 2, padding 1, output
padding 1) with ``GELU(AvgPool3d_2(LayerNorm_W(conv + sum_weight)))`` as its epilogue.

With stride 2 the transposed convolution splits by output parity: an even output position takes
the centre tap (k = 1) of input position p / 2, an odd one the taps k = 0 of (p + 1) / 2 and
k = 2 of (p - 1) / 2. A program owns ``BLOCK_CO`` output channels of ``ROWS`` pooled rows
``(n, do, ho)``, ``ho`` consecutive, i.e. for each of them the four conv rows
``d in {2do, 2do + 1}``, ``h in {2ho, 2ho + 1}``. For each of the four it builds the even and odd
halves of the rows, ``[BLOCK_M, BLOCK_CO]`` each (``BLOCK_M = ROWS x ROW_W`` input W positions),
as sums of ``[BLOCK_M, C_in] @ [C_in, BLOCK_CO]`` products (``tl.dot``) over the rows' 1, 2 or 4
input rows; more rows per program read each weight tile for more outputs. The LayerNorm over a
row's 2 * W_in positions takes its statistics from both halves, the W pooling adds the two
halves, and the four conv rows are averaged in registers. The conv output is never written: x
and the weight are read, the pooled output is the only store.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from ._common import (
    check_approximate,
    check_device,
    check_param,
    check_tensor,
    gelu,
    gradients_required,
    launch_or_compile,
    load_shift,
    split_sum_weight,
    stand_in_tensors,
    sum_weight_dtype,
)
from .config import LaunchConfig
from .defaults import conv_tail_block_co, device_properties
from .descriptor import KernelDescriptor, TableKey
from .device import device_name, interpreter_enabled

# The one convolution this kernel computes (ConvTranspose3d arguments).
KERNEL_SIZE, STRIDE, PADDING, OUTPUT_PADDING = (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)


@triton.jit
def _conv_transpose_tail_kernel(
    x_ptr, weight_ptr, conv_bias_ptr, ln_weight_ptr, ln_bias_ptr, sum_weight_ptr, sum_weight_value,
    out_ptr, c_in, c_out, in_d, in_h, in_w, co_blocks, h_blocks, eps,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, ROW_W: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
    SUM_FROM_PTR: tl.constexpr, APPROX_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr, EVICTION_POLICY: tl.constexpr, INDEX_64: tl.constexpr,
    EXACT_CHANNELS: tl.constexpr,
):
    # Program -> (n, do, block of pooled rows ho, channel block); the pooled grid is the input
    # grid (stride 2). The M axis of the products is ROWS pooled rows of ROW_W positions each.
    ROWS: tl.constexpr = BLOCK_M // ROW_W
    pid = tl.program_id(0)
    if INDEX_64:  # int32 offsets otherwise: half the registers for addresses
        pid = pid.to(tl.int64)
    cos = (pid % co_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    rest = pid // co_blocks
    ho_first = (rest % h_blocks) * ROWS
    rest = rest // h_blocks
    do = rest % in_d
    n = rest // in_d
    cis = tl.arange(0, BLOCK_CI)
    ms = tl.arange(0, BLOCK_M)
    hos = ho_first + ms // ROW_W          # pooled (= input) row of each M position
    js = ms % ROW_W                       # input W position of each M position
    co_mask = cos < c_out
    ci_mask = cis < c_in
    if EXACT_CHANNELS:
        # The blocks fit the channels exactly: constant all-true masks, which the compiler
        # drops (masks held across the loop take registers the products need).
        co_mask = tl.full([BLOCK_CO], 1, tl.int1)
        ci_mask = tl.full([BLOCK_CI], 1, tl.int1)
    shift = load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR)
    # The weight comes tap-major, [3, 3, 3, C_in, C_out]: a tap's [ci, co] slice is contiguous.
    w_offsets = cis[:, None] * c_out + cos[None, :]
    w_mask = ci_mask[:, None] & co_mask[None, :]
    tap_stride = c_in * c_out
    if HAS_CONV_BIAS:
        conv_bias = tl.load(conv_bias_ptr + cos, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    # The epilogue works on [ROWS, ROW_W, BLOCK_CO] views of the [BLOCK_M, BLOCK_CO] products.
    js3 = tl.arange(0, ROW_W)[None, :, None]
    hos3 = ho_first + tl.arange(0, ROWS)[:, None, None]
    valid3 = (js3 < in_w) & (hos3 < in_h)
    width = 2 * in_w
    pooled = tl.zeros([ROWS, ROW_W, BLOCK_CO], dtype=tl.float32)
    # Runtime loops (not unrolled): one conv row, and one input row of it, at a time keeps
    # the live tiles few; unrolled, the 27 products of a program spill registers.
    for row in range(4):
        i = row // 2                      # d = 2 * do + i
        k = row % 2                       # h = 2 * ho + k
        even = tl.zeros([BLOCK_M, BLOCK_CO], dtype=tl.float32)
        odd = tl.zeros([BLOCK_M, BLOCK_CO], dtype=tl.float32)
        for t in range(1 + i):
            for u in range(1 + k):
                # Tap t of a position of parity i: kernel index 1 (even), else 0 then 2,
                # reading input position p // 2 + 1 for kernel index 0, else p // 2.
                kd = 1 - i + 2 * i * t
                in_depth = do + i * (1 - t)
                kh = 1 - k + 2 * k * u
                in_rows = hos + k * (1 - u)
                # Input rows past the last one (only at the far edge) read as zeros.
                row_len = tl.where((in_depth < in_d) & (in_rows < in_h), in_w, 0)[:, None]
                # x[n, ci, in_depth, in_row, j] as a [BLOCK_M, BLOCK_CI] tile, and shifted by one.
                base = ((n * c_in + cis[None, :]) * in_d + in_depth) * in_h + in_rows[:, None]
                offsets = base * in_w + js[:, None]
                tap = weight_ptr + (kd * 9 + kh * 3) * tap_stride + w_offsets
                a = tl.load(x_ptr + offsets, mask=(js[:, None] < row_len) & ci_mask[None, :],
                            other=0.0, eviction_policy=EVICTION_POLICY)
                a_next = tl.load(x_ptr + offsets + 1,
                                 mask=(js[:, None] + 1 < row_len) & ci_mask[None, :],
                                 other=0.0, eviction_policy=EVICTION_POLICY)
                w_first = tl.load(tap, mask=w_mask, other=0.0)
                w_centre = tl.load(tap + tap_stride, mask=w_mask, other=0.0)
                w_last = tl.load(tap + 2 * tap_stride, mask=w_mask, other=0.0)
                if DOT_IN_FLOAT32:
                    a, a_next = a.to(tl.float32), a_next.to(tl.float32)
                    w_centre, w_first, w_last = (w_centre.to(tl.float32), w_first.to(tl.float32),
                                                 w_last.to(tl.float32))
                even += tl.dot(a, w_centre, input_precision=DOT_PRECISION)
                odd += tl.dot(a_next, w_first, input_precision=DOT_PRECISION)
                odd += tl.dot(a, w_last, input_precision=DOT_PRECISION)
        if HAS_CONV_BIAS:
            even += conv_bias
            odd += conv_bias
        # LayerNorm over each row's 2 * in_w positions: even ones 2j, odd ones 2j + 1.
        even3 = tl.where(valid3, tl.reshape(even, [ROWS, ROW_W, BLOCK_CO]) + shift, 0.0)
        odd3 = tl.where(valid3, tl.reshape(odd, [ROWS, ROW_W, BLOCK_CO]) + shift, 0.0)
        mean = ((tl.sum(even3, axis=1) + tl.sum(odd3, axis=1)) / width)[:, None, :]
        even3 = tl.where(valid3, even3 - mean, 0.0)
        odd3 = tl.where(valid3, odd3 - mean, 0.0)
        variance = (tl.sum(even3 * even3, axis=1) + tl.sum(odd3 * odd3, axis=1)) / width
        rstd = tl.rsqrt(variance + eps)[:, None, :]
        even3 = even3 * rstd
        odd3 = odd3 * rstd
        # LayerNorm weight and bias at even and odd positions: loaded per conv row (L1 hits),
        # since holding them across the loop costs registers the products need.
        if HAS_LN_WEIGHT:
            even3 *= tl.load(ln_weight_ptr + 2 * js3, mask=js3 < in_w, other=0.0).to(tl.float32)
            odd3 *= tl.load(ln_weight_ptr + 2 * js3 + 1, mask=js3 < in_w, other=0.0).to(tl.float32)
        if HAS_LN_BIAS:
            even3 += tl.load(ln_bias_ptr + 2 * js3, mask=js3 < in_w, other=0.0).to(tl.float32)
            odd3 += tl.load(ln_bias_ptr + 2 * js3 + 1, mask=js3 < in_w, other=0.0).to(tl.float32)
        pooled += even3 + odd3        # AvgPool along W: positions 2j and 2j + 1
    y = gelu(pooled * 0.125, APPROX_TANH)
    # out[n, co, do, ho, j], NCDHW.
    cos3 = cos[None, None, :]
    out_offsets = (((n * c_out + cos3) * in_d + do) * in_h + hos3) * in_w + js3
    tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty),
             mask=valid3 & (cos3 < c_out), eviction_policy=EVICTION_POLICY)


@functools.lru_cache(maxsize=1024)
def heuristic_config(c_out: int, in_w: int, c_in: int = 32, dtype: torch.dtype = torch.float32,
                     device: str | None = None) -> LaunchConfig:
    """One pooled row a program with all its output channels (up to 64, fewer where the dot
    operands would not fit the shared memory of the GPU model ``device``; None: the current
    one), 2 warps: few live accumulators keep the unrolled products out of local memory."""
    block_w = max(16, triton.next_power_of_2(in_w))
    return LaunchConfig(block_rows=conv_tail_block_co(c_in, c_out, block_w, dtype.itemsize,
                                                      device_properties(device)),
                        block_w=block_w, num_warps=2)


@dataclasses.dataclass(frozen=True)
class ConvTailCall:
    """A call of :func:`fused_conv_transpose_tail` on x of ``x_shape`` [N, C_in, D, H, W] with
    ``c_out`` output channels: the GELU, which optional tensors are given and sum_weight's
    dtype (None: a Python number)."""

    x_shape: tuple[int, int, int, int, int]
    c_out: int
    dtype: torch.dtype
    approximate: str = "none"
    has_conv_bias: bool = True
    has_ln_weight: bool = True
    has_ln_bias: bool = True
    sum_weight_dtype: torch.dtype | None = None


class ConvTransposeTail(KernelDescriptor[ConvTailCall]):
    """The whole-model kernel. A tuner shape is the conv input and the output channels,
    NxC_inxDxHxWxC_out; the tuner measures exact GELU with every parameter given and a
    sum_weight tensor of x's dtype."""

    name = "conv_transpose_tail"

    def call_for_shape(self, shape: tuple[int, ...], dtype: torch.dtype) -> ConvTailCall:
        if len(shape) != 6:
            raise ValueError(f"{self.name} takes NxC_inxDxHxWxC_out (the conv input and its "
                             f"output channels), such as 32x32x16x32x32x64; got "
                             f"{'x'.join(map(str, shape))}")
        return ConvTailCall(tuple(shape[:5]), shape[5], dtype, sum_weight_dtype=dtype)

    def shape_for_call(self, call: ConvTailCall) -> tuple[int, ...] | None:
        """None with tanh GELU, which the tuner's problems do not cover."""
        return None if call.approximate != "none" else (*call.x_shape, call.c_out)

    def table_key(self, call: ConvTailCall) -> TableKey:
        """Width W, rows N*D*H; the variant names C_in, C_out, H and the GELU, e.g.
        ``ci32_co64_h32_none``."""
        batch, c_in, in_d, in_h, in_w = call.x_shape
        return TableKey(width=in_w, rows=batch * in_d * in_h,
                        variant=f"ci{c_in}_co{call.c_out}_h{in_h}_{call.approximate}")

    def default_config(self, call: ConvTailCall, device: str | None = None) -> LaunchConfig:
        return heuristic_config(call.c_out, call.x_shape[4], call.x_shape[1], call.dtype, device)

    def compile(self, call: ConvTailCall, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """A no-op under the interpreter, which compiles nothing."""
        if interpreter_enabled():
            return
        tiny, ln_weight, ln_bias, sum_tensor = stand_in_tensors(
            call.dtype, call.has_ln_weight, call.has_ln_bias, call.sum_weight_dtype, device)
        self.launch(tiny, tiny, tiny if call.has_conv_bias else None, ln_weight, ln_bias,
                    sum_tensor, 0.0, tiny, call.x_shape, call.c_out, 1e-5, call.approximate,
                    config, warmup=True)

    def launch(self, x: torch.Tensor, tap_major_weight: torch.Tensor,
               conv_bias: torch.Tensor | None, ln_weight: torch.Tensor | None,
               ln_bias: torch.Tensor | None, sum_tensor: torch.Tensor | None, sum_value: float,
               out: torch.Tensor, x_shape: tuple[int, ...], c_out: int, eps: float,
               approximate: str, config: LaunchConfig, warmup: bool = False) -> None:
        """Launches the kernel on contiguous x of ``x_shape`` and the tap-major weight
        ``[3, 3, 3, C_in, C_out]`` (or, with ``warmup``, only compiles it); parameters are
        contiguous or None."""
        batch, c_in, in_d, in_h, in_w = x_shape
        row_w = triton.next_power_of_2(in_w)
        block_ci = max(16, triton.next_power_of_2(c_in))
        co_blocks = triton.cdiv(c_out, config.block_rows)
        h_blocks = triton.cdiv(in_h, config.block_w // row_w)
        args = (x, tap_major_weight,
                conv_bias if conv_bias is not None else x,
                ln_weight if ln_weight is not None else x,
                ln_bias if ln_bias is not None else x,
                sum_tensor if sum_tensor is not None else x, sum_value,
                out, c_in, c_out, in_d, in_h, in_w, co_blocks, h_blocks, float(eps))
        meta = dict(
            BLOCK_CI=block_ci, BLOCK_CO=config.block_rows, BLOCK_M=config.block_w, ROW_W=row_w,
            HAS_CONV_BIAS=conv_bias is not None, HAS_LN_WEIGHT=ln_weight is not None,
            HAS_LN_BIAS=ln_bias is not None, SUM_FROM_PTR=sum_tensor is not None,
            APPROX_TANH=approximate == "tanh",
            # float32 on TF32 tensor cores where PyTorch lets its cuDNN convolutions use them
            # (the default, torch.backends.cudnn.allow_tf32); "tf32x3" would be near-exact but
            # spills.
            DOT_PRECISION="tf32" if torch.backends.cudnn.allow_tf32 else "ieee",
            # The interpreter (Triton 3.9) multiplies 16-bit float dots wrongly: upcast there.
            DOT_IN_FLOAT32=interpreter_enabled() and x.dtype != torch.float32,
            EVICTION_POLICY=config.eviction_policy,
            # Masked reads past the far edge compute offsets up to a plane beyond x's end.
            INDEX_64=max(math.prod(x_shape) + math.prod(x_shape[1:]),
                         batch * c_out * in_d * in_h * in_w) >= 2**31,
            EXACT_CHANNELS=c_in == block_ci and c_out % config.block_rows == 0,
            num_warps=config.num_warps, num_stages=config.num_stages)
        grid = (batch * in_d * h_blocks * co_blocks,)
        launch_or_compile(_conv_transpose_tail_kernel, grid, args, meta, warmup)


CONV_TRANSPOSE_TAIL = ConvTransposeTail()


def fused_conv_transpose_tail(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    sum_weight: float | torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    approximate: str = "none",
    *,
    config: LaunchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gelu(avg_pool3d(layer_norm(conv_transpose3d(x, conv_weight, conv_bias, stride=2,
    padding=1, output_padding=1) + sum_weight, (W,), ln_weight, ln_bias, eps), 2))``.

    x is ``[N, C_in, D, H, W]`` and ``conv_weight`` ``[C_in, C_out, 3, 3, 3]``; the output is
    ``[N, C_out, D, H, W]`` (the conv doubles each spatial dim, the pooling halves it).
    ``config.block_rows`` is the number of output channels per program and ``block_w`` the
    input W positions, ``block_w / next_power_of_2(W)`` whole rows (both >= 16, for
    ``tl.dot``); without ``config`` the tables are asked
    (:meth:`ConvTransposeTail.select`). ``out`` is an optional contiguous output tensor.

    Inference only: it has no backward, so calling it with grad mode on and an input that
    requires grad is a RuntimeError (``ModelNew`` takes a differentiable path then).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"x must be a 5-D tensor [N, C_in, D, H, W], got {getattr(x, 'shape', x)}")
    check_tensor("x", x)
    if gradients_required(x, conv_weight, conv_bias, sum_weight, ln_weight, ln_bias):
        raise RuntimeError(
            "fused_conv_transpose_tail has no backward, but an input requires grad: call it "
            "under torch.no_grad() or torch.inference_mode(), or use ModelNew, which runs the "
            "cuDNN convolution and the differentiable fused tail when gradients are needed")
    batch, c_in, in_d, in_h, in_w = x.shape
    if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 5 \
            or conv_weight.shape[0] != c_in or tuple(conv_weight.shape[2:]) != KERNEL_SIZE:
        raise ValueError(f"conv_weight must be [C_in={c_in}, C_out, 3, 3, 3], got "
                         f"{tuple(getattr(conv_weight, 'shape', ()))}")
    c_out, width = conv_weight.shape[1], 2 * in_w
    for name, tensor, shape in (("conv_weight", conv_weight, tuple(conv_weight.shape)),
                                ("conv_bias", conv_bias, (c_out,)),
                                ("ln_weight", ln_weight, (width,)), ("ln_bias", ln_bias, (width,))):
        check_param(name, tensor, x, shape)
    check_approximate(approximate)
    sum_tensor, sum_value = split_sum_weight(sum_weight, x)
    check_device(x)
    if config is None:
        call = ConvTailCall(tuple(x.shape), c_out, x.dtype, approximate, conv_bias is not None,
                            ln_weight is not None, ln_bias is not None,
                            sum_weight_dtype(sum_tensor))
        config, _ = CONV_TRANSPOSE_TAIL.select(call, device_name(x.device))
    row_w = triton.next_power_of_2(in_w)
    if config.block_w < max(16, row_w) or config.block_rows < 16:
        raise ValueError(f"config block_w={config.block_w} must be >= max(16, W_in={in_w} rounded "
                         f"up to a power of 2) and block_rows={config.block_rows} (output "
                         "channels) >= 16")
    out_shape = (batch, c_out, in_d, in_h, in_w)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != out_shape \
            or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {out_shape} with x's dtype "
                         "and device")
    if out.numel() == 0:
        return out
    # Tap-major weight, [3, 3, 3, C_in, C_out]: each tap's [C_in, C_out] slice loads coalesced.
    tap_major_weight = conv_weight.permute(2, 3, 4, 0, 1).contiguous()
    CONV_TRANSPOSE_TAIL.launch(
        x.contiguous(), tap_major_weight, conv_bias.contiguous() if conv_bias is not None else None,
        ln_weight.contiguous() if ln_weight is not None else None,
        ln_bias.contiguous() if ln_bias is not None else None, sum_tensor, sum_value, out,
        tuple(x.shape), c_out, eps, approximate, config)
    return out
