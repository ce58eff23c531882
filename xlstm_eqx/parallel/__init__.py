"""Meshes and shardings: the only package that knows the axis names."""

from .dispatch import collectives_must_not_overlap, one_at_a_time
from .mesh import AXES, BATCH_AXES, FSDP_AXIS, TP_AXIS, batch_axes, batch_parallel_size, check_mesh_axes, make_mesh
from .sharding import batch_spec, dotted_path, named, optimizer_state_specs, parameter_specs

__all__ = [
    "AXES",
    "BATCH_AXES",
    "FSDP_AXIS",
    "TP_AXIS",
    "batch_axes",
    "batch_parallel_size",
    "batch_spec",
    "check_mesh_axes",
    "collectives_must_not_overlap",
    "dotted_path",
    "make_mesh",
    "named",
    "one_at_a_time",
    "optimizer_state_specs",
    "parameter_specs",
]
