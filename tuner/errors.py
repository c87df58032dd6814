"""Error types and classes: bad input (what the CLI reports in one line, without a
traceback), and the CUDA errors after which a worker's GPU context is gone."""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used: a flag, a shape, a file, a storage URL, a kernel reference.

    The message says what is wrong and names the input; every other exception is a bug and
    keeps its traceback.
    """


class UsageError(InputError):
    """Bad command-line input; printed without a traceback."""


# Errors after which the CUDA context is unusable: the worker must be replaced.
FATAL_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "misaligned address",
                     "illegal instruction", "CUDA error: an illegal", "device-side assert")


def is_fatal(error: BaseException) -> bool:
    """True when the error leaves the CUDA context unusable."""
    text = str(error)
    return any(marker in text for marker in FATAL_CUDA_ERRORS)
