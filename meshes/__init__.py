"""Meshes, layouts, sharding rules and memory planning: the bottom layer."""

from meshserve.meshes.compile_cache import (
    CompileCounter,
    enable_compilation_cache,
    programs_shared_across_device_groups,
    share_programs_across_device_groups,
)
from meshserve.meshes.devices import default_compute_dtype, set_cpu_device_count
from meshserve.meshes.layout import (
    LAYOUT_KEYS,
    MESH_AXES,
    LayoutError,
    MeshLayout,
    enumerate_layouts,
    make_mesh,
    parse_layout,
    split_slices,
)
from meshserve.meshes.planner import (
    DoesNotFitError,
    MemoryPlan,
    TensorSpec,
    bytes_per_device,
    device_capacity_bytes,
    plan_memory,
)
from meshserve.meshes.rules import ShardingRules, constrain, use_rules

__all__ = [
    "LAYOUT_KEYS",
    "MESH_AXES",
    "CompileCounter",
    "DoesNotFitError",
    "LayoutError",
    "MemoryPlan",
    "MeshLayout",
    "ShardingRules",
    "TensorSpec",
    "bytes_per_device",
    "constrain",
    "default_compute_dtype",
    "device_capacity_bytes",
    "enable_compilation_cache",
    "enumerate_layouts",
    "make_mesh",
    "parse_layout",
    "plan_memory",
    "programs_shared_across_device_groups",
    "set_cpu_device_count",
    "share_programs_across_device_groups",
    "split_slices",
    "use_rules",
]
