"""Next-token cross entropy with a loss mask; the objective is a token SUM, normalised by the caller."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from ..data.batch import Batch, document_starts
from .metrics import Measured


def lm_loss(
    model: eqx.Module,
    batch: Batch,
    key: PRNGKeyArray,
    *,
    z_loss: float = 0.0,
    tp_axis: str | None = None,
) -> tuple[Float[Array, ""], dict[str, Measured]]:
    """(Σ over scored tokens of CE [+ z·logsumexp²], measurements) for this device's rows (inside shard_map;
    token ids are validated on the global batch by the step functions).

    Returning a sum lets the step divide by the GLOBAL token count, so the objective equals the logged
    token-weighted mean across devices and micro-batches. ``key`` is this step's randomness (the xLSTM
    has no dropout; custom losses with the same signature may use it).
    """
    del key
    resets = document_starts(batch.segment_ids)
    logits, _ = jax.vmap(lambda tokens, reset: model(tokens, reset=reset, tp_axis=tp_axis, check_token_ids=False))(
        batch.inputs, resets
    )
    mask = batch.loss_mask.astype(logits.dtype)  # float32 (float64 for exact-math runs)
    count = jnp.sum(mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
    ce_sum = jnp.sum(ce * mask)
    predicted = jnp.argmax(logits, axis=-1).astype(batch.targets.dtype)
    correct = jnp.sum((predicted == batch.targets).astype(mask.dtype) * mask)
    measured = {"loss": Measured(ce_sum, count), "accuracy": Measured(correct, count)}
    objective = ce_sum
    if z_loss:
        z_sum = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * mask)
        objective = objective + z_loss * z_sum
        measured["z_loss"] = Measured(z_sum, count)
    return objective, measured
