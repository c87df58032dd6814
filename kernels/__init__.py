"""The runtime: fused Triton kernels, their descriptors, their launch-config lookup tables and
the model.

Needs only torch and triton. (The backward functions stay in their modules,
``kernels.add_layernorm_backward`` and ``kernels.add_layernorm_pool_gelu_backward``, whose
names they share.)
"""

from .add_layernorm import (
    ADD_LAYERNORM,
    AddLayerNorm,
    AddLayerNormCall,
    fused_add_layernorm,
    heuristic_config,
    select_config,
)
from .add_layernorm_backward import (
    ADD_LAYERNORM_BACKWARD,
    AddLayerNormBackward,
    AddLayerNormBackwardCall,
)
from .add_layernorm_pool_gelu import (
    ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST,
    AddLayerNormPoolGelu,
    PoolGeluCall,
    fused_add_layernorm_pool_gelu,
)
from .add_layernorm_pool_gelu_backward import (
    ADD_LAYERNORM_POOL_GELU_BACKWARD,
    ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST,
    AddLayerNormPoolGeluBackward,
)
from .config import EVICTION_POLICIES, LaunchConfig
from .conv_transpose_tail import (
    CONV_TRANSPOSE_TAIL,
    ConvTailCall,
    ConvTransposeTail,
    fused_conv_transpose_tail,
)
from .descriptor import KernelDescriptor, RowsCall, RowsDescriptor, TableKey
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
from .targets import compile_only_for, current_target

#: Every built-in kernel's descriptor, by name.
DESCRIPTORS: dict[str, KernelDescriptor] = {descriptor.name: descriptor for descriptor in (
    ADD_LAYERNORM, ADD_LAYERNORM_BACKWARD, ADD_LAYERNORM_POOL_GELU,
    ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST, ADD_LAYERNORM_POOL_GELU_BACKWARD,
    ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST, CONV_TRANSPOSE_TAIL)}

__all__ = [
    "ADD_LAYERNORM",
    "ADD_LAYERNORM_BACKWARD",
    "ADD_LAYERNORM_POOL_GELU",
    "ADD_LAYERNORM_POOL_GELU_BACKWARD",
    "ADD_LAYERNORM_POOL_GELU_BACKWARD_CHANNELS_LAST",
    "ADD_LAYERNORM_POOL_GELU_CHANNELS_LAST",
    "AddLayerNorm",
    "AddLayerNormBackward",
    "AddLayerNormBackwardCall",
    "AddLayerNormCall",
    "AddLayerNormPoolGelu",
    "AddLayerNormPoolGeluBackward",
    "CONV_TRANSPOSE_TAIL",
    "ConvTailCall",
    "ConvTransposeTail",
    "DESCRIPTORS",
    "EVICTION_POLICIES",
    "KernelDescriptor",
    "LaunchConfig",
    "Model",
    "ModelNew",
    "PoolGeluCall",
    "RowsCall",
    "RowsDescriptor",
    "SCHEMA_VERSION",
    "TableEntry",
    "TableError",
    "TableKey",
    "TableWarning",
    "compile_only_for",
    "current_target",
    "device_name",
    "fused_add_layernorm",
    "fused_add_layernorm_pool_gelu",
    "fused_conv_transpose_tail",
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
