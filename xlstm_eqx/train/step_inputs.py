"""What every step function does to its inputs around ``shard_map``: batch checks, specs, FSDP gathering."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..data.batch import Batch
from ..models.lm import outside_vocab
from ..parallel import FSDP_AXIS, TP_AXIS, batch_axes, batch_parallel_size, batch_spec, one_at_a_time


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
    if batch.inputs.ndim != 2 or 0 in batch.inputs.shape:
        raise ValueError(f"batch.inputs has shape {batch.inputs.shape}; expected (batch, time), both ≥ 1")
    rows = batch.inputs.shape[0]
    for name in ("targets", "loss_mask", "segment_ids", "positions"):
        field = getattr(batch, name)
        if field.shape != batch.inputs.shape:
            raise ValueError(f"batch.{name} has shape {field.shape}; expected batch.inputs' (batch, time) = "
                             f"{batch.inputs.shape}")  # fmt: skip
    for name in ("inputs", "targets", "segment_ids", "positions"):
        if not jnp.issubdtype(getattr(batch, name).dtype, jnp.integer):
            raise TypeError(f"batch.{name} must hold integers, got {getattr(batch, name).dtype}")
    parallel = batch_parallel_size(mesh)
    if rows % (parallel * micro_batches):
        raise ValueError(
            f"global batch size {rows} is not divisible by data×fsdp = {parallel}"
            + (f" × gradient_accumulate_steps = {micro_batches}" if micro_batches > 1 else "")
        )


def make_batch_check(static: Any, mesh: Mesh, micro_batches: int = 1, *, jit: bool = True) -> Callable[[Batch], Batch]:
    """``check(batch) -> batch``, what every step runs on its batch first: :func:`check_batch`'s errors (kind,
    shapes, integer ids, rows splitting over the mesh and ``micro_batches``) at once on the host; then token ids
    outside [0, vocab) raise at run time, naming the fields: every input, and the targets where ``loss_mask`` is
    set (an unscored target may be anything, e.g. an ignore index of -100).

    The token check is a program of its own, run before a step on the batch the step then takes: it needs a host
    callback (``eqx.error_if``), and JAX's persistent compilation cache refuses every program that holds one, so
    the steps stay cacheable only without it. The error is raised by the check's call, or, where that runs
    asynchronously, by the step that takes the checked ``inputs``: a program given an input that failed fails
    as a whole (the step must use ``batch.inputs``, or jit drops the argument). Inside, the count of bad ids is
    summed over the batch axes before the check, so every device raises together. (A check of the global batch
    without ``shard_map`` runs its callback on one device, and the others then wait for it in the next collective
    until XLA aborts the process.) ``jit=False`` (debug mode) checks eagerly; without a ``vocab_size`` only the
    host checks run."""
    vocab = getattr(getattr(static, "config", None), "vocab_size", None)
    if vocab is None:
        tokens_checked = None
    elif jit:  # one jitted function for all steps: every step on this mesh and vocabulary reuses its program
        tokens_checked = one_at_a_time(functools.partial(_check_tokens_jit, vocab=vocab, mesh=mesh), mesh)
    else:
        tokens_checked = functools.partial(check_tokens, vocab=vocab, mesh=mesh)

    def check(batch: Batch) -> Batch:
        check_batch(batch, mesh, micro_batches)
        return batch if tokens_checked is None else tokens_checked(batch)

    return check


def check_tokens(batch: Batch, *, vocab: int, mesh: Mesh) -> Batch:
    """``batch`` with ``inputs`` passed through a check of every device's token ids (see :func:`make_batch_check`)."""
    rows_axes = batch_axes(mesh)
    message = f"token id outside [0, vocab_size={vocab}) in batch.inputs, or in batch.targets where loss_mask is set"

    def local_check(batch: Batch) -> jax.Array:
        scored = batch.loss_mask.astype(bool)
        bad = outside_vocab(batch.inputs, vocab) | (outside_vocab(batch.targets, vocab) & scored)
        outside = jnp.sum(bad.astype(jnp.int32))
        if rows_axes:
            outside = lax.psum(outside, rows_axes)
        zero = eqx.error_if(jnp.zeros((), batch.inputs.dtype), outside > 0, message)
        return batch.inputs + zero  # the step's use of this output is what keeps the check alive

    specs = batch_specs(batch, mesh)
    inputs = jax.shard_map(local_check, mesh=mesh, in_specs=(specs,), out_specs=specs.inputs)(batch)
    return eqx.tree_at(lambda b: b.inputs, batch, inputs)


_check_tokens_jit = jax.jit(check_tokens, static_argnames=("vocab", "mesh"))


def batch_specs(batch: Batch, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: batch_spec(x.ndim, mesh), batch)


def tp_axis_of(mesh: Mesh) -> str | None:
    return TP_AXIS if mesh.shape[TP_AXIS] > 1 else None
