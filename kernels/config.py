"""The launch configuration of a kernel: the tuning knobs every kernel module accepts."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

EVICTION_POLICIES: tuple[str, ...] = ("", "evict_first", "evict_last")
NUM_WARPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
# Triton refuses tensors of more elements than this (TRITON_MAX_TENSOR_NUMEL).
MAX_TILE_ELEMENTS = 1 << 20
_KEY = re.compile(r"^r(\d+)_w(\d+)_warps(\d+)_s(\d+)_(none|evict_first|evict_last)$")


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration: tile shape, warps, pipelining stages and eviction policy.

    ``block_rows`` rows of ``block_w`` columns form the 2-D tile one program works on.
    ``eviction_policy`` applies to the streaming loads of the input and to the store.
    """

    block_rows: int
    block_w: int
    num_warps: int
    num_stages: int = 1
    eviction_policy: str = ""

    def __post_init__(self) -> None:
        problems = []
        for name in ("block_rows", "block_w", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"LaunchConfig.{name} must be an int, got {value!r}")
        if not _is_power_of_two(self.block_rows):
            problems.append(f"block_rows={self.block_rows} is not a power of two >= 1")
        if not _is_power_of_two(self.block_w):
            problems.append(f"block_w={self.block_w} is not a power of two >= 1")
        if self.num_warps not in NUM_WARPS:
            problems.append(f"num_warps={self.num_warps} is not one of {NUM_WARPS}")
        if self.num_stages < 1:
            problems.append(f"num_stages={self.num_stages} must be >= 1")
        if self.eviction_policy not in EVICTION_POLICIES:
            problems.append(
                f"eviction_policy={self.eviction_policy!r} is not one of {EVICTION_POLICIES}"
            )
        if self.block_rows * self.block_w > MAX_TILE_ELEMENTS:
            problems.append(
                f"block_rows*block_w={self.block_rows * self.block_w} exceeds Triton's "
                f"limit of {MAX_TILE_ELEMENTS} elements per tile"
            )
        if problems:
            raise ValueError("invalid LaunchConfig: " + "; ".join(problems))

    @property
    def tile_elements(self) -> int:
        """Elements one program holds per step."""
        return self.block_rows * self.block_w

    def as_dict(self) -> dict[str, Any]:
        """The config as a plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LaunchConfig":
        """Builds a config from a dict; unknown or missing keys are a ValueError."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown LaunchConfig keys {sorted(unknown)}; accepted: {sorted(fields)}")
        missing = {"block_rows", "block_w", "num_warps"} - set(data)
        if missing:
            raise ValueError(f"LaunchConfig is missing {sorted(missing)}")
        return cls(**data)

    @classmethod
    def from_key(cls, key: str) -> "LaunchConfig":
        """The config :meth:`key` names (``r64_w64_warps16_s1_evict_last``); a ValueError for
        anything else."""
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"bad config key {key!r}; expected like r64_w64_warps16_s1_evict_last")
        rows, width, warps, stages, policy = match.groups()
        return cls(int(rows), int(width), int(warps), int(stages), "" if policy == "none" else policy)

    def key(self) -> str:
        """A short stable string naming the config, used to dedupe measurements."""
        policy = self.eviction_policy or "none"
        return f"r{self.block_rows}_w{self.block_w}_warps{self.num_warps}_s{self.num_stages}_{policy}"
