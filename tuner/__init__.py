"""The tuning service: Optuna proposes launch configs, workers (one per GPU: local processes or
Ray actors) compile, check and time them, and the winners are merged into the runtime's lookup
tables.

The public names below are imported on first use, so that ``python -m tuner`` starts its GPU
workers before it pays for torch, Optuna or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Driver": "driver", "entry_from_result": "result",
    "format_columns": "columns",
    "InputError": "errors",
    "export_storage": "export", "results_in_storage": "export", "show_table": "export",
    "triton_configs": "export",
    "ENTRY_POINT_GROUP": "plugins", "PluginError": "plugins",
    "Progress": "progress", "quiet_library_noise": "progress",
    "results_document": "report", "write_report": "report",
    "open_storage": "storage",
    "LocalPool": "local",
    "Confirmation": "measure", "Measurement": "measure", "ProblemBench": "measure",
    "copy_bandwidth_gbps": "measure",
    "NoGPUError": "pools", "PoolOptions": "pools",
    "KERNELS": "problems", "KernelSpec": "problems", "Problem": "problems", "TableKey": "problems",
    "get_kernel": "problems", "parse_dims": "problems", "parse_dtype": "problems",
    "RESTRICTIONS": "space", "SearchSpace": "space", "SpaceError": "space", "load_space": "space",
    "parse_space": "space",
    "StudyResult": "result",
    "CandidateTPE": "sampler",
    "Settings": "study", "Stage": "study", "StudyRun": "study",
    "study_name": "study",
    "SpecError": "sweep", "SweepSpec": "sweep", "load_spec": "sweep", "parse_spec": "sweep",
    "TuningWorker": "tuning_worker",
    "WorkerPool": "workers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
