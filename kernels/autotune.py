"""Self-tuning on a table miss, persisted: with ``TUNER_AUTOTUNE=1`` the first add+LayerNorm
call of a (GPU model, dtype, width, row bucket) that has no table entry times a handful of
candidate configs on the call's own inputs, keeps the fastest whose output matches a float64
PyTorch reference, and merges it into the user table (``kernels.table.user_table_path``), so
later calls and later processes find it there.

A row bucket is a power-of-two range of row counts: a table entry anywhere in the bucket
counts as tuned. The candidates are the default config, the table's nearest entries for the
same width and the default's neighbours (rows, warps and eviction policy one step away), timed
within about :data:`BUDGET_S` seconds (a candidate started in time is finished). Under the Triton interpreter nothing is tuned unless the device name
is ``interpreter``, so CPU runs never write entries for a GPU model.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
import warnings

import torch
import torch.nn.functional as F
import triton

from .config import LaunchConfig
from .defaults import (
    ALIGNMENT_ELEMENTS,
    MAX_REGISTERS_PER_THREAD,
    DeviceProperties,
    device_properties,
    registers_per_thread,
)
from .device import INTERPRETER_DEVICE, compute_capability, device_name, interpreter_enabled
from .table import TableEntry, TableError, merge_entries, nearest_configs, nearest_rows, user_table_path

AUTOTUNE_ENV = "TUNER_AUTOTUNE"
BUDGET_S = 2.0
MAX_CANDIDATES = 8
# Elements of x checked against the float64 reference (the first and last rows of x: a
# config's masking errors show at the edges, its tiling errors in every tile).
CHECK_ELEMENTS = 1 << 22
# Relative error ||out - ref|| / ||ref|| a candidate may have, per dtype (as the tuner checks).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Seconds of launches timed per candidate on a GPU, after one launch to estimate.
TIMING_S = 0.02

# (device, dtype, width, row bucket) -> the config tuned in this process (also when the user
# table could not be written).
_tuned: dict[tuple[str, str, int, int], LaunchConfig] = {}


def autotune_enabled() -> bool:
    """True when ``TUNER_AUTOTUNE`` is set to anything but "", "0"."""
    return os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _neighbours(config: LaunchConfig, rows: int, width: int,
                props: DeviceProperties) -> list[LaunchConfig]:
    """Configs one step from ``config``: rows halved or doubled (with warps following, so the
    lanes a thread holds stay the same, and without), warps halved or doubled, evict_last;
    only those whose registers fit the device."""
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
        threads = 32 * candidate.num_warps
        registers = registers_per_thread(candidate.tile_elements // threads,
                                         width % ALIGNMENT_ELEMENTS == 0)
        if candidate.block_rows > triton.next_power_of_2(rows) or \
                registers > MAX_REGISTERS_PER_THREAD or \
                registers * threads > props.registers_per_sm or \
                (candidate.num_warps > 1 and candidate.tile_elements < threads):
            continue
        found.append(candidate)
    return found


def _check_rows(rows: int, width: int) -> list[slice]:
    """The row ranges compared with the reference: all rows, or the first and last ones."""
    if rows * width <= CHECK_ELEMENTS:
        return [slice(0, rows)]
    half = max(1, CHECK_ELEMENTS // (2 * width))
    return [slice(0, half), slice(rows - half, rows)]


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


def tune_add_layernorm(x: torch.Tensor, sum_tensor: torch.Tensor | None, sum_value: float,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       rows: int, width: int, default: LaunchConfig) -> LaunchConfig:
    """The config an add+LayerNorm call on these inputs should use: ``default`` when the
    problem's row bucket is already tuned (or cannot be tuned here), else the fastest correct
    candidate, which is also merged into the user table. ``x`` holds ``rows`` rows of
    ``width`` elements; candidates write to a scratch buffer, never to the caller's output."""
    from .add_layernorm import KERNEL_NAME, _dtype_name, _launch

    device = device_name(x.device)
    if interpreter_enabled() and device != INTERPRETER_DEVICE:
        return default
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return default  # timing synchronises, which a CUDA graph capture forbids
    dtype = _dtype_name(x.dtype)
    key = (device, dtype, width, rows.bit_length())
    if key in _tuned:
        return _tuned[key]
    tabled = nearest_rows(KERNEL_NAME, device, dtype, width, rows)
    if tabled is not None and tabled.bit_length() == rows.bit_length():
        return default
    candidates = [default]
    neighbours = _neighbours(default, rows, width, device_properties(device))
    for config in nearest_configs(KERNEL_NAME, device, dtype, width, rows) + neighbours:
        if config not in candidates and len(candidates) < MAX_CANDIDATES:
            candidates.append(config)

    deadline = time.perf_counter() + BUDGET_S
    with torch.no_grad():
        # The kernel reads x, weight and bias as flat contiguous arrays.
        x2 = x.detach().contiguous().view(rows, width)
        weight = weight.detach().contiguous().view(width) if weight is not None else None
        bias = bias.detach().contiguous().view(width) if bias is not None else None
        shift = sum_tensor.detach().double() if sum_tensor is not None else sum_value
        checked = _check_rows(rows, width)
        reference = [F.layer_norm(x2[part].double() + shift, (width,),
                                  weight.double() if weight is not None else None,
                                  bias.double() if bias is not None else None, eps)
                     for part in checked]
        scratch = torch.empty_like(x2)
        timed: list[tuple[float, int, LaunchConfig]] = []
        for index, config in enumerate(candidates):
            if index and time.perf_counter() > deadline:
                break

            def launch(config: LaunchConfig = config) -> None:
                _launch(x2, scratch, weight, bias, sum_tensor, sum_value, rows, width, eps, config)

            try:
                scratch.fill_(float("nan"))  # a config that skips elements cannot pass
                launch()
                if not _matches(scratch, checked, reference, TOLERANCE[x.dtype]):
                    continue
                timed.append((_timer(launch), index, config))
            except Exception:  # a candidate that cannot compile or launch is only skipped
                continue
    if not timed:
        _tuned[key] = default
        return default
    ms, _, best = min(timed)
    _tuned[key] = best
    _save(TableEntry(kernel=KERNEL_NAME, device=device, dtype=dtype, width=width, rows=rows,
                     config=best, ms=ms, trials=len(timed),
                     compute_capability=compute_capability(x.device if x.is_cuda else None),
                     torch=torch.__version__, triton=triton.__version__,
                     date=datetime.date.today().isoformat()))
    return best


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
