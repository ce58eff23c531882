"""TrainState and ``init``: every array placed with its sharding from the start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int, PRNGKeyArray

from ..parallel import check_mesh_axes, named, optimizer_state_specs, parameter_specs


class TrainState(eqx.Module):
    """Data only: the step counter, the model's arrays, the optimizer state and the base PRNG key.

    The static half of the model and the optimizer are closed over by the step functions. Per-step
    randomness is ``jax.random.fold_in(key, step)``, so a resumed run draws the same numbers.
    """

    step: Int[Array, ""]
    params: Any  # the model with only its arrays (eqx.partition(model, eqx.is_array)[0])
    opt_state: optax.OptState
    key: PRNGKeyArray


def is_array_like(x: Any) -> bool:
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct)


def split_model(model: eqx.Module) -> tuple[Any, Any]:
    """(arrays, static) halves of a model (or of its shapes); ``eqx.combine`` rebuilds it."""
    return eqx.partition(model, is_array_like)


def state_shardings(state_shapes: TrainState, mesh: Mesh, fsdp_min_weight_size: int) -> TrainState:
    """NamedShardings for every leaf of a TrainState (from its shapes)."""
    check_mesh_axes(mesh)
    param_specs = parameter_specs(state_shapes.params, mesh, fsdp_min_weight_size)
    opt_specs = optimizer_state_specs(state_shapes.opt_state, state_shapes.params, param_specs)
    replicated = NamedSharding(mesh, P())
    return eqx.tree_at(  # tree_at, not TrainState(...): the leaves are shardings, not arrays
        lambda s: (s.step, s.params, s.opt_state, s.key),
        state_shapes,
        (replicated, named(mesh, param_specs), named(mesh, opt_specs), replicated),
    )


def _state_builder(
    model: eqx.Module | Callable[..., eqx.Module], tx: optax.GradientTransformation, key: PRNGKeyArray
) -> tuple[Callable[[PRNGKeyArray], eqx.Module], Callable[[PRNGKeyArray], TrainState], PRNGKeyArray]:
    model_key, train_key = jax.random.split(key)
    build = (lambda key: model) if isinstance(model, eqx.Module) else (lambda key: model(key=key))

    def make_state(k: PRNGKeyArray) -> TrainState:
        params, _ = split_model(build(k))
        with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict promotion
            opt_state = tx.init(params)
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state, train_key)

    return build, make_state, model_key


def abstract_state(
    model: eqx.Module | Callable[..., eqx.Module],
    tx: optax.GradientTransformation,
    *,
    key: PRNGKeyArray,
    mesh: Mesh,
    fsdp_min_weight_size: int = 2**18,
) -> tuple[TrainState, Any]:
    """What ``init`` would return, without computing anything: a TrainState of ``jax.ShapeDtypeStruct`` s carrying
    their target shardings on ``mesh`` (a restore target for checkpoints), and the model's static half."""
    build, make_state, model_key = _state_builder(model, tx, key)
    static = split_model(eqx.filter_eval_shape(build, model_key))[1]
    shapes = jax.eval_shape(make_state, model_key)
    shardings = state_shardings(shapes, mesh, fsdp_min_weight_size)
    with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)  # noqa: E731
    return jax.tree.map(with_sharding, shapes, shardings), static


def init(
    model: eqx.Module | Callable[..., eqx.Module],
    tx: optax.GradientTransformation,
    *,
    key: PRNGKeyArray,
    mesh: Mesh,
    fsdp_min_weight_size: int = 2**18,
) -> tuple[TrainState, Any]:
    """A sharded TrainState and the model's static half.

    Pass a builder called as ``model(key=...)`` (e.g. ``functools.partial(xe.models.build, cfg.model)``) to build the
    model under ``jit`` with output shardings, so no unsharded full copy is ever materialised; a built
    model is copied into the sharded layout, so the state never shares a buffer with it (the train step
    donates the state: a shared buffer would delete the caller's model with the first step).
    """
    build, make_state, model_key = _state_builder(model, tx, key)
    static = split_model(eqx.filter_eval_shape(build, model_key))[1]
    shapes = jax.eval_shape(make_state, model_key)
    shardings = state_shardings(shapes, mesh, fsdp_min_weight_size)
    if isinstance(model, eqx.Module):  # device_put would alias replicated leaves to the model's own buffers
        place = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings)
        return place(make_state(model_key)), static
    return jax.jit(make_state, out_shardings=shardings)(model_key), static
