"""Search spaces: YAML files of knob values and restrictions, validated on load.

A space file (search_spaces/<kernel>.yaml)::

    kernel: add_layernorm
    parameters:                      # each a list of values, or a rule relative to the width
      block_rows: [1, 2, 4, 8]
      block_w: {relative_to_width: {min: 16, max: 65536, max_chunks: 2}}
      num_warps: [4, 8]
      num_stages: [1, 2]
      eviction_policy: ["", evict_first]
    restrictions:                    # named predicates from RESTRICTIONS, with their argument
      max_tile_elements: 16384
    refine_last: [num_stages]        # optional: knobs the search leaves at their smallest value
                                     # until every other combination is tried once

``relative_to_width`` gives the powers of two from the row's next power of two down to that
over ``max_chunks``, clamped to [min, max]. ``refine_last`` suits knobs that rarely change a
kernel's time (the pipelining stages of a memory-bound row kernel); a kernel whose time does
depend on them should leave them out.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import triton
import yaml

from kernels import EVICTION_POLICIES, LaunchConfig, TableKey
from kernels.config import MAX_TILE_ELEMENTS, NUM_WARPS
from kernels.defaults import conv_tail_shared_bytes

from .errors import InputError

PARAMETERS = ("block_rows", "block_w", "num_warps", "num_stages", "eviction_policy")
_TOP_LEVEL = ("kernel", "parameters", "restrictions", "refine_last")
# Knobs with ordered values (moved a step at a time by the local search; refine_last may name them).
ORDERED_PARAMETERS = ("block_rows", "block_w", "num_warps", "num_stages")


class SpaceError(InputError):
    """A search-space file that cannot be used; the message names the file and key."""


def _threads(config: LaunchConfig) -> int:
    return 32 * config.num_warps


def _c_in(key: TableKey) -> int:
    """Input channels of a whole-model kernel problem, from its table variant ``ci{C_in}_...``."""
    match = re.match(r"ci(\d+)_", key.variant)
    if match is None:
        raise SpaceError(f"max_dot_shared_bytes applies to conv_transpose_tail only (variant "
                         f"ci<C_in>_...), not to variant {key.variant!r}")
    return int(match.group(1))


# Restrictions: name -> (type of its argument, predicate(config, table key, argument)).
RESTRICTIONS: dict[str, tuple[type, Callable[[LaunchConfig, TableKey, Any], bool]]] = {
    "max_tile_elements": (int, lambda c, key, limit: c.tile_elements <= limit),
    "min_tile_elements": (int, lambda c, key, limit: c.tile_elements >= min(limit, key.rows * key.width)),
    # A single warp is always allowed: tiny problems have fewer elements than threads.
    "min_elements_per_thread": (int, lambda c, key, n: c.num_warps == 1 or c.tile_elements >= n * _threads(c)),
    "max_elements_per_thread": (int, lambda c, key, n: c.tile_elements <= n * _threads(c)),
    # No tile taller than the (power-of-two rounded) number of rows.
    "block_rows_within_rows": (bool, lambda c, key, on: not on or
                               c.block_rows <= triton.next_power_of_2(key.rows)),
    # Pipelining stages only matter in the chunked loop; with the row in registers they are one config.
    "stages_only_when_chunked": (bool, lambda c, key, on: not on or c.num_stages == 1 or
                                 c.block_w < key.width),
    "whole_rows_only": (bool, lambda c, key, on: not on or c.block_w >= key.width),
    # A chunked loop reads x twice: it pays only in steps large enough to keep memory busy.
    "min_chunk_elements": (int, lambda c, key, n: c.block_w >= key.width or c.block_w >= n),
    # Shared memory of the whole-model kernel's dot operands (float32, the larger case) within
    # a block's limit: 101376 bytes on sm_86/sm_89 (RTX 30x0/40x0), 232448 on an H100.
    "max_dot_shared_bytes": (int, lambda c, key, limit:
                             conv_tail_shared_bytes(_c_in(key), c.block_w, c.block_rows, 4) <= limit),
}

_VALUE_TYPES = {"block_rows": int, "block_w": int, "num_warps": int, "num_stages": int,
                "eviction_policy": str}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Knob values and restrictions of one kernel, as read from ``path``."""

    kernel: str
    parameters: dict[str, Any]
    restrictions: dict[str, Any]
    path: str = "<memory>"
    refine_last: tuple[str, ...] = ()  # knobs left at their smallest value while others are open

    def values(self, name: str, key: TableKey) -> list:
        """The values of one knob for a problem (block_w may depend on the width)."""
        spec = self.parameters[name]
        if isinstance(spec, list):
            return list(spec)
        rule = spec["relative_to_width"]
        top = min(triton.next_power_of_2(key.width), rule.get("max", MAX_TILE_ELEMENTS))
        lowest = max(top // rule.get("max_chunks", 1), min(rule.get("min", 1), top))
        return [1 << bits for bits in range(lowest.bit_length() - 1, top.bit_length())]

    def choices(self, key: TableKey) -> dict[str, list]:
        """Every knob's values for a problem, in PARAMETERS order."""
        return {name: self.values(name, key) for name in PARAMETERS}

    def allows(self, config: LaunchConfig, key: TableKey) -> bool:
        """True when every restriction accepts ``config`` for the problem."""
        return all(RESTRICTIONS[name][1](config, key, argument)
                   for name, argument in self.restrictions.items())

    def candidates(self, key: TableKey) -> list[LaunchConfig]:
        """Every valid config for a problem; a SpaceError if the restrictions leave none."""
        choices = self.choices(key)
        configs = [LaunchConfig(**dict(zip(PARAMETERS, values)))
                   for values in itertools.product(*choices.values())
                   if values[0] * values[1] <= MAX_TILE_ELEMENTS]
        valid = [config for config in configs if self.allows(config, key)]
        if not valid:
            raise SpaceError(f"{self.path}: restrictions {sorted(self.restrictions)} leave no valid "
                             f"config for width {key.width}, rows {key.rows}")
        return valid


def _check_parameter(path: str, name: str, spec: Any) -> Any:
    where = f"{path}: parameters.{name}"
    if isinstance(spec, dict):
        if name != "block_w" or set(spec) != {"relative_to_width"} or \
                not isinstance(spec["relative_to_width"], dict):
            raise SpaceError(f"{where}: expected a list of values"
                             + (" or {relative_to_width: {min, max, max_chunks}}" if name == "block_w" else ""))
        rule = spec["relative_to_width"]
        unknown = set(rule) - {"min", "max", "max_chunks"}
        if unknown:
            raise SpaceError(f"{where}.relative_to_width: unknown keys {sorted(unknown)}; "
                             "accepted: min, max, max_chunks")
        for key, value in rule.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpaceError(f"{where}.relative_to_width.{key}: must be a positive integer, got {value!r}")
            # values() yields powers of two between min and max: other bounds would let it
            # produce values outside [min, max].
            if key in ("min", "max") and value & (value - 1):
                raise SpaceError(f"{where}.relative_to_width.{key}: must be a power of two, got {value!r}")
        return spec
    if not isinstance(spec, list) or not spec:
        raise SpaceError(f"{where}: must be a non-empty list, got {spec!r}")
    kind = _VALUE_TYPES[name]
    for value in spec:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SpaceError(f"{where}: {value!r} is not {'an int' if kind is int else 'a string'}")
    if name == "eviction_policy" and not set(spec) <= set(EVICTION_POLICIES):
        raise SpaceError(f"{where}: {sorted(set(spec) - set(EVICTION_POLICIES))} not accepted; "
                         f"accepted: {list(EVICTION_POLICIES)}")
    if name == "num_warps" and not set(spec) <= set(NUM_WARPS):
        raise SpaceError(f"{where}: accepted values are {list(NUM_WARPS)}")
    if name in ("block_rows", "block_w") and any(value < 1 or value & (value - 1) for value in spec):
        raise SpaceError(f"{where}: values must be powers of two")
    if name == "num_stages" and any(value < 1 for value in spec):
        raise SpaceError(f"{where}: values must be >= 1")
    return list(dict.fromkeys(spec))


def parse_space(data: Any, path: str = "<memory>") -> SearchSpace:
    """Validates a space already read from YAML; errors name ``path`` and the key."""
    check_keys(data, _TOP_LEVEL, SpaceError, path)
    if not isinstance(data.get("kernel"), str):
        raise SpaceError(f"{path}: kernel: must name the kernel, e.g. 'kernel: add_layernorm'")
    parameters = data.get("parameters")
    if not isinstance(parameters, dict):
        raise SpaceError(f"{path}: parameters: must be a mapping of {list(PARAMETERS)}")
    unknown = set(parameters) - set(PARAMETERS)
    missing = set(PARAMETERS) - set(parameters)
    if unknown or missing:
        raise SpaceError(f"{path}: parameters: unknown {sorted(unknown)}, missing {sorted(missing)}; "
                         f"expected exactly {list(PARAMETERS)}")
    checked = {name: _check_parameter(path, name, parameters[name]) for name in PARAMETERS}
    restrictions = data.get("restrictions") or {}
    if not isinstance(restrictions, dict):
        raise SpaceError(f"{path}: restrictions: must be a mapping of name: argument")
    for name, argument in restrictions.items():
        if name not in RESTRICTIONS:
            raise SpaceError(f"{path}: restrictions.{name}: unknown restriction; known: "
                             f"{', '.join(sorted(RESTRICTIONS))}")
        kind = RESTRICTIONS[name][0]
        if not isinstance(argument, kind) or (kind is int and isinstance(argument, bool)):
            raise SpaceError(f"{path}: restrictions.{name}: expected {kind.__name__}, got {argument!r}")
    refine_last = data.get("refine_last") or []
    if not isinstance(refine_last, list) or not set(refine_last) <= set(ORDERED_PARAMETERS):
        raise SpaceError(f"{path}: refine_last: expected a list of knobs among "
                         f"{list(ORDERED_PARAMETERS)}, got {refine_last!r}")
    return SearchSpace(data["kernel"], checked, dict(restrictions), path,
                       tuple(dict.fromkeys(refine_last)))


def check_keys(data: Any, accepted: Iterable[str], error: type[InputError], path: str) -> None:
    """``data`` must be a mapping whose keys are among ``accepted``; else ``error`` naming them."""
    accepted = sorted(accepted)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping with keys {accepted}")
    unknown = set(data) - set(accepted)
    if unknown:
        raise error(f"{path}: unknown keys {sorted(unknown)}; accepted: {accepted}")


def read_yaml(path: str | os.PathLike, error: type[InputError], what: str) -> Any:
    """``yaml.safe_load`` of a file; unreadable files and bad YAML raise ``error`` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as problem:
        raise error(f"{path}: cannot read {what}: {problem.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid YAML: {problem}") from None


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Reads and validates a search-space YAML file."""
    return parse_space(read_yaml(path, SpaceError, "search space"), str(path))
