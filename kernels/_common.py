"""What the kernel modules share: the validation of their arguments and small ``@triton.jit``
helpers."""

from __future__ import annotations

import math
from numbers import Real

import torch
import triton
import triton.language as tl

from .device import interpreter_enabled

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
APPROXIMATIONS: tuple[str, ...] = ("none", "tanh")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; a TypeError for dtypes the kernels do not take."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; accepted: float32, float16, bfloat16")
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, x: object) -> torch.Tensor:
    """``x`` itself, if it is a tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    dtype_name(x.dtype)
    return x


def check_param(name: str, tensor: torch.Tensor | None, x: torch.Tensor,
                shape: tuple[int, ...]) -> None:
    """An optional parameter tensor must have ``shape`` and x's dtype and device."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected normalized_shape "
                         f"{shape}")
    if tensor.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}; they must match")
    if tensor.device != x.device:
        raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


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


def check_eps(eps: object) -> None:
    if type(eps) is not float and (not isinstance(eps, Real) or isinstance(eps, bool)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")


def check_device(x: torch.Tensor) -> None:
    """CPU tensors run only through the Triton interpreter."""
    if x.device.type == "cpu" and not interpreter_enabled():
        raise ValueError("x is on the CPU: run on a CUDA device, or set TRITON_INTERPRET=1 "
                         "to use the Triton interpreter")


def gradients_required(*tensors: torch.Tensor | float | None) -> bool:
    """True when autograd records: grad mode is on and a tensor among ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(tensor, torch.Tensor) and tensor.requires_grad for tensor in tensors)


def check_no_out_with_autograd(out: torch.Tensor | None, track: bool) -> None:
    if out is not None and track:
        raise ValueError("out= cannot be used while gradients are required (autograd needs an "
                         "output of its own): drop out=, or call under torch.no_grad()")


def stand_in_tensors(dtype: torch.dtype, has_weight: bool, has_bias: bool,
                     sum_weight_dtype: torch.dtype | None, device: torch.device | str):
    """Tiny tensors that specialise a kernel as real inputs of these dtypes would (for compiling
    without launching): x (also the output), weight or None, bias or None, sum_weight or None."""
    dtype_name(dtype)
    tiny = torch.empty(16, dtype=dtype, device=device)  # 16-byte aligned, like any allocation
    sum_tensor = None if sum_weight_dtype is None else torch.empty(1, dtype=sum_weight_dtype, device=device)
    return tiny, tiny if has_weight else None, tiny if has_bias else None, sum_tensor


def launch_or_compile(kernel, grid: tuple[int, ...], args: tuple, meta: dict,
                      warmup: bool) -> None:
    """Launches the ``@triton.jit`` ``kernel`` on ``grid``, or with ``warmup`` only compiles it
    into Triton's cache (what a descriptor's ``compile`` runs on stand-in tensors)."""
    if warmup:
        kernel.warmup(*args, grid=grid, **meta)
    else:
        kernel[grid](*args, **meta)


def needs_64bit_offsets(padded_rows: int, width: int, block_w: int) -> bool:
    """Whether element offsets up to ``padded_rows`` rows of ``width`` (and a chunk of
    ``block_w`` past the last) may pass 2**31, so that a kernel must compute them in 64 bits;
    below that 32-bit offsets save instructions on every element."""
    return padded_rows * width + block_w >= 2**31


def width_multiple(width: int) -> int:
    """The largest power of two, up to 16, that divides ``width`` (a kernel's
    ``WIDTH_MULTIPLE``, see :func:`known_multiple`)."""
    return math.gcd(width, 16)


def sum_weight_dtype(sum_tensor: torch.Tensor | None) -> torch.dtype | None:
    """The dtype a call records for its sum_weight: the tensor's, None for a number."""
    return None if sum_tensor is None else sum_tensor.dtype


# -- @triton.jit helpers -------------------------------------------------------------------------
@triton.jit
def known_multiple(width, WIDTH_MULTIPLE: tl.constexpr):
    """``width``, written so that the compiler knows it is a multiple of ``WIDTH_MULTIPLE``:
    Triton specialises integers on divisibility by 16 only, so rows of, say, 20 halves would
    otherwise load element by element; knowing 4 divides the width, row starts are 8-byte
    aligned and loads take 4 elements at a time."""
    return width // WIDTH_MULTIPLE * WIDTH_MULTIPLE


@triton.jit
def first_row(tile, BLOCK_ROWS: tl.constexpr, INDEX_64: tl.constexpr):
    """The first row of row tile ``tile``, in 64 bits when ``INDEX_64``
    (:func:`needs_64bit_offsets`), else in 32."""
    if INDEX_64:
        tile = tile.to(tl.int64)
    return tile * BLOCK_ROWS


@triton.jit
def load_shift(sum_weight_ptr, sum_weight_value, SUM_FROM_PTR: tl.constexpr):
    """``sum_weight`` in float32: read on the device, or the Python number passed in."""
    if SUM_FROM_PTR:
        shift = tl.load(sum_weight_ptr).to(tl.float32)
    else:
        shift = sum_weight_value
    return shift


@triton.jit
def affine(acc, weight_ptr, bias_ptr, cols, col_mask, AXIS: tl.constexpr,
           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr):
    """``acc * weight + COUNT * bias``: the affine step applied to a sum of ``COUNT``
    normalised values (1 for a plain LayerNorm). ``weight``/``bias`` are loaded at the columns
    ``cols`` and broadcast to acc's shape by a new axis ``AXIS``."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc * tl.expand_dims(w, AXIS)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + COUNT * tl.expand_dims(b, AXIS)
    return acc


@triton.jit
def store_stats(mean_ptr, rstd_ptr, row_ids, mean, rstd, row_mask):
    """Saves the per-row mean of ``x + sum_weight`` and rstd (float32) for the backward."""
    tl.store(mean_ptr + row_ids, mean, mask=row_mask)
    tl.store(rstd_ptr + row_ids, rstd, mask=row_mask)


@triton.jit
def gelu(v, APPROX_TANH: tl.constexpr):
    """GELU in float32, exact (erf) or the tanh approximation."""
    if APPROX_TANH:
        # 0.5 * v * (1 + tanh(z)) == v * sigmoid(2 * z)
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        y = v * tl.sigmoid(2.0 * z)
    else:
        y = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    return y


@triton.jit
def gelu_grad(v, APPROX_TANH: tl.constexpr):
    """d GELU(v) / dv in float32, exact (erf) or of the tanh approximation."""
    if APPROX_TANH:
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        s = tl.sigmoid(2.0 * z)  # GELU = v * s
        grad = s + v * 2.0 * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * v * v)
    else:
        grad = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476)) \
            + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    return grad


@triton.jit
def row_sum(x, AXIS: tl.constexpr, AXIS2: tl.constexpr):
    """Sum of x over ``AXIS`` and then, when ``AXIS2 >= 0``, over ``AXIS2`` of the result."""
    total = tl.sum(x, axis=AXIS)
    if AXIS2 >= 0:
        total = tl.sum(total, axis=AXIS2)
    return total


@triton.jit
def unreduce(v, AXIS: tl.constexpr, AXIS2: tl.constexpr):
    """The inverse of :func:`row_sum`'s shape change: size-1 axes back where it summed."""
    if AXIS2 >= 0:
        v = tl.expand_dims(v, AXIS2)
    return tl.expand_dims(v, AXIS)


@triton.jit
def normalized_rows(x, mask, shift, width, eps, AXIS: tl.constexpr, AXIS2: tl.constexpr):
    """LayerNorm (no affine) of the rows of one loaded tile, in float32, zero where masked,
    and the rows' mean (of ``x + shift``) and rstd.

    A row's ``width`` elements lie along ``AXIS`` (and ``AXIS2`` when ``>= 0``, numbered after
    ``AXIS`` is summed away): the statistics are taken over those axes, every other axis
    indexes independent rows.
    """
    x = tl.where(mask, x.to(tl.float32) + shift, 0.0)
    mean = row_sum(x, AXIS, AXIS2) / width
    centered = tl.where(mask, x - unreduce(mean, AXIS, AXIS2), 0.0)
    rstd = tl.rsqrt(row_sum(centered * centered, AXIS, AXIS2) / width + eps)
    return centered * unreduce(rstd, AXIS, AXIS2), mean, rstd
