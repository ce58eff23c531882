"""Sharded log-likelihood scoring of token requests, for the LM Evaluation Harness adapter.

Requests become rows (:mod:`.rows`), rows become padded batches placed on the mesh (rows over data × fsdp), and
each batch goes through the trainer's own pure step functions with a per-row measure:
:func:`~xlstm_eqx.train.make_eval_step` for fixed windows, or
:func:`~xlstm_eqx.train.recurrent_eval.make_recurrent_eval_step` (chunks of ``chunk_size`` with the recurrent
state carried) for whole documents. Per-row log-likelihood and correct-token counts come back as per-example
metrics (``single_noreduce_wcount``), are concatenated on the host once per batch, and are fused per document.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Float

from ..config.mesh import MeshConfig
from ..config.train import TrainConfig
from ..data.batch import Batch, document_starts
from ..data.loader import BatchIterator
from ..data.pipeline import with_workers
from ..parallel import batch_parallel_size, batch_spec, make_mesh, named, parameter_specs
from ..train.loss import measure_in_slices, target_scores
from ..train.metrics import Measured
from ..train.recurrent_eval import make_recurrent_eval_step
from ..train.state import TrainState, split_model
from ..train.steps import make_eval_step
from .extended import evaluate_extended
from .fusion import fuse_document_results
from .rows import Row, RowBatches, whole_row, window_rows

ROW_MODES = {"loglikelihood": ("single_noreduce_wcount",), "accuracies": ("single_noreduce_wcount",)}


def row_measurements(logits: Float[Array, "batch t vocab"], batch: Batch) -> dict[str, Measured]:
    """Per row: Σ log p(target) over the scored targets, and the number of scored targets that were the most likely
    token (greedy: ``argmax == target``, ties to the lowest id as in lm-eval), each with the row's scored-target
    count."""
    mask = batch.loss_mask.astype(jnp.float32)
    log_likelihood, is_top = target_scores(logits.astype(jnp.float32), batch.targets, ties_to_first=True)
    correct = is_top.astype(jnp.float32)
    count = jnp.sum(mask, axis=-1)
    return {
        "loglikelihood": Measured(jnp.sum(log_likelihood * mask, axis=-1), count),
        "accuracies": Measured(jnp.sum(correct * mask, axis=-1), count),
    }


def row_measure(model: eqx.Module, batch: Batch, key: Any, *, z_loss: float = 0.0, tp_axis: str | None = None):
    """:func:`row_measurements` as a loss function of the step builders (``key`` and ``z_loss`` unused), the head
    run on slices of positions (:func:`~xlstm_eqx.train.loss.measure_in_slices`): a batch of long windows with a
    large vocabulary never holds all its logits."""
    del key, z_loss
    resets = document_starts(batch.segment_ids)
    features, _, _ = model.features_batch(batch.inputs, reset=resets, tp_axis=tp_axis, check_token_ids=False)
    measured = measure_in_slices(model.head, row_measurements, features, batch)
    return -jnp.sum(measured["loglikelihood"].value), measured


def check_rows_split(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """ValueError unless ``batch_size`` rows split evenly over the mesh's data × fsdp devices."""
    parallel = batch_parallel_size(mesh)
    if batch_size % parallel:
        raise ValueError(f"{name} {batch_size} is not divisible by the mesh's data×fsdp = {parallel}")


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    """``window`` inputs per row on the fixed path; ``chunk_size`` on the recurrent one; ``batch_size`` rows per
    batch (a multiple of the mesh's data × fsdp); grain ``worker_count`` processes build batches
    (``worker_buffer_size`` ahead each); ``debug`` scales log-likelihoods by 1e-4 (finite perplexities from a
    random model)."""

    window: int = 2048
    chunk_size: int = 64
    batch_size: int = 8
    worker_count: int = 0
    worker_buffer_size: int = 1
    debug: bool = False


class Scorer:
    """Scores token requests with ``model`` on ``mesh`` (default: one device), sharded like training."""

    def __init__(
        self, model: eqx.Module, settings: ScoringSettings, mesh: Mesh | None = None, fsdp_min_weight_size: int = 2**18
    ):
        for name in ("window", "chunk_size", "batch_size", "worker_buffer_size"):
            if getattr(settings, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(settings, name)}")
        if settings.worker_count < 0:
            raise ValueError(f"worker_count must be ≥ 0, got {settings.worker_count}")
        if mesh is None:
            mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
        check_rows_split(settings.batch_size, mesh)
        params, static = split_model(model)
        self._shardings = named(mesh, parameter_specs(params, mesh, fsdp_min_weight_size))
        self.settings, self.mesh = settings, mesh
        self.state = TrainState(
            jnp.zeros((), jnp.int32), jax.device_put(params, self._shardings), (), jax.random.key(0)
        )
        self.sharding = NamedSharding(mesh, batch_spec(2, mesh))
        self.fixed_step = make_eval_step(
            static, mesh, TrainConfig(), loss_fn=row_measure, modes=ROW_MODES, fsdp_min_weight_size=fsdp_min_weight_size
        )
        self.recurrent_step = make_recurrent_eval_step(
            static, mesh, TrainConfig(), chunk_size=settings.chunk_size, fsdp_min_weight_size=fsdp_min_weight_size,
            measure=row_measurements, modes=ROW_MODES,
        )  # fmt: skip

    def set_params(self, params: Any) -> None:
        """Score with these arrays (same shapes, e.g. a later training state) without recompiling."""
        self.state = eqx.tree_at(lambda s: s.params, self.state, jax.device_put(params, self._shardings))

    def score(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], recurrent: bool
    ) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), is_greedy) per (context, continuation) token pair, in request order.

        ``recurrent``: each request is one row of any length scored in chunks with the state carried; else rows
        of at most ``window`` inputs (:func:`~.rows.window_rows`).
        """
        rows: list[Row] = []
        for index, (context, continuation) in enumerate(requests):
            tokens = [*context, *continuation]
            if recurrent:
                rows.append(whole_row(tokens, len(context), index + 1))
            else:
                rows.extend(window_rows(tokens, len(context), self.settings.window, index + 1))
        if not rows:
            return []
        _check_same_requests(requests)
        settings = self.settings
        source = RowBatches(rows, settings.batch_size, "multiple" if recurrent else "power_of_two",
                            settings.chunk_size if recurrent else settings.window)  # fmt: skip
        step = self.recurrent_step if recurrent else self.fixed_step
        results = evaluate_extended(step, self.state, self._batches(source), ROW_MODES)  # per row, with its document
        fused = fuse_document_results(results)
        if len(fused) != len(requests):
            raise RuntimeError(f"scored {len(fused)} documents for {len(requests)} requests")
        scale = 1e-4 if settings.debug else 1.0
        return [(value * scale, greedy) for value, greedy in fused]

    def _batches(self, source: RowBatches) -> Iterable[Any]:
        settings = self.settings
        dataset = grain.MapDataset.source(source).to_iter_dataset()
        dataset = with_workers(dataset, settings.worker_count, settings.worker_buffer_size)
        # every process builds all rows from the same requests and places its own part (no data exchange)
        return BatchIterator(dataset, indexed=True, sharding=self.sharding, global_rows=True)


def _check_same_requests(requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
    """In a multi-process run every process scores the same requests (each runs the same lm-eval tasks, process
    0's output is the one written): a fingerprint check turns a divergence into an error instead of a hang or
    mixed results."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(repr([(list(c), list(t)) for c, t in requests]).encode()).digest()
    multihost_utils.assert_equal(np.frombuffer(digest, np.uint8), "the processes were given different scoring requests")
