"""Building the ``('data', 'fsdp', 'model')`` mesh. The only module besides ``sharding`` that knows axis names."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ..config.mesh import MeshConfig

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch is split over these; 'model' ranks see the same rows
TP_AXIS = "model"
FSDP_AXIS = "fsdp"


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with Auto axis types (GSPMD propagation outside shard_map).

    Raises ValueError naming the sizes when the mesh does not fit the devices present, or when (over the default
    devices of a multi-process run) it would leave out every device of some process.
    """
    every_process = devices is None
    devices = list(devices if devices is not None else jax.devices())
    fixed = config.fsdp * config.model
    data = config.data if config.data != -1 else len(devices) // fixed
    shape = (data, config.fsdp, config.model)
    needed = math.prod(shape)
    if data < 1 or needed > len(devices) or (config.data == -1 and len(devices) % fixed):
        raise ValueError(
            f"mesh data={config.data} fsdp={config.fsdp} model={config.model} needs {max(needed, fixed)} devices "
            f"(a multiple of {fixed} for data=-1), but {len(devices)} are present"
        )
    left_out = sorted({d.process_index for d in devices} - {d.process_index for d in devices[:needed]})
    if every_process and left_out:  # their steps would have no devices of the mesh to run on
        raise ValueError(
            f"mesh data={config.data} fsdp={config.fsdp} model={config.model} takes the first {needed} of "
            f"{len(devices)} devices and leaves out every device of process(es) {left_out}; size the mesh to all "
            "devices (data=-1) or start fewer processes"
        )
    grid = np.asarray(devices[:needed], dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def check_mesh_axes(mesh: Mesh) -> Mesh:
    """``mesh``, or ValueError naming the axes missing or unknown: the steps need exactly the axes
    ``('data', 'fsdp', 'model')`` (size 1 where unused), as :func:`make_mesh` builds them."""
    names = tuple(mesh.axis_names)
    missing, unknown = [a for a in AXES if a not in names], [a for a in names if a not in AXES]
    if missing or unknown:
        raise ValueError(
            f"mesh axes {names}: missing {missing}, unknown {unknown}; the steps need a mesh with exactly the axes "
            f"{AXES} (size 1 where unused), e.g. xlstm_eqx.parallel.make_mesh(MeshConfig(data=...))"
        )
    return mesh


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The batch axes (of data, fsdp) that split the batch on ``mesh``: those of size > 1.

    Batch specs and every collective over the batch inside ``shard_map`` name only these. A size-1 axis named
    there would make each replicated parameter's gradient vary over it and be summed by a one-participant
    all-reduce (a full copy of those gradients on XLA:CPU), on one device and on a pure tensor-parallel mesh alike.
    """
    return tuple(axis for axis in BATCH_AXES if mesh.shape[axis] > 1)


def batch_parallel_size(mesh: Mesh) -> int:
    """Number of distinct batch slices: data × fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
