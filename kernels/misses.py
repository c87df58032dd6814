"""Table misses fed back to the tuner: with ``TUNER_MISS_LOG=FILE`` the runtime appends one
JSON line per problem it served without an exact table entry::

    {"kernel": "add_layernorm", "device": "NVIDIA GeForce RTX 4090", "dtype": "float16",
     "shape": "4096x768"}

``kernel`` and ``shape`` are what ``python -m tuner`` takes (``--kernel``, ``--shape``), so
``python -m tuner sweep --misses FILE`` tunes exactly these problems. Each problem is written
once per process; after that a miss costs a set lookup and no I/O.
"""

from __future__ import annotations

import json
import os
import warnings

MISS_LOG_ENV = "TUNER_MISS_LOG"

# (log file, kernel, device, dtype, shape) already written by this process.
_logged: set[tuple[str, str, str, str, str]] = set()


def missed_problems_logged() -> bool:
    """True when TUNER_MISS_LOG names a file."""
    return bool(os.environ.get(MISS_LOG_ENV))


def record_miss(kernel: str, device: str, dtype: str, shape: str) -> None:
    """Appends the problem to the file named by TUNER_MISS_LOG, once per process; a no-op
    when the variable is unset. A log that cannot be written is reported once and ignored:
    it must never fail the kernel call."""
    path = os.environ.get(MISS_LOG_ENV)
    if not path:
        return
    key = (path, kernel, device, dtype, shape)
    if key in _logged:
        return
    _logged.add(key)
    line = json.dumps({"kernel": kernel, "device": device, "dtype": dtype, "shape": shape})
    try:
        # One write() of a line shorter than PIPE_BUF to a file opened for appending: lines
        # from concurrent processes do not interleave.
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as error:
        warnings.warn(f"{MISS_LOG_ENV}={path}: cannot append a table miss: {error}",
                      RuntimeWarning, stacklevel=3)
