"""The runtime: fused Triton kernels, their launch-config lookup tables and the model.

Needs only torch and triton.
"""

from .add_layernorm import fused_add_layernorm, heuristic_config, select_config
from .add_layernorm_pool_gelu import fused_add_layernorm_pool_gelu
from .config import EVICTION_POLICIES, LaunchConfig
from .conv_transpose_tail import fused_conv_transpose_tail
from .device import device_name, interpreter_enabled
from .model import Model, ModelNew
from .table import (
    SCHEMA_VERSION,
    TableEntry,
    TableError,
    TableWarning,
    load_table,
    lookup_config,
    merge_entries,
    nearest_configs,
    reload_tables,
    table_paths,
    user_table_path,
)

__all__ = [
    "EVICTION_POLICIES",
    "LaunchConfig",
    "Model",
    "ModelNew",
    "SCHEMA_VERSION",
    "TableEntry",
    "TableError",
    "TableWarning",
    "device_name",
    "fused_add_layernorm",
    "fused_conv_transpose_tail",
    "fused_add_layernorm_pool_gelu",
    "heuristic_config",
    "interpreter_enabled",
    "load_table",
    "lookup_config",
    "merge_entries",
    "nearest_configs",
    "reload_tables",
    "select_config",
    "table_paths",
    "user_table_path",
]
