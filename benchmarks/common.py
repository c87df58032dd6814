"""Shared helpers for the benchmark scripts: timing, copy bandwidth, result tables."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.columns import format_columns  # noqa: E402


def time_ms(fn) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench: CUDA events, L2 flushed)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbps(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / ms / 1e6


def versions() -> dict:
    if not torch.cuda.is_available():
        return {"device": "cpu", "torch": torch.__version__, "triton": triton.__version__}
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__,
            "capability": ".".join(map(str, torch.cuda.get_device_capability()))}


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
