"""The tuning service: Optuna proposes launch configs, Ray workers (one per GPU) compile,
check and time them, and the winners are merged into the runtime's lookup tables."""

from .driver import Driver, entry_from_result
from .export import export_storage, results_in_storage, show_table, triton_configs
from .measure import Measurement, ProblemBench, copy_bandwidth_gbps
from .plugins import ENTRY_POINT_GROUP, PluginError
from .problems import KERNELS, KernelSpec, Problem, TableKey, get_kernel, parse_dims, parse_dtype
from .progress import Progress, quiet_library_noise
from .report import results_document, write_report
from .space import RESTRICTIONS, SearchSpace, SpaceError, load_space, parse_space
from .storage import open_storage
from .study import Settings, StudyResult, StudyRun, study_name
from .sweep import SpecError, SweepSpec, load_spec, parse_spec
from .workers import NoGPUError, PoolOptions, TuningWorker, WorkerPool

__all__ = [
    "Driver", "ENTRY_POINT_GROUP", "KERNELS", "KernelSpec", "Measurement", "NoGPUError",
    "PluginError", "PoolOptions", "Problem", "ProblemBench", "Progress", "RESTRICTIONS",
    "SearchSpace", "Settings", "SpaceError", "SpecError", "StudyResult", "StudyRun", "SweepSpec", "TableKey", "TuningWorker", "WorkerPool",
    "copy_bandwidth_gbps", "entry_from_result", "export_storage", "get_kernel", "load_space",
    "load_spec", "open_storage", "parse_dims", "parse_dtype", "parse_space", "parse_spec",
    "quiet_library_noise",
    "results_document", "results_in_storage", "show_table", "study_name", "triton_configs",
    "write_report",
]
