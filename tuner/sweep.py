"""Sweep specs: YAML lists of kernels, shapes and dtypes to tune, validated on load.

    kernels: [add_layernorm]          # optional, default [add_layernorm]
    shapes: [32x64x32x64x64, 4096x768]
    dtypes: [float32, bfloat16]
    trials: 48                        # optional: measured configs per study
    patience: 24                      # optional: stop a study after this many without gain
    timeout: 3600                     # optional: seconds for the whole sweep
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .errors import InputError
from .problems import Problem, get_kernel
from .space import check_keys, read_yaml

_KEYS = {"kernels": list, "shapes": list, "dtypes": list, "trials": int, "patience": int,
         "timeout": (int, float)}
_MISS_KEYS = ("kernel", "device", "dtype", "shape")


class SpecError(InputError):
    """A sweep spec that cannot be used; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """The problems of a sweep and its budget (None: the command line decides)."""

    problems: tuple[Problem, ...]
    trials: int | None = None
    patience: int | None = None
    timeout: float | None = None


def build_problems(kernels: list[str], shapes: list[str], dtypes: list[str],
                   where: str = "command line") -> tuple[Problem, ...]:
    """Every (kernel, shape, dtype) combination, canonical and without repeats."""
    problems: dict[Problem, None] = {}
    for kernel in kernels:
        spec = get_kernel(kernel)
        for shape in shapes:
            for dtype in dtypes:
                try:
                    problems[spec.problem(str(shape), str(dtype))] = None
                except InputError as error:
                    raise SpecError(f"{where}: {error}") from None
    return tuple(problems)


def parse_spec(data: Any, path: str = "<memory>") -> SweepSpec:
    """Validates a spec already read from YAML."""
    check_keys(data, _KEYS, SpecError, path)
    for key, kind in _KEYS.items():
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SpecError(f"{path}: {key}: expected {getattr(kind, '__name__', 'a number')}, got {value!r}")
        if isinstance(value, list) and not value:
            raise SpecError(f"{path}: {key}: must not be empty")
        if not isinstance(value, list) and value <= 0:
            raise SpecError(f"{path}: {key}: must be positive, got {value!r}")
    for key in ("shapes", "dtypes"):
        if key not in data:
            raise SpecError(f"{path}: missing {key}")
    try:
        kernels = [get_kernel(str(name)).name for name in data.get("kernels") or ["add_layernorm"]]
    except InputError as error:
        raise SpecError(f"{path}: kernels: {error}") from None
    problems = build_problems(kernels, data["shapes"], data["dtypes"], path)
    return SweepSpec(problems, data.get("trials"), data.get("patience"), data.get("timeout"))


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Reads and validates a sweep spec file."""
    return parse_spec(read_yaml(path, SpecError, "sweep spec"), str(path))


def load_misses(path: str | os.PathLike) -> dict[Problem, frozenset[str]]:
    """The problems of a table-miss log (``TUNER_MISS_LOG``, one JSON object a line with
    ``kernel``, ``device``, ``dtype`` and ``shape``), each with the GPU models it missed on.

    A bad line is a SpecError naming the file, the line number and the problem.
    """
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"{path}: cannot read the miss log: {error}") from None
    problems: dict[Problem, set[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SpecError(f"{where}: not a JSON object ({error}); each line must be like "
                            '{"kernel": "add_layernorm", "device": "...", "dtype": "float16", '
                            '"shape": "4096x768"}') from None
        check_keys(record, _MISS_KEYS, SpecError, where)
        absent = [key for key in _MISS_KEYS if not isinstance(record.get(key), str) or not record[key]]
        if absent:
            raise SpecError(f"{where}: missing or not a non-empty string: {', '.join(absent)}; "
                            f"each line needs {list(_MISS_KEYS)}")
        try:
            problem = get_kernel(record["kernel"]).problem(record["shape"], record["dtype"])
        except InputError as error:
            raise SpecError(f"{where}: {error}") from None
        problems.setdefault(problem, set()).add(record["device"])
    if not problems:
        raise SpecError(f"{path}: the miss log has no entries")
    return {problem: frozenset(devices) for problem, devices in problems.items()}
