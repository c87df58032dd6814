"""A study's outcome: the confirmed winner of one problem on one GPU model, with the baselines
measured beside it, as stored with the study and exported to the tables."""

from __future__ import annotations

import dataclasses
from typing import Any

from kernels import LaunchConfig, TableEntry

from .problems import Problem


@dataclasses.dataclass
class StudyResult:
    """The confirmed winner of a study, with the baselines measured beside it."""

    problem: Problem
    device: str
    config: LaunchConfig
    ms: float
    gbps: float
    pct_of_copy: float
    trials: int
    heuristic_ms: float | None  # None where the default config failed its trial (crashed, wrong)
    eager_ms: float | None  # None where PyTorch eager cannot run the problem
    compute_capability: str = ""
    torch: str = ""
    triton: str = ""
    date: str = ""
    resumed: bool = False

    @property
    def speedup_vs_heuristic(self) -> float | None:
        return None if self.heuristic_ms is None else self.heuristic_ms / self.ms

    @property
    def speedup_vs_eager(self) -> float | None:
        return None if self.eager_ms is None else self.eager_ms / self.ms

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["problem"] = {"kernel": self.problem.kernel, "shape": list(self.problem.shape),
                           "dtype": self.problem.dtype}
        data["config"] = self.config.as_dict()
        data.pop("resumed")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StudyResult":
        problem = Problem(data["problem"]["kernel"], tuple(data["problem"]["shape"]),
                          data["problem"]["dtype"])
        return cls(**{**data, "problem": problem, "config": LaunchConfig.from_dict(data["config"]),
                      "resumed": True})


def entry_from_result(result: StudyResult) -> TableEntry:
    """The lookup-table entry of a study's winner."""
    from .problems import get_kernel

    spec = get_kernel(result.problem.kernel)
    return spec.descriptor.table_entry(
        spec.call(result.problem), result.device, result.config, ms=result.ms, gbps=result.gbps,
        pct_of_copy=result.pct_of_copy, trials=result.trials,
        compute_capability=result.compute_capability, torch=result.torch,
        triton=result.triton, date=result.date)
