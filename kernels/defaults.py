"""Default launch configs derived from the GPU's properties and each kernel's arithmetic.

The inputs are the device's SM count, threads and registers per SM, shared memory per block
(from ``torch.cuda.get_device_properties``; fixed values under the Triton interpreter) and, per
kernel, the bytes a row occupies, the lanes Triton allocates for it (a power of two), the bytes
one load of a row can move (its alignment) and the registers a lane costs. The add+LayerNorm
rule was developed on the exhaustive grids of four held-out sets measured on an H100 and
checked, never fitted, on an H200 grid, on a fresh set's grid, and for an RTX 4090 (compiled
for sm_89 without spills; BENCHMARKS.md). The reasoning:

* Loads in flight: Triton issues all of a thread's loads of a tile before their first use, so
  a thread's lanes are the loads it has in flight. A thread takes 16 loads (as many elements
  as 16 loads of its row's alignment bring: 16 for odd widths, 64 for 16-byte vectors of
  float16), at most 64 bytes: 16 float32 lanes, or 32 lanes of 16-bit elements at two
  registers each (80 registers, 25 warps an SM). Little's law with DRAM's idle latency asks
  under 16 bytes a thread of every GPU here, below one of those loads, so bandwidth does not
  set the figure: the loads a thread keeps in flight and the registers they cost do.
* Loads vectorise fully only when every row starts 16-byte aligned (the kernels tell the
  compiler the power of two dividing the width); other rows load in smaller pieces, down to
  one element at a time for odd widths.
* Layout: Triton spreads a tile's threads along the row first before it stacks rows, and a row
  that spans warps pays a shared-memory exchange and a barrier in each of its two reductions.
  Rows of which one warp holds two or more (at 16 loads a thread) get a one-warp program
  stacking as many rows as fill it, so every reduction stays in the warp; wider rows go two
  to a program, so that each barrier serves two rows, on as many warps as their lanes ask.
* Wide rows (4096 lanes and more, MIN_CHUNK_ELEMENTS): rows loaded in full 16-byte vectors
  stay whole up to 16 lanes on each of the most threads a program may have (16384 lanes);
  other rows are walked two at a time in chunks of 4096 lanes on four warps, 64 lanes a
  thread (the search space's most): each chunk ends in cross-warp reductions, cheapest on few
  warps, and its second read comes from L2 soon after the first.
* Few rows: while the rows, two a program, do not fill the programs an SM holds at that size
  (registers bound them), a row gets a program of its own and the work is spread over all
  the threads: about 8 lanes a thread across an SM's threads, so a program's chunk is the
  SM's threads times 8 over the programs each SM gets (at most 16 lanes on each of 1024
  threads with fewer rows than SMs, where the registers allow it without spilling).
* Waves: narrow programs give rows back until every SM has at least one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton

from ._common import width_multiple
from .config import LaunchConfig
from .device import INTERPRETER_DEVICE, interpreter_enabled

VECTOR_BYTES = 16            # the widest load one thread issues
# Registers a lane costs in the LayerNorm kernels, and a thread's fixed cost; checked against
# ptxas for sm_89 by tests/test_sm89.py. Aligned rows: the float32 value and its centred copy
# (a vector load shares one address among its lanes). Unaligned rows load element by element:
# each lane also keeps its own offset and mask.
REGISTERS_PER_LANE = 2
REGISTERS_PER_UNALIGNED_LANE = 4
REGISTERS_BASE = 16
MAX_REGISTERS_PER_THREAD = 255
MAX_THREADS_PER_PROGRAM = 1024
WARP_THREADS = 32
# A thread's loads in flight and the bytes they may bring (see "Loads in flight" above).
LOADS_PER_THREAD = 16
MAX_BYTES_PER_THREAD = 64
# Rows a program holds at least, unless rows are few (see "Layout").
ROWS_PER_WIDE_PROGRAM = 2
# Rows of MIN_CHUNK_ELEMENTS lanes and more (see "Wide rows"): chunks of that many lanes
# (search_spaces/add_layernorm.yaml's min_chunk_elements), CHUNK_LANES_PER_THREAD lanes a
# thread (its max_elements_per_thread); aligned rows whole up to ALIGNED_WHOLE_ROW_LANES.
MIN_CHUNK_ELEMENTS = 4096
CHUNK_LANES_PER_THREAD = 64
ALIGNED_WHOLE_ROW_LANES = MAX_THREADS_PER_PROGRAM * LOADS_PER_THREAD
# Lanes a thread across all of an SM's threads when rows are few (see "Few rows").
FEW_ROWS_LANES_PER_THREAD = 8


@dataclasses.dataclass(frozen=True)
class DeviceProperties:
    """What a default config needs to know about a GPU."""

    name: str
    sm_count: int
    max_threads_per_sm: int
    registers_per_sm: int
    shared_memory_per_block: int     # bytes a program may use (opt-in maximum)
    l2_bytes: int
    dram_gbps: float
    max_programs_per_sm: int
    capability: tuple[int, int] = (0, 0)


# Under the interpreter there is no GPU: a mid-range card's properties, so that defaults
# picked in CPU tests look like GPU ones.
INTERPRETER_PROPERTIES = DeviceProperties(
    name=INTERPRETER_DEVICE, sm_count=108, max_threads_per_sm=2048, registers_per_sm=65536,
    shared_memory_per_block=101376, l2_bytes=40 << 20, dram_gbps=1500.0,
    max_programs_per_sm=32, capability=(8, 0))

# Resident programs (thread blocks) per SM by compute capability (CUDA programming guide);
# 32 for the others.
_MAX_BLOCKS_PER_SM = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24, (12, 0): 24}
# Bandwidth when the driver does not report the memory clock (GB/s): a conservative GDDR card.
_FALLBACK_DRAM_GBPS = 900.0


def properties_from_torch(props, capability: tuple[int, int]) -> DeviceProperties:
    """Reads ``torch.cuda.get_device_properties``; fields missing in older PyTorch releases
    fall back to values every GPU since Volta meets."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    # Double data rate: two transfers per clock on each bit of the bus.
    dram_gbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else _FALLBACK_DRAM_GBPS
    threads = getattr(props, "max_threads_per_multi_processor", 0) or 2048
    return DeviceProperties(
        name=props.name, sm_count=props.multi_processor_count, max_threads_per_sm=threads,
        registers_per_sm=getattr(props, "regs_per_multiprocessor", 0) or 65536,
        shared_memory_per_block=(getattr(props, "shared_memory_per_block_optin", 0)
                                 or getattr(props, "shared_memory_per_block", 0) or 49152),
        l2_bytes=getattr(props, "L2_cache_size", 0) or (4 << 20), dram_gbps=dram_gbps,
        max_programs_per_sm=_MAX_BLOCKS_PER_SM.get(capability, 32), capability=capability)


# GPU models described by whoever measured them (register_device_properties).
_REGISTERED: dict[str, DeviceProperties] = {}


def register_device_properties(device: str, properties: DeviceProperties) -> None:
    """Makes ``device_properties(device)`` answer ``properties`` without asking CUDA: how a
    tuning driver learns the GPUs of its workers, which may be on other hosts."""
    _REGISTERED[device] = properties
    device_properties.cache_clear()


@functools.lru_cache(maxsize=None)
def device_properties(device: str | None = None) -> DeviceProperties:
    """The properties of the GPU model called ``device`` (a table device name: registered, or
    one of this host's GPUs), of the current CUDA device for None, or
    :data:`INTERPRETER_PROPERTIES` under the interpreter."""
    if device in _REGISTERED:
        return _REGISTERED[device]
    if interpreter_enabled() or not torch.cuda.is_available():
        return INTERPRETER_PROPERTIES
    indices = range(torch.cuda.device_count())
    if device is not None:
        matching = [index for index in indices if torch.cuda.get_device_name(index) == device]
        index = matching[0] if matching else torch.cuda.current_device()
    else:
        index = torch.cuda.current_device()
    return properties_from_torch(torch.cuda.get_device_properties(index),
                                 torch.cuda.get_device_capability(index))


def _floor_pow2(value: float) -> int:
    return 1 << max(0, int(value).bit_length() - 1) if value >= 1 else 1


def rows_aligned(width: int, itemsize: int) -> bool:
    """Whether rows of ``width`` elements of ``itemsize`` bytes all start 16-byte aligned, so
    that the kernels load them in full 16-byte vectors."""
    return width_multiple(width) * itemsize >= VECTOR_BYTES


def registers_per_thread(lanes_per_thread: int, aligned: bool = True) -> int:
    """Estimated registers of a LayerNorm thread holding ``lanes_per_thread`` lanes of rows
    that start 16-byte aligned (``aligned``) or not."""
    per_lane = REGISTERS_PER_LANE if aligned else REGISTERS_PER_UNALIGNED_LANE
    return REGISTERS_BASE + per_lane * lanes_per_thread


def elements_per_load(width: int, itemsize: int) -> int:
    """Elements one load brings of rows of ``width`` elements: the power of two dividing the
    width that the kernels pass to the compiler, up to a 16-byte vector."""
    return max(1, min(width_multiple(width) * itemsize, VECTOR_BYTES) // itemsize)


def lanes_per_thread(width: int, itemsize: int) -> int:
    """Lanes a thread holds: :data:`LOADS_PER_THREAD` loads, at most
    :data:`MAX_BYTES_PER_THREAD` bytes (see "Loads in flight" in the module docstring)."""
    return max(1, min(LOADS_PER_THREAD * elements_per_load(width, itemsize),
                      MAX_BYTES_PER_THREAD // itemsize))


def resident_programs(threads: int, lanes: int, props: DeviceProperties,
                      aligned: bool = True) -> int:
    """Programs of ``threads`` threads holding ``lanes`` lanes each that an SM holds at once,
    bound by its threads, its registers and its program slots."""
    by_threads = props.max_threads_per_sm // threads
    by_registers = props.registers_per_sm // (threads * registers_per_thread(lanes, aligned))
    return max(1, min(by_threads, by_registers, props.max_programs_per_sm))


def add_layernorm_default(rows: int, width: int, itemsize: int,
                          props: DeviceProperties) -> LaunchConfig:
    """The add+LayerNorm launch config for ``rows x width`` rows of ``itemsize``-byte elements
    on a GPU with ``props`` (see the module docstring for the reasoning)."""
    span = triton.next_power_of_2(width)
    lanes = lanes_per_thread(width, itemsize)
    warp_lanes = WARP_THREADS * lanes
    if ROWS_PER_WIDE_PROGRAM * span <= warp_lanes:
        # Rows of which a warp holds two or more: a one-warp program, as many as fill it.
        block_rows = max(1, warp_lanes // span)
        while block_rows > 1 and triton.cdiv(rows, block_rows) < props.sm_count:
            block_rows //= 2
        return LaunchConfig(block_rows=block_rows, block_w=span, num_warps=1)
    # Rows a wide program (two rows of MIN_CHUNK_ELEMENTS-lane chunks on the fewest warps)
    # brings to an SM while it holds as many of those as its registers allow.
    chunk_threads = ROWS_PER_WIDE_PROGRAM * MIN_CHUNK_ELEMENTS // CHUNK_LANES_PER_THREAD
    rows_per_sm = ROWS_PER_WIDE_PROGRAM * resident_programs(chunk_threads,
                                                            CHUNK_LANES_PER_THREAD, props)
    if rows < rows_per_sm * props.sm_count:
        return _few_rows_default(rows, span, rows_aligned(width, itemsize), props)
    if span < MIN_CHUNK_ELEMENTS:
        warps = max(1, ROWS_PER_WIDE_PROGRAM * span // warp_lanes)
        return LaunchConfig(block_rows=ROWS_PER_WIDE_PROGRAM, block_w=span, num_warps=warps)
    if rows_aligned(width, itemsize):
        block_w = min(span, ALIGNED_WHOLE_ROW_LANES)
        warps = max(1, min(MAX_THREADS_PER_PROGRAM, block_w // lanes) // WARP_THREADS)
        return LaunchConfig(block_rows=1, block_w=block_w, num_warps=warps)
    return LaunchConfig(block_rows=ROWS_PER_WIDE_PROGRAM, block_w=MIN_CHUNK_ELEMENTS,
                        num_warps=chunk_threads // WARP_THREADS)


def _few_rows_default(rows: int, span: int, aligned: bool,
                      props: DeviceProperties) -> LaunchConfig:
    """Fewer rows than the SMs hold at two a program: a program a row, whose chunk is an SM's
    threads times :data:`FEW_ROWS_LANES_PER_THREAD` lanes over the rows each SM gets (the
    nearest power of two; at most one SM's worth), on a thread per that many lanes, halved
    while the program's registers would pass an SM's."""
    rows_per_sm = max(rows, props.sm_count) / props.sm_count
    lanes_per_sm = props.max_threads_per_sm * FEW_ROWS_LANES_PER_THREAD / rows_per_sm
    block_w = min(span, max(MIN_CHUNK_ELEMENTS, 1 << round(math.log2(lanes_per_sm))))

    def threads(block_w: int) -> int:
        return max(WARP_THREADS,
                   min(MAX_THREADS_PER_PROGRAM, block_w // FEW_ROWS_LANES_PER_THREAD))

    while block_w > MIN_CHUNK_ELEMENTS and threads(block_w) * registers_per_thread(
            block_w // threads(block_w), aligned) > props.registers_per_sm:
        block_w //= 2
    return LaunchConfig(block_rows=1, block_w=block_w, num_warps=threads(block_w) // WARP_THREADS)


def fit_to_device(config: LaunchConfig, props: DeviceProperties, *,
                  registers_per_element: int = REGISTERS_PER_LANE,
                  shared_bytes: int = 0) -> LaunchConfig:
    """``config`` with warps raised (then rows lowered) until a thread's estimated registers
    (``registers_per_element`` per tile element it holds) stay within 255 and the program's
    within an SM's register file, and, when ``shared_bytes`` estimates the program's shared
    memory, until that fits a block's."""
    block_rows, warps = config.block_rows, config.num_warps

    def registers() -> int:
        threads = 32 * warps
        return REGISTERS_BASE + registers_per_element * block_rows * config.block_w // threads

    def too_big() -> bool:
        return (registers() > MAX_REGISTERS_PER_THREAD
                or registers() * 32 * warps > props.registers_per_sm)

    while too_big() and 32 * warps * 2 <= MAX_THREADS_PER_PROGRAM and \
            REGISTERS_BASE * 32 * warps * 2 <= props.registers_per_sm:
        warps *= 2
    while block_rows > 1 and (too_big() or
                              shared_bytes * block_rows // config.block_rows
                              > props.shared_memory_per_block):
        block_rows //= 2
    return dataclasses.replace(config, block_rows=block_rows, num_warps=warps)


def conv_tail_shared_bytes(c_in: int, block_m: int, block_co: int, itemsize: int) -> int:
    """Shared memory of a whole-model kernel program: its ``tl.dot`` operands, two input tiles
    ``[block_m, C_in]`` (a row and its shift by one) and three weight taps ``[C_in, block_co]``
    (equal to what Triton allocates for sm_89 and sm_90)."""
    block_ci = max(16, triton.next_power_of_2(c_in))
    return (2 * block_m + 3 * block_co) * block_ci * itemsize


def conv_tail_block_co(c_in: int, c_out: int, block_m: int, itemsize: int,
                       props: DeviceProperties) -> int:
    """Output channels per program of the whole-model kernel: all of them up to 64, fewer
    where the dot operands would pass the device's shared memory per block."""
    block_co = max(16, min(64, triton.next_power_of_2(c_out)))
    while block_co > 16 and \
            conv_tail_shared_bytes(c_in, block_m, block_co, itemsize) > props.shared_memory_per_block:
        block_co //= 2
    return block_co


def add_layernorm_pool_gelu_default(pooled_rows: int, width: int, itemsize: int,
                                    pool_rows: int, channels_last: bool, channels: int | None,
                                    props: DeviceProperties) -> LaunchConfig:
    """The fused tail's launch config: whole input rows in registers, ``pool_rows`` (KD * KH)
    input row tiles per pooled row.

    Contiguous x: pooled rows are packed so that a program reads about 8 KiB of x in all,
    with a warp per KiB of one tile, 1 to 16 warps; rows of 2 KiB or more get a program per
    pooled row and a warp per KiB (4 to 16). Channels-last x: ``block_rows`` counts channels,
    up to 16 and at most C, fewer where a ``[block_w, channels]`` tile would pass 8 KiB, a
    warp per 4 KiB of the tile. Then fitted to the device (:func:`fit_to_device`): registers
    for the tile, its normalised copy and the accumulator, and the tile's float32 copy (the
    pooling reshape goes through shared memory) within a block's shared memory.
    """
    block_w = triton.next_power_of_2(width)
    row_bytes = block_w * itemsize
    if channels_last:
        bound = channels if channels is not None else pooled_rows
        budget = max(1, min(16, 8192 // row_bytes))
        block_rows = min(_floor_pow2(budget), triton.next_power_of_2(max(bound, 1)))
        warps = max(1, min(16, block_rows * row_bytes // 4096))
    elif row_bytes >= 2048:
        block_rows, warps = 1, max(4, min(16, row_bytes // 1024))
    else:
        budget = max(1, 8192 // (row_bytes * pool_rows))
        block_rows = min(_floor_pow2(budget), triton.next_power_of_2(max(pooled_rows, 1)))
        warps = max(1, min(16, block_rows * row_bytes // 1024))
    config = LaunchConfig(block_rows=block_rows, block_w=block_w, num_warps=warps)
    # Registers: the loaded tile, its normalised copy and the float32 accumulator.
    return fit_to_device(config, props, registers_per_element=3,
                         shared_bytes=4 * config.tile_elements)
