"""Which device a kernel runs on: the name that keys the lookup tables."""

from __future__ import annotations

import functools
import os

import torch

INTERPRETER_DEVICE = "interpreter"


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | None = None) -> str:
    """The GPU model name tables are keyed by, or ``"interpreter"`` for CPU tensors and under
    TRITON_INTERPRET=1.

    ``TUNER_DEVICE_NAME`` overrides the interpreter's name, so that a CPU-only Ray cluster can
    stand in for several GPU models in tests. For a CUDA tensor's device this is one cached
    lookup (it is on the launch path).
    """
    if device is not None and device.type == "cuda":
        return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())
    if device is not None or interpreter_enabled():
        return os.environ.get("TUNER_DEVICE_NAME", INTERPRETER_DEVICE)
    return _cuda_device_name(torch.cuda.current_device())


def compute_capability(device: torch.device | None = None) -> str:
    """``"major.minor"`` of the current CUDA device, or ``""`` under the interpreter."""
    if interpreter_enabled() or not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"
