"""Extended evaluation: extra metrics from any measurement function, as a hook during training or on a checkpoint.

A *measure* has the signature of :func:`xlstm_eqx.train.loss.lm_loss`:
``measure(model, batch, key, *, z_loss, tp_axis) -> (scalar, {name: Measured})``. The step built from it is the
pure ``eval_step`` (jitted, ``shard_map``-ped, one collective per batch) with the measure's own log modes, so
per-example values (``single_noreduce``, ``single_noreduce_wcount``) are all-gathered in row order on device and
concatenated across batches on the host (:func:`xlstm_eqx.train.metrics_host.aggregate_host`), while the other
modes keep running sums on device. ``finalize`` = the aggregated host metrics plus perplexities.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from ..config.train import TrainConfig
from ..data.batch import IndexedBatch
from ..loop.evaluate import EvalSet, fresh_pass
from ..loop.events import Event, Hook, Log, on
from ..train.metrics import ModesSpec, as_log_modes
from ..train.metrics_host import HostMetrics, add_perplexity, aggregate_host, to_host
from ..train.steps import LossFn, make_eval_step


def make_extended_eval_step(
    static: Any, mesh: Any, measure: LossFn, modes: ModesSpec, config: TrainConfig | None = None, **kwargs: Any
) -> Callable[..., Any]:
    """``step(state, batch, metrics) -> metrics`` for ``measure`` with ``modes`` (see the module docstring)."""
    return make_eval_step(static, mesh, config or TrainConfig(), loss_fn=measure, modes=as_log_modes(modes), **kwargs)


def evaluate_extended(step: Callable[..., Any], state: Any, batches: Iterable[Any], modes: ModesSpec) -> HostMetrics:
    """Runs ``step`` over ``batches`` (one pass) and returns the finalized host metrics: running values for the
    ordinary modes, per-example arrays concatenated in batch order for the noreduce modes, plus perplexities.

    With :class:`~xlstm_eqx.data.batch.IndexedBatch` batches the result also maps every row to its source:
    ``document_idx_single_noreduce`` (from 1; 0 = a padding row) and ``sequence_idx_single_noreduce`` (which
    piece of its document, from 0), in the same global row order as the per-row values."""
    modes = as_log_modes(modes)
    metrics, aggregated, indices = None, None, {"document_idx": [], "sequence_idx": []}
    for batch in batches:
        if isinstance(batch, IndexedBatch):
            for name, rows in (("document_idx", batch.document_index), ("sequence_idx", batch.sequence_index)):
                indices[name].append(np.asarray(multihost_utils.process_allgather(rows, tiled=True)))
            batch = batch.batch
        metrics = step(state, batch, metrics)
        aggregated = aggregate_host(aggregated, to_host(metrics), modes)
    if aggregated is None:
        warnings.warn("extended evaluation got no batches", RuntimeWarning, stacklevel=2)
        return {}
    located = {f"{name}_single_noreduce": np.concatenate(rows) for name, rows in indices.items() if rows}
    return {**add_perplexity(aggregated), **located}


def extended_evaluation_hook(
    step: Callable[..., Any],
    data: EvalSet,
    modes: ModesSpec,
    *,
    prefix: str = "",
    mode: str | None = None,
    kinds: Sequence[str] = ("val_end",),
    summarize: Callable[[HostMetrics], dict[str, Any]] | None = None,
) -> Hook:
    """A hook running the extended evaluation on ``data`` at ``kinds`` events (validation and/or test ends) and
    logging ``prefix + key`` metrics with that evaluation's row (or under ``mode``). ``summarize`` turns the
    host metrics (which may hold per-example arrays) into what is logged; by default the scalar ones."""

    def hook(event: Event) -> list[Log]:
        host = evaluate_extended(step, event.state, fresh_pass(data), modes)
        logged = summarize(host) if summarize is not None else {k: v for k, v in host.items() if isinstance(v, float)}
        return [Log({prefix + key: value for key, value in logged.items()}, mode)]

    return on(kinds, hook)


def evaluate_checkpoint(
    path: str | Path,
    measure: LossFn,
    modes: ModesSpec,
    batches: Callable[[Any], Iterable[Any]],
    *,
    step: int | str = "latest",
    mesh: Any = None,
    devices: list | None = None,
) -> HostMetrics:
    """The extended evaluation of a saved model, standalone: rebuilds it with ``load_from_checkpoint`` (onto
    ``mesh``, default the saved one) and runs ``measure`` over ``batches(loaded)`` (a callable, so the batches
    can be built from the checkpoint's own config and mesh)."""
    from ..loop.restore import load_from_checkpoint
    from ..parallel import make_mesh

    loaded = load_from_checkpoint(path, step, mesh=mesh, devices=devices)
    device_mesh = make_mesh(loaded.config.mesh, devices)
    eval_step = make_extended_eval_step(
        loaded.static, device_mesh, measure, modes, loaded.config.train,
        fsdp_min_weight_size=loaded.config.mesh.fsdp_min_weight_size,
    )  # fmt: skip
    return evaluate_extended(eval_step, loaded.state, batches(loaded), modes)
