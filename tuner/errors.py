"""The error type of bad input: what the CLI reports in one line, without a traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot be used: a flag, a shape, a file, a storage URL, a kernel reference.

    The message says what is wrong and names the input; every other exception is a bug and
    keeps its traceback.
    """


class UsageError(InputError):
    """Bad command-line input; printed without a traceback."""
