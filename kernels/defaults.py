"""Default launch configs derived from the GPU's properties and each kernel's arithmetic.

No constant here is fitted to one card's timings. The inputs are the device's SM count,
threads and registers per SM, shared memory per block, L2 size and DRAM bandwidth (from
``torch.cuda.get_device_properties``; fixed values under the Triton interpreter) and, per
kernel, the bytes a row occupies, the lanes Triton allocates for it (a power of two) and the
registers a lane costs. The reasoning:

* Latency hiding (Little's law): to stream at full DRAM bandwidth an SM must keep about
  ``bandwidth * latency / SMs`` bytes in flight; spread over the threads an SM can hold that
  gives the bytes each thread must load per step, never under one 16-byte vector.
* Loads vectorise only when every row starts 16-byte aligned: Triton knows that only for
  widths divisible by 16. Other widths load one element at a time, so a thread issues more,
  smaller loads and needs more of them in flight.
* Registers: a thread holds its lanes in float32 (the row and its centred copy); lanes per
  thread times the registers of a lane, times the threads of a program, must fit an SM's
  register file, and no thread may pass 255 registers.
* L2: rows too wide for one pass are read twice, the second time from L2 only while the rows
  of all resident programs fit there; that bounds how many programs may be resident.
* Reductions: a row's statistics are summed serially within a thread, then across warps
  through shared memory, a step per warp; a row gets a program of its own once whole-row
  programs can fill an SM within its limit on resident programs, with threads balancing the
  two costs.
* Waves: programs are shrunk (fewer rows each) until there are enough to give every SM its
  full complement of resident programs, so that small problems still use the whole GPU.
* Masked lanes of a non-power-of-two row cost registers but move no bytes: threads are
  counted from the row's useful bytes, lanes per thread from its power-of-two span.
* Layout: Triton spreads a tile's threads along the row first, one vector (one element for
  unaligned rows) each, before it stacks rows; a packed tile of narrow unaligned rows therefore
  spreads every row over all its warps, and each warp past the first adds a shared-memory
  exchange and a barrier to both of the row's reductions. Such programs are kept to a few
  warps and hold more rows per thread instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton

from .config import MAX_TILE_ELEMENTS, LaunchConfig
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
# Triton specialises integer arguments divisible by 16; only then are row starts known aligned.
ALIGNMENT_ELEMENTS = 16
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


@functools.lru_cache(maxsize=None)
def device_properties(device: str | None = None) -> DeviceProperties:
    """The properties of the GPU model called ``device`` (a table device name), of the current
    CUDA device for None, or :data:`INTERPRETER_PROPERTIES` under the interpreter."""
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
    if width % ALIGNMENT_ELEMENTS:
        # Unaligned rows load element by element: twice the loads in flight make up for the
        # smaller transactions (and keep the per-thread addressing cost amortised).
        lanes *= 2
    return max(1, lanes)


def single_pass_lanes(aligned: bool) -> int:
    """Lanes a LayerNorm thread holds at most in one pass: 80 registers either way, so that
    programs of 512 threads (the most whole rows need) still fit a 64K-register SM."""
    return 32 if aligned else 16


def single_pass_width(props: DeviceProperties, aligned: bool = True) -> int:
    """The widest row (a power of two) the add+LayerNorm default keeps in registers; wider
    rows are walked in chunks of this width."""
    lanes = single_pass_lanes(aligned)
    return lanes * max_program_threads(lanes, props, aligned)


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
    lanes_target = lanes_per_thread_target(width, itemsize, props)
    aligned = width % ALIGNMENT_ELEMENTS == 0
    most_lanes = single_pass_lanes(aligned)
    widest_program = max_program_threads(most_lanes, props, aligned)
    span = triton.next_power_of_2(width)
    if span > single_pass_width(props, aligned):
        # Chunked: two passes over the row, the second from L2 only while the rows of all
        # resident programs fit there. Chunks are as wide as one pass holds; programs get
        # fewer threads (more of them resident, hiding latency better) only while the rows
        # they hold at once stay within half of L2.
        block_w = single_pass_width(props, aligned)
        threads = MAX_THREADS_PER_PROGRAM
        row_bytes = width * itemsize
        # Unaligned lanes cost twice the registers in the two-pass loop (ptxas for sm_89:
        # 124 of the 128 a 512-thread program may have, at 16 lanes a thread).
        fewest_threads = block_w // (most_lanes if aligned else most_lanes // 2)
        while threads // 2 >= fewest_threads and \
                props.sm_count * (props.max_threads_per_sm // (threads // 2)) * row_bytes \
                <= props.l2_bytes // 2:
            threads //= 2
        while threads > 32 and threads * registers_per_thread(block_w // threads, aligned) \
                > props.registers_per_sm:
            threads //= 2
        return LaunchConfig(block_rows=1, block_w=block_w, num_warps=max(1, threads // 32))

    block_w = span
    # Threads from the useful bytes of a row; lanes per thread from its power-of-two span.
    row_threads = triton.next_power_of_2(triton.cdiv(width, lanes_target))
    # A quarter of an SM's threads per program: at least four programs resident per SM.
    program_threads = max(32, min(_floor_pow2(props.max_threads_per_sm // 4),
                                  max_program_threads(block_w // row_threads, props, aligned)))
    if row_threads >= props.max_threads_per_sm // props.max_programs_per_sm or \
            row_threads * 2 > widest_program:
        # Wide rows: one row a program, as soon as whole-row programs can fill an SM's threads
        # within its limit on resident programs. Each thread sums its lanes serially and the
        # warps combine their sums through shared memory, a step per warp: threads balance the
        # two (lanes per thread = 2 x warps, i.e. threads = sqrt(16 * lanes of the row)), with
        # a 16-byte vector a thread at least and no more lanes than one pass holds.
        balanced = triton.next_power_of_2(math.isqrt(16 * block_w))
        balanced = min(balanced, max(32, block_w * itemsize // VECTOR_BYTES))
        threads = min(max(balanced, triton.cdiv(block_w, most_lanes), 32), widest_program)
        return LaunchConfig(block_rows=1, block_w=block_w, num_warps=threads // 32)

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
