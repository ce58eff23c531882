"""Iterators of :class:`Batch` / :class:`IndexedBatch` over the grain pipelines of :mod:`.pipeline`."""

from __future__ import annotations

from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from .batch import Batch, IndexedBatch
from .pipeline import INDEX_KEYS, ROW_KEYS, DataConfig, _eod, _Tokenize, eval_dataset, train_dataset


class BatchIterator:
    """Iterates a pipeline as :class:`Batch` (or :class:`IndexedBatch`) of jax arrays, with a resumable state.

    Without ``sharding`` the local rows go to the default device as they are. With a ``sharding`` (e.g.
    ``NamedSharding(mesh, batch_spec(2, mesh))``) each field becomes a global array of ``process_count × local`` rows
    via ``jax.make_array_from_process_local_data``: each process contributes exactly the rows it loaded.
    ``num_batches`` (evaluation) appends all-padding batches (loss_mask False, indices 0) once the data runs out,
    so that every process yields the same number of batches; more real batches than that is an error.
    ``global_rows``: every process loads the whole global batch (the same rows everywhere, e.g. scoring requests
    that all processes know) and places only the rows its devices hold.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        indexed: bool = False,
        sharding: Any = None,
        num_batches: int | None = None,
        padding: dict[str, np.ndarray] | None = None,
        global_rows: bool = False,
    ):
        self.dataset, self.indexed, self.sharding, self.global_rows = dataset, indexed, sharding, global_rows
        self.num_batches, self._padding = num_batches, padding
        self._iterator = iter(dataset)
        self._count = 0

    def __iter__(self) -> BatchIterator:
        return self

    def _array(self, x: np.ndarray) -> jax.Array:
        if self.sharding is None:
            return jnp.asarray(x)
        sharding = self.sharding
        if x.ndim == 1 and len(sharding.spec) > 1:  # per-row index fields: shard the rows only
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
        return jax.make_array_from_process_local_data(sharding, x, x.shape if self.global_rows else None)

    def __next__(self) -> Batch | IndexedBatch:
        try:
            element = next(self._iterator)
        except StopIteration:
            if self.num_batches is None or self._count >= self.num_batches:
                raise
            element = self._padding
        if self.num_batches is not None and self._count >= self.num_batches:
            raise ValueError(f"the pipeline yields more than num_batches={self.num_batches} batches")
        self._count += 1
        batch = Batch(*(self._array(element[key]) for key in ROW_KEYS))
        if self.indexed:
            return IndexedBatch(batch, *(self._array(element[key]) for key in INDEX_KEYS))
        return batch

    def get_state(self) -> dict[str, Any]:
        """A JSON-able dict; ``set_state`` of it resumes with exactly the batches that followed."""
        return {"pipeline": self._iterator.get_state(), "batches": self._count}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state["pipeline"])
        self._count = state["batches"]


def train_batches(
    source: Any, tokenizer: Any, config: DataConfig, eod_id: int | None = None, sharding: Any = None
) -> BatchIterator:
    """:func:`.train_dataset` as an iterator of :class:`Batch` es (see :class:`BatchIterator` for ``sharding``)."""
    return BatchIterator(train_dataset(source, tokenizer, config, eod_id), sharding=sharding)


def eval_batches(
    source: Any,
    tokenizer: Any,
    config: DataConfig,
    eod_id: int | None = None,
    sharding: Any = None,
    num_batches: int | None = None,
) -> BatchIterator:
    """:func:`.eval_dataset` as an iterator of :class:`IndexedBatch` es. With several processes pass
    ``num_batches=eval_num_batches(...)`` so that all of them yield the same number of batches."""
    rows, length = config.local_batch_size, config.seq_len
    padding = {key: np.zeros((rows, length), bool if key == "loss_mask" else np.int32) for key in ROW_KEYS}
    padding.update({key: np.zeros(rows, np.int32) for key in INDEX_KEYS})
    dataset = eval_dataset(source, tokenizer, config, eod_id)
    return BatchIterator(dataset, indexed=True, sharding=sharding, num_batches=num_batches, padding=padding)


def eval_num_batches(source: Any, tokenizer: Any, config: DataConfig, eod_id: int | None = None) -> int:
    """The number of evaluation batches of the busiest process: tokenises the whole source once (in this
    process), so every process can compute it alike without communicating."""
    _eod(tokenizer, eod_id)
    tokenize, rows = _Tokenize(tokenizer), [0] * config.process_count
    for index in range(len(source)):
        n = len(tokenize(source[index]))
        rows[index % config.process_count] += -(-(n + 1) // config.seq_len) if n else 0
    return max(-(-r // config.local_batch_size) for r in rows)
