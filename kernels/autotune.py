"""Self-tuning on a table miss, persisted: with ``TUNER_AUTOTUNE=1`` the first add+LayerNorm
(or fused tail) call of a (GPU model, dtype, width, variant, row bucket) that has no table
entry times a handful of candidate configs on the call's own inputs, keeps the fastest whose
output matches a float64 PyTorch reference, and merges it into the user table
(``kernels.table.user_table_path``), so later calls and later processes find it there.

A row bucket is a power-of-two range of row counts: a table entry anywhere in the bucket
counts as tuned. The candidates are the default config, the table's nearest entries for the
same width and the default's neighbours (rows, warps and eviction policy one step away), timed
within about :data:`BUDGET_S` seconds (a candidate started in time is finished). Under the
Triton interpreter nothing is tuned unless the device name is ``interpreter``, so CPU runs
never write entries for a GPU model.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
import triton

from .config import LaunchConfig
from .defaults import (
    MAX_REGISTERS_PER_THREAD,
    REGISTERS_BASE,
    REGISTERS_PER_LANE,
    REGISTERS_PER_UNALIGNED_LANE,
    DeviceProperties,
    device_properties,
    rows_aligned,
)
from ._common import dtype_name
from .device import INTERPRETER_DEVICE, compute_capability, device_name, interpreter_enabled
from .table import TableEntry, TableError, merge_entries, nearest_configs, nearest_rows, user_table_path

if TYPE_CHECKING:  # the kernel modules import this one
    from .add_layernorm import AddLayerNorm, AddLayerNormCall
    from .add_layernorm_pool_gelu import AddLayerNormPoolGelu, PoolGeluCall
    from .descriptor import KernelDescriptor

AUTOTUNE_ENV = "TUNER_AUTOTUNE"
BUDGET_S = 2.0
MAX_CANDIDATES = 8
# Elements of x checked against the float64 reference, about (entries of x's first dim at
# each end).
CHECK_ELEMENTS = 1 << 22
# Relative error ||out - ref|| / ||ref|| a candidate may have, per dtype (as the tuner checks).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Seconds of launches timed per candidate on a GPU, after one launch to estimate.
TIMING_S = 0.02

# (kernel, device, dtype, width, variant, row bucket) -> the config tuned in this process
# (also when the user table could not be written).
_tuned: dict[tuple[str, str, str, int, str, int], LaunchConfig] = {}


def autotune_enabled() -> bool:
    """True when ``TUNER_AUTOTUNE`` is set to anything but "", "0"."""
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _neighbours(config: LaunchConfig, most_rows: int,
                fits: Callable[[LaunchConfig], bool]) -> list[LaunchConfig]:
    """Configs one step from ``config``: rows halved or doubled (with warps following, so the
    lanes a thread holds stay the same, and without), warps halved or doubled, evict_last;
    only those with at most ``most_rows`` rows, no idle threads and that ``fits`` the device."""
    changes = [dict(block_rows=config.block_rows * 2), dict(block_rows=config.block_rows // 2),
               dict(block_rows=config.block_rows * 2, num_warps=config.num_warps * 2),
               dict(block_rows=config.block_rows // 2, num_warps=config.num_warps // 2),
               dict(num_warps=config.num_warps * 2), dict(num_warps=config.num_warps // 2),
               dict(eviction_policy="evict_last")]
    found = []
    for change in changes:
        try:
            candidate = dataclasses.replace(config, **change)
        except ValueError:
            continue  # past a knob's range
        idle = candidate.num_warps > 1 and candidate.tile_elements < 32 * candidate.num_warps
        if candidate.block_rows <= most_rows and not idle and fits(candidate):
            found.append(candidate)
    return found


def _fits_registers(registers_per_element: float, props: DeviceProperties):
    """A predicate: a config's estimated registers (``registers_per_element`` per tile element
    a thread holds) within 255 a thread and the SM's register file."""
    def fits(config: LaunchConfig) -> bool:
        threads = 32 * config.num_warps
        registers = REGISTERS_BASE + registers_per_element * config.tile_elements / threads
        return registers <= MAX_REGISTERS_PER_THREAD and registers * threads <= props.registers_per_sm
    return fits


def _check_rows(rows: int, row_elements: int) -> list[slice]:
    """The ranges of dim 0 (``rows`` entries of ``row_elements``) compared with the reference:
    all of it, or its first and last entries (a config's masking errors show at the edges,
    its tiling errors everywhere)."""
    count = max(1, CHECK_ELEMENTS // (2 * row_elements))
    if rows <= 2 * count:
        return [slice(0, rows)]
    return [slice(0, count), slice(rows - count, rows)]


def _timer(launch) -> float:
    """Milliseconds per launch of ``launch`` (wall clock under the interpreter)."""
    if interpreter_enabled():
        start = time.perf_counter()
        launch()
        return (time.perf_counter() - start) * 1e3
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first.record()
    launch()
    last.record()
    last.synchronize()
    reps = max(1, min(50, int(TIMING_S * 1e3 / max(first.elapsed_time(last), 1e-3))))
    first.record()
    for _ in range(reps):
        launch()
    last.record()
    last.synchronize()
    return first.elapsed_time(last) / reps


def _skip(x: torch.Tensor, device: str) -> bool:
    """True where nothing may be tuned: the interpreter posing as a GPU model (its timings
    would be stored for that GPU), or a CUDA graph capture (timing synchronises)."""
    if interpreter_enabled() and device != INTERPRETER_DEVICE:
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _tune(descriptor: KernelDescriptor, call: Any, device: str, default: LaunchConfig,
          neighbours: list[LaunchConfig], x: torch.Tensor,
          run: Callable[[LaunchConfig], None], scratch: torch.Tensor,
          matches: Callable[[torch.Tensor], bool]) -> LaunchConfig:
    """The tuning shared by the kernels: ``default`` when the call's row bucket is tuned
    already, else the fastest of the candidates whose output (``run(config)`` writes
    ``scratch``) ``matches`` the reference, merged into the user table."""
    key, kernel, dtype = descriptor.table_key(call), descriptor.table_name, dtype_name(call.dtype)
    bucket = (kernel, device, dtype, key.width, key.variant, key.rows.bit_length())
    if bucket in _tuned:
        return _tuned[bucket]
    tabled = nearest_rows(kernel, device, dtype, key.width, key.rows, variant=key.variant)
    if tabled is not None and tabled.bit_length() == key.rows.bit_length():
        return default
    candidates = [default]
    for config in nearest_configs(kernel, device, dtype, key.width, key.rows,
                                  variant=key.variant) + neighbours:
        if config not in candidates and len(candidates) < MAX_CANDIDATES:
            candidates.append(config)
    deadline = time.perf_counter() + BUDGET_S
    timed: list[tuple[float, int, LaunchConfig]] = []
    with torch.no_grad():
        for index, config in enumerate(candidates):
            if index and time.perf_counter() > deadline:
                break
            try:
                scratch.fill_(float("nan"))  # a config that skips elements cannot pass
                run(config)
                if matches(scratch):
                    timed.append((_timer(lambda: run(config)), index, config))
            except Exception:  # a candidate that cannot compile or launch is only skipped
                continue
    best = min(timed)[2] if timed else default
    _tuned[bucket] = best
    if timed:
        _save(descriptor.table_entry(
            call, device, best, ms=min(timed)[0], trials=len(timed),
            compute_capability=compute_capability(x.device if x.is_cuda else None),
            torch=torch.__version__, triton=triton.__version__,
            date=datetime.date.today().isoformat()))
    return best


def tune_add_layernorm(descriptor: AddLayerNorm, call: AddLayerNormCall, x: torch.Tensor,
                       sum_tensor: torch.Tensor | None, sum_value: float,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       default: LaunchConfig) -> LaunchConfig:
    """The config an add+LayerNorm call on these inputs should use: ``default`` when the
    problem's row bucket is already tuned (or cannot be tuned here), else the fastest correct
    candidate, which is also merged into the user table. ``x`` holds ``call.rows`` rows of
    ``call.width`` elements; candidates write to a scratch buffer, never to the caller's
    output."""
    device = device_name(x.device)
    if _skip(x, device):
        return default
    rows, width = call.rows, call.width
    with torch.no_grad():
        # The kernel reads x, weight and bias as flat contiguous arrays.
        x = x.detach().contiguous().view(rows, width)
        weight = weight.detach().contiguous().view(width) if weight is not None else None
        bias = bias.detach().contiguous().view(width) if bias is not None else None
        shift = sum_tensor.detach().double() if sum_tensor is not None else sum_value
        checked = _check_rows(rows, width)
        reference = [F.layer_norm(x[part].double() + shift, (width,),
                                  weight.double() if weight is not None else None,
                                  bias.double() if bias is not None else None, eps)
                     for part in checked]
        scratch = torch.empty_like(x)

    def run(config: LaunchConfig) -> None:
        descriptor.launch(x, scratch, weight, bias, sum_tensor, sum_value, rows, width, eps,
                          config)

    fits = _fits_registers(REGISTERS_PER_LANE if rows_aligned(width, x.dtype.itemsize)
                           else REGISTERS_PER_UNALIGNED_LANE, device_properties(device))
    neighbours = _neighbours(default, triton.next_power_of_2(rows), fits)
    return _tune(descriptor, call, device, default, neighbours, x, run, scratch,
                 lambda out: _matches(out, checked, reference, TOLERANCE[x.dtype]))


def tune_add_layernorm_pool_gelu(descriptor: AddLayerNormPoolGelu, call: PoolGeluCall,
                                 x: torch.Tensor, sum_tensor: torch.Tensor | None,
                                 sum_value: float, weight: torch.Tensor | None,
                                 bias: torch.Tensor | None, eps: float,
                                 default: LaunchConfig) -> LaunchConfig:
    """As :func:`tune_add_layernorm`, for the fused tail on x ``[N, C, D, H, W]`` (contiguous,
    or channels-last for the channels-last descriptor), checked on the first and last batch
    entries."""
    device = device_name(x.device)
    if _skip(x, device):
        return default
    batch, channels, depth, height, width = x.shape
    kd, kh, kw = pool_kernel = call.pool_kernel
    channels_last = descriptor.channels_last
    with torch.no_grad():
        x = x.detach() if channels_last else x.detach().contiguous()
        weight = weight.detach().contiguous() if weight is not None else None
        bias = bias.detach().contiguous() if bias is not None else None
        shift = sum_tensor.detach().double() if sum_tensor is not None else sum_value
        checked = _check_rows(batch, x[0].numel())
        reference = [F.gelu(F.avg_pool3d(F.layer_norm(
            x[part].double() + shift, (width,), weight.double() if weight is not None else None,
            bias.double() if bias is not None else None, eps), pool_kernel),
            approximate=call.approximate) for part in checked]
        layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        scratch = torch.empty((batch, channels, depth // kd, height // kh, width // kw),
                              dtype=x.dtype, device=x.device, memory_format=layout)

    def run(config: LaunchConfig) -> None:
        descriptor.launch(x, scratch, weight, bias, sum_tensor, sum_value, eps, tuple(x.shape),
                          pool_kernel, call.approximate, config)

    # Registers: the loaded tile, its normalised copy and the float32 accumulator.
    fits = _fits_registers(3, device_properties(device))
    most_rows = triton.next_power_of_2(channels) if channels_last else \
        triton.next_power_of_2(call.pooled_rows)
    neighbours = _neighbours(default, most_rows, fits)
    return _tune(descriptor, call, device, default, neighbours, x, run, scratch,
                 lambda out: _matches(out, checked, reference, TOLERANCE[x.dtype]))


def _matches(out: torch.Tensor, checked: list[slice], reference: list[torch.Tensor],
             tolerance: float) -> bool:
    for part, expected in zip(checked, reference):
        error = (out[part].double() - expected).norm() / expected.norm().clamp_min(1e-30)
        if not bool(error <= tolerance):  # NaN compares False
            return False
    return True


def _save(entry: TableEntry) -> None:
    """Merges a tuned entry into the user table; a table that cannot be written is reported
    once and the config is still used for the rest of the process."""
    path = user_table_path()
    try:
        merge_entries(path, [entry])
    except (OSError, TableError) as error:
        warnings.warn(f"{AUTOTUNE_ENV}: cannot save the tuned config to {path}: {error}",
                      RuntimeWarning, stacklevel=4)
