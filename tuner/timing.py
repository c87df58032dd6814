"""Timing a kernel on a GPU the way a user's job runs it: inputs not in L2, no host in the way.

A kernel of a few microseconds is hard to time one launch at a time: between the CUDA events
around a launch the GPU waits for the host's Python launch path, and on a host busy compiling
(the tuner's compile processes) that wait varies from trial to trial, so configs are ranked by
the host's load rather than their speed. Here many launches are captured in one CUDA graph and
replayed behind a GPU-side sleep, so the host enqueues everything before the GPU starts and the
events measure GPU time only. Each launch reads its own copy of the inputs, the copies taking
turns, so that together they overflow L2 and every launch finds its inputs in DRAM, as
``triton.testing.do_bench`` arranges by flushing L2 before each launch.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

# The copies together span this many L2s, so a launch's inputs were evicted since they were
# last read (L2 replacement is not strictly LRU: one L2's worth would leave some resident).
L2_MULTIPLE = 3
MAX_COPIES = 1024
# At most this share of the free GPU memory goes to copies.
COPY_MEMORY_SHARE = 0.25
# Launches per replay: enough to span ``replay_ms``, at most this many (capture costs the host
# a Python launch each).
MAX_LAUNCHES = 4096
# GPU cycles of sleep queued before each replay: longer than the host takes to record an
# event and launch the graph, so the GPU never waits for it.
SLEEP_CYCLES = 200_000
# (replay length in ms, replays) for a screening trial and for a careful re-timing.
QUICK = (1.0, 5)
CAREFUL = (3.0, 15)
# A screening trial cycles through at most this many copies: capturing a launch costs the host
# tens of microseconds, and a thousand copies of a tiny problem, which L2 holds anyway, made
# the capture most of a trial. Careful re-timings use every copy.
QUICK_COPIES = 256
# Runs of a config timed without a GPU (the interpreter): its wall clock says nothing about a
# GPU and only gives the pipeline something to rank, so one run, and one confirm round.
CPU_RUNS = 1


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 size in bytes."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)


def copies_needed(n_bytes: int, device: torch.device) -> int:
    """How many copies of a problem's tensors (``n_bytes`` each) keep launches out of L2,
    bounded by :data:`MAX_COPIES` and a share of the free GPU memory."""
    wanted = math.ceil(L2_MULTIPLE * l2_bytes(device) / max(1, n_bytes))
    free, _ = torch.cuda.mem_get_info(device)
    affordable = int(COPY_MEMORY_SHARE * free // max(1, n_bytes))
    return max(1, min(wanted, MAX_COPIES, affordable + 1))


def tensor_bytes(values: Any) -> int:
    """Bytes of the tensors among ``values`` (a dict, list or tensor)."""
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, dict):
        return sum(tensor_bytes(value) for value in values.values())
    if isinstance(values, (list, tuple)):
        return sum(tensor_bytes(value) for value in values)
    return 0


def clone_tensors(values: Any) -> Any:
    """``values`` with every tensor in it (dict values, list items) replaced by a clone."""
    if isinstance(values, torch.Tensor):
        return values.clone()
    if isinstance(values, dict):
        return {key: clone_tensors(value) for key, value in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(clone_tensors(value) for value in values)
    return values


def do_bench_ms(fn: Callable[[], Any], quick: bool = False) -> float:
    """``triton.testing.do_bench``'s median (L2 flushed before each launch, one launch timed at
    a time): for callables that cannot be captured in a CUDA graph."""
    import triton.testing

    warmup, rep = (10, 40) if quick else (25, 100)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


class CaptureError(RuntimeError):
    """Calls that run could not be captured in a CUDA graph."""


class GraphTimer:
    """Calls captured once in a CUDA graph of many launches cycling through them (each call on
    its own copy of the inputs), replayed on demand: the capture costs the host a Python launch
    per launch, a replay almost nothing.

    The calls must already run (compiled, checked). Raises :class:`CaptureError` if they
    cannot be captured in a graph (e.g. they synchronise with the host).
    """

    def __init__(self, calls: Sequence[Callable[[], Any]], device: torch.device,
                 quick: bool = False) -> None:
        replay_ms = (QUICK if quick else CAREFUL)[0]
        if quick:
            calls = calls[:QUICK_COPIES]
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):  # lazily initialised state is created outside capture
            calls[0]()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sample = calls[:8]
            start.record()
            for call in sample:
                call()
            end.record()
        end.synchronize()
        # An over-estimate (it includes the host's launch gaps): fewer launches, never too many.
        estimate_ms = max(start.elapsed_time(end) / len(sample), 1e-4)
        launches = max(len(calls), min(MAX_LAUNCHES, math.ceil(replay_ms / estimate_ms)))
        self.launches = math.ceil(launches / len(calls)) * len(calls)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=self.stream):
                for index in range(self.launches):
                    calls[index % len(calls)]()
        except Exception as error:  # the calls ran above: only capturing them failed
            raise CaptureError(f"{type(error).__name__}: {error}") from error
        with torch.cuda.stream(self.stream):
            self.graph.replay()  # the first replay uploads the graph

    def samples_ms(self, replays: int) -> list[float]:
        """Milliseconds of one call, from each of ``replays`` replays."""
        samples = []
        with torch.cuda.stream(self.stream):
            for _ in range(replays):
                before = torch.cuda.Event(enable_timing=True)
                after = torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(SLEEP_CYCLES)
                before.record()
                self.graph.replay()
                after.record()
                samples.append((before, after))
        torch.cuda.synchronize(self.device)
        return [before.elapsed_time(after) / self.launches for before, after in samples]

    def close(self) -> None:
        """Frees the graph."""
        del self.graph


def graph_time_ms(calls: Sequence[Callable[[], Any]], device: torch.device,
                  quick: bool = False) -> float:
    """Median milliseconds of one call, from CUDA-graph replays (:class:`GraphTimer`)."""
    timer = GraphTimer(calls, device, quick)
    try:
        return statistics.median(timer.samples_ms((QUICK if quick else CAREFUL)[1]))
    finally:
        timer.close()


def wall_time_ms(fn: Callable[[], Any], runs: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn`` (the interpreter: numbers only rank configs)."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _without_graph(error: CaptureError, device: torch.device) -> None:
    """Warns that calls are timed without a CUDA graph, and lets the failed capture settle."""
    warnings.warn(f"timing without a CUDA graph (the call cannot be captured: {error})",
                  RuntimeWarning, stacklevel=3)
    torch.cuda.synchronize(device)


def time_calls_ms(calls: Sequence[Callable[[], Any]], device: torch.device,
                  quick: bool = False) -> float:
    """Median milliseconds of one call: :func:`graph_time_ms` on a GPU, falling back to
    :func:`do_bench_ms` of the first call (with a warning) when the calls cannot be captured;
    wall clock under the interpreter."""
    if device.type != "cuda":
        return wall_time_ms(calls[0], runs=CPU_RUNS)
    try:
        return graph_time_ms(calls, device, quick)
    except CaptureError as error:
        _without_graph(error, device)
        return do_bench_ms(calls[0], quick)


def time_interleaved_ms(candidates: Mapping[str, Sequence[Callable[[], Any]]],
                        device: torch.device, rounds: int) -> dict[str, float]:
    """Median milliseconds of one call of each candidate's ``calls``, timed carefully and
    interleaved over ``rounds`` rounds, so that drift in clocks or temperature affects every
    candidate alike. Each candidate is captured once (:class:`GraphTimer`) and replayed a share
    of a careful timing's replays per round; one whose calls cannot be captured is timed with
    ``do_bench`` each round (with a warning); under the interpreter, one wall-clock run each
    (:data:`CPU_RUNS`), whatever ``rounds``."""
    rounds = max(1, rounds)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    if device.type != "cuda":
        return {name: wall_time_ms(calls[0], runs=CPU_RUNS) for name, calls in candidates.items()}
    timers: dict[str, GraphTimer | None] = {}
    try:
        for name, calls in candidates.items():
            try:
                timers[name] = GraphTimer(calls, device)
            except CaptureError as error:
                _without_graph(error, device)
                timers[name] = None
        per_round = max(1, math.ceil(CAREFUL[1] / rounds))
        for _ in range(rounds):
            for name, timer in timers.items():
                if timer is None:
                    samples[name].append(do_bench_ms(candidates[name][0]))
                else:
                    samples[name].extend(timer.samples_ms(per_round))
    finally:
        for timer in timers.values():
            if timer is not None:
                timer.close()
    return {name: statistics.median(values) for name, values in samples.items()}
