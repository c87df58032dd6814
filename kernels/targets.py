"""Compiling kernels for a GPU without touching it: a process that only compiles (the tuner's
compile processes, the sm_89 readiness check) answers Triton's questions about "the current
GPU" with a target given up front, so it never creates a CUDA context, and every kernel it
compiles lands in Triton's disk cache under the key a launch on that GPU looks up.

A descriptor's ``compile(call, config, device="cpu")`` runs its launcher with ``warmup`` on
stand-in CPU tensors; under :func:`compile_only_for` that goes through Triton's own JIT path,
specialisation, options and cache key included, with only the target swapped.
"""

from __future__ import annotations

from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

__all__ = ["GPUTarget", "compile_only_for", "current_target"]

# The target this process compiles for, once it only compiles.
_installed: GPUTarget | None = None


class _TargetOnlyDriver:
    """The three answers Triton's JIT asks of the active driver before compiling (device,
    stream, target), for a fixed target. Anything else (loading or launching a kernel) fails
    with an error that says why."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> str:
        # The key of the JIT's per-device caches: one of its own, never a real device's.
        return f"compile-only:{self.target.backend}:{self.target.arch}"

    def get_current_stream(self, device: object = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def __getattr__(self, name: str):
        # An AttributeError, so that hasattr() and getattr(..., default) still answer.
        raise AttributeError(f"this process only compiles, for {self.target}: its driver has "
                             f"no {name!r} (no kernel may be loaded or launched here)")


def compile_only_for(target: GPUTarget) -> None:
    """From now on, this process compiles Triton kernels for ``target`` instead of asking a GPU
    (there may be none); launching a kernel becomes an error. For processes that only compile:
    there is no way back."""
    global _installed
    if not isinstance(target, GPUTarget):
        raise TypeError(f"expected a triton GPUTarget, got {type(target).__name__}")
    if target != _installed:
        driver.set_active(_TargetOnlyDriver(target))
        _installed = target


def current_target() -> GPUTarget:
    """The target of the GPU this process uses (creates no kernel, but initialises CUDA)."""
    return driver.active.get_current_target()
