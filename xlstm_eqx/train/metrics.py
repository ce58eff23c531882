"""Metrics as typed pytrees with a pure merge (device side; host side in ``metrics_host``).

Data flow of one step (everything up to ``merge_metrics`` runs inside ``jit(shard_map(...))``)::

    loss fn    -> {name: Measured(value, count)}   per-device sums, e.g. Measured(Σ token CE, #tokens)
    reduce_measured(measured, modes, axis_names)   one psum (+ one all-gather for the noreduce modes)
    accumulate(reduced, modes)                     {output key: accumulator}, e.g. {"loss_mean": MeanAcc}
    merge_metrics(running, step)                   running metrics; same structure and dtypes every step
    -- host, one step late ------------------------------------------------------------------------------
    to_host(running)                               one device_get -> floats / arrays / (values, counts)
    add_perplexity, aggregate_host -> logger;      running = empty_like(running)  (reset, no recompilation)

Modes (names as in xlstm-jax) -> output keys: ``mean`` -> ``<key>_mean`` (Σv/Σc), ``mean_nopostfix`` -> ``<key>``,
``single`` -> ``<key>_single`` (v/c of the last step), ``max``/``std`` -> ``<key>_max``/``<key>_std`` (over the
per-step averages v/c), ``single_noreduce[_wcount]`` -> ``<key>_<mode>`` (last raw values [and counts]). Unknown
modes are errors naming metric and mode. With no modes given the default is ``("mean",)``, as xlstm-jax documents
(its code used ``mean_nopostfix``, its §10.42); evaluation passes ``EVAL_LOG_MODES`` (``loss``, ``accuracy``).

Reduction acts on ``Measured`` before accumulation: ``mean`` is the global token-weighted mean and ``max``/``std``/
``single`` see global per-step averages, not averages of per-device ratios (fixes §10.3); ``max`` starts at -inf
(§10.2); steps with count 0 add nothing to ``max``/``std``. Values and counts are float32 (counts may be weights).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float32, Real

from ..config.train import LOG_MODES, PER_EXAMPLE_MODES

_SUFFIX = {mode: "" if mode == "mean_nopostfix" else "_" + mode for mode in LOG_MODES}


@dataclasses.dataclass(frozen=True, init=False)
class LogModes:
    """Log modes per metric name, with ``default`` for metrics not named in ``per_metric``. Immutable, hashable."""

    per_metric: tuple[tuple[str, tuple[str, ...]], ...]
    default: tuple[str, ...]

    def __init__(
        self, per_metric: Mapping[str, str | Sequence[str]] | None = None, *, default: str | Sequence[str] = ("mean",)
    ):
        object.__setattr__(self, "default", _check_modes("<default>", default))
        per_metric = tuple(sorted((name, _check_modes(name, m)) for name, m in (per_metric or {}).items()))
        object.__setattr__(self, "per_metric", per_metric)

    def of(self, name: str) -> tuple[str, ...]:
        """The modes metric ``name`` is logged with."""
        return dict(self.per_metric).get(name, self.default)

    def override(self, per_metric: Mapping[str, str | Sequence[str]]) -> LogModes:
        """A copy with ``per_metric`` entries added or replaced (e.g. ``{"param_norm": "mean_nopostfix"}``)."""
        return LogModes({**dict(self.per_metric), **per_metric}, default=self.default)


def _check_modes(name: str, modes: str | Sequence[str]) -> tuple[str, ...]:
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    for mode in modes:
        if mode not in LOG_MODES:
            raise ValueError(f"metric {name!r}: unknown log mode {mode!r}; known modes: {', '.join(LOG_MODES)}")
    return modes


TRAIN_LOG_MODES = LogModes(default=("mean",))
EVAL_LOG_MODES = LogModes(default=("mean_nopostfix",))
ModesSpec = LogModes | Mapping[str, str | Sequence[str]] | str | Sequence[str] | None


def as_log_modes(modes: ModesSpec) -> LogModes:
    """None -> ``("mean",)`` for all; mode(s) -> those for all; mapping -> per metric, ``("mean",)`` for the rest."""
    if isinstance(modes, LogModes):
        return modes
    if modes is None or isinstance(modes, Mapping):
        return LogModes(modes)
    return LogModes(default=modes)


def as_eval_log_modes(modes: ModesSpec) -> LogModes:
    """Evaluation's modes: None -> ``mean_nopostfix`` for all; a mapping sets the modes of the metrics it names
    and leaves the rest at ``mean_nopostfix`` (so ``loss`` keeps its name); mode(s) or LogModes as given."""
    if isinstance(modes, Mapping):
        return EVAL_LOG_MODES.override(modes)
    return EVAL_LOG_MODES if modes is None else as_log_modes(modes)


def output_key(name: str, mode: str) -> str:
    """Key of metric ``name`` logged with ``mode``: ``loss_mean``, ``loss`` (mean_nopostfix), ``loss_max``, ..."""
    _check_modes(name, mode)
    return name + _SUFFIX[mode]


class Measured(eqx.Module):
    """One metric, one step, one device: a sum of values and its count (default 1). For the noreduce modes
    ``value`` (and for ``single_noreduce_wcount`` ``count``) may be per-example arrays, batch on axis 0."""

    value: Real[Array, "..."] = eqx.field(converter=jnp.asarray)
    count: Real[Array, "..."] = eqx.field(converter=jnp.asarray, default=1.0)


class Accumulator(eqx.Module):
    """Running state of one output key. ``merge`` folds in a newer accumulator of the same type and shapes."""

    @abc.abstractmethod
    def merge(self, newer: Accumulator) -> Accumulator:
        raise NotImplementedError


class MeanAcc(Accumulator):
    """``mean`` / ``mean_nopostfix``: Σ value and Σ count; reads as total / count."""

    total: Float32[Array, "..."]
    count: Float32[Array, "..."]

    def merge(self, newer: MeanAcc) -> MeanAcc:
        return MeanAcc(self.total + newer.total, self.count + newer.count)


class LastAcc(Accumulator):
    """``single``: the last step's value and count; reads as value / count."""

    value: Float32[Array, "..."]
    count: Float32[Array, "..."]

    def merge(self, newer: LastAcc) -> LastAcc:
        return newer


class MaxAcc(Accumulator):
    """``max``: the largest per-step average value / count; -inf until a step with count > 0 arrives."""

    value: Float32[Array, "..."]

    def merge(self, newer: MaxAcc) -> MaxAcc:
        return MaxAcc(jnp.maximum(self.value, newer.value))


class StdAcc(Accumulator):
    """``std``: number, mean and M2 (Σ squared deviations) of the per-step averages; reads as sqrt(M2 / n).
    Chan et al.'s pairwise merge, not Σx and Σx², whose E[x²] - E[x]² cancels in float32 (loss 3.0 ± 0.01)."""

    n: Float32[Array, "..."]
    mean: Float32[Array, "..."]
    m2: Float32[Array, "..."]

    def merge(self, newer: StdAcc) -> StdAcc:
        n = self.n + newer.n
        share = newer.n / jnp.where(n > 0, n, 1.0)
        delta = newer.mean - self.mean
        return StdAcc(n, self.mean + delta * share, self.m2 + newer.m2 + delta * delta * self.n * share)


class LastArrayAcc(Accumulator):
    """``single_noreduce`` (reads as the raw values) and ``single_noreduce_wcount`` (reads as (values, counts))."""

    value: Float32[Array, "..."]
    count: Float32[Array, "..."]
    with_count: bool = eqx.field(static=True)

    def merge(self, newer: LastArrayAcc) -> LastArrayAcc:
        return newer


Metrics = dict[str, Accumulator]


def _from_step(mode: str, value: Array, count: Array) -> Accumulator:
    if mode in ("mean", "mean_nopostfix"):
        return MeanAcc(value, count)
    if mode == "single":
        return LastAcc(value, count)
    if mode in PER_EXAMPLE_MODES:
        return LastArrayAcc(value, count, with_count=mode == "single_noreduce_wcount")
    has = count > 0  # a step with count 0 adds nothing to max / std
    average = jnp.where(has, value / jnp.where(has, count, 1.0), 0.0)
    if mode == "max":
        return MaxAcc(jnp.where(has, average, -jnp.inf))
    return StdAcc(jnp.broadcast_to(has, average.shape).astype(jnp.float32), average, jnp.zeros_like(average))


def accumulate(measured: Mapping[str, Measured], modes: ModesSpec = None) -> Metrics:
    """The step's accumulators, keyed by output key (one per metric and mode)."""
    modes = as_log_modes(modes)
    out: Metrics = {}
    for name, m in measured.items():
        value, count = m.value.astype(jnp.float32), m.count.astype(jnp.float32)
        for mode in modes.of(name):
            key = output_key(name, mode)
            if key in out:
                raise ValueError(f"metric {name!r} with mode {mode!r}: output key {key!r} is already taken")
            out[key] = _from_step(mode, value, count)
    return out


@jax.jit
def merge_metrics(old: Mapping[str, Accumulator], new: Mapping[str, Accumulator]) -> Metrics:
    """``old`` with ``new`` folded in (pure). Keys present on one side only are kept as they are. Jitted, so that
    a loop folding each step's metrics on the host dispatches one program, not one per accumulator field."""
    out = dict(old)
    for key, acc in new.items():
        if key in out and type(out[key]) is not type(acc):
            raise TypeError(f"metric {key!r}: cannot merge {type(acc).__name__} into {type(out[key]).__name__}")
        out[key] = out[key].merge(acc) if key in out else acc
    return out


def empty_like(metrics: Mapping[str, Accumulator], sharding: jax.sharding.Sharding | None = None) -> Metrics:
    """Reset: zeros (-inf for ``max``), same structure, dtypes, shardings: a jitted step does not recompile. Also
    preallocates from ``jax.eval_shape`` output; ``sharding`` (e.g. ``NamedSharding(mesh, P())``) places them."""

    def fill(leaf, value: float):
        if sharding is None and not isinstance(leaf, jax.ShapeDtypeStruct):
            return jnp.full_like(leaf, value)
        return jnp.full(leaf.shape, value, leaf.dtype, device=sharding or leaf.sharding)

    return {
        k: jax.tree.map(lambda x, a=a: fill(x, -jnp.inf if isinstance(a, MaxAcc) else 0.0), a)
        for k, a in metrics.items()
    }


def _reduction(name: str, modes: tuple[str, ...]) -> str:
    noreduce = [m for m in modes if m in PER_EXAMPLE_MODES]
    if noreduce and len(modes) > 1:
        msg = "is reduced differently; log the per-example values under a second metric name"
        raise ValueError(f"metric {name!r}: mode {noreduce[0]!r} in {modes} {msg}")
    return noreduce[0] if noreduce else "sum"


def _vary(x: Array, axes: tuple[str, ...]) -> Array:
    """Marks ``x`` as device-varying over ``axes`` (a no-op where it already is, and under check_vma=False)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    varying = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
    missing = tuple(a for a in axes if a not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _collective(leaves: list[Array], axes: tuple[str, ...], *, gather: bool) -> list[Array]:
    """ONE psum (or tiled all-gather on axis 0; a 0-d leaf gathers one entry per device) of all leaves."""
    if gather:  # before the early return: with no axes (one device) a 0-d leaf is still one entry per device
        leaves = [x.reshape(1) if x.ndim == 0 else x for x in leaves]
    if not leaves or not axes:
        return leaves
    flat = jnp.concatenate([_vary(x, axes).ravel() for x in leaves])
    if gather:
        rows = jax.lax.all_gather(flat, axes, axis=0, tiled=True, to="invarying").reshape(-1, flat.size)
    else:
        rows = jax.lax.psum(flat, axes)[None]
    out, start = [], 0
    for x in leaves:
        part = rows[:, start : start + x.size]
        out.append(part.reshape(-1, *x.shape[1:]) if gather else part.reshape(x.shape))
        start += x.size
    return out


def _axes(names: str | Sequence[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def reduce_measured(
    measured: Mapping[str, Measured],
    modes: ModesSpec,
    axis_names: str | Sequence[str],
    *,
    batch_axis_names: str | Sequence[str] | None = None,
) -> dict[str, Measured]:
    """Cross-device reduction of one step's ``Measured`` values; call inside ``shard_map`` before ``accumulate``.

    Ordinary modes: value and count psum-ed over ``axis_names`` (one psum for all metrics). ``single_noreduce``:
    values all-gathered (tiled on axis 0, in device order of ``batch_axis_names``), counts psum-ed;
    ``single_noreduce_wcount``: both all-gathered. ``batch_axis_names`` (default: all ``axis_names``) split the
    batch rows; over the other axes (e.g. ``model`` scoring slices of the sequence) per-example values are
    psum-ed first. Every leaf is one contribution per device, even where identical across devices (check_vma
    True or False alike): report norms of replicated parameters after the reduction, with count 1.
    """
    modes = as_log_modes(modes)
    axes = _axes(axis_names)
    batch_axes = axes if batch_axis_names is None else _axes(batch_axis_names)
    if not set(batch_axes) <= set(axes):
        raise ValueError(f"batch_axis_names {batch_axes} must be a subset of axis_names {axes}")
    sum_only_axes = tuple(a for a in axes if a not in batch_axes)
    kinds = {name: _reduction(name, modes.of(name)) for name in measured}
    summed, gathered = [], []
    for name, m in measured.items():
        value, count = m.value.astype(jnp.float32), m.count.astype(jnp.float32)
        (summed if kinds[name] == "sum" else gathered).append(value)
        (gathered if kinds[name] == "single_noreduce_wcount" else summed).append(count)
    summed = iter(_collective(summed, axes, gather=False))
    gathered = iter(_collective(_collective(gathered, sum_only_axes, gather=False), batch_axes, gather=True))
    out = {}
    for name in measured:
        value = next(summed if kinds[name] == "sum" else gathered)
        out[name] = Measured(value, next(gathered if kinds[name] == "single_noreduce_wcount" else summed))
    return out


def merge_micro_batches(stacked: Mapping[str, Measured], modes: ModesSpec) -> dict[str, Measured]:
    """One device's measurements of consecutive micro-batches (leaves stacked on a leading micro-batch axis) as
    one measurement of their whole batch, before :func:`reduce_measured`.

    Values and counts are summed over micro-batches, except the per-example arrays of the noreduce modes, which
    are joined on the batch axis in micro-batch order (rows as in the undivided batch): ``single_noreduce``
    values, and ``single_noreduce_wcount`` values and counts.
    """
    modes = as_log_modes(modes)
    join = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  (micro, rows, ...) -> (micro · rows, ...)
    out = {}
    for name, m in stacked.items():
        kind = _reduction(name, modes.of(name))
        value = m.value.sum(0) if kind == "sum" else join(m.value)
        out[name] = Measured(value, join(m.count) if kind == "single_noreduce_wcount" else m.count.sum(0))
    return out


def __getattr__(name: str):  # the host side, re-exported lazily (metrics_host imports this module)
    if name in ("to_host", "aggregate_host", "add_perplexity", "perplexity_key"):
        return getattr(importlib.import_module(".metrics_host", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
