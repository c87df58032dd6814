"""Shared helpers for the benchmark scripts: timing, copy bandwidth, result tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner import measure  # noqa: E402
from tuner.columns import format_columns  # noqa: E402
from tuner.timing import do_bench_ms  # noqa: E402


def time_ms(fn) -> float:
    """Median milliseconds of ``fn``: ``do_bench``, L2 flushed before every call
    (tuner.timing.do_bench_ms)."""
    return do_bench_ms(fn)


def copy_bandwidth_gbps() -> float:
    """The current GPU's device-to-device copy bandwidth (tuner.measure.copy_bandwidth_gbps)."""
    return measure.copy_bandwidth_gbps(torch.device("cuda"))


def versions() -> dict:
    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__, "triton": triton.__version__}
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "driver": _driver_version()}


def _driver_version() -> str:
    """The NVIDIA driver's version (machines of one GPU model differ in it), or "unknown"."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def out_dir() -> Path:
    path = Path(os.environ.get("OUT", "out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, data) -> None:
    (out_dir() / name).write_text(json.dumps(data, indent=1))


def print_table(headers: list[str], rows: list[list]) -> None:
    """Prints a result table (tuner.columns, the tuner's own printer)."""
    for line in format_columns(headers, rows):
        print(line)
