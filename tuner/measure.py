"""Measuring one config: compile it, check it against a PyTorch reference, time it."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from kernels import LaunchConfig

from .errors import is_fatal
from .problems import KernelSpec, Problem
from .timing import (
    CPU_RUNS,
    clone_tensors,
    copies_needed,
    do_bench_ms,
    tensor_bytes,
    time_calls_ms,
    time_interleaved_ms,
    wall_time_ms,
)

# Above this many elements the reference is computed in float32 to bound its memory.
FLOAT64_REFERENCE_LIMIT = 1 << 24
# Elements compared at a time by ProblemBench.check.
CHECK_SLICE_ELEMENTS = 1 << 24


class WrongResult(AssertionError):
    """A config whose output does not match the reference."""


@dataclasses.dataclass
class Measurement:
    """The outcome of one trial; ``ms`` is None when the config failed."""

    config: str
    ms: float | None = None
    gbps: float | None = None
    pct_of_copy: float | None = None
    compile_s: float | None = None
    error: str | None = None
    fatal: bool = False
    # Seconds the worker spent on each phase of the trial (``--verbose`` sums them up).
    phases: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """The confirm stage's outcome: each config's median time over interleaved rounds (by
    config key), PyTorch eager's time (None where eager cannot run the problem), the bytes the
    kernel must move and the device's copy bandwidth."""

    ms: dict[str, float]
    eager_ms: float | None
    n_bytes: int
    copy_gbps: float
    # Seconds the worker spent on each part of the stage (``--verbose`` sums them up).
    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    def gbps(self, ms: float) -> float:
        """Bandwidth of a config that took ``ms``."""
        return self.n_bytes / ms / 1e6


def time_ms(fn, device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU (L2 flushed before
    each call), wall clock under the interpreter. Configs are ranked with
    :meth:`ProblemBench.time` instead, which keeps the host's launch gaps out of the timing."""
    if device.type == "cuda":
        return do_bench_ms(fn, quick)
    return wall_time_ms(fn, runs=CPU_RUNS)


def copy_bandwidth_gbps(device: torch.device, n_bytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    if device.type != "cuda":
        n_bytes = 1 << 24
    source = torch.rand(n_bytes // 4, device=device)
    target = torch.empty_like(source)
    return 2 * n_bytes / time_ms(lambda: target.copy_(source), device, quick=True) / 1e6


class ProblemBench:
    """Inputs, reference and output buffer of one problem on one device, reused across trials."""

    def __init__(self, spec: KernelSpec, problem: Problem, device: torch.device, seed: int) -> None:
        self.spec, self.problem, self.device = spec, problem, device
        generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
        generator.manual_seed(seed)
        self.inputs = spec.make_inputs(problem, device, generator)
        self.out = spec.output_like(self.inputs)
        numel = self.out.numel()
        precision = torch.float64 if numel <= FLOAT64_REFERENCE_LIMIT else torch.float32
        self.reference = spec.reference(self.inputs, precision)
        self.reference_norm = self.reference.norm().item()
        self.tolerance = spec.tolerance[problem.dtype]
        self.n_bytes = spec.bytes_moved(problem)
        self._rotation: list[tuple[dict[str, Any], torch.Tensor]] | None = None

    def check(self, config: LaunchConfig | None) -> None:
        """Runs ``config`` on a NaN-poisoned output and compares it with the reference."""
        self.out.fill_(math.nan)
        result = self.spec.run(self.inputs, config, out=self.out)
        if not torch.isfinite(result).all():
            raise WrongResult("output has non-finite or unwritten (poisoned) elements")
        # Slice by slice, so the difference never needs a copy of the whole output.
        step = max(1, CHECK_SLICE_ELEMENTS // max(1, result[0].numel()))
        squared = sum((got.to(want.dtype) - want).square().sum().item()
                      for got, want in zip(result.split(step), self.reference.split(step)))
        error = math.sqrt(squared) / max(self.reference_norm, 1e-30)
        if not error <= self.tolerance:
            raise WrongResult(f"relative error {error:.3g} exceeds {self.tolerance:g} for {self.problem.dtype}")

    def time(self, config: LaunchConfig | None, quick: bool = False) -> float:
        """Median milliseconds of one run of ``config``, each run on its own copy of the inputs
        (:mod:`tuner.timing`); ``quick`` for a screening trial."""
        return time_calls_ms([lambda inputs=inputs, out=out: self.spec.run(inputs, config, out=out)
                              for inputs, out in self._copies()], self.device, quick)

    def time_interleaved(self, configs: list[LaunchConfig], rounds: int) -> dict[str, float]:
        """Median milliseconds of each config by its key, timed carefully and interleaved over
        ``rounds`` rounds (:func:`tuner.timing.time_interleaved_ms`)."""
        return time_interleaved_ms(
            {config.key(): [lambda inputs=inputs, out=out, config=config:
                            self.spec.run(inputs, config, out=out)
                            for inputs, out in self._copies()] for config in configs},
            self.device, rounds)

    def time_eager(self) -> float:
        """PyTorch eager's milliseconds, for the report's comparison: a quick timing (the
        careful one took a third of the confirm stage)."""
        return time_calls_ms([lambda inputs=inputs: self.spec.eager(inputs)
                              for inputs, _ in self._copies()], self.device, quick=True)

    def _copies(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """The inputs and output buffer, and on a GPU enough copies of them to overflow L2
        (made on first use, kept for the problem's later trials)."""
        if self._rotation is None:
            self._rotation = [(self.inputs, self.out)]
            if self.device.type == "cuda":
                per_copy = tensor_bytes(self.inputs) + tensor_bytes(self.out)
                for _ in range(copies_needed(per_copy, self.device) - 1):
                    inputs = clone_tensors(self.inputs)
                    self._rotation.append((inputs, self.spec.output_like(inputs)))
        return self._rotation

    def gbps(self, ms: float) -> float:
        return self.n_bytes / ms / 1e6

    def measure(self, config: LaunchConfig, copy_gbps: float, quick: bool = False) -> Measurement:
        """Compiles (timed separately), checks and times one config; never raises.

        ``quick`` times with a short ``do_bench`` (a search trial; its best few are re-timed).
        """
        result = Measurement(config.key())
        try:
            self._sync()
            start = time.perf_counter()
            self.check(config)  # the first launch compiles
            self._sync()
            result.compile_s = time.perf_counter() - start
            result.phases["first launch and check"] = result.compile_s
            result.ms = self.time(config, quick)
            result.phases["timing"] = time.perf_counter() - start - result.compile_s
            result.gbps = self.gbps(result.ms)
            result.pct_of_copy = 100 * result.gbps / copy_gbps
        except Exception as error:  # any failure fails this trial only
            result.ms = result.gbps = result.pct_of_copy = None
            result.error = f"{type(error).__name__}: {str(error).strip()[:500]}"
            result.fatal = is_fatal(error)
        return result

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
