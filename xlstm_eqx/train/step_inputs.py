"""What every step function does to its inputs around ``shard_map``: batch checks, specs, FSDP gathering."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..data.batch import Batch
from ..parallel import FSDP_AXIS, TP_AXIS, batch_parallel_size, batch_spec


def gather_fsdp(params: Any, specs: Any) -> Any:
    """All-gather every FSDP-sharded leaf over 'fsdp' (inside shard_map)."""

    def gather(x, spec):
        for axis, name in enumerate(spec):
            if name == FSDP_AXIS:
                return lax.all_gather(x, FSDP_AXIS, axis=axis, tiled=True)
        return x

    return jax.tree.map(gather, params, specs, is_leaf=lambda s: isinstance(s, P))


def check_batch(batch: Batch, mesh: Mesh, micro_batches: int = 1) -> None:
    """Clear errors for a batch the mesh (and accumulation) cannot split evenly, or of the wrong kind."""
    if not isinstance(batch, Batch):
        raise TypeError(f"expected an xlstm_eqx.data.Batch, got {type(batch).__name__}")
    rows = batch.inputs.shape[0]
    for name in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
        field = getattr(batch, name)
        if field.ndim != 2 or field.shape != batch.inputs.shape:
            raise ValueError(f"batch.{name} has shape {field.shape}; expected (batch, time) = {batch.inputs.shape}")
    for name in ("inputs", "targets", "segment_ids", "positions"):
        if not jnp.issubdtype(getattr(batch, name).dtype, jnp.integer):
            raise TypeError(f"batch.{name} must hold integers, got {getattr(batch, name).dtype}")
    parallel = batch_parallel_size(mesh)
    if rows % (parallel * micro_batches):
        raise ValueError(
            f"global batch size {rows} is not divisible by data×fsdp = {parallel}"
            + (f" × gradient_accumulate_steps = {micro_batches}" if micro_batches > 1 else "")
        )


def validate_tokens(batch: Batch, static: Any, rows_axes: tuple[str, ...]) -> Batch:
    """Inside ``shard_map``: token ids outside [0, vocab) raise at run time, naming the fields: every input,
    and the targets where ``loss_mask`` is set (an unscored target may be anything, e.g. an ignore index of -100).

    The local count is summed over ``rows_axes`` before the check, so every device raises together. (A check on
    the global batch outside ``shard_map`` runs its callback on one device, and the others then wait for it in
    the next collective until XLA aborts the process.)"""
    vocab = getattr(getattr(static, "config", None), "vocab_size", None)
    if vocab is None:
        return batch
    bad = lambda ids: (ids < 0) | (ids >= vocab)  # noqa: E731
    outside = jnp.sum((bad(batch.inputs) | (bad(batch.targets) & batch.loss_mask.astype(bool))).astype(jnp.int32))
    if rows_axes:
        outside = lax.psum(outside, rows_axes)
    message = f"token id outside [0, vocab_size={vocab}) in batch.inputs, or in batch.targets where loss_mask is set"
    zero = eqx.error_if(jnp.zeros((), jnp.int32), outside > 0, message)
    return eqx.tree_at(lambda b: b.inputs, batch, batch.inputs + zero)  # the dependency keeps the check alive


def batch_specs(batch: Batch, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: batch_spec(x.ndim, mesh), batch)


def tp_axis_of(mesh: Mesh) -> str | None:
    return TP_AXIS if mesh.shape[TP_AXIS] > 1 else None
