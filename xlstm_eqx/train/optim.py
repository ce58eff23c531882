"""Optimizer and learning-rate schedule from an :class:`~xlstm_eqx.config.optim.OptimConfig`, from optax pieces.

Step convention (used everywhere in this package): ``k`` is the optimizer's update count *before* an
update, i.e. 0 for the first update. The update that takes the count from k to k+1 applies the learning
rate ``schedule(k)`` (optax's ``scale_by_schedule`` reads its count, then increments it). So after ``s``
updates the last applied LR is ``learning_rate_at(schedule, s - 1)`` and the next one is
``learning_rate_at(schedule, s)``; :func:`optimizer_step_count` reads ``s`` from an optimizer state.

Schedule phases (W warmup, D decay, C cooldown steps, T total steps, peak = ``learning_rate``,
end = ``end_learning_rate``)::

    k ∈ [0, W)        linear  warmup_init_factor·peak → peak   (value at k is init + (peak − init)·k/W)
    k ∈ [W, W+D)      decay   peak → end   (t = k − W; cosine: end + (peak − end)·(1 + cos(πt/D))/2,
                                            exponential: peak·(end/peak)^(t/D), linear: peak + (end − peak)·t/D)
    k ∈ [W+D, T−C)    stable  end          (the peak for decay 'constant', where D = 0)
    k ∈ [T−C, T)      linear  end → 0      (value end·(T − k)/C)
    k ≥ T             0                     (only when a cooldown is configured; otherwise stable forever)

Each phase reaches its target value exactly at the first step of the next phase. The cooldown needs the
run length: pass ``total_steps`` T (then T ≥ W + D + C is required); without a cooldown it is ignored.

Weight decay: adamw, lion and ademamix decay decoupled, θ ← θ − lr_k·wd·θ (added to the direction before
the −lr scaling, so scaled by the scheduled LR); adam and sgd use coupled L2, adding wd·θ to the clipped
gradient *before* the optimizer, so the decay also passes through Adam's normalisation / SGD's momentum.
Gradient clipping by global norm comes first in every chain (it sees the raw gradient only).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Int

from ..config.optim import OptimConfig
from ..config.parsing import ConfigError
from ..parallel.sharding import dotted_path

__all__ = [
    "build_optimizer",
    "build_schedule",
    "KnownNorm",
    "clip_by_global_norm",
    "learning_rate_at",
    "optimizer_step_count",
    "parameter_path",
    "set_optimizer_step_count",
    "weight_decay_mask",
    "with_standard_promotion",
]


# The dotted path of a pytree key path (``blocks.mlstm_layer.q.weight``, ``layers.0.bias``). Nothing is added for
# sharded arrays (no trailing ``.value``, unlike the original), so anchored patterns behave the same everywhere.
parameter_path = dotted_path


def weight_decay_mask(params: Any, exclude: Sequence[str] = ("norm", "bias", "embedding")) -> Any:
    """A pytree of Python bools shaped like ``params``: True where weight decay applies.

    A leaf is decayed when it is a floating-point array (or ``jax.ShapeDtypeStruct``, so abstract params
    from ``eqx.filter_eval_shape`` work too) and no regex in ``exclude`` is found (``re.search``) in its
    :func:`parameter_path`. ``None`` holes (``eqx.filter`` output) stay holes, so the mask matches
    ``eqx.filter(model, eqx.is_inexact_array)`` structurally.
    """
    patterns = [re.compile(p) for p in exclude]

    def decays(path, leaf) -> bool:
        name = parameter_path(path)
        is_float = eqx.is_inexact_array(leaf) or (
            isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.inexact)
        )
        return bool(is_float) and not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


def _decay_phase(cfg: OptimConfig) -> optax.Schedule:
    peak, end, steps = cfg.learning_rate, cfg.end_learning_rate, cfg.decay_steps
    if cfg.decay == "cosine":
        return optax.cosine_decay_schedule(peak, steps, alpha=cfg.end_lr_factor)
    if cfg.decay == "exponential":  # end_value clamps rounding below `end` at t = D
        return optax.exponential_decay(peak, steps, decay_rate=cfg.end_lr_factor, end_value=end)
    return optax.linear_schedule(peak, end, steps)


def build_schedule(cfg: OptimConfig, total_steps: int | None = None) -> optax.Schedule:
    """The LR schedule ``k ↦ lr`` described in the module docstring (float32 array for an int32 count).

    ``total_steps`` (T) is required when ``cfg.cooldown_steps > 0``; a ConfigError naming
    ``cooldown_steps`` is raised if it is missing or smaller than warmup + decay + cooldown.
    """
    warmup, decay, cooldown = cfg.warmup_steps, cfg.decay_steps, cfg.cooldown_steps
    if total_steps is not None and total_steps < 0:
        raise ConfigError("total_steps", f"must be non-negative, got {total_steps}")
    phases: list[tuple[int, optax.Schedule]] = []  # (first step, schedule of the steps since then)
    if warmup:
        phases.append((0, optax.linear_schedule(cfg.warmup_init_factor * cfg.learning_rate, cfg.learning_rate, warmup)))
    if decay:
        phases.append((warmup, _decay_phase(cfg)))
    phases.append((warmup + decay, optax.constant_schedule(cfg.end_learning_rate)))
    if cooldown:
        if total_steps is None:
            raise ConfigError("cooldown_steps", "a cooldown needs the run length: pass total_steps to the builder")
        if total_steps < warmup + decay + cooldown:
            raise ConfigError(
                "cooldown_steps",
                f"warmup_steps + decay_steps + cooldown_steps = {warmup + decay + cooldown} exceeds "
                f"total_steps = {total_steps}",
            )
        phases.append((total_steps - cooldown, optax.linear_schedule(cfg.end_learning_rate, 0.0, cooldown)))
    joined = optax.join_schedules([fn for _, fn in phases], [start for start, _ in phases[1:]])

    def schedule(count: ArrayLike) -> Array:
        with jax.numpy_dtype_promotion("standard"):  # optax's cosine mixes a Python float with the int count
            return jnp.asarray(joined(count), dtype=jnp.float32)

    return schedule


def learning_rate_at(
    schedule: OptimConfig | Callable[[ArrayLike], ArrayLike], step: ArrayLike, total_steps: int | None = None
) -> Array:
    """The LR that the update at optimizer count ``step`` applies (count before the update; 0 = first update).

    ``schedule`` is a config (built with ``total_steps``) or a schedule from :func:`build_schedule`.
    For the LR of the update just made, pass ``optimizer_step_count(state) - 1``. Works under jit.
    """
    if isinstance(schedule, OptimConfig):
        schedule = build_schedule(schedule, total_steps)
    return jnp.asarray(schedule(step), dtype=jnp.float32)


def build_optimizer(cfg: OptimConfig, total_steps: int | None = None) -> optax.GradientTransformation:
    """``clip_by_global_norm → [coupled L2] → optimizer with the schedule [+ decoupled decay]``.

    The weight-decay mask is computed from the params given to ``init``/``update`` (pass the filtered
    params tree, e.g. ``eqx.filter(model, eqx.is_inexact_array)``; ``update`` needs ``params``).
    ``total_steps`` is forwarded to :func:`build_schedule`.
    """
    schedule = build_schedule(cfg, total_steps)
    wd = cfg.weight_decay
    mask = functools.partial(weight_decay_mask, exclude=cfg.weight_decay_exclude) if wd else None
    chain: list[optax.GradientTransformation] = []
    if cfg.grad_clip_norm is not None:
        chain.append(clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.name == "adamw":
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask))
    elif cfg.name == "lion":
        chain.append(optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=mask))
    elif cfg.name == "ademamix":
        chain.append(
            optax.contrib.ademamix(
                schedule, b1=cfg.b1, b2=cfg.b2, b3=cfg.b3, alpha=cfg.alpha, eps=cfg.eps, weight_decay=wd, mask=mask
            )
        )
    else:  # adam / sgd: coupled L2 on the gradient, before the optimizer sees it
        if wd:
            chain.append(optax.add_decayed_weights(wd, mask))
        if cfg.name == "adam":
            chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        else:
            momentum = cfg.momentum or None  # None: no momentum buffer at all
            chain.append(optax.sgd(schedule, momentum=momentum, nesterov=cfg.nesterov))
    return with_standard_promotion(optax.chain(*chain))


@dataclasses.dataclass(frozen=True)
class KnownNorm:
    """‖tree‖₂ already computed by the caller, vouched for one pytree of arrays (or tracers).

    The train step computes the gradients' global norm outside its NaN-check branch (for the check and the
    ``grad_norm`` metric) and hands it to :func:`clip_by_global_norm` as the extra argument ``known_norm``, so the
    clip need not read every gradient once more (config B bf16: +0.9 to +1% train tokens/s). The norm is used only
    for the very pytree it was computed from (:meth:`norm_of` compares leaves by identity): a wrapper that hands the
    clip different updates, e.g. ``optax.MultiSteps`` its accumulated gradients, makes the clip compute its own."""

    tree: Any
    norm: Array

    def norm_of(self, updates: Any) -> Array | None:
        """The known norm if ``updates`` is the pytree it was computed from, else None."""
        known, given = jax.tree.flatten(self.tree), jax.tree.flatten(updates)
        if known[1] != given[1] or any(a is not b for a, b in zip(known[0], given[0], strict=True)):
            return None
        return self.norm


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm``'s rule, g · min(1, max_norm / ‖g‖), as one scalar multiply per element.

    optax divides every element by the norm instead. XLA:CPU does not repeat a divide in each of its consumers, so
    it wrote the clipped gradients out in a pass of their own before Adam's moments read them; a multiply by one
    scalar fuses into both moment updates (config B's optimizer update alone 38 → 29 ms; inside the bf16 train step,
    where other work overlaps it, the fastest step 11–16 ms faster, the median 0.2–0.3%). The results agree to rounding
    (identical below the threshold; a norm of 0 leaves g as it is; inf or NaN norms give what optax gives), and
    the state is optax's (empty), so checkpoints are interchangeable. ‖g‖ comes from the extra argument
    ``known_norm`` (a :class:`KnownNorm`) when that was computed from these very updates."""

    def update(
        updates: Any, state: optax.EmptyState, params: Any = None, *, known_norm: KnownNorm | None = None, **extra: Any
    ) -> tuple[Any, optax.EmptyState]:
        del params, extra
        norm = None if known_norm is None else known_norm.norm_of(updates)
        if norm is None:
            norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def with_standard_promotion(tx: Any) -> optax.GradientTransformationExtraArgs:
    """``tx`` with init/update traced under standard dtype promotion.

    optax is not written for ``jax_numpy_dtype_promotion="strict"`` (which our tests switch on): Adam's
    bias correction computes ``b1 ** count`` with a Python float and an int32 count, and ``optax.MultiSteps``
    divides float32 by int32. The wrapper scopes standard promotion to optax's internals; the caller's own
    code keeps whatever mode it runs under. Wrap any further optax layer (e.g. ``MultiSteps``) the same way.
    """
    if isinstance(tx, optax.GradientTransformation):  # MultiSteps has init/update but is not one
        tx = optax.with_extra_args_support(tx)

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)


def _is_schedule_state(node: Any) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def optimizer_step_count(opt_state: Any) -> Int[Array, ""]:
    """Updates applied so far = the count ``k`` the next update passes to the schedule.

    Read from the single ``ScaleByScheduleState`` of the chain (other counts, e.g. Adam's bias-correction
    count, are ignored; ``optax.tree_utils.tree_get(state, "count")`` fails because there are several).
    Inside ``optax.MultiSteps`` this counts real (every-k-th) updates, not micro-steps.
    """
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_schedule_state) if _is_schedule_state(n)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one ScaleByScheduleState in the optimizer state, found {len(found)}")
    return found[0].count


def set_optimizer_step_count(opt_state: Any, step: ArrayLike) -> Any:
    """``opt_state`` with the schedule count set to ``step`` (moments and bias-correction counts untouched).

    For resuming from a checkpoint without optimizer state: a fresh state would restart the warmup;
    setting the schedule count to the restored training step keeps the LR on schedule while the
    moment estimates restart with correct bias correction.
    """

    def fresh_count(old: Any) -> Any:
        # Always a new buffer, placed like the old count: with ``jnp.asarray`` the count would share the buffer of
        # ``state.step``, and the train step, which donates its state, would donate that buffer twice.
        new = jnp.array(step, dtype=old.dtype, copy=True)
        traced = isinstance(old, jax.core.Tracer) or isinstance(new, jax.core.Tracer)
        return new if traced or not isinstance(old, jax.Array) else jax.device_put(new, old.sharding)

    def replace(node):
        if _is_schedule_state(node):
            return node._replace(count=fresh_count(node.count))
        return node

    return jax.tree.map(replace, opt_state, is_leaf=_is_schedule_state)
