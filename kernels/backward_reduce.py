"""What the backward kernels share: their persistent grid and the reduction of their column sums.

The backward kernels (``kernels/add_layernorm_backward.py``,
``kernels/add_layernorm_pool_gelu_backward.py``) launch a fixed number of programs that each
walk many row tiles, accumulating the column sums of dweight and dbias in registers and adding
them out once at the end. How many programs: one wave of as many as the GPU keeps resident,
counted from the compiled kernel's registers and shared memory (as Triton's fused-softmax
tutorial does), so that no part-empty second wave leaves SMs idle while it runs, and each
program covers at least :data:`MIN_ROWS_PER_PROGRAM` rows. How their sums are reduced
(``reduction``): ``"partials"``, each program stores its own row of a float32
``[programs, columns]`` array that :func:`column_sums` sums over programs; or ``"atomics"``,
each program adds into one zeroed float32 row. Either way :func:`column_sums` then writes the
gradients in their dtype, dweight and dbias in one launch.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import triton
import triton.language as tl

from ._common import width_multiple
from .defaults import DeviceProperties, device_properties
from .device import device_name, interpreter_enabled

REDUCTIONS: tuple[str, ...] = ("partials", "atomics")
# Width from which the reduction defaults to partial sums. With atomics, all P programs of the
# wave add into one row: each of its 2W float32 addresses takes P adds, serialised at the L2
# slice that owns it, and as the programs finish together these P-deep queues are the kernel's
# tail, with nothing to overlap them; their work grows with P * W. Partial sums have no
# contention but the array's extra traffic, P * 2W float32 written and read back at full
# bandwidth (small next to the 64 rows or more of x, dy and dx each program moves), and a
# second pass parallel over columns only: for a narrow row a couple of programs walk all P rows
# one block after another, a fixed latency. Narrow rows: few addresses, short queues, so
# atomics. Wide rows: the queues outgrow the traffic, so partial sums, which are also bitwise
# reproducible. Where the two meet is measured (BENCHMARKS.md, Training).
PARTIALS_FROM_WIDTH = 1024
# Each program's partial sums (8 bytes a column, written and read again) cost 16 / (3 * 2 * 64)
# = 4% of the 16-bit backward's bytes (x, dy, dx) over 64 rows.
MIN_ROWS_PER_PROGRAM = 64
# Under the interpreter (no GPU, programs run one after another): a few programs, so that
# each still walks several tiles.
_INTERPRETER_RESIDENT_PROGRAMS = 4
# Registers are allocated per warp in units of 256, from four equal sub-partitions of an SM's
# register file (CUDA occupancy calculator); shared memory keeps 1 KiB per resident program.
_REGISTER_UNIT = 256
_SUB_PARTITIONS = 4
_RESERVED_SHARED_BYTES = 1024

# (kernel, device index, x dtype, rows aligned, launch meta) -> resident programs on the GPU.
_resident: dict[tuple, int] = {}


def choose_reduction(width: int, reduction: str | None = None) -> str:
    """The reduction of the column sums: ``reduction`` when given (checked), else
    ``"partials"`` from :data:`PARTIALS_FROM_WIDTH` columns or while PyTorch's deterministic
    algorithms are on (atomics add in whatever order programs finish), ``"atomics"`` below."""
    if reduction is not None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS} or None, got {reduction!r}")
        return reduction
    if width >= PARTIALS_FROM_WIDTH or torch.are_deterministic_algorithms_enabled():
        return "partials"
    return "atomics"


@functools.lru_cache(maxsize=None)
def _shared_bytes_per_multiprocessor(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return (getattr(props, "shared_memory_per_multiprocessor", 0)
            or getattr(props, "shared_memory_per_block_optin", 0) or 49152)


def programs_per_multiprocessor(registers: int, shared_bytes: int, num_warps: int,
                                props: DeviceProperties, shared_bytes_per_sm: int) -> int:
    """Programs of ``num_warps`` warps, each thread holding ``registers`` registers and the
    program ``shared_bytes`` of shared memory, that one SM holds at once: the fewest that
    registers, threads, shared memory and the SM's limit on programs allow (at least one)."""
    registers_per_warp = triton.cdiv(max(1, registers) * 32, _REGISTER_UNIT) * _REGISTER_UNIT
    warps = _SUB_PARTITIONS * (props.registers_per_sm // _SUB_PARTITIONS // registers_per_warp)
    return max(1, min(warps // num_warps, props.max_threads_per_sm // (32 * num_warps),
                      shared_bytes_per_sm // (shared_bytes + _RESERVED_SHARED_BYTES),
                      props.max_programs_per_sm))


def resident_programs(kernel: Any, args: Sequence[Any], meta: dict[str, Any],
                      x: torch.Tensor) -> int:
    """How many programs of ``kernel``, specialised for ``args`` and ``meta`` (its launch
    keywords, ``num_warps`` among them), the whole GPU keeps resident: compiled once (into
    Triton's cache, so the launch that follows compiles nothing) and counted per SM, then
    cached. Under the interpreter, a fixed few."""
    if x.device.type != "cuda" or interpreter_enabled():
        return _INTERPRETER_RESIDENT_PROGRAMS
    key = (kernel, x.device.index, x.dtype, width_multiple(x.shape[-1]), tuple(meta.items()))
    found = _resident.get(key)
    if found is None:
        props = device_properties(device_name(x.device))
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        if hasattr(compiled, "result"):  # compiled under triton.AsyncCompileMode
            compiled = compiled.result()
        if compiled is None:  # a compile hook declined: count by threads alone
            registers, shared = 1, 0
        else:
            # Loading the binary sets n_regs (as Triton's fused-softmax tutorial does).
            compiled._init_handles()
            registers, shared = compiled.n_regs, compiled.metadata.shared
        found = _resident[key] = props.sm_count * programs_per_multiprocessor(
            registers, shared, meta["num_warps"], props,
            _shared_bytes_per_multiprocessor(x.device.index))
    return found


def program_count(row_tiles: int, rows_per_tile: int, resident: int) -> int:
    """Programs that walk ``row_tiles`` tiles of ``rows_per_tile`` rows: one wave of the
    ``resident`` programs the GPU holds, fewer where each would cover under
    :data:`MIN_ROWS_PER_PROGRAM` rows (the partial sums' traffic), at least one."""
    enough_rows = triton.cdiv(row_tiles, max(1, MIN_ROWS_PER_PROGRAM // rows_per_tile))
    return max(1, min(row_tiles, resident, enough_rows))


def partial_sums(programs: int, columns: int, atomic: bool, zeroed: bool,
                 device: torch.device) -> torch.Tensor:
    """The float32 ``[rows, columns]`` array the kernel adds its column sums into: one row
    for the atomics, else a row a program; zeroed for the atomics or when ``zeroed`` (a
    program that adds into its own row more than once)."""
    rows = 1 if atomic else programs
    allocate = torch.zeros if atomic or zeroed else torch.empty
    return allocate((rows, columns), dtype=torch.float32, device=device)


@triton.jit
def _column_sums_kernel(partial_ptr, first_ptr, second_ptr, partial_rows, columns, width,
                        TWO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums ``partial[:, c]`` over rows for ``BLOCK_C`` of the ``[rows, columns]`` columns
    (``columns`` is ``width``, or twice it with ``TWO``); columns below ``width`` go to
    ``first``, the next ``width`` to ``second``."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < columns
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, partial_rows, BLOCK_P):
        part_ids = start + tl.arange(0, BLOCK_P)
        mask = (part_ids < partial_rows)[:, None] & col_mask[None, :]
        acc += tl.load(partial_ptr + part_ids.to(tl.int64)[:, None] * columns + cols[None, :],
                       mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(first_ptr + cols, total.to(first_ptr.dtype.element_ty), mask=cols < width)
    if TWO:
        tl.store(second_ptr + (cols - width), total.to(second_ptr.dtype.element_ty),
                 mask=(cols >= width) & col_mask)


def column_sums(partials: torch.Tensor, width: int, count: int,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """The column sums of a float32 ``[rows, count * width]`` array as ``count`` (1 or 2)
    tensors of ``[width]`` in ``dtype``, in one launch."""
    partial_rows, columns = partials.shape
    outputs = [torch.empty(width, dtype=dtype, device=partials.device) for _ in range(count)]
    # Narrow column blocks: wide rows spread the sum over many programs.
    block_c = min(64, triton.next_power_of_2(columns))
    block_p = max(1, min(64, 4096 // block_c, triton.next_power_of_2(partial_rows)))
    _column_sums_kernel[(triton.cdiv(columns, block_c),)](
        partials, outputs[0], outputs[-1], partial_rows, columns, width, TWO=count == 2,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return outputs
