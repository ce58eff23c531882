"""The Batch pytree every step function consumes."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


class Batch(eqx.Module):
    """Packed rows of tokens. ``targets[b, t]`` is the token after ``inputs[b, t]``.

    ``loss_mask`` is False on padding and on targets that must not be scored. ``segment_ids`` numbers the
    documents packed into a row (1, 2, …; 0 = padding): a change of id marks a document start, where the
    model's memory is wiped. ``positions`` restart at 0 in every document.
    """

    inputs: Int[Array, "batch t"]
    targets: Int[Array, "batch t"]
    loss_mask: Bool[Array, "batch t"]
    segment_ids: Int[Array, "batch t"]
    positions: Int[Array, "batch t"]

    @classmethod
    def from_tokens(cls, tokens: Int[Array, "batch t1"]) -> Batch:
        """One document per row: inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]``, all scored."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        ones = jnp.ones(inputs.shape, jnp.int32)
        return cls(inputs, targets, jnp.ones(inputs.shape, bool), ones, jnp.cumsum(ones, axis=1) - 1)


def document_starts(segment_ids: Int[Array, "batch t"]) -> Bool[Array, "batch t"]:
    """True where a new document begins inside a row (never at t = 0: the state is fresh there anyway)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), change], axis=1)


class IndexedBatch(eqx.Module):
    """An evaluation batch: ``batch`` plus, per row, which document (``document_index``, numbered from 1; 0 = a
    padding row whose loss_mask is all False) and which piece of it (``sequence_index``, from 0) the row holds."""

    batch: Batch
    document_index: Int[Array, " batch"]
    sequence_index: Int[Array, " batch"]
