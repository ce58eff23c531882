"""Next-token cross entropy with a loss mask; the objective is a token SUM, normalised by the caller."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..data.batch import Batch, document_starts
from ..models.kernels import MLSTMState
from .metrics import Measured

INTERMEDIATES_PREFIX = "intermediates/"  # measured keys the step logs with intermediates_log_modes


def lm_forward(
    model: eqx.Module,
    inputs: Array,
    resets: Bool[Array, "batch t"],
    state: MLSTMState | None = None,
    *,
    tp_axis: str | None = None,
) -> tuple[Float[Array, "batch t vocab"], MLSTMState]:
    """Logits for every row (vmapped model) and the recurrent state after the last token.

    Inside shard_map: token ids are validated on the global batch by the step functions, not here.
    """
    run = lambda tokens, reset, s: model(tokens, s, reset=reset, tp_axis=tp_axis, check_token_ids=False)  # noqa: E731
    return jax.vmap(run, in_axes=(0, 0, None if state is None else 0))(inputs, resets, state)


def lm_measurements(
    logits: Float[Array, "batch t vocab"], batch: Batch, z_loss: float = 0.0
) -> tuple[Float[Array, ""], dict[str, Measured]]:
    """(Σ over scored tokens of CE [+ z·logsumexp²], {loss, accuracy[, z_loss]} as value/count sums).

    A sum lets the step divide by the GLOBAL token count, so the objective equals the logged token-weighted
    mean across devices and micro-batches.
    """
    mask = batch.loss_mask.astype(logits.dtype)  # float32 (float64 for exact-math runs)
    count = jnp.sum(mask)
    ce_sum = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets) * mask)
    predicted = jnp.argmax(logits, axis=-1).astype(batch.targets.dtype)
    correct = jnp.sum((predicted == batch.targets).astype(mask.dtype) * mask)
    measured = {"loss": Measured(ce_sum, count), "accuracy": Measured(correct, count)}
    objective = ce_sum
    if z_loss:
        z_sum = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * mask)
        objective = objective + z_loss * z_sum
        measured["z_loss"] = Measured(z_sum, count)
    return objective, measured


def lm_loss(
    model: eqx.Module,
    batch: Batch,
    key: PRNGKeyArray,
    *,
    z_loss: float = 0.0,
    tp_axis: str | None = None,
    intermediates: bool = False,
) -> tuple[Float[Array, ""], dict[str, Measured]]:
    """The default loss of the step functions: :func:`lm_measurements` of the model on ``batch``.

    ``key`` is this step's randomness (the xLSTM has no dropout; custom losses with this signature may use it).
    With ``intermediates``, the model's per-block diagnostics are added as ``intermediates/<name>_<block>``
    (averaged over rows).
    """
    del key
    resets = document_starts(batch.segment_ids)
    if not intermediates:
        logits, _ = lm_forward(model, batch.inputs, resets, tp_axis=tp_axis)
        return lm_measurements(logits, batch, z_loss)
    run = lambda t, r: model.forward_with_intermediates(t, reset=r, tp_axis=tp_axis, check_token_ids=False)  # noqa: E731
    logits, _, stats = jax.vmap(run)(batch.inputs, resets)
    objective, measured = lm_measurements(logits, batch, z_loss)
    rows = jnp.asarray(batch.inputs.shape[0], jnp.float32)
    for name, per_row in stats.items():  # per_row: (rows, blocks)
        for block in range(per_row.shape[1]):
            measured[f"{INTERMEDIATES_PREFIX}{name}_{block}"] = Measured(jnp.sum(per_row[:, block]), rows)
    return objective, measured
