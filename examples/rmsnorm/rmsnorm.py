"""RMSNorm over the last dim: a user's @triton.jit kernel, its descriptor and its launcher.

:data:`RMSNORM`, the kernel's :class:`kernels.KernelDescriptor`, is what both the launcher and
the tuner ask: the launcher for the tables' config (``RMSNORM.select``, falling back to
:func:`heuristic_config` where no table has an entry), the tuner for the table key, the default
config and the search space.
"""

from __future__ import annotations

from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels import LaunchConfig, RowsCall, RowsDescriptor, device_name, interpreter_enabled


@triton.jit
def _rmsnorm_kernel(x_ptr, weight_ptr, out_ptr, rows, width, eps,
                    BLOCK_ROWS: tl.constexpr, BLOCK_W: tl.constexpr, SINGLE_PASS: tl.constexpr,
                    EVICTION_POLICY: tl.constexpr):
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_ids < rows
    row_starts = row_ids * width
    cols = tl.arange(0, BLOCK_W)
    if SINGLE_PASS:
        col_mask = cols < width
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_starts[:, None] + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0,
                    eviction_policy=EVICTION_POLICY).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / width + eps)
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * weight[None, :]
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask,
                 eviction_policy=EVICTION_POLICY)
    else:
        # Rows wider than a tile: one pass for the sum of squares, a second reads x again.
        squares = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for start in range(0, width, BLOCK_W):
            col_ids = start + cols
            mask = row_mask[:, None] & (col_ids < width)[None, :]
            x = tl.load(x_ptr + row_starts[:, None] + col_ids[None, :], mask=mask, other=0.0,
                        eviction_policy=EVICTION_POLICY).to(tl.float32)
            squares += tl.sum(x * x, axis=1)
        rstd = tl.rsqrt(squares / width + eps)
        for start in range(0, width, BLOCK_W):
            col_ids = start + cols
            col_mask = col_ids < width
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = row_starts[:, None] + col_ids[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0,
                        eviction_policy=EVICTION_POLICY).to(tl.float32)
            weight = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * weight[None, :]
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask,
                     eviction_policy=EVICTION_POLICY)


def heuristic_config(rows: int, width: int, dtype: torch.dtype) -> LaunchConfig:
    """The config used where no table has an entry: whole rows in registers up to 8192
    columns (chunks of 4096 beyond), tiles of about 4096 elements, a warp per 256 of them."""
    block_w = triton.next_power_of_2(width) if width <= 8192 else 4096
    block_rows = max(1, min(4096 // block_w, triton.next_power_of_2(rows)))
    return LaunchConfig(block_rows=block_rows, block_w=block_w,
                        num_warps=max(1, min(16, block_rows * block_w // 256)))


class RMSNorm(RowsDescriptor[RowsCall]):
    """RMSNorm's identity: keyed by width and row count like every row-wise kernel; a tuner
    shape is ROWSxWIDTH or a full tensor shape."""

    name = "rmsnorm"
    space_file = Path(__file__).with_name("rmsnorm.yaml")

    def default_config(self, call: RowsCall, device: str | None = None) -> LaunchConfig:
        return heuristic_config(call.rows, call.width, call.dtype)

    def compile(self, call: RowsCall, config: LaunchConfig,
                device: torch.device | str = "cuda") -> None:
        """Compiles on tiny stand-in tensors (a no-op under the interpreter, which compiles
        nothing), so the tuner's workers compile upcoming configs while they time others."""
        if interpreter_enabled():
            return
        tiny = torch.empty(16, dtype=call.dtype, device=device)
        self.launch(tiny, tiny, tiny, call.rows, call.width, 1e-6, config, warmup=True)

    def launch(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, rows: int,
               width: int, eps: float, config: LaunchConfig, warmup: bool = False) -> None:
        """Launches the kernel on contiguous x of ``rows x width`` (or, with ``warmup``, only
        compiles it)."""
        grid = (triton.cdiv(rows, config.block_rows),)
        args = (x, weight, out, rows, width, eps)
        meta = dict(BLOCK_ROWS=config.block_rows, BLOCK_W=config.block_w,
                    SINGLE_PASS=config.block_w >= width, EVICTION_POLICY=config.eviction_policy,
                    num_warps=config.num_warps, num_stages=config.num_stages)
        if warmup:
            _rmsnorm_kernel.warmup(*args, grid=grid, **meta)
        else:
            _rmsnorm_kernel[grid](*args, **meta)


RMSNORM = RMSNorm()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
            config: LaunchConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight``, statistics in float32.

    ``config`` forces a launch config; by default the tables' (or the heuristic's) is used.
    """
    width = x.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({width},)")
    x = x.contiguous()
    rows = x.numel() // width
    if config is None:
        config, _ = RMSNORM.select(RowsCall(rows, width, x.dtype),
                                   device_name(x.device if x.is_cuda else None))
    out = torch.empty_like(x) if out is None else out
    RMSNORM.launch(x, weight, out, rows, width, eps, config)
    return out
