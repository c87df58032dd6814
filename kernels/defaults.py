"""Default launch configs derived from the GPU's properties and each kernel's arithmetic.

The inputs are the device's SM count, threads and registers per SM, shared memory per block
and DRAM bandwidth (from ``torch.cuda.get_device_properties``; fixed values under the Triton
interpreter) and, per kernel, the bytes a row occupies, the lanes Triton allocates for it (a
power of two) and the registers a lane costs. Narrow rows follow from that reasoning alone;
the shape of a wide-row program (32 lanes a thread, 4096-lane or 16 KB tiles) was read off the
exhaustive grids of two held-out sets on an H100 and is checked on other GPU models and shapes
(BENCHMARKS.md). The reasoning:

* Latency hiding (Little's law): to stream at full DRAM bandwidth an SM must keep about
  ``bandwidth * latency / SMs`` bytes in flight; spread over the threads an SM can hold that
  gives the bytes each thread must load per step, never under one 16-byte vector.
* Loads vectorise fully only when every row starts 16-byte aligned (the kernels tell the
  compiler the power of two dividing the width). Other rows load in smaller pieces, down to
  one element at a time for odd widths, so a thread issues more, smaller loads and needs more
  of them in flight.
* Registers: a thread holds its lanes in float32 (the row and its centred copy); lanes per
  thread times the registers of a lane, times the threads of a program, must fit an SM's
  register file, and no thread may pass 255 registers.
* Waves: programs are shrunk (fewer rows each) until there are enough to give every SM its
  full complement of resident programs, so that small problems still use the whole GPU.
* Masked lanes of a non-power-of-two row cost registers but move no bytes: threads are
  counted from the row's useful bytes, lanes per thread from its power-of-two span.
* Layout: Triton spreads a tile's threads along the row first, one vector (one element for
  unaligned rows) each, before it stacks rows; a packed tile of narrow unaligned rows therefore
  spreads every row over all its warps, and each warp past the first adds a shared-memory
  exchange and a barrier to both of the row's reductions. Such programs are kept to a few
  warps and hold more rows per thread instead.
* Wide rows (512 lanes and more): a row's statistics cross warps through shared memory, so
  threads hold many lanes each (32: many loads in flight, 80 registers) and programs stay at
  4-8 warps; a program holds a few whole rows (4096 lanes, or 16 KB once rows are 8 KB), or
  two rows walked in chunks of half that, where the second read of each chunk comes from L2
  soon after the first; rows loaded in full 16-byte vectors stay whole up to 32 lanes on each
  of the most threads the registers allow. With fewer rows than SMs a row gets wide chunks
  (32 KB) and the threads of 32 lanes each, so that the little work there is spreads over
  more threads.
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

# DRAM latency under load, in nanoseconds: a property of GDDR/HBM memory systems generally.
DRAM_LATENCY_NS = 600.0
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
# Rows of WIDE_ROW_LANES lanes and more (see "Wide rows" above): 32 lanes a thread in tiles of
# 4096 lanes, 16 KB for rows of 8 KB or more; chunked rows in chunks of at least
# MIN_CHUNK_ELEMENTS (search_spaces/add_layernorm.yaml's min_chunk_elements); fewer rows than
# SMs get chunks of up to 32 KB.
WIDE_ROW_LANES = 512
WIDE_LANES_PER_THREAD = 32
WIDE_TILE_ELEMENTS = 4096
WIDE_TILE_BYTES = 16 << 10
MIN_CHUNK_ELEMENTS = 4096
FEW_ROWS_CHUNK_BYTES = 32 << 10
# Warps one row of a packed tile may span (see "Layout" above): up to four, a row's reductions
# cross warps in two shared-memory steps at most.
MAX_WARPS_PER_ROW = 4


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


def max_program_threads(lanes_per_thread: int, props: DeviceProperties,
                        aligned: bool = True) -> int:
    """The most threads (a power of two) a program may have whose threads each hold
    ``lanes_per_thread`` lanes without running out of registers."""
    registers = min(registers_per_thread(lanes_per_thread, aligned), MAX_REGISTERS_PER_THREAD)
    return max(32, min(MAX_THREADS_PER_PROGRAM, _floor_pow2(props.registers_per_sm / registers)))


def bytes_per_thread(props: DeviceProperties) -> int:
    """Bytes each thread should load per step to keep DRAM busy (a power of two, >= 16)."""
    in_flight_per_sm = props.dram_gbps * DRAM_LATENCY_NS / props.sm_count  # GB/s * ns = bytes
    per_thread = in_flight_per_sm / props.max_threads_per_sm
    return max(VECTOR_BYTES, triton.next_power_of_2(math.ceil(per_thread)))


def lanes_per_thread_target(width: int, itemsize: int, props: DeviceProperties) -> int:
    """Elements a thread should load per step for rows of ``width`` elements."""
    lanes = bytes_per_thread(props) // itemsize
    if not rows_aligned(width, itemsize):
        # Unaligned rows load element by element: twice the loads in flight make up for the
        # smaller transactions (and keep the per-thread addressing cost amortised).
        lanes *= 2
    return max(1, lanes)


def _resident_programs(threads: int, props: DeviceProperties, lanes_per_thread: int,
                       aligned: bool) -> int:
    by_threads = props.max_threads_per_sm // threads
    by_registers = props.registers_per_sm // (threads * registers_per_thread(lanes_per_thread,
                                                                             aligned))
    return max(1, min(by_threads, by_registers, props.max_programs_per_sm))


def fullest_program_threads(most: int, lanes_per_thread: int, props: DeviceProperties,
                            aligned: bool) -> int:
    """The program size (a power of two from 32 to ``most`` threads) whose resident programs
    fill the most of an SM's threads, the largest among equals. Registers, not threads, often
    bound residency, and then only a program size that divides the SM's register budget well
    uses all of it (e.g. one 512-thread program where six 128-thread ones would fit)."""
    def resident_threads(threads: int) -> int:
        return threads * _resident_programs(threads, props, lanes_per_thread, aligned)

    sizes = [32 << shift for shift in range(max(1, most // 32).bit_length())]
    return max(sizes, key=lambda threads: (resident_threads(threads), threads))


def add_layernorm_default(rows: int, width: int, itemsize: int,
                          props: DeviceProperties) -> LaunchConfig:
    """The add+LayerNorm launch config for ``rows x width`` rows of ``itemsize``-byte elements
    on a GPU with ``props`` (see the module docstring for the reasoning)."""
    span = triton.next_power_of_2(width)
    if span >= WIDE_ROW_LANES:
        return _wide_rows_default(rows, width, itemsize, props)
    lanes_target = lanes_per_thread_target(width, itemsize, props)
    aligned = rows_aligned(width, itemsize)
    block_w = span
    # Threads from the useful bytes of a row; lanes per thread from its power-of-two span.
    row_threads = triton.next_power_of_2(triton.cdiv(width, lanes_target))
    # A quarter of an SM's threads per program: at least four programs resident per SM.
    program_threads = max(32, min(_floor_pow2(props.max_threads_per_sm // 4),
                                  max_program_threads(block_w // row_threads, props, aligned)))

    # Narrow rows: every thread holds its lanes target, over as many rows as that takes, in
    # programs that span at most MAX_WARPS_PER_ROW warps of a row and leave the fewest of an
    # SM's threads unused; then rows are given back while the grid is too small for the GPU.
    vector = VECTOR_BYTES // itemsize if aligned else 1
    if block_w // vector > MAX_WARPS_PER_ROW * 32:
        program_threads = min(program_threads, MAX_WARPS_PER_ROW * 32)
    program_threads = fullest_program_threads(program_threads, lanes_target, props, aligned)
    block_rows = max(1, lanes_target * program_threads // block_w)
    while True:
        threads = max(32, min(program_threads, block_rows * row_threads))
        lanes = block_rows * block_w // threads
        wanted = props.sm_count * _resident_programs(threads, props, lanes, aligned)
        if block_rows == 1 or triton.cdiv(rows, block_rows) >= wanted:
            break
        block_rows //= 2
    return LaunchConfig(block_rows=block_rows, block_w=block_w, num_warps=threads // 32)


def _wide_rows_default(rows: int, width: int, itemsize: int,
                       props: DeviceProperties) -> LaunchConfig:
    """Rows spanning :data:`WIDE_ROW_LANES` lanes or more: programs of
    :data:`WIDE_TILE_ELEMENTS` lanes (16 KB once rows are 8 KB), 32 lanes a thread, whole rows
    while they fit, else two rows walked in chunks of half that; fewer rows (and threads) a
    program while the grid has under two programs an SM; and for fewer rows than SMs, a row a
    program with as many threads as 32 lanes each give, within the SM's registers."""
    span = triton.next_power_of_2(width)
    aligned = rows_aligned(width, itemsize)
    if rows < props.sm_count:
        most_threads = max_program_threads(WIDE_LANES_PER_THREAD, props, aligned)
        block_w = min(span, FEW_ROWS_CHUNK_BYTES // itemsize, most_threads * WIDE_LANES_PER_THREAD)
        threads = max(32, block_w // WIDE_LANES_PER_THREAD)
        return LaunchConfig(block_rows=1, block_w=block_w, num_warps=threads // 32)
    tile = WIDE_TILE_ELEMENTS
    if span * itemsize >= WIDE_TILE_BYTES // 2:
        tile = max(tile, WIDE_TILE_BYTES // itemsize)
    chunk = max(tile // 2, MIN_CHUNK_ELEMENTS)
    # Aligned rows cost half the registers a lane: whole rows fit one pass up to 32 lanes on
    # each thread of the largest program the registers allow.
    whole_row = max_program_threads(WIDE_LANES_PER_THREAD, props) * WIDE_LANES_PER_THREAD
    block_w = span if span < tile or span <= chunk or (aligned and span <= whole_row) else chunk
    block_rows = max(1, tile // block_w)
    while block_rows > 1 and triton.cdiv(rows, block_rows) < 2 * props.sm_count:
        block_rows //= 2
    threads = max(32, min(MAX_THREADS_PER_PROGRAM,
                          block_rows * block_w // WIDE_LANES_PER_THREAD))
    return LaunchConfig(block_rows=block_rows, block_w=block_w, num_warps=threads // 32)


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
