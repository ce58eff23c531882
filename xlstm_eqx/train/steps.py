"""The pure step functions: ``train_step`` and ``eval_step``, each ``jit(shard_map(...))`` over the mesh.

Inside ``shard_map`` every device holds its slice of the batch (split over data × fsdp) and its parameter
shards. FSDP-sharded parameters are all-gathered where the model is applied (the transpose of that gather
reduce-scatters their gradients); tensor-parallel ones stay split and the model all-reduces its row-parallel
projections. The optimizer update, norms and the NaN check run outside ``shard_map`` on global arrays, so
global-norm clipping sees the true norm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..config.train import TrainConfig
from ..data.batch import Batch, document_starts
from ..parallel import batch_axes, batch_parallel_size, check_mesh_axes, dotted_path, one_at_a_time, parameter_specs
from .loss import INTERMEDIATES_PREFIX, lm_eval_loss, lm_loss
from .metrics import (
    LogModes,
    Measured,
    ModesSpec,
    accumulate,
    as_eval_log_modes,
    merge_metrics,
    merge_micro_batches,
    reduce_measured,
)
from .optim import KnownNorm
from .state import TrainState
from .step_inputs import batch_specs, gather_fsdp, make_batch_check, tp_axis_of

LossFn = Callable[..., tuple[jax.Array, dict[str, Measured]]]


def _norms(tree: Any, prefix: str, per_param: bool, norm: jax.Array | None = None) -> dict[str, Measured]:
    """Global L2 norm (``norm`` if already computed) and per-parameter norms of a pytree of global arrays, as
    count-1 measurements."""
    one = jnp.ones((), jnp.float32)
    norm = optax.tree.norm(tree) if norm is None else norm
    out = {prefix: Measured(norm.astype(jnp.float32), one)}
    if per_param:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[f"{prefix}_{dotted_path(path)}"] = Measured(jnp.linalg.norm(leaf.ravel()).astype(jnp.float32), one)
    return out


def make_train_step(
    static: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    config: TrainConfig = TrainConfig(),
    *,
    loss_fn: LossFn = lm_loss,
    fsdp_min_weight_size: int = 2**18,
    modes: Mapping[str, str | Sequence[str]] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Any]]:
    """``train_step(state, batch) -> (state, metrics)``: one optimizer update from ``batch``.

    ``static`` is the model's static half (from ``init``). Gradients are of Σ CE / (global token count)
    summed over ``gradient_accumulate_steps`` micro-batches, so accumulation equals one big batch. With
    ``check_for_nan`` a step whose loss or gradients are not finite leaves parameters and optimizer state
    unchanged and reports ``nonfinite`` = 1. The state is donated unless ``donate_train_state`` is off.
    ``tx.update`` gets the gradients' global norm as the extra argument ``known_norm`` (an
    :class:`~xlstm_eqx.train.optim.KnownNorm`, which :func:`~xlstm_eqx.train.optim.clip_by_global_norm` uses): a
    plain ``GradientTransformation`` is wrapped to ignore it, and one with extra-argument support must accept
    keywords it does not use, as optax's own transformations do.

    ``loss_fn(model, batch, key, *, z_loss, tp_axis, [intermediates]) -> (value, {name: Measured})`` must
    measure ``loss`` when ``check_for_nan`` is on. Metrics are logged with ``default_train_log_modes``
    (``intermediates_log_modes`` for the model's diagnostics) except where ``modes`` names a metric's own
    (e.g. ``{"loss": ("mean", "max")}``).

    Token ids outside the vocabulary raise (see :func:`~.step_inputs.make_batch_check`, a program run before
    the update). ``train_step.lower(state, batch)`` lowers the jitted update, which skips that check (absent with
    ``debug``, where nothing is jitted).
    """
    check_mesh_axes(mesh)
    micro_batches = config.gradient_accumulate_steps
    if modes is not None and not isinstance(modes, Mapping):
        raise TypeError(
            f"make_train_step(modes=...) maps metric names to their modes (e.g. {{'loss': ('mean', 'max')}}), got "
            f"{modes!r}; modes for every metric are TrainConfig.default_train_log_modes"
        )
    own_modes = dict(LogModes(modes).per_metric)  # checked here, at build time

    def step_modes(measured: Mapping[str, Measured]) -> dict[str, tuple[str, ...]]:
        fixed = {name: ("mean",) for name in BATCH_STATISTICS if name in measured}
        return {**_train_modes(measured, config), **fixed, **{k: v for k, v in own_modes.items() if k in measured}}

    tp_axis, rows_axes = tp_axis_of(mesh), batch_axes(mesh)

    def local_grads(params, batch, key, specs):
        total = lax.psum(jnp.sum(batch.loss_mask.astype(jnp.float32)), rows_axes)
        denominator = jnp.maximum(total, 1.0)
        device_key = jax.random.fold_in(key, lax.axis_index(rows_axes))

        def grads_of(micro: Batch, index):
            def objective(p):
                model = eqx.combine(gather_fsdp(p, specs), static)
                extra = {"intermediates": True} if config.log_intermediates else {}
                value, measured = loss_fn(
                    model, micro, jax.random.fold_in(device_key, index), z_loss=config.z_loss, tp_axis=tp_axis, **extra
                )
                return lax.psum(value, rows_axes) / denominator.astype(value.dtype), measured

            (_, measured), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return grads, measured

        if micro_batches == 1:
            grads, measured = grads_of(batch, 0)
        else:
            micro = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)
            take = lambda i: jax.tree.map(lambda x: x[i], micro)  # noqa: E731
            grads, first = grads_of(take(0), 0)
            if config.gradient_accumulate_scan:
                # The carry starts from micro-batch 0's real sums (not zeros), so its types, including which
                # mesh axes it varies over inside shard_map, are those of the body's output.

                def body(grads, i):
                    more, measured = grads_of(take(i), i)
                    return jax.tree.map(jnp.add, grads, more), measured

                grads, rest = lax.scan(body, grads, jnp.arange(1, micro_batches))
                stacked = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
            else:
                each = [first]
                for i in range(1, micro_batches):
                    more, measured = grads_of(take(i), i)
                    grads = jax.tree.map(jnp.add, grads, more)
                    each.append(measured)
                stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *each)
            # summed, except per-example values, which are joined in row order
            measured = merge_micro_batches(stacked, step_modes(first))
        if config.check_for_nan and "loss" not in measured:
            raise ValueError(f"train.check_for_nan needs the loss_fn to measure 'loss'; it measured {sorted(measured)}")
        measured = {**batch_statistics(batch, batch_parallel_size(mesh)), **measured}  # a loss_fn's own names win
        return grads, reduce_measured(measured, step_modes(measured), rows_axes)

    update_with_extra_args = optax.with_extra_args_support(tx).update

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Any]:
        specs = parameter_specs(state.params, mesh, fsdp_min_weight_size)
        grads_fn = jax.shard_map(
            functools.partial(local_grads, specs=specs),
            mesh=mesh,
            in_specs=(specs, batch_specs(batch, mesh), P()),
            out_specs=(specs, P()),
        )
        grads, measured = grads_fn(state.params, batch, jax.random.fold_in(state.key, state.step))

        # One read of every gradient for the NaN check, the grad_norm metric and the clip (which finds it as
        # ``known_norm``; a tx without extra-argument support is wrapped to ignore it).
        grad_norm = optax.tree.norm(grads)

        def apply_update(grads, opt_state, params, grad_norm):
            with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
                updates, opt_state = update_with_extra_args(
                    grads, opt_state, params, known_norm=KnownNorm(grads, grad_norm)
                )
            return optax.apply_updates(params, updates), opt_state

        one = jnp.ones((), jnp.float32)
        fixed_modes: dict[str, tuple[str, ...]] = {}
        if config.check_for_nan:
            finite = jnp.isfinite(measured["loss"].value) & jnp.isfinite(grad_norm)
            # A branch, not a select of new against old values: optax computes each parameter's update inline
            # from the old moments, which the moments' own in-place updates overwrite, so a select made XLA copy
            # every moment first (config B bf16: +2.4% train tokens/s for the branch; +4.5% with no check at all).
            skip = lambda grads, opt_state, params, grad_norm: (params, opt_state)  # noqa: E731
            params, opt_state = lax.cond(finite, apply_update, skip, grads, state.opt_state, state.params, grad_norm)
            measured["nonfinite"] = Measured(1.0 - finite.astype(jnp.float32), one)
            fixed_modes["nonfinite"] = ("max",)
        else:
            params, opt_state = apply_update(grads, state.opt_state, state.params, grad_norm)
        if config.log_grad_norm:
            measured.update(_norms(grads, "grad_norm", config.log_grad_norm_per_param, grad_norm))
        if config.log_param_norm:
            param_norms = _norms(params, "param_norm", config.log_param_norm_per_param)
            measured.update(param_norms)
            fixed_modes.update({name: ("mean_nopostfix",) for name in param_norms})
        metrics = accumulate(measured, {**step_modes(measured), **fixed_modes})
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    check = make_batch_check(static, mesh, micro_batches, jit=not config.debug)
    program = (
        train_step
        if config.debug
        else one_at_a_time(jax.jit(train_step, donate_argnums=(0,) if config.donate_train_state else ()), mesh)
    )

    def checked_train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Any]:
        if _donated(state):
            raise ValueError(
                "train_step(state, ...): this state was donated to an earlier train_step call, which freed its "
                "buffers; pass the state that call returned (or set TrainConfig.donate_train_state=False)"
            )
        return program(state, check(batch))

    if not config.debug:
        checked_train_step.lower = program.lower
    return checked_train_step


def _fingerprint(tokens: jax.Array) -> jax.Array:
    """A uint32 hash of a block of token ids (position-weighted, wrapping): what an evaluation batch folds into
    its key, so that batches draw different numbers without the step being told their index."""
    weights = jnp.arange(tokens.size, dtype=jnp.uint32).reshape(tokens.shape) * jnp.uint32(2654435761) + 1
    return jnp.sum(tokens.astype(jnp.uint32) * weights, dtype=jnp.uint32)


def _donated(state: TrainState) -> bool:
    """Whether ``state`` went into a donating step already. Donation frees every buffer of the state at once, so
    its step counter tells; reusing it would make XLA:CPU read freed memory (a segfault on multi-device meshes)."""
    step = state.step
    return isinstance(step, jax.Array) and not isinstance(step, jax.core.Tracer) and step.is_deleted()


BATCH_STATISTICS = ("token_utilization", "tokens_per_batch", "documents_per_batch")


def batch_statistics(batch: Batch, shards: int) -> dict[str, Measured]:
    """The train step's batch statistics, logged with mode ``mean`` (``<name>_mean``): ``token_utilization``
    (scored targets ÷ positions), ``tokens_per_batch`` (scored targets) and ``documents_per_batch`` (documents
    in the rows, a document split over rows counted in each) of one optimizer step's global batch. Each device
    measures its rows with count ``1 / shards`` (``shards`` = data × fsdp), so the sum over devices counts one
    step, whatever the mesh."""
    scored = jnp.sum(batch.loss_mask.astype(jnp.float32))
    segments = batch.segment_ids
    first = jnp.arange(segments.shape[1]) == 0  # every row's first position starts a document (or padding)
    starts = (segments > 0) & (document_starts(segments) | first)
    per_step = jnp.asarray(1.0 / shards, jnp.float32)
    return {
        "token_utilization": Measured(scored, jnp.asarray(segments.size, jnp.float32)),
        "tokens_per_batch": Measured(scored, per_step),
        "documents_per_batch": Measured(jnp.sum(starts.astype(jnp.float32)), per_step),
    }


def _train_modes(measured: dict, config: TrainConfig) -> dict[str, tuple[str, ...]]:
    """default_train_log_modes, and intermediates_log_modes for the model's diagnostics."""
    return {
        name: config.intermediates_log_modes
        if name.startswith(INTERMEDIATES_PREFIX)
        else config.default_train_log_modes
        for name in measured
    }


def make_eval_step(
    static: Any,
    mesh: Mesh,
    config: TrainConfig = TrainConfig(),
    *,
    loss_fn: LossFn = lm_eval_loss,
    fsdp_min_weight_size: int = 2**18,
    modes: ModesSpec = None,
) -> Callable[[TrainState, Batch, Any], Any]:
    """``eval_step(state, batch, metrics) -> metrics``: folds one batch's loss/accuracy into ``metrics``
    (None starts fresh). Metric names carry no postfix (mode ``mean_nopostfix``) unless ``modes`` says otherwise:
    a mapping sets the modes of the metrics it names (e.g. ``single_noreduce`` for per-example values, see
    :mod:`xlstm_eqx.eval.extended`), a mode or sequence of modes applies to all; randomness, if the
    loss uses any, comes from ``seed_eval`` and the batch's tokens, so evaluation is reproducible and every
    batch draws its own numbers. The default ``loss_fn``,
    :func:`~.loss.lm_eval_loss`, measures what :func:`~.loss.lm_loss` does with the head run on slices of
    positions, so evaluation memory does not grow with rows × time × vocab.

    ``eval_step.batch_step(params, batch) -> metrics`` is the jitted program of one batch (e.g. for ``.lower``),
    without the batch check that ``eval_step`` runs first;
    ``eval_step`` folds its result into ``metrics`` with the jitted :func:`~.metrics.merge_metrics`."""
    check_mesh_axes(mesh)
    tp_axis, rows_axes = tp_axis_of(mesh), batch_axes(mesh)
    eval_modes = as_eval_log_modes(modes)

    def local_eval(params, batch, specs):
        model = eqx.combine(gather_fsdp(params, specs), static)
        key = jax.random.fold_in(jax.random.key(config.seed_eval), _fingerprint(batch.inputs))
        key = jax.random.fold_in(key, lax.axis_index(rows_axes))
        _, measured = loss_fn(model, batch, key, z_loss=config.z_loss, tp_axis=tp_axis)
        return reduce_measured(measured, eval_modes, rows_axes)

    def batch_metrics(params: Any, batch: Batch) -> Any:
        specs = parameter_specs(params, mesh, fsdp_min_weight_size)
        measured = jax.shard_map(
            functools.partial(local_eval, specs=specs),
            mesh=mesh,
            in_specs=(specs, batch_specs(batch, mesh)),
            out_specs=P(),
        )(params, batch)
        return accumulate(measured, eval_modes)

    # One program per batch shape: it sees neither the running metrics (absent on a set's first batch) nor the
    # optimizer state (absent in a restored test state), so neither recompiles it; the fold is a small program.
    batch_step = batch_metrics if config.debug else one_at_a_time(jax.jit(batch_metrics), mesh)
    check = make_batch_check(static, mesh, jit=not config.debug)

    def eval_step(state: TrainState, batch: Batch, metrics: Any = None) -> Any:
        new = batch_step(state.params, check(batch))
        return new if metrics is None else merge_metrics(metrics, new)

    eval_step.batch_step = batch_step
    return eval_step
