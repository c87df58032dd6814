"""Launching a compiled Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **meta)`` binds every argument, specialises each one, hashes the
specialisation and looks the compiled kernel up on every call: on a small problem that is
most of the host's time. A kernel's launcher knows which of its arguments decide what Triton
compiles (dtypes, which optional tensors are given, integer values, the config), so it names
them in a ``key``; the first call with a key goes through Triton as usual, and later calls
with it hand their arguments straight to the compiled kernel's launcher, as Triton itself does
after its lookup.

Only while every tensor argument is 16-byte aligned (Triton specialises pointers on that) and
the kernel has no pre-run hooks; anything else, the interpreter and torch.compile's tracing go
through Triton.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import torch
from triton import knobs
from triton.runtime import driver


#: compiled launches kept; beyond this many keys the oldest half is forgotten
MAX_LAUNCHES = 4096


class _Launch:
    """One compiled kernel bound to a grid and its constexpr arguments."""

    __slots__ = ("kernel", "compiled", "launcher", "function", "metadata", "current_stream",
                 "grid", "constexprs", "tensor_positions")

    def __init__(self, kernel: Any, compiled: Any, grid: tuple[int, ...], constexprs: tuple,
                 tensor_positions: tuple[int, ...]) -> None:
        compiled[grid]  # loads the module onto the current device (Triton's _init_handles)
        self.kernel, self.compiled = kernel, compiled
        self.launcher, self.function = compiled.run, compiled.function
        self.metadata = compiled.packed_metadata
        self.current_stream = driver.active.get_current_stream
        self.grid = (tuple(grid) + (1, 1))[:3]
        self.constexprs = constexprs
        self.tensor_positions = tensor_positions

    def __call__(self, args: Sequence[Any], device: int) -> None:
        stream = self.current_stream(device)
        bound = (*args, *self.constexprs)
        grid = self.grid
        # What JITFunction.run does once it has found the compiled kernel.
        self.launcher(grid[0], grid[1], grid[2], stream, self.function, self.metadata,
                      self.compiled.launch_metadata(grid, stream, *bound),
                      knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound)


# (id of the kernel, device index, key) -> its launch, or None where the fast path does not
# apply. By id: hashing a JITFunction hashes its source each time.
_launches: dict[tuple, _Launch | None] = {}
_UNSEEN = object()  # a key not in _launches yet


def _aligned(args: Sequence[Any], positions: tuple[int, ...]) -> bool:
    pointers = 0
    for position in positions:
        pointers |= args[position].data_ptr()
    return not pointers & 15


def _new_launch(kernel: Any, grid: tuple[int, ...], args: Sequence[Any],
                meta: dict[str, Any], positions: tuple[int, ...]) -> _Launch | None:
    """The launch for later calls like this one, or None when they must go through Triton."""
    if getattr(kernel, "pre_run_hooks", None):
        return None
    try:
        constexprs = tuple(meta[name] for name in kernel.arg_names[len(args):])
        compiled = kernel.warmup(*args, grid=grid, **meta)  # found in Triton's cache
        return _Launch(kernel, compiled, grid, constexprs, positions)
    except (AttributeError, KeyError, TypeError):  # a Triton whose internals differ
        return None


def launch(kernel: Any, grid: tuple[int, ...], args: Sequence[Any],
           meta: Callable[[], dict[str, Any]], key: Hashable) -> None:
    """``kernel[grid](*args, **meta())``, where ``key`` (with the current device) fixes
    ``grid``, ``meta()`` and everything Triton specialises on in ``args`` except tensor
    alignment: the tensors' dtypes, which are given, and every integer argument's value (float
    arguments are always fp32). ``args`` are the kernel's leading, non-constexpr parameters,
    ``args[0]`` a tensor; ``meta()`` gives its constexprs and options by name."""
    # The interpreter's CPU tensors, and torch.compile's tracing (which knows Triton's launch,
    # not a compiled kernel's launcher), take Triton's own path.
    if not args[0].is_cuda or torch.compiler.is_compiling():
        kernel[grid](*args, **meta())
        return
    device = torch.cuda.current_device()
    cache_key = (id(kernel), device, key)
    found = _launches.get(cache_key, _UNSEEN)
    if isinstance(found, _Launch):
        if found.kernel is not kernel:  # another kernel that had this id before
            found = _UNSEEN
        elif _aligned(args, found.tensor_positions):
            found(args, device)
            return
    options = meta()
    kernel[grid](*args, **options)  # compiles on the first call
    if found is _UNSEEN:
        positions = tuple(index for index, arg in enumerate(args) if isinstance(arg, torch.Tensor))
        if _aligned(args, positions):  # else the next call tries again
            if len(_launches) >= MAX_LAUNCHES:
                for stale in list(_launches)[:MAX_LAUNCHES // 2]:
                    _launches.pop(stale, None)  # another thread may have taken it
            _launches[cache_key] = _new_launch(kernel, grid, args, options, positions)
