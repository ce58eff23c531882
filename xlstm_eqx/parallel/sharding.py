"""PartitionSpecs for parameters, optimizer state and batches, from rules over module paths.

Tensor parallelism (axis ``model``) splits heads and FFN hidden features Megatron-style: the
column-parallel projections (q, k, v, o-gate, gates, FFN up) are split on their output features, the
row-parallel ones (out_proj, FFN down) on their input features, followed by one all-reduce in the model
(``row_parallel``). FSDP (axis ``fsdp``) then splits the largest remaining axis that it divides, for
parameters of at least ``fsdp_min_weight_size`` elements; the stacked-blocks axis is never split.
"""

from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .mesh import FSDP_AXIS, TP_AXIS, batch_axes

# (pattern on the dotted parameter path, axis split over 'model', counted from the end)
TENSOR_PARALLEL_RULES: tuple[tuple[str, int], ...] = (
    (r"mlstm_layer\.(q|k|v|ogate_preact|igate_preact|fgate_preact)\.weight$", -2),
    (r"mlstm_layer\.(q|k|v|ogate_preact|igate_preact|fgate_preact)\.bias$", -1),
    (r"multihead_norm\.norms\.(weight|bias)$", -2),
    (r"mlstm_layer\.out_proj\.weight$", -1),
    (r"ffn\.(proj_up_gate|proj_up)\.weight$", -2),
    (r"ffn\.(proj_up_gate|proj_up)\.bias$", -1),
    (r"ffn\.proj_down\.weight$", -1),
)
STACKED_PREFIX = "blocks."  # leaves under it carry a leading num_blocks axis


def dotted_path(path: tuple) -> str:
    """'blocks.mlstm_layer.q.weight' for a pytree key path (attributes, dict keys and indices joined by ".")."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


def parameter_spec(path: str, shape: tuple[int, ...], mesh: Mesh | AbstractMesh, fsdp_min_weight_size: int) -> P:
    """The PartitionSpec of one parameter (only the mesh's axis sizes matter, so an AbstractMesh will do);
    ValueError names it when 'model' does not divide its split axis."""
    spec: list[Any] = [None] * len(shape)
    tp = mesh.shape[TP_AXIS]
    for pattern, axis in TENSOR_PARALLEL_RULES:
        if re.search(pattern, path):
            if shape[axis] % tp:
                raise ValueError(
                    f"tensor parallelism: {path} has {shape[axis]} features on axis {axis}, not divisible by "
                    f"model={tp} (num_heads and the FFN width must be multiples of the 'model' axis size)"
                )
            if tp > 1:
                spec[axis] = TP_AXIS
            break
    fsdp = mesh.shape[FSDP_AXIS]
    size = 1
    for dim in shape:
        size *= dim
    if fsdp > 1 and size >= fsdp_min_weight_size:
        first = 1 if path.startswith(STACKED_PREFIX) else 0
        candidates = [i for i in range(first, len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if candidates:
            spec[max(candidates, key=lambda i: shape[i])] = FSDP_AXIS
    return P(*spec)


def parameter_specs(params: Any, mesh: Mesh | AbstractMesh, fsdp_min_weight_size: int = 2**18) -> Any:
    """A pytree of PartitionSpecs shaped like ``params`` (arrays or ShapeDtypeStructs; None holes kept)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: parameter_spec(dotted_path(path), tuple(leaf.shape), mesh, fsdp_min_weight_size), params
    )


def optimizer_state_specs(opt_state: Any, params: Any, param_specs: Any) -> Any:
    """Specs for an optax state: a leaf whose path ends with a parameter's path and has its shape is sharded
    like that parameter (Adam's mu/nu, momentum…); everything else (counts, scalars) is replicated."""
    by_path = {
        dotted_path(path): (tuple(leaf.shape), spec)
        for (path, leaf), spec in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_specs, is_leaf=_is_spec)
        )
    }

    def spec_for(path, leaf):
        name = dotted_path(path)
        for param_path, (shape, spec) in by_path.items():
            if (name == param_path or name.endswith("." + param_path)) and tuple(leaf.shape) == shape:
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, opt_state)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpecs → NamedShardings on ``mesh`` (same tree)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def batch_spec(ndim: int, mesh: Mesh) -> P:
    """Batch arrays are split on their leading (batch) axis over data × fsdp (the axes of size > 1, see
    :func:`~.mesh.batch_axes`), replicated over 'model'."""
    return P(batch_axes(mesh) or None, *([None] * (ndim - 1)))
