"""``recurrent_eval_step``: evaluate sequences of any length in chunks, carrying the recurrent state.

One compiled function per chunk shape: rows are cut into ``chunk_size`` columns, the last chunk is padded
(and masked), so a 65,536-token document costs the memory of one chunk. Document starts are found on the
full rows before cutting, so a chunk border is never mistaken for a new document. Inside a chunk the head and
the measure run on slices of positions (a loop), so the chunk's largest temporary is one slice of logits, not
(rows, chunk, vocab) of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config.train import TrainConfig
from ..data.batch import Batch, document_starts
from ..models.kernels import MLSTMState
from ..parallel import TP_AXIS, batch_axes, batch_spec, check_mesh_axes, one_at_a_time, parameter_specs
from .loss import ChunkMeasure, lm_measure, measure_in_slices
from .metrics import ModesSpec, accumulate, as_eval_log_modes, merge_metrics, reduce_measured
from .state import TrainState
from .step_inputs import batch_specs, gather_fsdp, make_batch_check, tp_axis_of


def _state_spec(mesh: Mesh) -> Any:
    """Model state (rows, blocks, heads, …): rows over data × fsdp, heads over 'model' when it splits them."""
    heads, rows = TP_AXIS if mesh.shape[TP_AXIS] > 1 else None, batch_axes(mesh) or None
    return MLSTMState(C=P(rows, None, heads, None, None), n=P(rows, None, heads, None), m=P(rows, None, heads))


def make_recurrent_eval_step(
    static: Any,
    mesh: Mesh,
    config: TrainConfig = TrainConfig(),
    *,
    chunk_size: int,
    fsdp_min_weight_size: int = 2**18,
    measure: ChunkMeasure | None = None,
    modes: ModesSpec = None,
    logits_slice: int | None = None,
) -> Callable[[TrainState, Batch, Any], Any]:
    """``recurrent_eval_step(state, batch, metrics) -> metrics`` for rows of any length.

    Not jitted itself (a Python loop over chunks); each chunk runs one jitted ``shard_map`` step that takes and
    returns the model's recurrent state, donated between chunks; token ids are checked once per batch, before the
    chunks. Equals :func:`make_eval_step` on the same batch up to rounding. ``measure(logits, piece)`` (default:
    loss and accuracy) gives the ``Measured`` values of a slice of at most ``logits_slice`` positions of a chunk
    (None: the most with rows·slice·vocab ≤ ``LOGITS_SLICE_ELEMENTS`` on each device), logged with ``modes``.
    Values and counts must be sums over positions: they are added across a chunk's slices and across a row's
    chunks, so every mode (``max``, ``std``, per-example ones) treats the batch as one step, as
    :func:`make_eval_step` does. The jitted per-chunk step, without the token check, is the returned function's
    ``chunk_step`` attribute, for inspection.
    """
    check_mesh_axes(mesh)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if logits_slice is not None and logits_slice < 1:
        raise ValueError(f"logits_slice must be ≥ 1 or None, got {logits_slice}")
    tp_axis, rows_axes = tp_axis_of(mesh), batch_axes(mesh)
    modes = as_eval_log_modes(modes)
    state_spec = _state_spec(mesh)
    measure_fn = functools.partial(lm_measure, z_loss=config.z_loss) if measure is None else measure
    zero_state = _zero_state_maker(static, mesh, state_spec)
    prepare, take_chunk = _chunker(mesh, chunk_size)
    check = make_batch_check(static, mesh)

    def local_chunk(params, model_state, chunk, resets, specs):
        model = eqx.combine(gather_fsdp(params, specs), static)
        features, model_state, _ = model.features_batch(
            chunk.inputs, model_state, reset=resets, tp_axis=tp_axis, check_token_ids=False
        )
        measured = measure_in_slices(model.head, measure_fn, features, chunk, logits_slice)
        return model_state, reduce_measured(measured, modes, rows_axes)

    @functools.partial(one_at_a_time, mesh=mesh)
    @functools.partial(jax.jit, donate_argnums=(1,))
    def chunk_step(params, model_state, chunk, resets):
        specs = parameter_specs(params, mesh, fsdp_min_weight_size)
        return jax.shard_map(
            functools.partial(local_chunk, specs=specs),
            mesh=mesh,
            in_specs=(specs, state_spec, batch_specs(chunk, mesh), batch_spec(2, mesh)),
            out_specs=(state_spec, P()),
        )(params, model_state, chunk, resets)

    def recurrent_eval_step(state: TrainState, batch: Batch, metrics: Any = None) -> Any:
        batch = check(batch)
        rows, length = batch.inputs.shape
        batch, resets = prepare(batch)
        model_state, summed = zero_state(rows), None
        for i in range(math.ceil(length / chunk_size)):
            # a host scalar: a device array on this process's default device would need a cross-process transfer
            chunk, chunk_resets = take_chunk((batch, resets), np.int32(i * chunk_size))
            model_state, measured = chunk_step(state.params, model_state, chunk, chunk_resets)
            summed = measured if summed is None else jax.tree.map(jnp.add, summed, measured)
        batch_metrics = accumulate(summed, modes)  # the chunks' sums are one batch's, as eval_step's are
        return batch_metrics if metrics is None else merge_metrics(metrics, batch_metrics)

    recurrent_eval_step.chunk_step = chunk_step
    return recurrent_eval_step


def _chunker(mesh: Mesh, chunk_size: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``prepare(batch) -> (batch, resets)``: the document starts of the whole rows, then every field padded to
    a multiple of ``chunk_size`` (padded columns are unscored and come after every real token);
    ``take_chunk((batch, resets), start)``: the ``chunk_size`` columns from ``start`` (traced). One compiled
    program each per row shape, however many chunks (eager slicing compiled one program per chunk offset)."""
    sharding = NamedSharding(mesh, batch_spec(2, mesh))

    @functools.partial(jax.jit, out_shardings=sharding)
    def prepare(batch: Batch) -> tuple[Batch, jax.Array]:
        pad = -batch.inputs.shape[1] % chunk_size
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)))  # noqa: E731
        return jax.tree.map(widen, batch), widen(document_starts(batch.segment_ids))

    @functools.partial(jax.jit, out_shardings=sharding)
    def take_chunk(tree: Any, start: jax.Array) -> Any:
        return jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, chunk_size, axis=1), tree)

    return prepare, take_chunk


def _zero_state_maker(static: Any, mesh: Mesh, state_spec: Any) -> Callable[[int], Any]:
    """``zero_state(rows)``: the empty recurrent state for ``rows`` sequences, created directly with its sharding
    (one compiled program per row count, kept for the step's lifetime)."""
    empty = static.init_state()  # shapes only: init_state allocates small zeros for one sequence
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_spec, is_leaf=lambda s: isinstance(s, P))

    @functools.partial(jax.jit, static_argnums=0, out_shardings=shardings)
    def zero_state(rows: int) -> Any:
        return jax.tree.map(lambda leaf: jnp.zeros((rows, *leaf.shape), leaf.dtype), empty)

    return zero_state
