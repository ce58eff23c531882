"""A model's parameters as a table: path, shape, dtype, size, sharding spec and whether weight decay applies.

Works on concrete parameters and on shapes alike (``eqx.filter_eval_shape`` output), so a configuration can be
inspected before anything is allocated (``xlstm-eqx params --table``); the job writes it to its text log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from ..config.mesh import MeshConfig
from ..config.optim import OptimConfig
from ..parallel.mesh import AXES
from ..parallel.sharding import dotted_path, parameter_spec
from .optim import weight_decay_mask

COLUMNS = ("parameter", "shape", "dtype", "size", "sharding", "decay")


def abstract_mesh(config: MeshConfig) -> AbstractMesh:
    """The mesh a config describes, without devices (``data=-1`` counts as 1: it never splits a parameter)."""
    sizes = (max(config.data, 1), config.fsdp, config.model)
    return AbstractMesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def param_rows(
    params: Any,
    mesh: Mesh | AbstractMesh,
    *,
    fsdp_min_weight_size: int = 2**18,
    optim: OptimConfig = OptimConfig(),
) -> list[dict[str, Any]]:
    """One row per array leaf of ``params`` (arrays or ShapeDtypeStructs), in tree order. ``decay``: whether
    ``optim``'s optimizer decays it (never when its ``weight_decay`` is 0, else unless ``weight_decay_exclude``
    matches it)."""
    decays = jax.tree.leaves(weight_decay_mask(params, optim.weight_decay_exclude))
    decays = decays if optim.weight_decay else [False] * len(decays)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    rows = []
    for (path, leaf), decay in zip(leaves, decays, strict=True):
        name, shape = dotted_path(path), tuple(leaf.shape)
        spec = parameter_spec(name, shape, mesh, fsdp_min_weight_size)
        rows.append({"parameter": name, "shape": shape, "dtype": str(np.dtype(leaf.dtype)),
                     "size": int(np.prod(shape, dtype=np.int64)), "sharding": tuple(spec), "decay": decay})  # fmt: skip
    return rows


def format_param_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as aligned text, with a total line (parameters, and how many of them are weight-decayed)."""
    cells = [COLUMNS] + [
        (r["parameter"], "×".join(map(str, r["shape"])) or "()", r["dtype"], f"{r['size']:,}",
         "(" + ", ".join(str(a) for a in r["sharding"]) + ")", "yes" if r["decay"] else "no")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    total, decayed = sum(r["size"] for r in rows), sum(r["size"] for r in rows if r["decay"])
    return "\n".join([*lines, f"total {total:,} parameters in {len(rows)} arrays, {decayed:,} weight-decayed"])
