"""Host side of the metrics (see ``metrics`` for the data flow): reading, aggregation, perplexity.

Empty metrics (count 0, or no step with count > 0 for ``max``/``std``) read as NaN, with one RuntimeWarning
naming them: 0.0 would be a plausible loss or accuracy and pass unnoticed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax
import numpy as np

from .metrics import (
    PER_EXAMPLE_MODES,
    Accumulator,
    LastAcc,
    LastArrayAcc,
    LogModes,
    MaxAcc,
    MeanAcc,
    ModesSpec,
    StdAcc,
    as_log_modes,
)

HostValue = float | np.ndarray | tuple[np.ndarray, np.ndarray]
HostMetrics = dict[str, HostValue]


def _unwrap(x: np.ndarray) -> float | np.ndarray:
    return float(x.reshape(())) if x.size == 1 else x


def _ratio(value: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, bool]:
    empty = count == 0
    return np.where(empty, np.nan, value / np.where(empty, 1.0, count)), bool(np.any(empty))


def read_accumulator(acc: Accumulator) -> tuple[HostValue, bool]:
    """Host value of one accumulator whose leaves are numpy arrays, and whether it is (partly) empty."""
    if isinstance(acc, MeanAcc):
        value, empty = _ratio(acc.total, acc.count)
    elif isinstance(acc, LastAcc):
        value, empty = _ratio(acc.value, acc.count)
    elif isinstance(acc, MaxAcc):
        none = acc.value == -np.inf
        value, empty = np.where(none, np.nan, acc.value), bool(np.any(none))
    elif isinstance(acc, StdAcc):
        value, empty = _ratio(acc.m2, acc.n)
        value = np.sqrt(np.maximum(value, 0.0))
    elif isinstance(acc, LastArrayAcc):
        value = np.asarray(acc.value)
        return ((value, np.asarray(acc.count)) if acc.with_count else value), False
    else:
        raise TypeError(f"unknown accumulator type {type(acc).__name__}")
    return _unwrap(np.asarray(value, np.float32)), empty


def to_host(metrics: Mapping[str, Accumulator]) -> HostMetrics:
    """Host values of the running metrics, with ONE ``jax.device_get`` of the whole pytree.

    ``mean``/``mean_nopostfix``: total / count; ``single``: v / c of the last step; ``max``; ``std``: population
    std of the per-step averages; size-1 results become Python floats. ``single_noreduce``: the raw value array;
    ``single_noreduce_wcount``: (values, counts). Empty metrics read as NaN (warned about once per call).
    """
    host = jax.device_get(dict(metrics))
    out: HostMetrics = {}
    empty = []
    for key in metrics:  # insertion order (device_get of a dict sorts the keys)
        out[key], is_empty = read_accumulator(host[key])
        if is_empty:
            empty.append(key)
    if empty:
        warnings.warn(f"metrics with nothing accumulated read as NaN: {', '.join(empty)}", RuntimeWarning, stacklevel=2)
    return out


def _noreduce_mode(key: str, modes: LogModes) -> str | None:
    for mode in PER_EXAMPLE_MODES:
        suffix = "_" + mode
        if key.endswith(suffix) and mode in modes.of(key[: -len(suffix)]):
            return mode
    return None


def _concat(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return np.concatenate([np.atleast_1d(old), np.atleast_1d(new)], axis=0)


def aggregate_host(
    aggregated: Mapping[str, HostValue] | None, batch_host: Mapping[str, HostValue], modes: ModesSpec
) -> HostMetrics:
    """Extended evaluation, once per batch: fold this batch's ``to_host`` output into what was collected before.

    ``single_noreduce``: values concatenated on axis 0; ``single_noreduce_wcount``: values and counts
    concatenated; every other key: replaced by the latest value (the running device sums already span all
    batches). Keys only in ``aggregated`` are kept. ``modes`` (the spec used on device) tells which keys are which.
    """
    modes = as_log_modes(modes)
    out: HostMetrics = dict(aggregated or {})
    for key, value in batch_host.items():
        mode = _noreduce_mode(key, modes)
        if key not in out or mode is None:
            out[key] = value
        elif mode == "single_noreduce_wcount":
            (old_values, old_counts), (values, counts) = out[key], value
            out[key] = (_concat(old_values, values), _concat(old_counts, counts))
        else:
            out[key] = _concat(out[key], value)
    return out


def perplexity_key(key: str) -> str | None:
    """Where the perplexity of ``key`` goes, or None: ``loss`` -> ``perplexity``, ``first_loss`` ->
    ``first_perplexity``, ``loss_mean`` -> ``perplexity_mean``, ``eval_loss_single`` -> ``eval_perplexity_single``.

    The base name must be exactly ``loss`` or end in ``_loss`` (``gloss`` is not a loss), and the only suffixes
    are ``_mean`` and ``_single``: exp of ``_std``, ``_max`` or the raw noreduce sums is not a perplexity. The
    z-loss (``z_loss``, ``val_z_loss``: a mean of squared log-normalisers, not a cross entropy) has none.
    """
    for suffix in ("", "_mean", "_single"):
        base = key[: len(key) - len(suffix)]
        is_z_loss = base == "z_loss" or base.endswith("_z_loss")
        if key.endswith(suffix) and (base == "loss" or base.endswith("_loss")) and not is_z_loss:
            return base[: -len("loss")] + "perplexity" + suffix
    return None


def add_perplexity(host: Mapping[str, HostValue]) -> HostMetrics:
    """A copy of ``host`` plus exp(value) for every key ``perplexity_key`` names (exp of the aggregated mean
    loss, not a mean of per-step perplexities). Existing keys are never overwritten."""
    out: HostMetrics = dict(host)
    for key, value in host.items():
        target = perplexity_key(key)
        if target is None or target in host or not isinstance(value, float | np.ndarray):
            continue
        with np.errstate(over="ignore"):
            out[target] = float(np.exp(value)) if isinstance(value, float) else np.exp(value)
    return out
